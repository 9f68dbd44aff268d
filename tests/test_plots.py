"""plots.py: the pictures and report.html of run folders written in the trainer's exact formats."""

import base64
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest
from run_fixtures import LAST_EVAL, MARKUP_COMPLETION, write_run

import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")
DPO_PICTURES = {"loss", "reward_accuracy", "reward_margins", "rewards", "logps", "grad_norm", "lr"}
SFT_PICTURES = {"loss", "logps", "grad_norm"}  # no rewards in SFT, and this run never logged lr


class PageReader(HTMLParser):
    """The parts of a page the tests check: tags opened, image sources, link targets and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.image_sources: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.image_sources += [value for name, value in attrs if tag == "img" and name == "src"]
        self.links += [value for name, value in attrs if name == "href"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def read_page(path: Path) -> PageReader:
    reader = PageReader()
    reader.feed(path.read_text(encoding="utf-8"))
    reader.close()
    return reader


def assert_png(data: bytes, path: Path) -> None:
    assert data.startswith(PNG_MAGIC), path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 200 and pixels.shape[1] >= 400, (path, pixels.shape)
    assert pixels.std() > 0.05, f"{path} is blank"


def no_temporary_files(folder: Path) -> bool:
    return not [path for path in folder.rglob("*") if path.name.startswith(".") or path.suffix == ".tmp"]


@pytest.fixture
def dpo_run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "dpo_2026-12-01_16-36-48", "dpo", with_lr=True)


@pytest.fixture
def sft_run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "sft_2026-12-01_16-30-02", "sft")


def test_run_report_writes_a_png_per_logged_metric_and_the_report_last(dpo_run: Path) -> None:
    written = plots.write_run_report(dpo_run)
    assert written[-1] == dpo_run / "report.html"
    assert {path.stem for path in written[:-1]} == DPO_PICTURES
    for path in written[:-1]:
        assert path.parent == dpo_run / "plots"
        assert_png(path.read_bytes(), path)
    assert no_temporary_files(dpo_run)


def test_metrics_never_logged_are_skipped(sft_run: Path) -> None:
    written = plots.write_run_report(sft_run)
    assert {path.stem for path in written[:-1]} == SFT_PICTURES
    assert sorted(path.name for path in (sft_run / "plots").iterdir()) == sorted(f"{n}.png" for n in SFT_PICTURES)


def test_report_is_self_contained_html_with_config_last_eval_and_escaped_samples(dpo_run: Path) -> None:
    written = plots.write_run_report(dpo_run)
    page = read_page(dpo_run / "report.html")
    assert page.tags[:1] == ["html"] and "table" in page.tags
    # every picture inline, byte for byte the PNG written beside it; nothing fetched from elsewhere
    prefix = "data:image/png;base64,"
    assert all(source.startswith(prefix) for source in page.image_sources)
    inline = sorted(base64.b64decode(source.removeprefix(prefix)) for source in page.image_sources)
    assert inline == sorted(path.read_bytes() for path in written[:-1])
    assert page.links == [] and "script" not in page.tags and "link" not in page.tags
    text = "".join(page.text)
    assert "beta: 0.1" in text and "exp_name: dpo" in text  # the resolved config
    for key, value in LAST_EVAL["dpo"].items():
        assert key in text and f"{value:.4g}" in text
    assert "after 192 examples, 6 optimizer steps" in text
    # samples from the newest file by number (192 > 96, though "96" sorts after "192" as text), escaped
    assert "examples-192.jsonl" in text and "after 192 examples." in text and "after 96 examples." not in text
    assert MARKUP_COMPLETION in text and "b" not in page.tags
    assert " The largest is 2." in text  # the reference column


def test_report_before_the_first_training_step(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "dpo", "dpo")
    first_line = (run_dir / "metrics.jsonl").read_text().splitlines()[0]
    (run_dir / "metrics.jsonl").write_text(first_line + "\n")  # the first eval, as the trainer calls it
    written = plots.write_run_report(run_dir)
    assert {path.stem for path in written[:-1]} == {"loss", "reward_accuracy", "reward_margins", "rewards", "logps"}
    assert "after 0 examples, 0 optimizer steps" in "".join(read_page(run_dir / "report.html").text)


def test_torn_last_line_is_left_out_and_a_bad_line_is_reported(dpo_run: Path) -> None:
    metrics = dpo_run / "metrics.jsonl"
    complete = plots.read_metrics(dpo_run)
    with open(metrics, "a") as file:
        file.write('{"counters/examples": 224, "loss/tr')  # the trainer mid-append
    assert plots.read_metrics(dpo_run) == complete
    metrics.write_text(metrics.read_text() + "\n")
    with pytest.raises(ValueError, match=rf"{metrics}:{len(complete) + 1} is not valid JSON"):
        plots.read_metrics(dpo_run)


def test_a_folder_without_metrics_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no metrics.jsonl in {tmp_path}"):
        plots.write_run_report(tmp_path)


def test_overlay_draws_every_run_on_one_picture_set(sft_run: Path, dpo_run: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "compare"
    written = plots.overlay_runs([sft_run, dpo_run], out_dir)
    assert {path.stem for path in written} == DPO_PICTURES  # a picture as soon as one run logged its metrics
    assert sorted(out_dir.iterdir()) == sorted(written)
    for path in written:
        assert_png(path.read_bytes(), path)
    # the legend of a shared metric names both runs' curves, of a DPO-only one only the DPO run
    runs = [(sft_run.name, plots.read_metrics(sft_run)), (dpo_run.name, plots.read_metrics(dpo_run))]
    pictures = {picture.name: picture for picture in plots.PICTURES}
    loss_labels = plots.draw_picture(pictures["loss"], runs, by_run=True).axes[0].get_legend_handles_labels()[1]
    assert loss_labels == [
        f"{sft_run.name}: train",
        f"{sft_run.name}: eval",
        f"{dpo_run.name}: train",
        f"{dpo_run.name}: eval",
    ]
    margin_labels = (
        plots.draw_picture(pictures["reward_margins"], runs, by_run=True).axes[0].get_legend_handles_labels()[1]
    )
    assert margin_labels == [f"{dpo_run.name}: train", f"{dpo_run.name}: eval"]


def test_final_metrics_table_puts_runs_side_by_side(sft_run: Path, dpo_run: Path) -> None:
    lines = plots.final_metrics_table([sft_run, dpo_run]).splitlines()
    assert lines[0] == f"| metric | {sft_run.name} | {dpo_run.name} |"
    assert lines[1] == "|---|---:|---:|"
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines[2:]}
    assert rows["counters/examples"] == "| counters/examples | 192 | 192 |"
    assert rows["loss/eval"] == "| loss/eval | 0.1127 | 0.4585 |"
    assert rows["rewards_eval/accuracies"] == "| rewards_eval/accuracies |  | 0.8125 |"  # SFT has no rewards


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.html"
    plots.write_atomically(target, b"old")

    def failing_replace(source: str, destination: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        plots.write_atomically(target, b"new")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_plot_runs_script_reports_one_run_and_overlays_several(sft_run: Path, dpo_run: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "plot_runs.py"
    one = subprocess.run([sys.executable, str(script), str(dpo_run)], capture_output=True, text=True, check=True)
    assert f"report: {dpo_run / 'report.html'}" in one.stdout and (dpo_run / "report.html").is_file()
    both = subprocess.run([sys.executable, str(script), str(sft_run), str(dpo_run)], capture_output=True, text=True)
    assert both.returncode == 0, both.stderr
    assert f"| metric | {sft_run.name} | {dpo_run.name} |" in both.stdout
    assert str(sft_run / "compare-plots") in both.stdout and (sft_run / "compare-plots" / "loss.png").is_file()
    missing = subprocess.run(
        [sys.executable, str(script), str(dpo_run), "/nonexistent"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "/nonexistent" in missing.stderr


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)
def test_report_renders_in_a_headless_browser(dpo_run: Path, tmp_path: Path) -> None:
    plots.write_run_report(dpo_run)
    screenshot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    flags += [f"--screenshot={screenshot}", "--window-size=1200,1600"]
    subprocess.run(
        [str(CHROMIUM), *flags, (dpo_run / "report.html").as_uri()], capture_output=True, timeout=120, check=True
    )
    assert_png(screenshot.read_bytes(), screenshot)
    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (1600, 1200)
    # the pictures drew: a fair share of the page is not white background
    assert (pixels[..., :3].min(axis=2) < 0.9).mean() > 0.05

"""Pictures and an HTML report of a run folder, from its files (metrics.jsonl, config.yaml, samples/).

    write_run_report(run_dir)          # run_dir/plots/*.png and run_dir/report.html
    overlay_runs(run_dirs, out_dir)    # the same pictures with several runs' curves overlaid
    final_metrics_table(run_dirs)      # Markdown: each run's last eval metrics side by side

Every picture plots metrics.jsonl values against `counters/examples`; a metric the run never
logged (rewards in an SFT run, the learning rate before the trainer logs it) leaves its picture
out. Only the run's files are read, so this works the same on a run in progress, a finished one,
or one copied from another machine, and report.html opens in a browser with nothing else: its
pictures are inline. Drawing uses matplotlib's object API on the Agg canvas (no pyplot state, no
display), so the trainer can call it at every evaluation.
"""

import base64
import html
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
MARGINS_DIR = "margins"  # the trainer's eval reward margins (run_log.write_margins)
PLOTS_DIR = "plots"
REPORT_FILE = "report.html"
EXAMPLES_KEY = "counters/examples"
UPDATES_KEY = "counters/updates"
N_REPORT_SAMPLES = 4
FIGURE_INCHES, FIGURE_DPI = (6.4, 3.6), 100  # 640 x 360 pixels: two side by side fill a laptop screen
LINE_STYLES = ("-", "--", ":", "-.")  # by a series' place in its picture, so overlaid runs keep them apart


@dataclass(frozen=True)
class Series:
    """One metric drawn as one line: its metrics.jsonl key, its legend label, its colour in a one-run picture."""

    key: str
    label: str
    color: str = "C0"

    @property
    def is_eval(self) -> bool:
        return is_eval_key(self.key)


@dataclass(frozen=True)
class Picture:
    """One PNG: its file stem, title, y-axis label and the series drawn on it."""

    name: str
    title: str
    y_label: str
    series: tuple[Series, ...]
    y_limits: tuple[float, float] | None = None


PICTURES = (
    Picture("loss", "Loss", "loss", (Series("loss/train", "train"), Series("loss/eval", "eval"))),
    Picture(
        "reward_accuracy",
        "Reward accuracy (share of pairs with chosen reward > rejected)",
        "accuracy",
        (Series("rewards_train/accuracies", "train"), Series("rewards_eval/accuracies", "eval")),
        y_limits=(-0.02, 1.02),
    ),
    Picture(
        "reward_margins",
        "Reward margin (chosen - rejected)",
        "margin",
        (Series("rewards_train/margins", "train"), Series("rewards_eval/margins", "eval")),
    ),
    Picture(
        "rewards",
        "Implicit rewards of the chosen and rejected responses",
        "reward",
        (
            Series("rewards_train/chosen", "chosen, train", "C2"),
            Series("rewards_eval/chosen", "chosen, eval", "C2"),
            Series("rewards_train/rejected", "rejected, train", "C3"),
            Series("rewards_eval/rejected", "rejected, eval", "C3"),
        ),
    ),
    Picture(
        "logps",
        "Policy log-probabilities of the chosen and rejected responses",
        "log-probability",
        (
            Series("logps_train/chosen", "chosen, train", "C2"),
            Series("logps_eval/chosen", "chosen, eval", "C2"),
            Series("logps_train/rejected", "rejected, train", "C3"),
            Series("logps_eval/rejected", "rejected, eval", "C3"),
        ),
    ),
    Picture(
        "kto_rewards",
        "KTO: implicit rewards of the desirable and undesirable completions",
        "reward",
        (
            Series("rewards_train/desirable", "desirable, train", "C2"),
            Series("rewards_eval/desirable", "desirable, eval", "C2"),
            Series("rewards_train/undesirable", "undesirable, train", "C3"),
            Series("rewards_eval/undesirable", "undesirable, eval", "C3"),
        ),
    ),
    Picture(
        "kto_logps",
        "KTO: policy log-probabilities of the desirable and undesirable completions",
        "log-probability",
        (
            Series("logps_train/desirable", "desirable, train", "C2"),
            Series("logps_eval/desirable", "desirable, eval", "C2"),
            Series("logps_train/undesirable", "undesirable, train", "C3"),
            Series("logps_eval/undesirable", "undesirable, eval", "C3"),
        ),
    ),
    Picture(
        "kl_estimate",
        "KTO: the batch's KL estimate z0 (mismatched completions)",
        "nats",
        (Series("kl/train", "train", "C1"), Series("kl/eval", "eval", "C1")),
    ),
    Picture(
        "displacement",
        "Likelihood displacement: share of pairs whose chosen response fell below the reference",
        "share of pairs",
        (
            Series("displacement_train/chosen_below_reference", "train", "C3"),
            Series("displacement_eval/chosen_below_reference", "eval", "C3"),
        ),
        y_limits=(-0.02, 1.02),
    ),
    Picture(
        "margin_length_correlation",
        "Correlation of reward margin with length gap (chosen minus rejected tokens)",
        "Pearson r",
        (
            Series("rewards_train/margin_length_correlation", "train", "C4"),
            Series("rewards_eval/margin_length_correlation", "eval", "C4"),
        ),
        y_limits=(-1.02, 1.02),
    ),
    Picture("grad_norm", "Gradient norm before clipping", "norm", (Series("grad_norm", "train", "C1"),)),
    Picture("lr", "Learning rate", "learning rate", (Series("lr", "train", "C4"),)),
)


def write_run_report(run_dir: Path) -> list[Path]:
    """Write run_dir/plots/<picture>.png for each metric the run logged, then run_dir/report.html.

    Returns the written paths, the report last. Raises FileNotFoundError if run_dir has no metrics.jsonl.
    """
    records = read_metrics(run_dir)
    written, pngs = [], []
    for picture in PICTURES:
        figure = draw_picture(picture, [(run_dir.name, records)], by_run=False)
        if figure is not None:
            png = png_bytes(figure)
            written.append(write_atomically(run_dir / PLOTS_DIR / f"{picture.name}.png", png))
            pngs.append((picture, png))
    margins_file = newest_margins_file(run_dir)
    if margins_file is not None:
        picture, figure = draw_margin_histogram(margins_file)
        png = png_bytes(figure)
        written.append(write_atomically(run_dir / PLOTS_DIR / f"{picture.name}.png", png))
        pngs.append((picture, png))
    written.append(write_atomically(run_dir / REPORT_FILE, report_html(run_dir, records, pngs).encode()))
    return written


def newest_margins_file(run_dir: Path) -> Path | None:
    """margins/examples-<N>.json of the latest evaluation (the trainer writes one per evaluation), or None."""
    files = list((run_dir / MARGINS_DIR).glob("examples-*.json"))
    return max(files, key=lambda path: int(path.stem.removeprefix("examples-")), default=None)


def draw_margin_histogram(margins_file: Path) -> tuple[Picture, Figure]:
    """The eval pairs' reward margins at one evaluation: how many pairs the model separates, and by how much."""
    margins = json.loads(margins_file.read_text())
    examples = margins_file.stem.removeprefix("examples-")
    picture = Picture("margin_histogram", f"Reward margins of the eval pairs after {examples} examples", "pairs", ())
    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(margins, bins=min(50, max(5, len(margins) // 10)), color="C0")
    axes.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
    below = sum(m <= 0 for m in margins)
    axes.set(title=picture.title, xlabel=f"chosen - rejected reward ({below} of {len(margins)} pairs at or below 0)",
             ylabel=picture.y_label)  # fmt: skip
    figure.subplots_adjust(left=0.11, right=0.98, bottom=0.15, top=0.9)
    return picture, figure


def overlay_runs(run_dirs: Sequence[Path], out_dir: Path) -> list[Path]:
    """Write out_dir/<picture>.png with every run's curves on one axes (legend: the run folder's name)."""
    runs = [(label, read_metrics(run_dir)) for label, run_dir in zip(run_labels(run_dirs), run_dirs)]
    written = []
    for picture in PICTURES:
        figure = draw_picture(picture, runs, by_run=True)
        if figure is not None:
            written.append(write_atomically(out_dir / f"{picture.name}.png", png_bytes(figure)))
    return written


def final_metrics_table(run_dirs: Sequence[Path]) -> str:
    """A Markdown table of each run's last eval metrics, one column per run; a metric a run lacks is blank."""
    finals = [last_eval(read_metrics(run_dir)) or {} for run_dir in run_dirs]
    keys = sorted({key for final in finals for key in final}, key=lambda key: (not key.startswith("counters/"), key))
    labels = [label.replace("|", "\\|") for label in run_labels(run_dirs)]
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for key in keys:
        cells = [format_value(final[key]) if key in final else "" for final in finals]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records, in logged order."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {METRICS_FILE} in {run_dir}: pass a run folder (train.py prints it as 'run folder: ...')"
        )
    return read_jsonl(path)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a file, one per line.

    A torn last line (read while its writer was appending) is left out; any other line that is
    not a JSON object is an error naming the file and line.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it yet: the writer has not finished this line
                break
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}); fix or delete that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number} is {type(record).__name__}, not a JSON object; fix or delete that line")
        records.append(record)
    return records


def is_eval_key(key: str) -> bool:
    return key == "loss/eval" or "_eval/" in key


def last_eval(records: Sequence[dict]) -> dict | None:
    """The last evaluation's record (counters included), or None before the first evaluation."""
    return next((record for record in reversed(records) if any(map(is_eval_key, record))), None)


def newest_samples_file(run_dir: Path) -> Path | None:
    """samples/examples-<N>.jsonl with the largest N (compared as numbers: 10944 is newer than 8000)."""
    numbered = []
    for path in (run_dir / "samples").glob("examples-*.jsonl"):
        match = re.fullmatch(r"examples-(\d+)\.jsonl", path.name)
        if match:
            numbered.append((int(match.group(1)), path))
    return max(numbered)[1] if numbered else None


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Legend labels: the run folder names, or the full paths when two runs share a name."""
    names = [run_dir.name for run_dir in run_dirs]
    return names if len(set(names)) == len(names) else [str(run_dir) for run_dir in run_dirs]


def draw_picture(picture: Picture, runs: Sequence[tuple[str, Sequence[dict]]], by_run: bool) -> Figure | None:
    """The picture for runs given as (label, metrics records), or None when no run logged any of its metrics.

    by_run colours lines by run (overlays) instead of by series; line styles follow the series
    either way, and eval series, logged rarely, get a marker at each evaluation.
    """
    lines = []
    for run_index, (run_label, records) in enumerate(runs):
        for series_index, series in enumerate(picture.series):
            points = [(record[EXAMPLES_KEY], record[series.key]) for record in records if series.key in record]
            if points:
                style = {
                    "label": f"{run_label}: {series.label}" if by_run else series.label,
                    "color": f"C{run_index % 10}" if by_run else series.color,
                    "linestyle": LINE_STYLES[series_index % len(LINE_STYLES)],
                    "marker": "o" if series.is_eval else None,
                }
                lines.append((points, style))
    if not lines:
        return None
    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    # fixed margins, room for 7-character tick labels: a layout engine would double the drawing time
    figure.subplots_adjust(left=0.11, right=0.98, bottom=0.13, top=0.92)
    axes = figure.add_subplot()
    for points, style in lines:
        examples, values = zip(*points)
        axes.plot(examples, values, linewidth=1.4, markersize=4, **style)
    axes.set_title(picture.title, fontsize=10)
    axes.set_xlabel("examples seen")
    axes.set_ylabel(picture.y_label)
    axes.xaxis.set_major_formatter(EngFormatter(sep=""))  # 6k, 1.5M: counts of examples, not floats
    if picture.y_limits is not None:
        axes.set_ylim(*picture.y_limits)
    axes.grid(alpha=0.3)
    if by_run or len(lines) > 1:  # a lone train curve (gradient norm, learning rate) needs no legend
        axes.legend(fontsize=8)
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_atomically(path: Path, data: bytes) -> Path:
    """Write data to path through a temporary file in the same folder and a rename.

    A reader (a browser refreshing report.html, a sync job) sees the old file or the new one,
    never half of one; the same folder keeps the rename on one filesystem, where it is atomic.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


STYLE_SHEET = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1320px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.note { color: #666; font-size: 13px; margin-top: 0; }
.pictures { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 8px; }
.pictures img { width: 100%; height: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; max-width: 420px; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


def report_html(run_dir: Path, records: Sequence[dict], pngs: Sequence[tuple[Picture, bytes]]) -> str:
    """A self-contained page: the pictures (inline PNGs), the last eval's metrics, a few samples, the config."""
    latest = records[-1] if records else {}
    summary = (
        f"{len(records)} metric lines; latest after {format_value(latest.get(EXAMPLES_KEY, 0))} examples "
        f"({format_value(latest.get(UPDATES_KEY, 0))} optimizer steps). "
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} from {run_dir.resolve()}."
    )
    images = "\n".join(
        f'<img alt="{html.escape(picture.title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for picture, png in pngs
    )
    config_path = run_dir / CONFIG_FILE
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else f"(no {CONFIG_FILE})"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(run_dir.name)}</title>
<style>{STYLE_SHEET}</style></head><body>
<h1>{html.escape(run_dir.name)}</h1>
<p class="note">{html.escape(summary)}</p>
<div class="pictures">
{images or '<p class="note">No metrics logged yet.</p>'}
</div>
{last_eval_html(records)}
{samples_html(run_dir)}
<h2>Resolved config ({CONFIG_FILE})</h2>
<pre>{html.escape(config_text)}</pre>
</body></html>
"""


def last_eval_html(records: Sequence[dict]) -> str:
    final = last_eval(records)
    if final is None:
        return '<h2>Last evaluation</h2><p class="note">No evaluation logged yet.</p>'
    counters = f"after {format_value(final[EXAMPLES_KEY])} examples, {format_value(final[UPDATES_KEY])} optimizer steps"
    rows = "\n".join(
        f'<tr><td>{html.escape(key)}</td><td class="number">{format_value(value)}</td></tr>'
        for key, value in final.items()
        if not key.startswith("counters/")
    )
    return f"<h2>Last evaluation, {counters}</h2>\n<table><tr><th>metric</th><th>value</th></tr>\n{rows}\n</table>"


def samples_html(run_dir: Path) -> str:
    path = newest_samples_file(run_dir)
    samples = read_jsonl(path)[:N_REPORT_SAMPLES] if path is not None else []
    if not samples:
        return '<h2>Samples</h2><p class="note">No samples written yet.</p>'
    columns = list(dict.fromkeys(key for sample in samples for key in sample))  # prompt, policy, reference
    header = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    rows = "\n".join(
        "<tr>" + "".join(f'<td class="text">{html.escape(str(sample.get(c, "")))}</td>' for c in columns) + "</tr>"
        for sample in samples
    )
    title = f"Samples: the first {len(samples)} of {path.relative_to(run_dir)}"
    return f"<h2>{html.escape(title)}</h2>\n<table><tr>{header}</tr>\n{rows}\n</table>"


def format_value(value: object) -> str:
    """Counters as exact integers with thousands separators, other numbers to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def add_report_section(run_dir: Path, section_id: str, title: str, png: bytes, body_html: str) -> Path | None:
    """Put a section (a title, an inline picture, some HTML) into run_dir/report.html, replacing one of the same id.

    For evaluate.py's results. None when the run has no report.html. The trainer rewrites the report
    at each of its evaluations, so a run still training loses the section until it is added again.
    """
    path = run_dir / REPORT_FILE
    if not path.is_file():
        return None
    section = (
        f'<section id="{html.escape(section_id)}">\n<h2>{html.escape(title)}</h2>\n'
        f'<div class="pictures"><img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></div>\n{body_html}\n</section>\n'
    )
    page = path.read_text(encoding="utf-8")
    existing = re.compile(rf'<section id="{re.escape(html.escape(section_id))}">.*?</section>\n', re.DOTALL)
    page = existing.sub(lambda _: "", page)
    page = page.replace("</body>", section + "</body>", 1)
    return write_atomically(path, page.encode())

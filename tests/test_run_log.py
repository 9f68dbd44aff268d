"""What a run leaves besides checkpoints: pictures and a report after a real tiny run, TensorBoard events, lr."""

import json

import matplotlib.image
from conftest import compose_config, equivalence_overrides, run_in_processes, train_records
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SHORT_RUN = ["n_examples=32", "eval_every=16", "do_first_eval=true"]


def test_a_tiny_run_leaves_pictures_and_a_report_and_tensorboard_events(tmp_path):
    overrides = equivalence_overrides("dpo") + SHORT_RUN + ["plots.enabled=true", "tensorboard.enabled=true"]
    run_dir = tmp_path / "run"
    run_in_processes(compose_config(overrides), run_dir, 1)

    pictures = {path.stem: path for path in (run_dir / "plots").glob("*.png")}
    assert {"loss", "reward_accuracy", "reward_margins", "rewards", "logps", "grad_norm", "lr"} <= set(pictures)
    for path in pictures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[0] > 100
    report = (run_dir / "report.html").read_text()
    assert report.count("data:image/png;base64,") == len(pictures) and "rewards_eval/margins" in report

    # TensorBoard holds every metrics.jsonl value, against the same counter
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for name in ("loss/train", "loss/eval", "rewards_eval/margins", "lr"):
        expected = [(r["counters/examples"], r[name]) for r in records if name in r]
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        assert [step for step, _ in logged] == [step for step, _ in expected], name
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(logged, expected)), name


def test_the_learning_rate_logged_is_the_one_each_step_applied(tmp_path):
    # warmup_steps=2: steps 0, 1, 2 run at lr/3, 2lr/3, lr; each train line averages one step
    overrides = equivalence_overrides("sft") + ["n_examples=24", "lr=3e-3", "warmup_steps=2"]
    run_dir = tmp_path / "run"
    run_in_processes(compose_config(overrides), run_dir, 1)
    assert [round(r["lr"], 12) for r in train_records(run_dir)] == [1e-3, 2e-3, 3e-3]

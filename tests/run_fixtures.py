"""Run folders written in the trainer's exact file formats, for the tests and benchmark of plots.py.

A run folder holds config.yaml, metrics.jsonl (one JSON object per line against `counters/examples`
and `counters/updates`: an eval line at the start, train lines, an eval line every
`train_lines_per_eval` train lines and at the end) and samples/examples-<N>.jsonl at each eval.
"""

import json
import math
from pathlib import Path

BATCH_SIZE = 32
# The final eval line's metrics, so tests can look for them: values exact at 4 significant digits.
LAST_EVAL = {
    "sft": {"logps_eval/chosen": -0.7887, "loss/eval": 0.1127},
    "dpo": {
        "logps_eval/chosen": -1.071,
        "logps_eval/rejected": -8.846,
        "loss/eval": 0.4585,
        "rewards_eval/accuracies": 0.8125,
        "rewards_eval/chosen": -0.0625,
        "rewards_eval/margins": 0.5625,
        "rewards_eval/rejected": -0.625,
    },
}
PROMPT = "\n\nHuman: Which is the largest of 2, 4, 7, 8?\n\nAssistant:"
# Completions that would break the page unless escaped.
MARKUP_COMPLETION = ' The largest is <b>8</b> & "7" </td></table><script>alert(1)</script>'


def config_yaml(kind: str) -> str:
    """A few keys of a resolved config in train.py's layout."""
    return (
        f"seed: 0\nexp_name: {kind}\ndatasets:\n- numbers\nbatch_size: {BATCH_SIZE}\nlr: 3.0e-05\n"
        f"model:\n  name: tiny\nloss:\n  name: {kind}\n" + ("  beta: 0.1\n" if kind == "dpo" else "")
    )


def eval_metrics(kind: str, progress: float) -> dict[str, float]:
    """Eval metrics sorted by key as the trainer logs them; progress 1.0 gives LAST_EVAL."""
    if progress == 1.0:
        return dict(LAST_EVAL[kind])
    metrics = {"logps_eval/chosen": -40.0 * (1 - progress) - 1.0, "loss/eval": 6.0 - 5.0 * progress}
    if kind == "dpo":
        metrics = {
            "logps_eval/chosen": -1.0 - 0.1 * progress,
            "logps_eval/rejected": -3.0 - 5.0 * progress,
            "loss/eval": math.log(2) - 0.2 * progress,
            "rewards_eval/accuracies": 0.8 * progress,
            "rewards_eval/chosen": -0.05 * progress,
            "rewards_eval/margins": 0.5 * progress,
            "rewards_eval/rejected": -0.55 * progress,
        }
    return metrics


def train_metrics(kind: str, progress: float, with_lr: bool) -> dict[str, float]:
    """One train line's metrics, in the trainer's order (examples_per_second last)."""
    wiggle = 0.05 * math.sin(40 * progress)  # train metrics are noisy window averages
    metrics = {"grad_norm": 6.0 - 5.0 * progress + wiggle, "logps_train/chosen": -40.0 * (1 - progress) + wiggle}
    if kind == "sft":
        metrics["loss/train"] = 5.0 * (1 - progress) + 0.1 + wiggle
    else:
        metrics |= {
            "logps_train/rejected": -3.0 - 5.0 * progress + wiggle,
            "loss/train": math.log(2) - 0.25 * progress + wiggle,
            "rewards_train/accuracies": min(1.0, 0.5 + progress + wiggle),
            "rewards_train/chosen": 0.05 * progress + wiggle,
            "rewards_train/margins": 0.6 * progress + wiggle,
            "rewards_train/rejected": -0.55 * progress,
        }
    if with_lr:
        metrics["lr"] = 3e-5 * min(1.0, 4 * progress)
    return metrics | {"examples_per_second": 190.0 + 10 * wiggle}


def write_run(run_dir: Path, kind: str, n_train_lines: int = 6, train_lines_per_eval: int = 3, with_lr: bool = False):
    """Write an SFT-like (kind "sft": no rewards) or DPO-like (kind "dpo") run folder; returns run_dir."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_yaml(kind))
    lines = [{"counters/examples": 0, "counters/updates": 0, **eval_metrics(kind, 0.0)}]
    for line in range(1, n_train_lines + 1):
        counters = {"counters/examples": line * BATCH_SIZE, "counters/updates": line}
        lines.append(counters | train_metrics(kind, line / n_train_lines, with_lr))
        if line % train_lines_per_eval == 0 or line == n_train_lines:
            lines.append(counters | eval_metrics(kind, line / n_train_lines))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    write_samples(run_dir, kind, [line["counters/examples"] for line in lines if "loss/eval" in line])
    return run_dir


def write_samples(run_dir: Path, kind: str, examples_at_evals: list[int]) -> None:
    """samples/examples-<N>.jsonl for each eval; the newest file's second row holds MARKUP_COMPLETION."""
    (run_dir / "samples").mkdir()
    for examples in examples_at_evals:
        rows = [{"prompt": PROMPT, "policy": f" The largest is 8, after {examples} examples."}]
        rows.append({"prompt": PROMPT, "policy": MARKUP_COMPLETION if examples == examples_at_evals[-1] else " 2"})
        if kind == "dpo":
            rows = [row | {"reference": " The largest is 2."} for row in rows]
        (run_dir / "samples" / f"examples-{examples}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

"""An evaluation's results: the per-temperature summary (summary.json), the printed table, the picture."""

import html
import json
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from evaluation import metrics
from evaluation.comparisons import Comparison, Judgment
from plots import add_report_section, png_bytes, write_atomically


def temperature_summary(
    comparisons: Sequence[Comparison],
    judgments: Sequence[Judgment],
    kl_estimates: Sequence[float] | None,
    seed: int,
    n_resamples: int,
    confidence: float,
) -> dict:
    """The metrics of one temperature's comparisons (one per prompt); see README, "Evaluating a run"."""
    preferences = [j.preference for j in judgments]
    readable = metrics.valid(preferences)
    has_baseline = [c.baseline is not None for c in comparisons]
    interval = metrics.bootstrap_interval(readable, seed, n_resamples, confidence)
    differences = [c.policy_length - c.baseline_length if c.baseline_length is not None else 0.0 for c in comparisons]
    summary = {
        "n_prompts": len(comparisons),
        "n_invalid": sum(1 for j, b in zip(judgments, has_baseline) if b and j.preference is None),
        "win_rate": metrics.win_rate(preferences),
        "win_rate_ci": list(interval) if interval else None,
        "lc_win_rate": metrics.length_controlled_win_rate(preferences, differences),
        "wins": sum(p == 1.0 for p in readable),
        "ties": sum(p == 0.5 for p in readable),
        "losses": sum(p == 0.0 for p in readable),
        "order_agreement": metrics.order_agreement([j.orders_agree for j in judgments]),
        "mean_length_policy": metrics.mean([c.policy_length for c in comparisons]),
        "mean_length_baseline": metrics.mean([c.baseline_length for c in comparisons]),
        "mean_reward": metrics.mean([j.policy_score for j in judgments]),
        "mean_reward_baseline": metrics.mean([j.baseline_score for j in judgments]),
    }
    if kl_estimates is not None:
        kl_interval = metrics.bootstrap_interval(list(kl_estimates), seed, n_resamples, confidence)
        summary["kl"] = metrics.mean(kl_estimates)
        summary["kl_ci"] = list(kl_interval) if kl_interval else None
    return summary


def judgment_records(comparisons: Sequence[Comparison], judgments: Sequence[Judgment]) -> list[dict]:
    """judgments.jsonl's lines: each comparison's prompt, both texts, the orders shown, verdicts and replies."""
    return [
        {
            "temperature": c.temperature,
            "prompt_id": c.prompt.prompt_id,
            "prompt": c.prompt.messages if c.prompt.messages is not None else c.prompt.text,
            "policy": c.policy,
            "baseline": c.baseline,
            "preference": j.preference,
            "policy_score": j.policy_score,
            "baseline_score": j.baseline_score,
            "verdicts": j.verdicts,
            "orders_agree": j.orders_agree,
        }
        for c, j in zip(comparisons, judgments)
    ]


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(summary: dict) -> str:
    """The per-temperature results as a Markdown table."""
    header = ("temperature", "win rate", "95% interval", "LC win rate", "wins/ties/losses", "invalid",
              "order agreement", "length policy/baseline", "KL", "reward policy/baseline")  # fmt: skip
    rows = []
    for temperature, s in summary["temperatures"].items():
        interval = s["win_rate_ci"]
        rows.append((
            temperature, _number(s["win_rate"]),
            "-" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]",
            _number(s["lc_win_rate"]), f"{s['wins']}/{s['ties']}/{s['losses']}", str(s["n_invalid"]),
            _number(s["order_agreement"]),
            f"{_number(s['mean_length_policy'], 1)}/{_number(s['mean_length_baseline'], 1)}",
            _number(s.get("kl"), 2),
            f"{_number(s['mean_reward'])}/{_number(s['mean_reward_baseline'])}",
        ))  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def win_rate_figure(summary: dict) -> Figure:
    """Win rate (with its interval) and length-controlled win rate against the sampling temperature."""
    figure = Figure(figsize=(5.5, 3.8), layout="constrained")
    axes = figure.add_subplot()
    points = [(float(t), s) for t, s in summary["temperatures"].items() if s["win_rate"] is not None]
    temperatures = [t for t, _ in points]
    rates = [s["win_rate"] for _, s in points]
    low = [s["win_rate"] - s["win_rate_ci"][0] for _, s in points]
    high = [s["win_rate_ci"][1] - s["win_rate"] for _, s in points]
    axes.errorbar(temperatures, rates, yerr=[low, high], marker="o", capsize=4, label="win rate (95% interval)")
    axes.plot(temperatures, [s["lc_win_rate"] for _, s in points], "s--", label="length-controlled")
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.set(xlabel="sampling temperature", ylabel="win rate", ylim=(0, 1),
             title=f"{summary['policy_label']}\nvs {summary['baseline_label']}\njudge: {summary['judge']}")  # fmt: skip
    axes.title.set_fontsize(8)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def write_picture(summary: dict, out_dir: Path) -> bytes:
    png = png_bytes(win_rate_figure(summary))
    write_atomically(out_dir / "win_rate_vs_temperature.png", png)
    return png


def add_to_run_report(run_dir: Path, out_dir: Path, summary: dict, png: bytes) -> Path | None:
    """The picture and table in the policy run's report.html, one section per evaluation folder."""
    body = f'<p class="note">{html.escape(str(out_dir))}</p>\n<pre>{html.escape(table(summary))}</pre>'
    title = f"Evaluation: {summary['policy_label']} vs {summary['baseline_label']}, judge {summary['judge']}"
    return add_report_section(run_dir, f"evaluation-{out_dir.name}", title, png, body)


def reward_vs_kl_figure(summaries: Sequence[tuple[str, dict]]) -> Figure | None:
    """Mean reward against KL to the reference, one point per (evaluation, temperature): the DPO paper's Figure 2.

    Evaluations without a KL (no reference) or without rewards (an LLM judge) are left out; None if none is left.
    """
    figure = Figure(figsize=(5.5, 3.8), layout="constrained")
    axes = figure.add_subplot()
    drawn = 0
    for label, summary in summaries:
        points = [(s["kl"], s["mean_reward"], t) for t, s in summary["temperatures"].items()
                  if s.get("kl") is not None and s.get("mean_reward") is not None]  # fmt: skip
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], "o", label=label)
            for kl, reward, temperature in points:
                axes.annotate(f"T={temperature}", (kl, reward), fontsize=7, xytext=(3, 3), textcoords="offset points")
            drawn += 1
    if not drawn:
        return None
    axes.set(xlabel="KL(policy || reference), nats per response", ylabel="mean reward of the policy",
             title="Reward against KL")  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure


def win_rates_figure(summaries: Sequence[tuple[str, dict]]) -> Figure:
    """Several evaluations' win rates (with intervals) against temperature on one axes."""
    figure = Figure(figsize=(5.5, 3.8), layout="constrained")
    axes = figure.add_subplot()
    for label, summary in summaries:
        points = [(float(t), s) for t, s in summary["temperatures"].items() if s["win_rate"] is not None]
        rates = [s["win_rate"] for _, s in points]
        errors = [[s["win_rate"] - s["win_rate_ci"][0] for _, s in points],
                  [s["win_rate_ci"][1] - s["win_rate"] for _, s in points]]  # fmt: skip
        axes.errorbar([t for t, _ in points], rates, yerr=errors, marker="o", capsize=4, label=label)
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.set(xlabel="sampling temperature", ylabel="win rate", ylim=(0, 1), title="Win rate against temperature")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure

"""Rounds of on-policy DPO: sample, score, pair, train, evaluate against the SFT model; then again from the result.

    .venv/bin/python scripts/iterative_dpo.py --sft <sft run>/LATEST --out runs/rounds --rounds 3 \\
        --pairs judge=reward_model judge.path=<reward run>/LATEST n_prompts=512 \\
        --train model=tiny lr=1e-5 \\
        --evaluate judge=rule judge.scorer=numbers n_prompts=256

Prompts come from the SFT run's datasets (unless --pairs or --evaluate name datasets=[...]).
Round r starts from the policy of round r - 1 (the SFT model for round 1), which is also its DPO
reference: make_pairs.py samples it and scores the samples (--pairs: make_pairs.py's settings),
train.py runs DPO on the pairs (--train: train.py's settings, loss=dpo unless given), and
evaluate.py compares the new policy with the SFT model (--evaluate: evaluate.py's settings). Each
round has its folder <out>/round-<r>/ with pairs/, runs/ and eval/<run>/. Every step continues what a
killed run left: make_pairs.py and evaluate.py keep what they generated, train.py resumes from its
newest checkpoint (resume_from=auto), and a finished step is not run again; so after a preemption
the same command picks up where it stopped. At the end (and after each round) <out>/rounds.json and
rounds.png hold the win rate against the SFT model by round.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import checkpoints  # noqa: E402
import evaluate  # noqa: E402
import make_pairs  # noqa: E402
import train  # noqa: E402
from errors import USER_ERRORS  # noqa: E402
from evaluation.loading import run_config  # noqa: E402
from evaluation.openai_api import ServerError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", type=Path, required=True, help="the SFT model folder rounds start from (<run>/LATEST)")
    parser.add_argument("--out", type=Path, required=True, help="the folder of the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="how many rounds (each: pairs, DPO, evaluation)")
    parser.add_argument("--pairs", nargs="*", default=[], help="make_pairs.py settings, e.g. judge=rule n_prompts=512")
    parser.add_argument("--train", nargs="*", default=[], help="train.py settings, e.g. model=tiny lr=1e-5")
    parser.add_argument("--evaluate", nargs="*", default=[], help="evaluate.py settings, e.g. judge=rule")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: one round or more")
    if not (args.sft / "config.json").is_file() and not (args.sft / checkpoints.ADAPTER_DIR).is_dir():
        parser.error(f"--sft {args.sft}: not a model folder (no config.json); give the SFT run's <run>/LATEST")
    return args


def finished_policy(runs: Path) -> Path | None:
    """The LATEST checkpoint of the newest run under `runs` that finished (a resumed run writes a new run folder)."""
    done = [run / checkpoints.FINAL for run in runs.glob("*") if checkpoints.is_complete(run / checkpoints.FINAL)]
    return max(done, key=lambda path: path.parent.name) if done else None


def task_data(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """datasets=[...] of the SFT run, unless the overrides name datasets: every round samples and is judged on
    the task's own prompts (a round's policy run was trained on the previous round's pairs file instead)."""
    if any(override.startswith("datasets=") for override in overrides):
        return []
    trained = run_config(args.sft)
    if trained is None:
        raise SystemExit(f"--sft {args.sft} is not in a run folder: give datasets=[...] in --pairs and --evaluate")
    return [f"datasets=[{','.join(str(name) for name in trained.datasets)}]"]


def run_round(args: argparse.Namespace, round_number: int, policy: Path) -> tuple[Path, dict]:
    """One round from `policy`: its pairs, its DPO run and its evaluation; (the new policy, the summary)."""
    folder = args.out / f"round-{round_number}"
    print(f"\n===== round {round_number}: from {policy}", flush=True)
    pairs = make_pairs.make_pairs(make_pairs.compose_config(
        [f"policy={policy}", f"out_dir={folder / 'pairs'}", f"seed={round_number}", *task_data(args, args.pairs),
         *args.pairs]
    ))  # fmt: skip
    if pairs.n_pairs == 0:
        raise SystemExit(f"round {round_number}: no pairs (every prompt's samples scored alike); see {pairs.out_dir}")
    new_policy = finished_policy(folder / "runs")
    if new_policy is None:
        pairs_file = pairs.out_dir / make_pairs.PAIRS_FILE
        runs = folder / "runs"
        overrides = ["loss=dpo", f"model.archive={policy}", f"datasets=[{pairs_file}]", f"local_dirs=[{runs}]",
                     f"exp_name=round-{round_number}", "resume_from=auto"]  # fmt: skip
        try:
            train.main.__wrapped__(train.compose_config(overrides + args.train))
        except SystemExit as stop:  # train.py's own exits: 0 done, else its error was printed
            if stop.code not in (0, None):
                raise
        new_policy = finished_policy(folder / "runs")
        if new_policy is None:
            raise SystemExit(f"round {round_number}: train.py finished without a LATEST checkpoint under {folder}")
    result = evaluate.evaluate(evaluate.compose_config(
        [f"policy={new_policy}", f"baseline={args.sft}", f"out_dir={folder / 'eval' / new_policy.parent.name}",
         *task_data(args, args.evaluate), *args.evaluate]
    ))  # fmt: skip
    return new_policy, {"round": round_number, "policy": str(new_policy), "pairs": pairs.n_pairs, **result.summary}


def write_table(out: Path, rounds: list[dict]) -> None:
    """rounds.json, a printed table and rounds.png: the win rate against the SFT model by round."""
    (out / "rounds.json").write_text(json.dumps(rounds, indent=2) + "\n")
    temperatures = list(rounds[0]["temperatures"])
    print(f"\nwin rate against the SFT model ({rounds[0]['judge']}), 95% intervals:")
    print("| round | pairs | " + " | ".join(f"T={t}" for t in temperatures) + " |")
    print("|---|---:|" + "---|" * len(temperatures))
    for row in rounds:
        cells = []
        for t in temperatures:
            metrics = row["temperatures"][t]
            low, high = metrics["win_rate_ci"]
            cells.append(f"{metrics['win_rate']:.3f} [{low:.3f}, {high:.3f}]")
        print(f"| {row['round']} | {row['pairs']} | " + " | ".join(cells) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for t in temperatures:
        xs = [row["round"] for row in rounds]
        ys = [row["temperatures"][t]["win_rate"] for row in rounds]
        lows = [y - row["temperatures"][t]["win_rate_ci"][0] for y, row in zip(ys, rounds)]
        highs = [row["temperatures"][t]["win_rate_ci"][1] - y for y, row in zip(ys, rounds)]
        axes.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, label=f"temperature {t}")
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes.set(xlabel="round", ylabel="win rate against SFT", xticks=[row["round"] for row in rounds], ylim=(0, 1))
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "rounds.png", dpi=120)
    plt.close(figure)
    print(f"table: {out / 'rounds.json'}; picture: {out / 'rounds.png'}", flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    policy, rounds = args.sft, []
    try:
        for round_number in range(1, args.rounds + 1):
            policy, summary = run_round(args, round_number, policy)
            rounds.append(summary)
            write_table(args.out, rounds)
    except (*USER_ERRORS, ServerError) as error:  # make_pairs.py's and evaluate.py's: the setting, file or server
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    return rounds


if __name__ == "__main__":
    main()

"""Compare evaluations (evaluate.py's output folders): reward against KL, and win rates against temperature.

    python scripts/plot_evaluations.py EVAL_DIR [EVAL_DIR ...] [--out DIR]

Policies trained at several betas and evaluated against the same reference, with a scoring judge
(judge=reward_model or judge=rule), trace the DPO paper's reward-vs-KL frontier (its Figure 2):
each evaluation adds a point per temperature. Writes reward_vs_kl.png (when some evaluation has
both a KL and rewards) and win_rates_vs_temperature.png into --out (default: <first EVAL_DIR>/../compare),
and prints each evaluation's table.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.report import reward_vs_kl_figure, table, win_rates_figure  # noqa: E402
from plots import png_bytes, write_atomically  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dirs", nargs="+", type=Path, help="evaluate.py output folders (with summary.json)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the pictures")
    args = parser.parse_args()
    summaries = []
    for eval_dir in args.eval_dirs:
        path = eval_dir / "summary.json"
        if not path.is_file():
            sys.exit(f"error: {path} does not exist: give folders that evaluate.py wrote.")
        summary = json.loads(path.read_text())
        summaries.append((f"{summary['policy_label']} vs {summary['baseline_label']}", summary))
        print(f"\n{eval_dir}: judge {summary['judge']}\n{table(summary)}")
    out_dir = args.out or args.eval_dirs[0].parent / "compare"
    written = [write_atomically(out_dir / "win_rates_vs_temperature.png", png_bytes(win_rates_figure(summaries)))]
    frontier = reward_vs_kl_figure(summaries)
    if frontier is not None:
        written.append(write_atomically(out_dir / "reward_vs_kl.png", png_bytes(frontier)))
    print("\npictures: " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    main()

"""Pictures of one run folder (with its report.html), or of several runs overlaid, from their files.

    python scripts/plot_runs.py RUN_DIR                          # RUN_DIR/plots/*.png and RUN_DIR/report.html
    python scripts/plot_runs.py RUN_DIR RUN_DIR ... [--out DIR]  # overlaid pictures in DIR

With several runs, each metric's picture carries every run's curves (legend: the run folder's
name), written to DIR, by default <first run>/compare-plots; the runs' last eval metrics are
printed side by side as a Markdown table. Nothing but the run folders' files is read (see plots.py),
so this works on runs in progress and on runs copied from a cluster.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plots  # noqa: E402

COMPARE_DIR = "compare-plots"


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders, as train.py prints them"
    )
    parser.add_argument("--out", type=Path, help=f"where overlaid pictures go (default: <first run>/{COMPARE_DIR})")
    return parser, parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    parser, args = parse_args(argv)
    problems = [
        f"{run_dir}: no {plots.METRICS_FILE}, so not a run folder (train.py prints those as 'run folder: ...')"
        for run_dir in args.run_dirs
        if not (run_dir / plots.METRICS_FILE).is_file()
    ]
    if len(args.run_dirs) == 1 and args.out is not None:
        problems.append("--out is for several runs; one run's report is written inside its own folder")
    if problems:
        parser.error("\n  ".join(["", *problems]))
    if len(args.run_dirs) == 1:
        run_dir = args.run_dirs[0]
        written = plots.write_run_report(run_dir)
        print(f"report: {written[-1]}")
        print(f"pictures: {run_dir / plots.PLOTS_DIR}/ ({', '.join(path.name for path in written[:-1])})")
        return
    out_dir = args.out if args.out is not None else args.run_dirs[0] / COMPARE_DIR
    written = plots.overlay_runs(args.run_dirs, out_dir)
    print(plots.final_metrics_table(args.run_dirs))
    print(
        f"pictures of the {len(args.run_dirs)} runs overlaid: {out_dir}/ ({', '.join(path.name for path in written)})"
    )


if __name__ == "__main__":
    main()

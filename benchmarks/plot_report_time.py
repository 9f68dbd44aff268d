"""Seconds that plots.write_run_report takes, by run size: the cost the trainer pays at each evaluation.

    .venv/bin/python benchmarks/plot_report_time.py [--lines 500 5000 20000] [--rounds 5]

Each size is a DPO-like run folder written by tests/run_fixtures.py in the trainer's exact formats
(all seven pictures, learning rate included): about --lines metric lines, an eval line every
tenth of the run, eight samples per eval. Each call is timed --rounds times after one warm-up
call; the table gives the fastest and the median (other processes on a shared machine can only
slow a call down) and the cost per picture. The one-off `import plots` (matplotlib included) is
timed apart, in a fresh interpreter.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from run_fixtures import write_run  # noqa: E402

import plots  # noqa: E402

EVALS_PER_RUN = 10


def import_seconds() -> float:
    """`import plots` in a fresh interpreter, after one import that fills matplotlib's font cache."""
    code = "import time; start = time.perf_counter(); import plots; print(time.perf_counter() - start)"
    run = [sys.executable, "-c", code]
    subprocess.run(run, cwd=REPO_ROOT, check=True, capture_output=True)
    return float(subprocess.run(run, cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    return f"`nproc` {len(os.sched_getaffinity(0))}, {cpu}, Python {platform.python_version()}"


def time_report(run_dir: Path, rounds: int) -> list[float]:
    plots.write_run_report(run_dir)  # warm-up: first use of fonts and the PNG encoder
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        plots.write_run_report(run_dir)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[500, 5000, 20000], help="metric lines per run")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[0]}")
    print(f"`import plots` (matplotlib included), fresh interpreter: {import_seconds():.2f} s\n")
    print("| metric lines | pictures | fastest s | median s | ms per picture |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as workdir:
        for n_lines in args.lines:
            n_train_lines = n_lines - EVALS_PER_RUN - 1  # one eval line at the start and after each tenth
            run_dir = write_run(
                Path(workdir) / f"dpo-{n_lines}",
                "dpo",
                n_train_lines=n_train_lines,
                train_lines_per_eval=-(-n_train_lines // EVALS_PER_RUN),
                with_lr=True,
            )
            logged = len(plots.read_metrics(run_dir))
            seconds = time_report(run_dir, args.rounds)
            n_pictures = len(list((run_dir / plots.PLOTS_DIR).glob("*.png")))
            fastest = min(seconds)
            print(
                f"| {logged:,} | {n_pictures} | {fastest:.3f} | {statistics.median(seconds):.3f} "
                f"| {1000 * fastest / n_pictures:.0f} |"
            )


if __name__ == "__main__":
    main()

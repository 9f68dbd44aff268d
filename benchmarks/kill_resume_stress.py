"""Kill a tiny-model DPO run at 20 random moments, resume it with resume_from=auto each time, and check that
its final weights equal those of a run that was never interrupted.

    .venv/bin/python benchmarks/kill_resume_stress.py                 # 20 kills, seed 0
    .venv/bin/python benchmarks/kill_resume_stress.py --kills 40 --seed 3

Each attempt is train.py's main() with the same config (resume_from=auto, as a resubmitted job), in a
child process forked from a forkserver that imported train.py once, and SIGKILLed when the moment it
waits for comes (plus a random 0-20 ms): mid-step (after a random number of logged steps), mid-eval
(as an evaluation starts), mid-save (while a step-N.partial folder is written), mid-tokenize-cache
write (a .tmp entry under cache_dir/tokenized, the cache emptied first) or mid-reference-precompute
(between the train and eval tables of precompute_ref_logps, that cache emptied first). The moments
are drawn in a random order from the seed. After the kills one more attempt runs to the end, and
every tensor of its LATEST/model.safetensors must be bit-for-bit equal to the uninterrupted run's.
"""

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "loss=dpo",
    "datasets=[numbers]",
    "model.from_scratch.hidden_size=64",
    "model.from_scratch.intermediate_size=128",
    "model.from_scratch.num_hidden_layers=2",
    "model.from_scratch.num_attention_heads=4",
    "batch_size=8",
    "eval_batch_size=16",
    "n_examples=384",  # 48 optimizer steps
    "eval_every=16",  # an evaluation and a step-N checkpoint every 2 steps
    "n_eval_examples=32",
    "precompute_ref_logps=true",
    "sample_during_eval=false",
    "plots.enabled=false",
    "minimum_log_interval_secs=0",  # a metrics line after every step
    "lr=1e-3",
    "warmup_steps=2",
    "exp_name=stress",
]
MOMENTS = ("mid-step", "mid-eval", "mid-save", "mid-tokenize-cache write", "mid-reference-precompute")
EXAMPLES_PER_EVAL = 16


def train_lines(run_dir: Path) -> list[int]:
    """counters/examples of each train line of a run folder so far (a line being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r["counters/examples"] for r in records if "loss/train" in r]


def condition_for(moment: str, rng: random.Random, cache: Path):
    """What the parent waits for before the kill: a function of the attempt's run folder (or None)."""
    if moment == "mid-step":
        steps = rng.randint(1, 3)
        return lambda run_dir: run_dir is not None and len(train_lines(run_dir)) >= steps
    if moment == "mid-eval":  # its train line is written just before the evaluation starts
        return lambda run_dir: run_dir is not None and any(n % EXAMPLES_PER_EVAL == 0 for n in train_lines(run_dir))
    if moment == "mid-save":
        return lambda run_dir: run_dir is not None and any(run_dir.glob("step-*.partial"))
    if moment == "mid-tokenize-cache write":
        shutil.rmtree(cache / "tokenized", ignore_errors=True)
        return lambda run_dir: any((cache / "tokenized").rglob("*.tmp"))
    shutil.rmtree(cache / "reference_logps", ignore_errors=True)
    # the train table is written, the eval table not yet: the reference pass is in progress
    return lambda run_dir: len(list((cache / "reference_logps").rglob("*.safetensors"))) == 1


def run_main(overrides: list[str], log: Path) -> None:
    """train.py's main() on the composed config (Hydra's decorator would parse sys.argv instead), its output
    appended to `log`."""
    import train

    with open(log, "a") as output:
        os.dup2(output.fileno(), sys.stdout.fileno())
        os.dup2(output.fileno(), sys.stderr.fileno())
    train.main.__wrapped__(train.compose_config(overrides))


def attempt(context, overrides: list[str], runs: Path, condition, rng: random.Random) -> tuple[int, Path | None, float]:
    """One start of the run, killed once condition(run_dir) holds: (exit code, its run folder, seconds)."""
    before = set(runs.glob("stress_*"))
    start = time.perf_counter()
    process = context.Process(target=run_main, args=(overrides, runs.parent / f"{runs.name}.log"))
    process.start()
    run_dir = None
    while process.exitcode is None and condition is not None:
        run_dir = run_dir or next(iter(set(runs.glob("stress_*")) - before), None)
        if condition(run_dir):
            time.sleep(rng.uniform(0, 0.02))
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    process.join(timeout=600)
    run_dir = run_dir or next(iter(set(runs.glob("stress_*")) - before), None)
    return process.exitcode, run_dir, time.perf_counter() - start


def incomplete_checkpoints(runs: Path) -> list[Path]:
    """Checkpoint folders under their final name (step-N, LATEST, their .old) without a trainer state."""
    import checkpoints

    named = [p for p in runs.glob("stress_*/*") if checkpoints.CHECKPOINT_NAME.fullmatch(p.name)]
    return [p for p in named if not checkpoints.is_complete(p)]


def resumed_from(run_dir: Path | None) -> str:
    """The examples a killed attempt had resumed from (its first train line's, minus one step), as text."""
    lines = train_lines(run_dir) if run_dir is not None else []
    return "-" if not lines else str(lines[0] - 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="draws the moments' order and the kill delays")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false"
    )
    import torch
    from safetensors.torch import load_file

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["train"])
    rng = random.Random(args.seed)
    moments = [MOMENTS[i % len(MOMENTS)] for i in range(args.kills)]
    rng.shuffle(moments)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kill-resume-stress-") as scratch:
        runs, cache = Path(scratch) / "runs", Path(scratch) / "cache"
        killed = RUN + [f"local_dirs=[{runs}]", f"cache_dir={cache}", "resume_from=auto"]
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, seed {args.seed}")
        print(f"command: {' '.join([sys.executable, *sys.argv])}")
        print(f"run: {' '.join(RUN)}\n")
        print("| kill | moment | resumed from (examples) | steps logged | exit | seconds | incomplete checkpoints |")
        print("|-----:|--------|------------------------:|-------------:|-----:|--------:|-----------------------:|")
        for number, moment in enumerate(moments, 1):
            exit_code, run_dir, seconds = attempt(context, killed, runs, condition_for(moment, rng, cache), rng)
            lines = train_lines(run_dir) if run_dir is not None else []
            broken = incomplete_checkpoints(runs)
            print(
                f"| {number:4d} | {moment:<24} | {resumed_from(run_dir):>23} | {len(lines):12d} | {exit_code:4d} | "
                f"{seconds:7.1f} | {len(broken):22d} |",
                flush=True,
            )
            if exit_code == 0 or broken:
                sys.exit(f"attempt {number} ({moment}) {'ran to the end' if exit_code == 0 else broken}: stopping")
        exit_code, final_dir, seconds = attempt(context, killed, runs, None, rng)
        lines, broken = train_lines(final_dir), incomplete_checkpoints(runs)
        print(
            f"| last | {'none: runs to the end':<24} | {resumed_from(final_dir):>23} | {len(lines):12d} | "
            f"{exit_code:4d} | {seconds:7.1f} | {len(broken):22d} |"
        )
        straight_runs = Path(scratch) / "straight"
        straight = RUN + [f"local_dirs=[{straight_runs}]", f"cache_dir={Path(scratch) / 'straight-cache'}"]
        straight_code, straight_dir, straight_seconds = attempt(context, straight, straight_runs, None, rng)
        resumed = load_file(final_dir / "LATEST" / "model.safetensors")
        expected = load_file(straight_dir / "LATEST" / "model.safetensors")
        equal = resumed.keys() == expected.keys() and all(torch.equal(resumed[k], v) for k, v in expected.items())
        print(f"\nuninterrupted run: exit {straight_code}, {straight_seconds:.1f} s")
        print(
            f"final weights after {args.kills} kills and {args.kills + 1} resumed starts: {len(expected)} tensors, "
            f"{'all bit-for-bit equal to the uninterrupted run' if equal else 'DIFFERENT from the uninterrupted run'}"
        )
        print(f"total: {time.perf_counter() - started:.0f} s")
        if not (equal and exit_code == 0 and straight_code == 0):
            sys.exit(1)


if __name__ == "__main__":
    main()

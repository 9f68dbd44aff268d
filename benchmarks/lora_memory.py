"""Peak memory and step time of LoRA DPO against full DPO: same model, same batches, one CPU process each.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lora_memory.py                  # SmolLM2-135M-Instruct
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lora_memory.py --model <dir> --steps 5

Each row runs train.py's own trainer (train.build_trainer, then train_step on the same seeded
batches) in its own subprocess, so its peak memory is its own. Memory is the process's
resident set size (Linux VmHWM): torch's CPU allocator keeps no peak statistics. "after load"
is the RSS once data, models and optimizer exist; "step peak" is the highest RSS during the
steps (the optimizer state of AdamW appears at the first step). Full DPO holds a float32
reference model beside the policy; LoRA none (its reference is the adapter switched off).
"""

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / ".cache" / "dpo" / "models" / "SmolLM2-135M-Instruct"
RESULT_MARKER = "BENCHMARK_RESULT "
ROWS = {"full": ["lora.enabled=false"], "lora": ["lora.enabled=true", "lora.r=16", "lora.alpha=32"]}


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, in MiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def torch_version() -> str:
    return importlib.metadata.version("torch")


def overrides(model: Path, batch_size: int, steps: int) -> list[str]:
    return [
        "model=blank_model",
        f"model.name_or_path={model}",
        "model.block_name=LlamaDecoderLayer",
        "model.reference_dtype=float32",  # the same precision as the LoRA run's base, which is its reference
        "loss=dpo",
        "datasets=[numbers]",
        f"batch_size={batch_size}",
        f"eval_batch_size={batch_size}",
        f"n_examples={batch_size * (steps + 1)}",
        "max_length=128",
        "max_prompt_length=64",
        "optimizer=AdamW",
        "lr=1e-5",
        "warmup_steps=0",
        "sample_during_eval=false",
        "plots.enabled=false",
        "debug=true",
    ]


def run_row(row: str, args: argparse.Namespace) -> dict:
    """One row, in this process: build the trainer as train.py does, time `steps` steps after a warm-up."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    import train

    with tempfile.TemporaryDirectory() as folder:
        config = train.compose_config(overrides(args.model, args.batch_size, args.steps) + ROWS[row])
        config.cache_dir = folder
        torch.manual_seed(0)
        trainer = train.build_trainer(config, Path(folder), torch.device("cpu"), rank=0, world_size=1)
        trainer.prepare()
        after_load = rss_mib("VmRSS")
        seconds = []
        for batch in trainer.train_batches():
            start = time.perf_counter()
            trainer.train_step(batch)
            seconds.append(time.perf_counter() - start)
        return {
            "trained_params_m": sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad) / 1e6,
            "total_params_m": sum(p.numel() for p in trainer.policy.parameters()) / 1e6,
            "reference_model": trainer.reference_model is not None,
            "after_load_mib": after_load,
            "step_peak_mib": rss_mib("VmHWM"),
            "step_seconds": sorted(seconds[1:])[len(seconds[1:]) // 2],  # median, the first step is warm-up
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a local Llama-style model folder")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # a child process runs one row
    args = parser.parse_args()
    if args.row:
        print(RESULT_MARKER + json.dumps(run_row(args.row, args)), flush=True)
        return

    load_before = os.getloadavg()
    results = {}
    for row in ROWS:
        command = [sys.executable, __file__, "--row", row, "--model", str(args.model)]
        command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        result_line = next(line for line in output.splitlines() if line.startswith(RESULT_MARKER))
        results[row] = json.loads(result_line.removeprefix(RESULT_MARKER))
    load_after = os.getloadavg()

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}, torch {torch_version()}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"model: {args.model.name}; {args.batch_size} pairs a step, max_length 128, AdamW, float32, CPU\n")
    print("| row  | params (M) | trained (M) | reference model | RSS after load (MiB) | peak RSS (MiB) | step (s) |")
    print("|------|-----------:|------------:|-----------------|---------------------:|---------------:|---------:|")
    for row, r in results.items():
        print(
            f"| {row:<4} | {r['total_params_m']:10.1f} | {r['trained_params_m']:11.2f} | "
            f"{'loaded' if r['reference_model'] else 'none':<15} | {r['after_load_mib']:20.0f} | "
            f"{r['step_peak_mib']:14.0f} | {r['step_seconds']:8.2f} |"
        )


if __name__ == "__main__":
    main()

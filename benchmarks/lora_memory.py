"""Peak memory and step time of LoRA DPO against full DPO: same model, same batches, one CPU process each.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lora_memory.py                  # SmolLM2-135M-Instruct
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lora_memory.py --model <dir> --steps 5
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lora_memory.py --shape real     # issue 18's shape, per phase

Each row runs train.py's own trainer (train.build_trainer, then train_step on the same seeded
batches) in its own subprocess, so its peak memory is its own. Memory is the process's
resident set size (Linux VmHWM): torch's CPU allocator keeps no peak statistics. "after load"
is the RSS once data, models and optimizer exist; "step peak" is the highest RSS during the
steps (the optimizer state of AdamW appears at the first step). Full DPO holds a float32
reference model beside the policy; LoRA none (its reference is the adapter switched off).

`--shape real` is the shape of issue 18: 4 HH-format pairs a step of about 256 tokens each
(synthetic_data.hh_like_pairs in the model's own tokenizer, no download), LoRA r=8, AdamW,
float32, and the peak RSS of each phase (the kernel's peak is reset between phases through
/proc/self/clear_refs): load (data, models, optimizer), first eval, first step, steady state.
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
REAL_ROWS = {"full": ["lora.enabled=false"], "lora": ["lora.enabled=true", "lora.r=8", "lora.alpha=16"]}
REAL_MAX_LENGTH = 256
PHASES = ("load", "first eval", "first step", "steady")


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, in MiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def torch_version() -> str:
    return importlib.metadata.version("torch")


def overrides(model: Path, batch_size: int, steps: int, max_length: int = 128, datasets: str = "numbers") -> list[str]:
    return [
        "model=blank_model",
        f"model.name_or_path={model}",
        "model.block_name=LlamaDecoderLayer",
        "model.reference_dtype=float32",  # the same precision as the LoRA run's base, which is its reference
        "loss=dpo",
        f"datasets=[{datasets}]",
        f"batch_size={batch_size}",
        f"eval_batch_size={batch_size}",
        f"n_examples={batch_size * (steps + 1)}",
        f"max_length={max_length}",
        f"max_prompt_length={max_length // 2}",
        "optimizer=AdamW",
        "lr=1e-5",
        "warmup_steps=0",
        "sample_during_eval=false",
        "plots.enabled=false",
        "debug=true",
    ]


def reset_peak() -> None:
    """Start a new peak: the kernel's VmHWM falls back to the RSS of now (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def write_real_pairs(model: Path, folder: Path, n_pairs: int) -> Path:
    """HH-format pairs of about REAL_MAX_LENGTH tokens in the model's tokenizer, as a .jsonl file (train and test)."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import synthetic_data
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = synthetic_data.hh_like_pairs(tokenizer, n_pairs, REAL_MAX_LENGTH, 0, (100, 127), (100, 128))
    path = folder / "hh_like_256.jsonl"
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return path


def run_real_row(row: str, args: argparse.Namespace) -> dict:
    """One row of the real shape, in this process: peak RSS of each phase, as train.py's trainer runs them."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    import models
    import train

    if not args.glibc_default:
        models.keep_large_allocations_returnable()  # as train.py's train_worker does on CPU
    with tempfile.TemporaryDirectory() as folder:
        data = write_real_pairs(args.model, Path(folder), args.batch_size * (args.steps + 2))
        settings = overrides(args.model, args.batch_size, args.steps, REAL_MAX_LENGTH, str(data))
        config = train.compose_config(settings + [f"n_eval_examples={args.batch_size}"] + REAL_ROWS[row])
        config.cache_dir = folder
        torch.manual_seed(0)
        peaks = {}
        reset_peak()
        trainer = train.build_trainer(config, Path(folder), torch.device("cpu"), rank=0, world_size=1)
        trainer.prepare()
        peaks["load"] = rss_mib("VmHWM")
        reset_peak()
        trainer.evaluate()
        peaks["first eval"] = rss_mib("VmHWM")
        batches = iter(trainer.train_batches())
        reset_peak()
        trainer.train_step(next(batches))
        peaks["first step"] = rss_mib("VmHWM")
        reset_peak()
        for batch in batches:
            trainer.train_step(batch)
        peaks["steady"] = rss_mib("VmHWM")
        lengths = [len(e["chosen_input_ids"]) for e in trainer.train_examples] if trainer.train_examples else []
        return {
            "trained_params_m": sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad) / 1e6,
            "reference_model": not config.lora.enabled,  # LoRA's reference is the policy with its adapter off
            "peaks_mib": peaks,
            "chunked_logps": trainer.plan.chunk_tokens is not None,
            "mean_tokens": sum(lengths) / max(len(lengths), 1),
        }


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
            "reference_model": not config.lora.enabled,  # LoRA's reference is the policy with its adapter off
            "after_load_mib": after_load,
            "step_peak_mib": rss_mib("VmHWM"),
            "step_seconds": sorted(seconds[1:])[len(seconds[1:]) // 2],  # median, the first step is warm-up
        }


def child_results(args: argparse.Namespace, rows) -> dict[str, dict]:
    """Each row in its own process (its peak memory its own), in turn."""
    results = {}
    for row in rows:
        command = [sys.executable, __file__, "--row", row, "--model", str(args.model), "--shape", args.shape]
        command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        command += ["--glibc-default"] if args.glibc_default else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        result_line = next(line for line in output.splitlines() if line.startswith(RESULT_MARKER))
        results[row] = json.loads(result_line.removeprefix(RESULT_MARKER))
    return results


def print_header(args: argparse.Namespace, load_before: tuple, load_after: tuple) -> None:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}, torch {torch_version()}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")


def print_real_table(args: argparse.Namespace, results: dict[str, dict]) -> None:
    tokens = results["full"]["mean_tokens"]
    print(
        f"model: {args.model.name}; {args.batch_size} HH-format pairs a step (chosen sequences {tokens:.0f} tokens on "
        f"average, max_length {REAL_MAX_LENGTH}), AdamW, float32, CPU; LoRA r=8"
    )
    threshold = "glibc's default (raised as blocks are freed)" if args.glibc_default else "fixed at 128 KiB (train.py)"
    print(f"malloc mmap threshold: {threshold}\n")
    print(
        "| row  | trained (M) | reference model | chunked log-probs | "
        + " | ".join(f"{p} peak (MiB)" for p in PHASES)
        + " |"
    )
    print(
        "|------|------------:|-----------------|-------------------|" + "|".join("-" * 12 + ":" for _ in PHASES) + "|"
    )
    for row, r in results.items():
        peaks = " | ".join(f"{r['peaks_mib'][p]:{len(p) + 11}.0f}" for p in PHASES)
        reference = "loaded" if r["reference_model"] else "adapter off"
        print(
            f"| {row:<4} | {r['trained_params_m']:11.2f} | {reference:<15} | {str(r['chunked_logps']):<17} | {peaks} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a local Llama-style model folder")
    parser.add_argument("--shape", choices=("numbers", "real"), default="numbers", help="real: issue 18's shape")
    parser.add_argument("--batch-size", type=int, help="preference pairs per step (default 8; real: 4)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument(
        "--glibc-default", action="store_true", help="real: without train.py's fixed mmap threshold (the old peaks)"
    )
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # a child process runs one row
    args = parser.parse_args()
    args.batch_size = args.batch_size or (4 if args.shape == "real" else 8)
    if args.row:
        run = run_real_row if args.shape == "real" else run_row
        print(RESULT_MARKER + json.dumps(run(args.row, args)), flush=True)
        return

    load_before = os.getloadavg()
    results = child_results(args, REAL_ROWS if args.shape == "real" else ROWS)
    print_header(args, load_before, os.getloadavg())
    if args.shape == "real":
        print_real_table(args, results)
        return
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

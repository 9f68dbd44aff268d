"""DPO training steps on one GPU: useful tokens/s, peak GPU memory and model FLOP utilisation, ours and TRL's.

    python benchmarks/gpu_benchmark.py                         # CUDA: a 0.73B Llama-style model, bfloat16
    python benchmarks/gpu_benchmark.py --device cpu --tiny     # the same code on a 2-layer model: a smoke test
    python benchmarks/gpu_benchmark.py --rows padded trl --out /tmp/gpu

benchmarks/gpu_check.sh runs it after the CUDA tests. It has NOT run on a GPU yet (no GPU was
available to this project when it was written; only the CPU smoke test has run): the first GPU
run is its test.

Every row runs in its own process on the same model, built from config as train.py builds it
(model=tiny's Llama-style architecture at the shape below, seed 0, a stand-in word-level
tokenizer of the vocabulary's size), the same HH-like pairs (prompts long next to responses)
and the same batches, in the order train.py trains on them:

- padded / packed / shared / packed-shared: BasicTrainer.train_step with packing and
  share_prompt set so: bfloat16 autocast over float32 policy weights (autocast_dtype), a
  bfloat16 reference model (model.reference_dtype), chunked log-probs (the config's
  logps_chunk_tokens), AdamW.
- default: no layout override, what `python train.py loss=dpo` gives (packing and share_prompt
  auto: packed prefix-shared rows, sdpa with a boolean mask).
- flash-packed: packed rows under flash_attention_2 (varlen kernels; it takes no prefix-shared mask).
- packed-shared-compiled: packed-shared with compile_backend (default inductor): every
  transformer block compiled; its warmup steps include the compilation.
- flex-packed-compiled / flex-shared-compiled / flex-packed-shared-compiled: the same layouts
  under model.attn_implementation=flex_attention (the masks as BlockMasks, shared_prompt.py),
  compiled likewise: the GPU choice between sdpa's dense mask and FlexAttention's block-sparse one.
- fsdp-packed-shared: FSDPTrainer on one rank (a process group of one), with FSDP's mixed
  precision (model.fsdp_policy_mp=bfloat16) instead of autocast.
- trl: TRL's DPOTrainer (bf16=True, padded, full logits) on the same float32 policy, with a
  copy of it as the reference (dpo_throughput.run_trl), when trl is installed.

The CUDA code is the CPU code: the device and dtypes come from the config (device=cuda).
Model FLOPs count the useful work of a step, the same for every row: for each chosen and
rejected sequence of L tokens (prompt included in each), policy forward + backward (3 forward
passes) and the reference forward (1): 4 x (2 x matmul weights x L + 2 x layers x hidden x L^2),
the matmul weights including the vocabulary projection at every position, the second term
causal attention (scores and weighted values over the L^2 / 2 earlier positions). Prefix sharing,
packing and chunked log-probs skip part of that work, so their utilisation can pass what the
chip computes; it is a speed on the same work, like tokens/s. Utilisation is against 989
TFLOP/s, the dense bfloat16 peak of an H100 SXM (NVIDIA's datasheet; the H200 has the same chip,
with more memory). Peak memory is torch.cuda.max_memory_allocated over the steps (on the CPU:
peak RSS).
"""

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import dpo_throughput
from dpo_throughput import RESULT_MARKER, SEED, fmt, total_seconds, version

PEAK_BF16_FLOPS = 989e12  # H100 SXM, dense bfloat16 (NVIDIA datasheet); the H200 is the same chip
DEFAULT_ROW_TIMEOUT_S = 240
MIN_ROW_SECONDS = 20  # a row given less of the time budget than this is not started


@dataclass(frozen=True)
class Workload:
    """The model's shape, the pairs' lengths and the steps of one benchmark size."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    max_length: int
    max_prompt_length: int
    prompt_tokens: tuple[int, int]  # log-uniform range of a prompt's length
    response_tokens: tuple[int, int]  # of a response's (cut to fit max_length)
    batch_pairs: int
    warmup_steps: int
    timed_steps: int


WORKLOADS = {
    # ~0.73B parameters (24 x 28.3M in the blocks, 49M in the tied embeddings)
    "gpu": Workload(1536, 4096, 24, 12, 32000, 1024, 768, (64, 640), (16, 384), 8, 3, 8),
    "tiny": Workload(64, 128, 2, 4, 512, 256, 192, (16, 128), (4, 96), 4, 1, 2),
}

FLEX = "model.attn_implementation=flex_attention"
FLASH = "model.attn_implementation=flash_attention_2"

ROWS = {
    "default": ("ours", []),  # what `python train.py loss=dpo` gives: auto packing and share_prompt, sdpa
    "padded": ("ours", ["packing=false", "share_prompt=false"]),
    "packed": ("ours", ["packing=true", "share_prompt=false"]),
    "shared": ("ours", ["packing=false", "share_prompt=true"]),
    "packed-shared": ("ours", ["packing=true", "share_prompt=true"]),
    "fsdp-packed-shared": (
        "ours",
        [
            "trainer=FSDPTrainer",
            "packing=true",
            "share_prompt=true",
            "autocast_dtype=null",
            "model.fsdp_policy_mp=bfloat16",
        ],
    ),
    # flash attention takes packed rows as varlen sequences, but no prefix-shared mask
    "flash-packed": ("ours", ["packing=true", "share_prompt=false", FLASH]),
    "trl": ("trl", []),
    # last, so that a slow compilation cannot crowd out the other rows of a time budget; each + compile_backend.
    # FlexAttention: the prefix-shared mask as a BlockMask whose fully masked blocks the kernel skips
    "flex-packed-compiled": ("ours", ["packing=true", "share_prompt=false", FLEX]),
    "flex-shared-compiled": ("ours", ["packing=false", "share_prompt=true", FLEX]),
    "flex-packed-shared-compiled": ("ours", ["packing=true", "share_prompt=true", FLEX]),
    "packed-shared-compiled": ("ours", ["packing=true", "share_prompt=true"]),
}


# ----- the child process: one row ---------------------------------------------------------


class DeviceStepRecorder(dpo_throughput.StepRecorder):
    """Step times read once the device has finished its queued work, and the device allocator's peak.

    On the CPU it is dpo_throughput's recorder: wall time and peak RSS.
    """

    def __init__(self, device):
        super().__init__()
        self.device = device

    def now(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        import torch

        if self.device.type != "cuda":
            super().start()
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def result(self, warmup_steps: int) -> dict:
        import torch

        if self.device.type != "cuda":
            cpu = super().result(warmup_steps)
            return {"step_seconds": cpu["step_seconds"], "peak_memory_gib": cpu["peak_rss_mib"] / 1024}
        peak = torch.cuda.max_memory_allocated(self.device)
        return {"step_seconds": self.seconds[warmup_steps:], "peak_memory_gib": peak / 2**30}


def overrides(row: str, args: argparse.Namespace, scratch: Path, run_dir: str) -> list[str]:
    """The config of a row: model=tiny built at the workload's shape, DPO on the scratch folder's pairs."""
    workload = WORKLOADS[args.workload]
    row_overrides = list(ROWS[row][1])
    if row.endswith("-compiled"):
        row_overrides.append(f"compile_backend={args.compile_backend}")
    return [
        "model=tiny",
        f"model.tokenizer_name_or_path={scratch / 'tokenizer'}",
        f"model.from_scratch.hidden_size={workload.hidden_size}",
        f"model.from_scratch.intermediate_size={workload.intermediate_size}",
        f"model.from_scratch.num_hidden_layers={workload.num_hidden_layers}",
        f"model.from_scratch.num_attention_heads={workload.num_attention_heads}",
        "model.policy_dtype=float32",
        "model.reference_dtype=bfloat16",
        "autocast_dtype=bfloat16",
        "loss=dpo",
        f"loss.beta={dpo_throughput.BETA}",
        "trainer=BasicTrainer",
        f"device={args.device}",
        f"datasets=[{scratch / 'pairs.jsonl'}]",
        f"batch_size={workload.batch_pairs}",
        f"eval_batch_size={workload.batch_pairs}",
        f"n_eval_examples={workload.batch_pairs}",
        "gradient_accumulation_steps=1",
        "n_examples=null",
        f"max_length={workload.max_length}",
        f"max_prompt_length={workload.max_prompt_length}",
        "optimizer=AdamW",
        f"lr={dpo_throughput.LEARNING_RATE}",
        f"weight_decay={dpo_throughput.WEIGHT_DECAY}",
        "warmup_steps=0",
        f"max_grad_norm={dpo_throughput.MAX_GRAD_NORM}",
        "do_first_eval=false",
        "sample_during_eval=false",
        "plots.enabled=false",
        "debug=true",
        "cache_dir=null",
        f"local_dirs=[{run_dir}]",
        f"seed={SEED}",
        *row_overrides,
    ]


def useful_flops(workload: Workload, batches: list[list[dict]]) -> float:
    """Model FLOPs of the useful work of the batches (see the module docstring)."""
    hidden, layers = workload.hidden_size, workload.num_hidden_layers
    matmul_weights = layers * (4 * hidden * hidden + 3 * hidden * workload.intermediate_size)
    matmul_weights += workload.vocab_size * hidden  # the vocabulary projection
    flops = 0.0
    for example in (example for batch in batches for example in batch):
        for side in ("chosen", "rejected"):
            length = len(example[f"{side}_input_ids"])
            flops += 4 * (2 * matmul_weights * length + 2 * layers * hidden * length**2)
    return flops


def run_ours(config, args: argparse.Namespace, run_dir: str) -> dict:
    """Time train_step of the trainer train.py builds (FSDPTrainer: in a process group of one)."""
    import torch
    import torch.distributed as dist

    import train
    from trainers import TRAINERS
    from utils import free_port, resolve_device, seed_everything

    device = resolve_device(config.device, 0)
    if TRAINERS[config.trainer].multi_process:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        seed_everything(config.seed)
        trainer = train.build_trainer(config, Path(run_dir), device, rank=0, world_size=1)
        trainer.prepare()  # the log-prob path and the layout (share_prompt falls back where it cannot work)
        batches = dpo_throughput.batches_of(trainer.train_examples, config, args.warmup + args.steps)
        recorder = DeviceStepRecorder(device)
        recorder.start()
        for batch in batches:
            start = recorder.now()
            trainer.train_step(batch)
            recorder.seconds.append(recorder.now() - start)
        return {
            **recorder.result(args.warmup),
            "timed_batches": batches[args.warmup :],
            "layout": trainer.plan.layout,
            "chunked": trainer.plan.chunk_tokens is not None,
        }
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_trl(config, args: argparse.Namespace, scratch: Path, run_dir: str) -> dict:
    """Time TRL's DPOTrainer on the same pairs in the same order (dpo_throughput.run_trl, on config.device)."""
    import console
    from loss_registry import LossSpec
    from models import load_tokenizer
    from train import load_examples
    from utils import resolve_device

    tokenizer = load_tokenizer(config.model)
    with console.silenced():
        train_examples, _ = load_examples(config, LossSpec.from_config(config.loss), tokenizer)
    pairs = [json.loads(line) for line in (scratch / "pairs.jsonl").read_text().splitlines()]
    trl_args = argparse.Namespace(dtype="bfloat16", warmup=args.warmup, steps=args.steps, batch_pairs=args.batch_pairs)
    recorder = DeviceStepRecorder(resolve_device(config.device, 0))
    result = dpo_throughput.run_trl(
        config, tokenizer, train_examples, {p["prompt"]: p for p in pairs}, trl_args, run_dir, recorder
    )
    batches = dpo_throughput.batches_of(train_examples, config, args.warmup + args.steps)
    return {**result, "timed_batches": batches[args.warmup :], "layout": "padded", "chunked": False}


def child_main(row: str, args: argparse.Namespace) -> None:
    sys.path[:0] = [str(dpo_throughput.REPO_ROOT)]
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from config_checks import validate_config
    from train import compose_config

    scratch = Path(args.scratch)
    with tempfile.TemporaryDirectory(prefix=f"gpu-benchmark-{row}-") as run_dir:
        config = compose_config(overrides(row, args, scratch, run_dir))
        validate_config(config, world_size=1)
        result = run_trl(config, args, scratch, run_dir) if ROWS[row][0] == "trl" else run_ours(config, args, run_dir)
    timed = result.pop("timed_batches")
    result |= {
        "status": "ok",
        "useful_tokens": dpo_throughput.useful_tokens(timed),
        "useful_flops": useful_flops(WORKLOADS[args.workload], timed),
        "pairs": sum(len(batch) for batch in timed),
    }
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ----- the parent process: the data, every row, the table --------------------------------


def write_scratch(workload: Workload, n_pairs: int, scratch: Path) -> None:
    """The stand-in tokenizer (scratch/tokenizer) and the HH-like pairs (scratch/pairs.jsonl) every row reads."""
    import synthetic_data

    tokenizer = synthetic_data.word_level_tokenizer(workload.vocab_size, synthetic_data.HH_VOCABULARY)
    tokenizer.save_pretrained(scratch / "tokenizer")
    pairs = synthetic_data.hh_like_pairs(
        tokenizer, n_pairs, workload.max_length, SEED, workload.prompt_tokens, workload.response_tokens
    )
    (scratch / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))


def run_row(row: str, args: argparse.Namespace, scratch: Path, log_file: Path, timeout_s: float) -> dict:
    """Run one row in a fresh interpreter (its output appended to log_file); its result, or a failure status."""
    command = [sys.executable, __file__, "--child", row, "--scratch", str(scratch)]
    command += ["--device", args.device, "--workload", args.workload, "--compile-backend", args.compile_backend]
    print(f"running {row} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    # a session of its own, so that a row past its time goes with everything it started (compile workers)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout_s)
        status = f"exit {child.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        status = f"over its {timeout_s:.0f} s"
    with log_file.open("a") as log:
        log.write(f"===== {row} ({time.perf_counter() - start:.0f} s): {shlex.join(command)}\n{stdout}{stderr}\n")
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    last_error = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"failed: {status}: {last_error[:200].replace('|', '/')}"}


def device_description(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible)"
    return f"CPU: {os.cpu_count()} cores, {dpo_throughput.cpu_model()}"


def report(args: argparse.Namespace, results: dict[str, dict], seconds: float) -> list[str]:
    """The header and the table a person can quote."""
    workload = WORKLOADS[args.workload]
    trl = dpo_throughput.ok(results, "trl")
    lines = [
        f"DPO training step on one device, workload `{args.workload}`",
        "",
        f"- command: `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}` ({seconds:.0f} s)",
        f"- device: {device_description(args.device)}; torch {version('torch')}, transformers "
        f"{version('transformers')}, trl {version('trl')}, Python {platform.python_version()}",
        f"- model: Llama-style from config (model=tiny's shape overridden), random weights (seed {SEED}): hidden "
        f"{workload.hidden_size}, MLP {workload.intermediate_size}, {workload.num_hidden_layers} layers, "
        f"{workload.num_attention_heads} heads, vocab {workload.vocab_size:,} (stand-in word-level tokenizer), tied "
        "embeddings, sdpa attention; float32 policy, bfloat16 autocast, bfloat16 reference",
        f"- data: {workload.batch_pairs} HH-like pairs per step, prompts {workload.prompt_tokens[0]}-"
        f"{workload.prompt_tokens[1]} and responses {workload.response_tokens[0]}-{workload.response_tokens[1]} "
        f"tokens (log-uniform, cut to fit max_length {workload.max_length}); {args.steps} timed steps after "
        f"{args.warmup} warmup steps; compiled row: compile_backend={args.compile_backend}",
        f"- utilisation: model FLOPs of the useful work (see the script's docstring) against "
        f"{PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s, the H100 SXM dense bfloat16 peak",
        "",
        "| row | layout | s/step | pairs/s | useful tokens/s | ÷ TRL (tokens/s) | useful TFLOP/s | MFU | peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, result in results.items():
        if result["status"] != "ok":
            lines.append(f"| {row} | {result['status']} | | | | | | | |")
            continue
        step_seconds = total_seconds(result)
        flops_per_second = result["useful_flops"] / step_seconds
        on_gpu = args.device == "cuda"
        layout = f"{result['layout']}, {'chunked' if result['chunked'] else 'full logits'}"
        lines.append(
            f"| {row} | {layout} | {step_seconds / len(result['step_seconds']):.3f} | "
            f"{result['pairs'] / step_seconds:.2f} | {result['useful_tokens'] / step_seconds:,.0f} | "
            f"{fmt(total_seconds(trl) / step_seconds if trl else None, '.2f')} | {flops_per_second / 1e12:.3g} | "
            f"{fmt(flops_per_second / PEAK_BF16_FLOPS if on_gpu else None, '.1%')} | "
            f"{result['peak_memory_gib']:.2f} |"
        )
    return lines


def parent_main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "gpu_benchmark_rows.log"
    log_file.write_text("")
    workload = WORKLOADS[args.workload]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-benchmark-") as scratch:
        n_needed = (args.warmup + args.steps) * args.batch_pairs
        write_scratch(workload, n_needed + n_needed // 10 + 2, Path(scratch))  # about 5% go to the test split
        results = {}
        for row in args.rows:
            time_left = args.time_budget - (time.perf_counter() - start)
            if time_left < MIN_ROW_SECONDS:
                results[row] = {"status": f"not run: {args.time_budget} s time budget spent"}
                continue
            results[row] = run_row(row, args, Path(scratch), log_file, min(args.row_timeout, time_left))
    lines = report(args, results, time.perf_counter() - start)
    (out / "gpu_benchmark.md").write_text("\n".join(lines) + "\n")
    summary = {"workload": asdict(workload), "args": vars(args), "results": results}
    (out / "gpu_benchmark.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short pairs: a smoke test")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW", help=", ".join(ROWS))
    parser.add_argument("--compile-backend", default="inductor", help="compile_backend of the compiled row")
    parser.add_argument(
        "--out", default=os.environ.get("OUT", ".cache/gpu_check"), help="output folder (default: $OUT, if set)"
    )
    parser.add_argument("--row-timeout", type=int, default=DEFAULT_ROW_TIMEOUT_S, help="seconds a row may take")
    parser.add_argument(
        "--time-budget", type=int, default=3600, help="seconds for all rows; rows it leaves no time for are not run"
    )
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)  # the parent's folder of tokenizer and pairs
    parser.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)  # set from --tiny
    args = parser.parse_args()
    args.workload = args.workload or ("tiny" if args.tiny else "gpu")
    workload = WORKLOADS[args.workload]
    args.batch_pairs, args.warmup, args.steps = workload.batch_pairs, workload.warmup_steps, workload.timed_steps
    if "trl" in args.rows and version("trl") == "not installed":
        args.rows.remove("trl")
        print("trl is not installed: no TRL row", file=sys.stderr)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args.child, args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

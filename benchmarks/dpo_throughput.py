"""Pairs/s, useful tokens/s and peak memory of a DPO training step: this project against TRL.

    .venv/bin/python benchmarks/dpo_throughput.py                       # HH-like length mix, float32
    .venv/bin/python benchmarks/dpo_throughput.py --scenario memory     # vocab 128,256, length 1,024
    .venv/bin/python benchmarks/dpo_throughput.py --dtype bfloat16 --rows bare-padded trl live-packed-chunked

Every row runs in its own subprocess (so its peak RSS is its own) on the same randomly
initialised Llama-style model (same seed), the same pairs and the same batches in the same
order, on the CPU:

- bare-padded / bare-packed: the limit, the model work alone on the same batch: policy
  forward + backward on the chosen and rejected sequences (one per row, padded to the
  longest; or packed into rows of max_length tokens), reference forward without gradients,
  AdamW step.
- live-* / precomputed-*: this project's BasicTrainer.train_step, with data, models and trainer
  built as train.py builds them; one row per setting of precompute_ref_logps, packing and
  logps_chunk_tokens.
- trl: TRL's DPOTrainer (benchmarks/requirements.txt) with the same model as an explicit
  reference, the same precision, no gradient checkpointing and a sequential sampler. Its steps
  are timed from one step's end to the next, so its batch collation counts, as ours does.

All rows run --rounds times, one row after the other, and each timed batch counts with its
fastest round: other processes on a shared machine can only slow a step down (the header says
how busy they kept the machine). Each row uses --threads torch threads (default 1: on a
shared two-core machine the steadiest timing, and under load no slower than two). Separate
processes still differ by several percent, too much to check a 5% budget, so with
--interleave (the throughput default) each of our rows then runs its timed batches once more,
alternating batch by batch with the bare work of its layout in the same process: the
"÷ bare, interleaved" column, which the goal checks use (the precomputed/live ratio as the
quotient of two such columns, the machine's speed cancelling out).

Useful tokens are the non-padding tokens of every chosen and rejected sequence (prompt
included in each); the data never needs truncating, so both projects train on identical token
ids. Peak RSS is the whole process's; "step peak" is what the training steps add to the RSS
the process had when they began (imports, data and models).
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_MARKER = "BENCHMARK_RESULT "
SEED = 0
LEARNING_RATE = 1e-6
MAX_GRAD_NORM = 10.0
BETA = 0.1
CHUNK_TOKENS = 1024  # logps_chunk_tokens of the chunked rows
CHILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Row:
    """One row: who trains ("ours", "trl" or "bare"), the layout of its batches, and our config overrides."""

    side: str
    layout: str  # "padded" or "packed": the bare limit the row is held to
    overrides: tuple[str, ...] = ()


def _ours(reference: str, layout: str, chunked: bool) -> Row:
    overrides = (
        f"precompute_ref_logps={str(reference == 'precomputed').lower()}",
        f"packing={str(layout == 'packed').lower()}",
        f"logps_chunk_tokens={CHUNK_TOKENS if chunked else 'null'}",
    )
    return Row("ours", layout, overrides)


ROWS = {
    "bare-padded": Row("bare", "padded"),
    "bare-packed": Row("bare", "packed"),
    "trl": Row("trl", "padded"),
    "live-padded": _ours("live", "padded", chunked=False),
    "live-padded-chunked": _ours("live", "padded", chunked=True),
    "live-packed": _ours("live", "packed", chunked=False),
    "live-packed-chunked": _ours("live", "packed", chunked=True),
    "precomputed-padded": _ours("precomputed", "padded", chunked=False),
    "precomputed-packed-chunked": _ours("precomputed", "packed", chunked=True),
}


@dataclass(frozen=True)
class Scenario:
    """A workload: model shape, sequence limits, data, and the defaults of its command-line options."""

    description: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int | None  # None: the project's embedded tokenizer (vocab 512) and HH-like text
    max_length: int
    max_prompt_length: int
    batch_pairs: int
    warmup_steps: int
    timed_steps: int
    rounds: int
    interleave: bool
    rows: tuple[str, ...]


SCENARIOS = {
    "throughput": Scenario(
        description="HH-format pairs, prompts 20-300 tokens and responses 3-400 tokens (log-uniform), "
        "the project's embedded byte-level BPE tokenizer",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=None,
        max_length=512,
        max_prompt_length=256,
        batch_pairs=8,
        warmup_steps=1,
        timed_steps=5,
        rounds=1,
        interleave=True,
        rows=tuple(ROWS),
    ),
    "memory": Scenario(
        description="random token ids, every prompt 256 and every response 767 tokens + EOS (no padding)",
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128256,
        max_length=1024,
        max_prompt_length=256,
        batch_pairs=4,
        warmup_steps=0,
        timed_steps=1,
        rounds=1,
        interleave=False,
        # every sequence is max_length long, so packed rows equal padded ones: no packed-only rows
        rows=("bare-padded", "trl", "live-padded", "live-padded-chunked", "precomputed-packed-chunked"),
    ),
}


# ----- measuring ------------------------------------------------------------------------


def current_rss_kib() -> int:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_rss_kib() -> int:
    """Peak RSS since the process started or since the last reset_peak_rss()."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM (and ru_maxrss) to the current RSS


class StepRecorder:
    """Wall time of each training step, and the peak RSS the steps reach."""

    def __init__(self):
        self.seconds: list[float] = []

    def start(self) -> None:
        """Call right before the first step: remembers the setup's peak RSS, then resets it."""
        self.setup_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.start_rss_kib = current_rss_kib()
        reset_peak_rss()

    def result(self, warmup_steps: int) -> dict:
        steps_peak_kib = peak_rss_kib()
        return {
            "step_seconds": self.seconds[warmup_steps:],
            "peak_rss_mib": max(self.setup_peak_kib, steps_peak_kib) / 1024,
            "step_peak_mib": (steps_peak_kib - self.start_rss_kib) / 1024,
        }


def useful_tokens(batches: list[list[dict]]) -> int:
    return sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for batch in batches for e in batch)


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ----- the child process: one row ---------------------------------------------------------


def write_pairs(scenario: Scenario, n_pairs: int, path: Path):
    """Write the scenario's pairs to a .jsonl file; return the tokenizer and the pairs by prompt."""
    import synthetic_data

    import embedded

    if scenario.vocab_size is None:
        tokenizer = embedded.build_tokenizer()
        pairs = synthetic_data.hh_like_pairs(tokenizer, n_pairs, scenario.max_length, seed=SEED)
    else:
        tokenizer = synthetic_data.word_level_tokenizer(scenario.vocab_size)
        response_tokens = scenario.max_length - scenario.max_prompt_length - 1  # + EOS = max_length
        pairs = synthetic_data.fixed_length_pairs(
            scenario.vocab_size, n_pairs, scenario.max_prompt_length, response_tokens, SEED
        )
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return tokenizer, {pair["prompt"]: pair for pair in pairs}


def base_overrides(scenario: Scenario, args: argparse.Namespace, data_file: Path, run_dir: str) -> list[str]:
    """Overrides shared by every row: a single-device DPO run of the scenario's model on the pairs."""
    autocast = "bfloat16" if args.dtype == "bfloat16" else "null"
    return [
        "loss=dpo",
        f"loss.beta={BETA}",
        "trainer=BasicTrainer",
        f"batch_size={args.batch_pairs}",
        "gradient_accumulation_steps=1",
        f"datasets=[{data_file}]",
        f"n_eval_examples={args.batch_pairs}",
        f"max_length={scenario.max_length}",
        f"max_prompt_length={scenario.max_prompt_length}",
        "do_first_eval=false",
        "sample_during_eval=false",
        "optimizer=AdamW",
        f"lr={LEARNING_RATE}",
        "warmup_steps=0",
        f"max_grad_norm={MAX_GRAD_NORM}",
        "device=cpu",
        f"local_dirs=[{run_dir}]",
        "debug=true",
        "cache_dir=null",
        f"seed={SEED}",
        f"autocast_dtype={autocast}",
        f"model.from_scratch.hidden_size={scenario.hidden_size}",
        f"model.from_scratch.intermediate_size={scenario.intermediate_size}",
        f"model.from_scratch.num_hidden_layers={scenario.num_hidden_layers}",
        f"model.from_scratch.num_attention_heads={scenario.num_attention_heads}",
    ]


def batches_of(examples, n_batches: int, batch_pairs: int) -> list[list[dict]]:
    """The first n_batches consecutive batches of example dicts."""
    if len(examples) < n_batches * batch_pairs:
        raise RuntimeError(f"{len(examples)} train examples, fewer than the {n_batches * batch_pairs} needed.")
    return [[examples[i] for i in range(b * batch_pairs, (b + 1) * batch_pairs)] for b in range(n_batches)]


def run_ours(
    config, tokenizer, train_examples, eval_examples, args: argparse.Namespace, run_dir: str, layout: str
) -> dict:
    """Time BasicTrainer.train_step on the batches, the trainer built as train.py builds it.

    With --interleave, the same batches then run once more, alternating batch by batch with
    the bare model work of the same layout, so that the ratio of the two sees the same machine.
    """
    import torch

    import trainers
    from losses import LossSpec
    from train import load_models, plan_reference

    loss = LossSpec.from_config(config.loss)
    plan = plan_reference(config, loss, train_examples, eval_examples, is_main=False)
    policy, reference = load_models(config, tokenizer, load_reference=loss.uses_reference)
    setup_start = time.perf_counter()
    trainer = trainers.BasicTrainer(
        config,
        loss,
        policy,
        reference,
        plan,
        tokenizer,
        train_examples,
        eval_examples,
        Path(run_dir),
        torch.device("cpu"),
    )
    trainer.prepare()  # the log-prob path, and the reference log-probs of the precomputed rows
    setup_seconds = time.perf_counter() - setup_start
    # the trainer's own examples: precomputed reference log-probs are looked up by their index
    batches = batches_of(trainer.train_examples, args.warmup + args.steps, args.batch_pairs)
    recorder = StepRecorder()
    recorder.start()
    for batch in batches:
        start = time.perf_counter()
        trainer.train_step(batch)
        recorder.seconds.append(time.perf_counter() - start)
    timed = batches[args.warmup :]
    result = {**recorder.result(args.warmup), "setup_seconds": setup_seconds, "useful_tokens": useful_tokens(timed)}
    if args.interleave:
        result["interleaved_bare_ratio"] = interleaved_bare_ratio(trainer, timed, config, tokenizer, args, layout)
    return result


def interleaved_bare_ratio(
    trainer, batches: list[list[dict]], config, tokenizer, args: argparse.Namespace, layout: str
) -> float:
    """Our step time over the bare model work's on the batches, the two alternating batch by batch."""
    bare_step = BareStep(config, tokenizer, args.dtype)
    inputs = [bare_inputs(batch, layout, tokenizer.pad_token_id, config.max_length) for batch in batches]
    bare_step(inputs[0])  # warmup: the optimizer state is allocated in the first step
    ours_seconds = bare_seconds = 0.0
    for batch, batch_inputs in zip(batches, inputs):
        start = time.perf_counter()
        trainer.train_step(batch)
        middle = time.perf_counter()
        bare_step(batch_inputs)
        ours_seconds, bare_seconds = ours_seconds + middle - start, bare_seconds + time.perf_counter() - middle
    return ours_seconds / bare_seconds


def bare_inputs(batch: list[dict], layout: str, pad_token_id: int, row_tokens: int) -> dict:
    """Model inputs of the batch's 2 x pairs sequences, laid out exactly as our trainer lays them out.

    padded: one sequence per row, right-padded (input_ids, attention_mask). packed: rows of
    row_tokens with position ids restarting per sequence (input_ids, position_ids).
    """
    from batching import packed_batch, padded_batch

    sides = ("chosen", "rejected")
    sequences = [e[f"{side}_input_ids"] for side in sides for e in batch]
    labels = [e[f"{side}_labels"] for side in sides for e in batch]
    if layout == "packed":
        packed = packed_batch(sequences, labels, pad_token_id, row_tokens)
        return {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    padded = padded_batch(sequences, labels, pad_token_id)
    return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}


class BareStep:
    """The model work of a DPO step and nothing else: policy forward + backward (on the sum of
    the logits), reference forward without gradients, AdamW step."""

    def __init__(self, config, tokenizer, dtype: str):
        import torch

        from train import load_models

        self.policy, self.reference = load_models(config, tokenizer, load_reference=True)
        self.reference.requires_grad_(False)
        self.reference.eval()
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=LEARNING_RATE)
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None

    def autocast(self):
        import torch

        return torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def __call__(self, inputs: dict) -> None:
        import torch

        with self.autocast():
            logits = self.policy(**inputs, use_cache=False).logits
        logits.sum().backward()
        with torch.no_grad(), self.autocast():
            self.reference(**inputs, use_cache=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def run_bare(config, tokenizer, train_examples, args: argparse.Namespace, layout: str) -> dict:
    """Time the bare model work on the batches."""
    bare_step = BareStep(config, tokenizer, args.dtype)
    batches = batches_of(train_examples, args.warmup + args.steps, args.batch_pairs)
    inputs = [bare_inputs(batch, layout, tokenizer.pad_token_id, config.max_length) for batch in batches]
    recorder = StepRecorder()
    recorder.start()
    for batch_inputs in inputs:
        start = time.perf_counter()
        bare_step(batch_inputs)
        recorder.seconds.append(time.perf_counter() - start)
    return {
        **recorder.result(args.warmup),
        "useful_tokens": useful_tokens(batches[args.warmup :]),
        "batch_tokens": sum(batch_inputs["input_ids"].numel() for batch_inputs in inputs[args.warmup :]),
        "n_params": sum(p.numel() for p in bare_step.policy.parameters()),
    }


def run_trl(config, tokenizer, train_examples, pairs_by_prompt: dict, args: argparse.Namespace, run_dir: str) -> dict:
    """Time TRL's DPOTrainer on the same pairs in the same order."""
    import copy

    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from train import load_models

    recorder = StepRecorder()
    collated = []  # (useful tokens, tokens with padding) of every batch TRL collates, in order

    class CountingCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            collated.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
            return batch

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                recorder.start()
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            recorder.seconds.append(now - self.last)
            self.last = now

    batches = batches_of(train_examples, args.warmup + args.steps, args.batch_pairs)
    pairs = [pairs_by_prompt[e["prompt"]] for batch in batches for e in batch]
    policy, _ = load_models(config, tokenizer, load_reference=False)
    trl_config = DPOConfig(
        output_dir=run_dir,
        seed=SEED,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        bf16=args.dtype == "bfloat16",
        fp16=False,
        gradient_checkpointing=False,  # TRL defaults to both on
        per_device_train_batch_size=args.batch_pairs,
        gradient_accumulation_steps=1,
        max_steps=len(batches),
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.01,
        max_grad_norm=MAX_GRAD_NORM,  # torch.optim.AdamW's default decay, as ours
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=config.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
    )
    collator = CountingCollator(
        pad_token_id=tokenizer.pad_token_id, max_length=config.max_length, truncation_mode="keep_start"
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),
        args=trl_config,
        data_collator=collator,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    timed = collated[args.warmup : len(batches)]
    return {
        **recorder.result(args.warmup),
        "useful_tokens": sum(useful for useful, _ in timed),
        "batch_tokens": sum(total for _, total in timed),
    }


def missing_config_key(error: Exception) -> str | None:
    match = re.search(r"Could not override '([^']+)'", str(error))
    return match.group(1) if match else None


def run_child(row_name: str, args: argparse.Namespace) -> dict:
    """Run one row in this process and return its measurements."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"dpo-benchmark-{row_name}-") as run_dir:
        result = run_row_in(run_dir, row_name, args)
    return {**result, "pairs": args.batch_pairs * args.steps, "threads": torch.get_num_threads()}


def run_row_in(run_dir: str, row_name: str, args: argparse.Namespace) -> dict:
    """Write the data to run_dir, compose the config, load the examples and time the row."""
    from hydra.errors import ConfigCompositionException

    from config_checks import validate_config
    from train import compose_config, load_examples

    scenario, row = SCENARIOS[args.scenario], ROWS[row_name]
    data_file = Path(run_dir) / "pairs.jsonl"
    n_needed = (args.warmup + args.steps) * args.batch_pairs
    tokenizer, pairs_by_prompt = write_pairs(scenario, n_needed + n_needed // 10 + 2, data_file)  # 5% go to "test"
    try:
        config = compose_config(base_overrides(scenario, args, data_file, run_dir) + list(row.overrides))
    except ConfigCompositionException as error:
        if missing_config_key(error) is None:
            raise
        return {"status": f"n/a (config key missing: {missing_config_key(error)})"}
    validate_config(config, world_size=1)
    train_examples, eval_examples = load_examples(config, tokenizer, is_main=False)
    if row.side == "ours":
        result = run_ours(config, tokenizer, train_examples, eval_examples, args, run_dir, row.layout)
    elif row.side == "bare":
        result = run_bare(config, tokenizer, train_examples, args, row.layout)
    else:
        result = run_trl(config, tokenizer, train_examples, pairs_by_prompt, args, run_dir)
    return {**result, "status": "ok"}


def child_main(row_name: str, args: argparse.Namespace) -> None:
    sys.path[:0] = [str(REPO_ROOT), str(Path(__file__).resolve().parent)]
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run_child(row_name, args)
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ----- the parent process: run every row, print the table --------------------------------


class Interference:
    """How much CPU other processes took while the children ran, as a share of the machine."""

    def __init__(self):
        self.others_seconds = self.wall_seconds = 0.0

    def measure(self, run, *args):
        busy, children, start = machine_busy_seconds(), children_cpu_seconds(), time.perf_counter()
        result = run(*args)
        self.wall_seconds += time.perf_counter() - start
        self.others_seconds += max(machine_busy_seconds() - busy - (children_cpu_seconds() - children), 0.0)
        return result

    @property
    def share(self) -> float:
        return self.others_seconds / max(self.wall_seconds * os.cpu_count(), 1e-9)


def run_row(row_name: str, args: argparse.Namespace) -> dict:
    """Run one row in a fresh interpreter; its result, or a failure status."""
    command = [
        sys.executable,
        __file__,
        "--child",
        row_name,
        "--scenario",
        args.scenario,
        "--dtype",
        args.dtype,
        "--batch-pairs",
        str(args.batch_pairs),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--interleave" if args.interleave else "--no-interleave",
    ]
    print(f"running {row_name} ...", file=sys.stderr, flush=True)
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: over {CHILD_TIMEOUT_S} s"}
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    last_error = (completed.stderr.strip().splitlines() or ["no output"])[-1]
    killed = " (killed: out of memory?)" if completed.returncode == -9 else ""
    return {"status": f"failed: exit {completed.returncode}{killed}: {last_error[:200].replace('|', '/')}"}


def merge_rounds(runs: list[dict]) -> dict:
    """One row's rounds as one result: each batch's fastest time, the largest memory figures."""
    failed = [run for run in runs if run["status"] != "ok"]
    if failed:
        return failed[0]
    merged = dict(runs[0])
    merged["step_seconds"] = [min(times) for times in zip(*(run["step_seconds"] for run in runs))]
    for key in ("peak_rss_mib", "step_peak_mib"):
        merged[key] = max(run[key] for run in runs)
    if "setup_seconds" in merged:
        merged["setup_seconds"] = min(run["setup_seconds"] for run in runs)
    if "interleaved_bare_ratio" in merged:  # each round's ratio already saw one machine state: average them
        merged["interleaved_bare_ratio"] = sum(run["interleaved_bare_ratio"] for run in runs) / len(runs)
    return merged


def cpu_model() -> str:
    match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return match.group(1).strip() if match else platform.processor()


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(args: argparse.Namespace, results: dict[str, dict], interference: Interference) -> list[str]:
    scenario = SCENARIOS[args.scenario]
    threads = next((r["threads"] for r in results.values() if "threads" in r), "?")
    n_params = next((r["n_params"] for r in results.values() if "n_params" in r), None)
    params = f", {n_params / 1e6:.2f}M parameters" if n_params else ""
    precision = (
        "float32 (TRL: bf16=False)"
        if args.dtype == "float32"
        else "bfloat16 autocast over float32 weights (ours: autocast_dtype=bfloat16; TRL: bf16=True)"
    )
    return [
        f"DPO step benchmark, scenario `{args.scenario}`",
        "",
        f"- command: `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}`",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; other processes used "
        f"{interference.share:.0%} of the machine's CPU while the rows ran",
        f"- machine: {os.cpu_count()} cores (nproc), {cpu_model()}; "
        f"torch {version('torch')} ({threads} thread(s) per row), "
        f"transformers {version('transformers')}, trl {version('trl')}, Python {platform.python_version()}",
        f"- precision: {precision}",
        f"- model: Llama-style, random weights (seed {SEED}), hidden {scenario.hidden_size}, MLP "
        f"{scenario.intermediate_size}, {scenario.num_hidden_layers} layers, {scenario.num_attention_heads} heads, "
        f"vocab {scenario.vocab_size or 512:,}, tied embeddings, sdpa attention{params}",
        f"- data: {args.batch_pairs} pairs (= {2 * args.batch_pairs} sequences) per step, max_length "
        f"{scenario.max_length}; {scenario.description}",
        f"- timing: {args.steps} timed batch(es) after {args.warmup} warmup step(s), the same batches in every row, "
        f"each counted with its fastest of {args.rounds} round(s)"
        f"{' (interleaved ratios: their mean)' * args.interleave}; "
        f"AdamW, lr {LEARNING_RATE:g}, beta {BETA}; "
        f"chunked rows: logps_chunk_tokens={CHUNK_TOKENS}",
        "",
    ]


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def ok(results: dict[str, dict], name: str) -> dict | None:
    result = results.get(name)
    return result if result is not None and result["status"] == "ok" else None


def total_seconds(result: dict) -> float:
    return sum(result["step_seconds"])


def table(results: dict[str, dict]) -> list[str]:
    bare = [ok(results, f"bare-{layout}") for layout in ("padded", "packed")]
    lines = [
        "| row | s/step | pairs/s | useful tokens/s | ÷ bare-padded | ÷ bare-packed | ÷ bare, interleaved "
        "| peak RSS MiB | step peak MiB | setup s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        if result["status"] != "ok":
            lines.append(f"| {name} | {result['status']} | | | | | | | | |")
            continue
        seconds = total_seconds(result)
        ratios = [fmt(seconds / total_seconds(limit) if limit else None, ".2f") for limit in bare]
        lines.append(
            f"| {name} | {seconds / len(result['step_seconds']):.3f} | {result['pairs'] / seconds:.2f} | "
            f"{result['useful_tokens'] / seconds:,.0f} | {ratios[0]} | {ratios[1]} | "
            f"{fmt(result.get('interleaved_bare_ratio'), '.2f')} | {result['peak_rss_mib']:,.0f} | "
            f"{result['step_peak_mib']:,.0f} | {fmt(result.get('setup_seconds'), '.2f')} |"
        )
    return lines


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def goal_lines(results: dict[str, dict], scenario: str) -> list[str]:
    """The project's four goals, checked against the rows that ran."""
    lines = []
    for name, row in ROWS.items():
        ours, bare = ok(results, name), ok(results, f"bare-{row.layout}")
        if not (name.startswith("live") and ours):
            continue
        if "interleaved_bare_ratio" in ours:
            ratio, how = ours["interleaved_bare_ratio"], "interleaved in one process"
        elif bare:
            ratio, how = total_seconds(ours) / total_seconds(bare), "separate processes"
        else:
            continue
        lines.append(
            f"- (1) {name} costs {ratio:.2f}x bare-{row.layout} ({how}; goal <= 1.05): {verdict(ratio <= 1.05)}"
        )
    for precomputed, live in (
        ("precomputed-padded", "live-padded"),
        ("precomputed-packed-chunked", "live-packed-chunked"),
    ):
        if not (ok(results, precomputed) and ok(results, live)):
            continue
        if "interleaved_bare_ratio" in results[precomputed] and "interleaved_bare_ratio" in results[live]:
            # both held to the same bare work in their own process: the machine's speed cancels out
            ratio = results[live]["interleaved_bare_ratio"] / results[precomputed]["interleaved_bare_ratio"]
            how = "from their interleaved ratios"
        else:
            ratio, how = total_seconds(results[live]) / total_seconds(results[precomputed]), "separate processes"
        lines.append(
            f"- (2) {precomputed} pairs/s = {ratio:.2f}x {live}'s ({how}; goal >= 1.4): {verdict(ratio >= 1.4)}"
        )
    trl = ok(results, "trl")
    for name, row in ROWS.items():
        ours = ok(results, name)
        if not (trl and ours and row.side == "ours"):
            continue
        if scenario == "memory" and "chunked" in name:
            ratio = ours["step_peak_mib"] / trl["step_peak_mib"]
            lines.append(f"- (3) {name} step peak = {ratio:.2f}x TRL's (goal <= 0.5): {verdict(ratio <= 0.5)}")
        if scenario == "throughput" and row.layout == "packed":
            ratio = total_seconds(trl) / total_seconds(ours)  # the same useful tokens on both sides
            lines.append(f"- (4) {name} useful tokens/s = {ratio:.2f}x TRL's (goal >= 1.3): {verdict(ratio >= 1.3)}")
    return lines


def notes(results: dict[str, dict]) -> list[str]:
    lines = []
    bare, trl = ok(results, "bare-padded"), ok(results, "trl")
    if bare:
        padding = 1 - bare["useful_tokens"] / bare["batch_tokens"]
        lines.append(
            f"Padded batches hold {bare['batch_tokens']:,} tokens in the timed steps, {padding:.0%} of them padding."
        )
    packed = ok(results, "bare-packed")
    if packed:
        padding = 1 - packed["useful_tokens"] / packed["batch_tokens"]
        lines.append(f"Packed batches hold {packed['batch_tokens']:,} tokens, {padding:.0%} of them padding.")
    if bare and trl and trl["useful_tokens"] != bare["useful_tokens"]:
        lines.append(
            f"WARNING: TRL's batches held {trl['useful_tokens']:,} useful tokens, ours {bare['useful_tokens']:,}."
        )
    return lines


def parent_main(args: argparse.Namespace) -> None:
    interference = Interference()
    runs: dict[str, list[dict]] = {name: [] for name in args.rows}
    for _ in range(args.rounds):
        for name in args.rows:
            runs[name].append(interference.measure(run_row, name, args))
    results = {name: merge_rounds(row_runs) for name, row_runs in runs.items()}
    lines = header(args, results, interference) + table(results) + [""] + notes(results)
    goals = goal_lines(results, args.scenario)
    if goals:
        lines += ["", "Goals:"] + goals
    print("\n".join(lines))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="throughput")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch-pairs", type=int, help="preference pairs per step (default: the scenario's)")
    parser.add_argument("--steps", type=int, help="timed batches (default: the scenario's)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default: the scenario's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per row (default: 1, the steadiest timing on a shared machine)",
    )
    parser.add_argument(
        "--rounds", type=int, help="runs of every row; each batch counts its fastest (default: the scenario's)"
    )
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        help="also time our rows alternating with the bare limit in one process (default: the scenario's)",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=ROWS,
        metavar="ROW",
        help=f"rows to run, in this order (default: the scenario's): {', '.join(ROWS)}",
    )
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    scenario = SCENARIOS[args.scenario]
    for key, default in (
        ("batch_pairs", scenario.batch_pairs),
        ("steps", scenario.timed_steps),
        ("warmup", scenario.warmup_steps),
        ("rounds", scenario.rounds),
        ("interleave", scenario.interleave),
        ("rows", list(scenario.rows)),
    ):
        if getattr(args, key) is None:
            setattr(args, key, default)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args.child, args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

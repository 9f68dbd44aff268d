"""Pairs/s, useful tokens/s and peak memory of a DPO training step: this project against TRL.

    .venv/bin/python benchmarks/dpo_throughput.py                       # HH-like length mix, float32
    .venv/bin/python benchmarks/dpo_throughput.py --scenario memory     # vocab 128,256, length 1,024
    .venv/bin/python benchmarks/dpo_throughput.py --scenario real       # SmolLM2-135M, HH-like pairs
    .venv/bin/python benchmarks/dpo_throughput.py --scenario real-short-prompts  # prompts a quarter of each pair
    .venv/bin/python benchmarks/dpo_throughput.py --dtype bfloat16 --rows bare-padded trl live-packed-chunked

Every row runs in its own subprocess (so its peak RSS is its own) on the same model (randomly
initialised with the same seed, or one model folder's weights), the same pairs and the same
batches in the same order (the first batches train.py would train on), on the CPU:

- bare-padded / bare-packed: the limit, the model work alone on the same batch: policy
  forward + backward on the chosen and rejected sequences (one per row, padded to the
  longest; or packed into rows of max_length tokens), reference forward without gradients,
  AdamW step. bare-shared / bare-packed-shared: the same work on the prefix-shared rows our
  trainer builds with share_prompt=true (shared_prompt.shared_prompt_batch: each pair one
  segment `prompt, chosen, rejected` with its 4D attention mask, one per row or packed).
- live-* / precomputed-*: this project's BasicTrainer.train_step, with data, models and trainer
  built as train.py builds them; one row per setting of precompute_ref_logps, packing,
  share_prompt and logps_chunk_tokens. default: the same with none of them overridden, what
  `python train.py` gives; its layout (and so its bare limit) is read from the trainer.
- trl: TRL's DPOTrainer (benchmarks/requirements.txt) with the same model as an explicit
  reference, the same precision, no gradient checkpointing and a sequential sampler. Its steps
  are timed from one step's end to the next, so its batch collation counts, as ours does.

All rows run --rounds times, one row after the other, and each timed batch counts with its
fastest round: other processes on a shared machine can only slow a step down (the header says
how busy they kept the machine, and its load average). Each row uses --threads torch threads
(default 1: on a shared two-core machine the steadiest timing, and under load no slower than
two; scenario `real`: 2, as the issue measured it on a quiet machine). Separate processes
still differ by several percent, too much to check a 5% budget, so with --interleave (the
throughput and real default) each of our rows then runs its timed batches once more,
alternating batch by batch with the bare work of its layout in the same process: the
"÷ bare, interleaved" column, which the goal checks use (the precomputed/live ratio as the
quotient of two such columns, the machine's speed cancelling out).

Useful tokens are the non-padding tokens of every chosen and rejected sequence (prompt
included in each, also where a prefix-shared row computes it once: the same work counted the
same way in every row); the data never needs truncating, so both projects train on identical
token ids. Peak RSS is the whole process's; "step peak" is what the training steps add to the
RSS the process had when they began (imports, data and models).

Scenario `real` uses the SmolLM2-135M-Instruct folder that scripts/build_chat_model.py builds
(.cache/dpo/models/SmolLM2-135M-Instruct) as `model=blank_model model.name_or_path=<folder>`;
where it is missing, a folder of the same architecture (LlamaConfig, 3 KV heads) with random
weights and a stand-in word-level tokenizer of the same vocabulary, written for the run. The
header says which.
"""

import argparse
import datetime
import importlib.metadata
import itertools
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
from dataclasses import dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_MARKER = "BENCHMARK_RESULT "
SEED = 0
LEARNING_RATE = 1e-6
MAX_GRAD_NORM = 10.0
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, in both projects
BETA = 0.1
CHUNK_TOKENS = 1024  # logps_chunk_tokens of the chunked rows
CHILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Row:
    """One row: who trains ("ours", "trl" or "bare"), the layout of its batches, and our config overrides."""

    side: str
    # how its pairs become model rows, the bare limit it is held to: padded, packed, shared or packed-shared
    # (ForwardPlan.layout); None: the layout the trainer chose, read at run time
    layout: str | None
    overrides: tuple[str, ...] = ()


def _ours(reference: str, layout: str, chunked: bool) -> Row:
    overrides = (
        f"precompute_ref_logps={str(reference == 'precomputed').lower()}",
        f"packing={str(layout.startswith('packed')).lower()}",
        f"share_prompt={str(layout.endswith('shared')).lower()}",
        f"logps_chunk_tokens={CHUNK_TOKENS if chunked else 'null'}",
    )
    return Row("ours", layout, overrides)


ROWS = {
    "bare-padded": Row("bare", "padded"),
    "bare-packed": Row("bare", "packed"),
    "bare-shared": Row("bare", "shared"),
    "bare-packed-shared": Row("bare", "packed-shared"),
    "trl": Row("trl", "padded"),
    "default": Row("ours", None),
    "live-padded": _ours("live", "padded", chunked=False),
    "live-padded-chunked": _ours("live", "padded", chunked=True),
    "live-packed": _ours("live", "packed", chunked=False),
    "live-packed-chunked": _ours("live", "packed", chunked=True),
    "live-shared-chunked": _ours("live", "shared", chunked=True),
    "live-packed-shared-chunked": _ours("live", "packed-shared", chunked=True),
    "precomputed-padded": _ours("precomputed", "padded", chunked=False),
    "precomputed-packed-chunked": _ours("precomputed", "packed", chunked=True),
    "precomputed-packed-shared-chunked": _ours("precomputed", "packed-shared", chunked=True),
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
    threads: int = 1
    # a model folder to train (weights and tokenizer) when it is complete; else a folder of this
    # scenario's architecture with random weights is written for the run. None: model=tiny's shape
    pretrained: Path | None = None
    num_key_value_heads: int | None = None  # of the pretrained architecture (None: one per attention head)
    # log-uniform (low, high) token ranges of HH-like prompts and responses; None: synthetic_data's defaults
    prompt_tokens: tuple[int, int] | None = None
    response_tokens: tuple[int, int] | None = None


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
        rows=(
            "bare-padded",
            "bare-packed",
            "trl",
            "live-padded",
            "live-padded-chunked",
            "live-packed",
            "live-packed-chunked",
            "precomputed-padded",
            "precomputed-packed-chunked",
        ),
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
    "real": Scenario(
        # HH's prompts (the whole dialogue so far) are long next to its responses: here the prompt is
        # about 70% of each sequence, and lengths vary as much as padding to the longest makes costly
        description="HH-format pairs, prompts 16-192 tokens and responses 4-128 tokens (log-uniform, cut to fit "
        "max_length), the model's tokenizer",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_length=256,
        max_prompt_length=224,
        batch_pairs=4,
        warmup_steps=1,
        timed_steps=3,
        rounds=2,
        interleave=True,
        threads=2,  # the issue's measurement: two threads on a quiet two-core machine
        pretrained=REPO_ROOT / ".cache" / "dpo" / "models" / "SmolLM2-135M-Instruct",
        prompt_tokens=(16, 192),
        response_tokens=(4, 128),
        rows=(
            "bare-padded",
            "bare-packed",
            "bare-shared",
            "bare-packed-shared",
            "trl",
            "default",
            "live-padded-chunked",
            "live-packed-chunked",
            "live-shared-chunked",
            "precomputed-packed-shared-chunked",
        ),
    ),
}

# UltraFeedback-like: one question, long answers; the prompt is about a quarter of each sequence, so
# prefix sharing saves less than on HH. Everything else is the real scenario's.
SCENARIOS["real-short-prompts"] = replace(
    SCENARIOS["real"],
    description="HH-format pairs, prompts 8-64 tokens and responses 32-192 tokens (log-uniform, cut to fit "
    "max_length), the model's tokenizer",
    max_prompt_length=64,
    prompt_tokens=(8, 64),
    response_tokens=(32, 192),
)


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

    def now(self) -> float:
        """The time a step boundary is read at (a GPU recorder waits for the device's queued work first)."""
        return time.perf_counter()

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


def scenario_tokenizer(scenario: Scenario, config):
    """The tokenizer of the scenario's model: the model folder's (loaded as train.py loads it), the
    project's embedded one, or a word-level one of the scenario's vocabulary."""
    import synthetic_data

    import embedded
    from models import load_tokenizer

    if scenario.pretrained is not None:
        return load_tokenizer(config.model)
    if scenario.vocab_size is None:
        return embedded.build_tokenizer()
    return synthetic_data.word_level_tokenizer(scenario.vocab_size)


def write_pairs(scenario: Scenario, tokenizer, n_pairs: int, path: Path) -> dict[str, dict]:
    """Write the scenario's pairs to a .jsonl file; return the pairs by prompt."""
    import synthetic_data

    if scenario.pretrained is not None or scenario.vocab_size is None:
        pairs = synthetic_data.hh_like_pairs(
            tokenizer,
            n_pairs,
            scenario.max_length,
            SEED,
            scenario.prompt_tokens or synthetic_data.PROMPT_TOKENS,
            scenario.response_tokens or synthetic_data.RESPONSE_TOKENS,
        )
    else:
        response_tokens = scenario.max_length - scenario.max_prompt_length - 1  # + EOS = max_length
        pairs = synthetic_data.fixed_length_pairs(
            scenario.vocab_size, n_pairs, scenario.max_prompt_length, response_tokens, SEED
        )
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return {pair["prompt"]: pair for pair in pairs}


def model_overrides(scenario: Scenario, args: argparse.Namespace) -> list[str]:
    """The model of the scenario: its model folder (args.model_dir), or model=tiny built in its shape."""
    if scenario.pretrained is not None:
        return [
            "model=blank_model",
            f"model.name_or_path={args.model_dir}",
            "model.block_name=LlamaDecoderLayer",
            "model.reference_dtype=float32",  # as TRL's reference, a copy of the float32 policy
        ]
    return [
        f"model.from_scratch.hidden_size={scenario.hidden_size}",
        f"model.from_scratch.intermediate_size={scenario.intermediate_size}",
        f"model.from_scratch.num_hidden_layers={scenario.num_hidden_layers}",
        f"model.from_scratch.num_attention_heads={scenario.num_attention_heads}",
    ]


def base_overrides(scenario: Scenario, args: argparse.Namespace, data_file: Path, run_dir: str) -> list[str]:
    """Overrides shared by every row: a single-device DPO run of the scenario's model on the pairs."""
    autocast = "bfloat16" if args.dtype == "bfloat16" else "null"
    return model_overrides(scenario, args) + [
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
        f"weight_decay={WEIGHT_DECAY}",
        "warmup_steps=0",
        f"max_grad_norm={MAX_GRAD_NORM}",
        "device=cpu",
        f"local_dirs=[{run_dir}]",
        "debug=true",
        "cache_dir=null",
        f"seed={SEED}",
        f"autocast_dtype={autocast}",
    ]


def batches_of(examples, config, n_batches: int) -> list[list[dict]]:
    """The first n_batches batches of example dicts that train.py would train on, in its (seeded) order.

    Its order, not the examples' own: a precomputed-reference run scores only the examples it trains on.
    """
    from batching import training_order

    order = training_order(len(examples), config.batch_size, config.seed, config.n_epochs, config.n_examples)
    batches = [[examples[i] for i in indices] for indices in itertools.islice(order, n_batches)]
    if len(batches) < n_batches:
        raise RuntimeError(f"{len(examples)} train examples: fewer than {n_batches} batches of {config.batch_size}.")
    return batches


def run_ours(config, tokenizer, train_examples, eval_examples, args: argparse.Namespace, run_dir: str) -> dict:
    """Time BasicTrainer.train_step on the batches, the trainer built as train.py builds it.

    With --interleave, the same batches then run once more, alternating batch by batch with
    the bare model work of the layout the trainer chose, so that the ratio of the two sees the
    same machine.
    """
    import torch

    import trainers
    from loss_registry import LossSpec
    from train import choose_reference, load_policy

    loss = LossSpec.from_config(config.loss)
    policy = load_policy(config, loss, tokenizer)
    reference = choose_reference(config, loss, tokenizer, train_examples, eval_examples)
    setup_start = time.perf_counter()
    trainer = trainers.BasicTrainer(
        config,
        loss,
        policy,
        reference,
        tokenizer,
        train_examples,
        eval_examples,
        Path(run_dir),
        torch.device("cpu"),
    )
    trainer.prepare()  # the log-prob path and layout, and the reference log-probs of the precomputed rows
    setup_seconds = time.perf_counter() - setup_start
    layout = trainer.plan.layout  # the layout the trainer chose (auto settings resolved)
    # the trainer's own examples: precomputed reference log-probs are looked up by their index
    batches = batches_of(trainer.train_examples, config, args.warmup + args.steps)
    recorder = StepRecorder()
    recorder.start()
    for batch in batches:
        start = time.perf_counter()
        trainer.train_step(batch)
        recorder.seconds.append(time.perf_counter() - start)
    timed = batches[args.warmup :]
    result = {
        **recorder.result(args.warmup),
        "setup_seconds": setup_seconds,
        "useful_tokens": useful_tokens(timed),
        "layout": layout,
        "chunked": trainer.plan.chunk_tokens is not None,
        "reference": "precomputed" if config.precompute_ref_logps else "live",
    }
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
    row_tokens with position ids restarting per sequence (input_ids, position_ids). shared /
    packed-shared: one pair per row (or pairs packed into rows of row_tokens), each prompt once
    (input_ids, position_ids, the (rows, 1, width, width) bool attention_mask).
    """
    from batching import packed_batch, padded_batch
    from shared_prompt import shared_prompt_batch

    if layout in ("shared", "packed-shared"):
        shared = shared_prompt_batch(batch, pad_token_id, row_tokens if layout == "packed-shared" else None)
        return {key: shared[key] for key in ("input_ids", "position_ids", "attention_mask", "pair_ids", "parts")}
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

        from loss_registry import LossSpec
        from train import load_policy, load_reference_model

        self.policy = load_policy(config, LossSpec.from_config(config.loss), tokenizer)
        self.reference = load_reference_model(config, tokenizer)
        self.reference.requires_grad_(False)
        self.reference.eval()
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None

    def autocast(self):
        import torch

        return torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def __call__(self, inputs: dict) -> None:
        import torch

        from shared_prompt import attention_mask_for

        if "pair_ids" in inputs:
            # a prefix-shared batch: its mask in the form this model's attention reads, as the trainer passes it
            mask = attention_mask_for(self.policy, inputs)
            inputs = {key: inputs[key] for key in ("input_ids", "position_ids")} | {"attention_mask": mask}
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
    batches = batches_of(train_examples, config, args.warmup + args.steps)
    inputs = [bare_inputs(batch, layout, tokenizer.pad_token_id, config.max_length) for batch in batches]
    recorder = StepRecorder()
    recorder.start()
    for batch_inputs in inputs:
        start = time.perf_counter()
        bare_step(batch_inputs)
        recorder.seconds.append(time.perf_counter() - start)
    timed = batches[args.warmup :]
    return {
        **recorder.result(args.warmup),
        "useful_tokens": useful_tokens(timed),
        "row_tokens": pair_tokens_in_rows(timed, layout),
        "batch_tokens": sum(batch_inputs["input_ids"].numel() for batch_inputs in inputs[args.warmup :]),
        "n_params": sum(p.numel() for p in bare_step.policy.parameters()),
    }


def pair_tokens_in_rows(batches: list[list[dict]], layout: str) -> int:
    """Tokens of the pairs that the layout's rows hold: the useful tokens, less one prompt per pair when shared."""
    if layout in ("shared", "packed-shared"):
        return useful_tokens(batches) - sum(len(e["prompt_input_ids"]) for batch in batches for e in batch)
    return useful_tokens(batches)


def run_trl(
    config,
    tokenizer,
    train_examples,
    pairs_by_prompt: dict,
    args: argparse.Namespace,
    run_dir: str,
    recorder: StepRecorder | None = None,
) -> dict:
    """Time TRL's DPOTrainer on the same pairs in the same order, on config.device.

    recorder: what reads the step times and the peak memory (default: wall time and peak RSS).
    """
    import copy

    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from loss_registry import LossSpec
    from train import load_policy

    recorder = recorder or StepRecorder()
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
                self.last = recorder.now()

        def on_step_end(self, args, state, control, **kwargs):
            now = recorder.now()
            recorder.seconds.append(now - self.last)
            self.last = now

    batches = batches_of(train_examples, config, args.warmup + args.steps)
    pairs = [pairs_by_prompt[e["prompt"]] for batch in batches for e in batch]
    policy = load_policy(config, LossSpec.from_config(config.loss), tokenizer)
    trl_config = DPOConfig(
        output_dir=run_dir,
        seed=SEED,
        use_cpu=config.device == "cpu",
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
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
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

    import console
    from config_checks import validate_config
    from loss_registry import LossSpec
    from train import compose_config, load_examples

    scenario, row = SCENARIOS[args.scenario], ROWS[row_name]
    data_file = Path(run_dir) / "pairs.jsonl"
    n_needed = (args.warmup + args.steps) * args.batch_pairs
    try:
        config = compose_config(base_overrides(scenario, args, data_file, run_dir) + list(row.overrides))
    except ConfigCompositionException as error:
        if missing_config_key(error) is None:
            raise
        return {"status": f"n/a (config key missing: {missing_config_key(error)})"}
    tokenizer = scenario_tokenizer(scenario, config)
    pairs_by_prompt = write_pairs(scenario, tokenizer, n_needed + n_needed // 10 + 2, data_file)  # 5% go to "test"
    validate_config(config, world_size=1)
    with console.silenced():
        train_examples, eval_examples = load_examples(config, LossSpec.from_config(config.loss), tokenizer)
    if row.side == "ours":
        result = run_ours(config, tokenizer, train_examples, eval_examples, args, run_dir)
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
    """How much CPU other processes took while the children ran, as a share of the machine,
    and the load average before and after."""

    def __init__(self):
        self.others_seconds = self.wall_seconds = 0.0
        self.load_at_start = os.getloadavg()

    def measure(self, run, *args):
        busy, children, start = machine_busy_seconds(), children_cpu_seconds(), time.perf_counter()
        result = run(*args)
        self.wall_seconds += time.perf_counter() - start
        self.others_seconds += max(machine_busy_seconds() - busy - (children_cpu_seconds() - children), 0.0)
        return result

    @property
    def share(self) -> float:
        return self.others_seconds / max(self.wall_seconds * os.cpu_count(), 1e-9)

    def load_averages(self) -> str:
        """The 1/5/15-minute load averages at the start and now (this benchmark's own rows included)."""
        start, end = ("/".join(f"{load:.1f}" for load in loads) for loads in (self.load_at_start, os.getloadavg()))
        return f"load average (1/5/15 min) {start} at the start, {end} at the end"


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
        *(["--model-dir", args.model_dir] if args.model_dir else []),
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
    model = (
        f"{args.model_source}{params}"
        if scenario.pretrained is not None
        else f"Llama-style, random weights (seed {SEED}), hidden {scenario.hidden_size}, MLP "
        f"{scenario.intermediate_size}, {scenario.num_hidden_layers} layers, {scenario.num_attention_heads} heads, "
        f"vocab {scenario.vocab_size or 512:,}, tied embeddings, sdpa attention{params}"
    )
    return [
        f"DPO step benchmark, scenario `{args.scenario}`",
        "",
        f"- command: `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}`",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; other processes used "
        f"{interference.share:.0%} of the machine's CPU while the rows ran; {interference.load_averages()}",
        f"- machine: {os.cpu_count()} cores (nproc), {cpu_model()}; "
        f"torch {version('torch')} ({threads} thread(s) per row), "
        f"transformers {version('transformers')}, trl {version('trl')}, Python {platform.python_version()}",
        f"- precision: {precision}",
        f"- model: {model}",
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


def row_layout(name: str, result: dict) -> str:
    """The layout a row's batches ran in: the one its trainer chose (ours), else the row's own."""
    return result.get("layout") or ROWS[name].layout


def layout_table(results: dict[str, dict]) -> list[str]:
    """Every row against TRL and against the bare limit of its own layout."""
    trl = ok(results, "trl")
    lines = [
        "| row | layout | s/step | pairs/s | useful tokens/s | ÷ TRL (tokens/s) | ÷ own bare | ÷ own bare, "
        "interleaved | peak RSS MiB | step peak MiB | step peak ÷ own bare | setup s |",
        "|---|---|" + "---:|" * 10,
    ]
    for name, result in results.items():
        if result["status"] != "ok":
            lines.append(f"| {name} | {result['status']} |" + " |" * 10)
            continue
        seconds, layout, side = total_seconds(result), row_layout(name, result), ROWS[name].side
        bare = ok(results, f"bare-{layout}") if side != "bare" else None
        described = layout + {"ours": ", chunked" if result.get("chunked") else ", full logits"}.get(side, "")
        lines.append(
            f"| {name} | {described} | {seconds / len(result['step_seconds']):.3f} | {result['pairs'] / seconds:.2f} | "
            f"{result['useful_tokens'] / seconds:,.0f} | {fmt(total_seconds(trl) / seconds if trl else None, '.2f')} | "
            f"{fmt(seconds / total_seconds(bare) if bare else None, '.2f')} | "
            f"{fmt(result.get('interleaved_bare_ratio'), '.2f')} | {result['peak_rss_mib']:,.0f} | "
            f"{result['step_peak_mib']:,.0f} | "
            f"{fmt(result['step_peak_mib'] / bare['step_peak_mib'] if bare else None, '.2f')} | "
            f"{fmt(result.get('setup_seconds'), '.2f')} |"
        )
    return lines


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def bare_ratio(results: dict[str, dict], name: str) -> tuple[float, str, str] | None:
    """Our row's step time over the bare limit of its layout, how that was measured, and the layout.

    Interleaved in the row's own process where it was, else across the two rows' processes.
    """
    ours = ok(results, name)
    if ours is None:
        return None
    layout = row_layout(name, ours)
    if "interleaved_bare_ratio" in ours:
        return ours["interleaved_bare_ratio"], "interleaved in one process", layout
    bare = ok(results, f"bare-{layout}")
    if bare is None:
        return None
    return total_seconds(ours) / total_seconds(bare), "separate processes", layout


def real_goal_lines(results: dict[str, dict]) -> list[str]:
    """The real-shape goals: our default and best exact combination against TRL; each step against its bare limit."""
    lines = []
    trl, default = ok(results, "trl"), ok(results, "default")
    ours = {name: result for name, result in results.items() if ROWS[name].side == "ours" and ok(results, name)}
    if trl and default:
        ratio = total_seconds(trl) / total_seconds(default)  # the same useful tokens on both sides
        lines.append(
            f"- default ({row_layout('default', default)}) useful tokens/s = {ratio:.2f}x TRL's (goal >= 1.5): "
            f"{verdict(ratio >= 1.5)}"
        )
    if trl and ours:
        # every row of ours is exact: packing, prefix sharing, chunked and precomputed log-probs are tested so
        best = min(ours, key=lambda name: total_seconds(ours[name]))
        ratio = total_seconds(trl) / total_seconds(ours[best])
        lines.append(
            f"- best exact combination, {best}: useful tokens/s = {ratio:.2f}x TRL's (goal >= 2.2): "
            f"{verdict(ratio >= 2.2)}"
        )
    for name in (name for name, result in ours.items() if result.get("reference") == "live"):
        # the bare limit includes a reference forward pass, which precomputed rows never run
        measured = bare_ratio(results, name)
        if measured:
            ratio, how, layout = measured
            lines.append(f"- {name} costs {ratio:.2f}x bare-{layout} ({how}; goal <= 1.05): {verdict(ratio <= 1.05)}")
    return lines


def goal_lines(results: dict[str, dict], scenario: str) -> list[str]:
    """The project's four goals (the real scenario: its own three), checked against the rows that ran."""
    if scenario.startswith("real"):
        return real_goal_lines(results)
    lines = []
    for name in ROWS:
        measured = bare_ratio(results, name) if name.startswith("live") else None
        if measured:
            ratio, how, layout = measured
            lines.append(
                f"- (1) {name} costs {ratio:.2f}x bare-{layout} ({how}; goal <= 1.05): {verdict(ratio <= 1.05)}"
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
    for layout in ("shared", "packed-shared"):
        shared = ok(results, f"bare-{layout}")
        if shared:
            saved = 1 - shared["row_tokens"] / shared["useful_tokens"]
            padding = 1 - shared["row_tokens"] / shared["batch_tokens"]
            lines.append(
                f"{layout.capitalize()} rows hold {shared['batch_tokens']:,} positions: {shared['row_tokens']:,} "
                f"tokens of the pairs (each prompt once: {saved:.0%} fewer than the {shared['useful_tokens']:,} useful "
                f"tokens), {padding:.0%} padding."
            )
    if bare and trl and trl["useful_tokens"] != bare["useful_tokens"]:
        lines.append(
            f"WARNING: TRL's batches held {trl['useful_tokens']:,} useful tokens, ours {bare['useful_tokens']:,}."
        )
    return lines


PRETRAINED_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # a complete model folder holds them


def model_folder(scenario: Scenario, scratch: Path) -> tuple[str, str]:
    """The folder every row loads the scenario's model from, and the header's words for it.

    scenario.pretrained when it is complete; else, written to scratch, a folder of the same
    architecture with random weights (seed SEED) and a stand-in word-level tokenizer of its
    vocabulary (synthetic_data): the same model work, without the download.
    """
    folder = scenario.pretrained
    shape = (
        f"hidden {scenario.hidden_size}, MLP {scenario.intermediate_size}, {scenario.num_hidden_layers} layers, "
        f"{scenario.num_attention_heads} heads ({scenario.num_key_value_heads} KV), vocab {scenario.vocab_size:,}, "
        "tied embeddings, sdpa attention"
    )
    if all((folder / name).is_file() for name in PRETRAINED_FILES):
        return str(folder), f"{folder.name} ({shape}), its weights and tokenizer from {os.path.relpath(folder)}"
    import synthetic_data
    import torch
    import transformers

    tokenizer = synthetic_data.word_level_tokenizer(scenario.vocab_size, synthetic_data.HH_VOCABULARY)
    config = transformers.LlamaConfig(
        vocab_size=scenario.vocab_size,
        hidden_size=scenario.hidden_size,
        intermediate_size=scenario.intermediate_size,
        num_hidden_layers=scenario.num_hidden_layers,
        num_attention_heads=scenario.num_attention_heads,
        num_key_value_heads=scenario.num_key_value_heads,
        max_position_embeddings=scenario.max_length,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},  # SmolLM2's
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        transformers.LlamaForCausalLM(config).save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    return str(scratch), (
        f"{folder.name}'s architecture ({shape}) with random weights (seed {SEED}) and a stand-in word-level "
        f"tokenizer of its vocabulary: {os.path.relpath(folder)} is missing (scripts/build_chat_model.py builds it)"
    )


def parent_main(args: argparse.Namespace) -> None:
    scenario = SCENARIOS[args.scenario]
    with tempfile.TemporaryDirectory(prefix="dpo-benchmark-model-") as scratch:
        if scenario.pretrained is not None:
            args.model_dir, args.model_source = model_folder(scenario, Path(scratch))
        interference = Interference()
        runs: dict[str, list[dict]] = {name: [] for name in args.rows}
        for _ in range(args.rounds):  # each round runs every row once, in turn
            for name in args.rows:
                runs[name].append(interference.measure(run_row, name, args))
    results = {name: merge_rounds(row_runs) for name, row_runs in runs.items()}
    rows_table = layout_table(results) if args.scenario.startswith("real") else table(results)
    lines = header(args, results, interference) + rows_table + [""] + notes(results)
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
        help="torch threads per row (default: the scenario's; 1 is the steadiest timing on a shared machine)",
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
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)  # the real scenario's model folder, for the rows
    args = parser.parse_args()
    scenario = SCENARIOS[args.scenario]
    for key, default in (
        ("batch_pairs", scenario.batch_pairs),
        ("steps", scenario.timed_steps),
        ("warmup", scenario.warmup_steps),
        ("rounds", scenario.rounds),
        ("threads", scenario.threads),
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

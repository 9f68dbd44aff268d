"""Configuration checks, run folders, seeding and exact metric averaging."""

import datetime
import os
import random
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

TRAINERS = ("BasicTrainer", "FSDPTrainer", "TensorParallelTrainer")
OPTIMIZERS = ("RMSprop", "AdamW", "Adam")
LOSSES = ("sft", "dpo", "ipo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


class ConfigError(ValueError):
    """One or more problems with the configuration, all reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) with the configuration:\n{listed}")


def uses_reference_model(loss_config: DictConfig) -> bool:
    """Whether the loss compares the policy against a frozen reference model."""
    return loss_config.name in ("dpo", "ipo") and not loss_config.reference_free


def world_size_from_environment(trainer: str) -> int:
    """Processes the run will have: torchrun's WORLD_SIZE, else one per local GPU (at least 1)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if trainer == "BasicTrainer":
        return 1
    return max(torch.cuda.device_count(), 1)


def _check_positive(config: DictConfig, keys: Iterable[str], problems: list[str]) -> None:
    for key in keys:
        value = OmegaConf.select(config, key)
        if value is not None and not value > 0:
            problems.append(f"{key}={value}: must be greater than 0.")


def _check_choice(key: str, value, allowed: Iterable, problems: list[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        problems.append(f"{key}={value}: must be one of {', '.join(map(str, allowed))}.")


def _check_model(model: DictConfig, problems: list[str]) -> None:
    if OmegaConf.is_missing(model, "name_or_path"):
        problems.append("model.name_or_path is required: pass a Hub id or a local model directory.")
    elif (model.name_or_path is None) == (model.from_scratch is None):
        problems.append(
            f"model.name_or_path={model.name_or_path} and model.from_scratch={model.from_scratch}: "
            "set exactly one (a pretrained model to load, or an architecture to build)."
        )
    for key in ("policy_dtype", "reference_dtype"):
        _check_choice(f"model.{key}", model[key], DTYPES, problems)
    if model.fsdp_policy_mp is not None:
        _check_choice("model.fsdp_policy_mp", model.fsdp_policy_mp, DTYPES, problems)
    if model.from_scratch is not None:
        shape = model.from_scratch
        if shape.hidden_size % shape.num_attention_heads:
            problems.append(
                f"model.from_scratch.hidden_size={shape.hidden_size} is not divisible by "
                f"model.from_scratch.num_attention_heads={shape.num_attention_heads}."
            )
    if model.archive is not None:
        archive = Path(model.archive)
        if not archive.exists():
            problems.append(f"model.archive={archive}: no such file or folder. Point it at a checkpoint folder (e.g. <run>/LATEST) or a policy.pt file.")
        elif archive.is_dir() and not (archive / "config.json").exists():
            problems.append(f"model.archive={archive}: this folder has no config.json, so it is not a checkpoint folder (expected e.g. <run>/LATEST).")
        elif archive.is_file() and archive.suffix != ".pt":
            problems.append(f"model.archive={archive}: expected a checkpoint folder or a .pt file from the reference scripts.")


def _check_resume(config: DictConfig, problems: list[str]) -> None:
    if config.resume_from is None:
        return
    checkpoint = Path(config.resume_from)
    # single-device runs save optimizer.pt; distributed ones one shard per rank under optimizer/
    optimizer_state = "optimizer.pt" if config.trainer == "BasicTrainer" else "optimizer"
    missing = [name for name in ("config.json", "trainer_state.pt", optimizer_state) if not (checkpoint / name).exists()]
    if missing:
        problems.append(
            f"resume_from={checkpoint}: missing {', '.join(missing)}. Point it at a checkpoint folder of a "
            f"{config.trainer} run (<run>/step-N or <run>/LATEST)."
        )


def _check_batches(config: DictConfig, world_size: int, problems: list[str]) -> None:
    data_parallel = world_size if config.trainer == "FSDPTrainer" else 1
    micro_batches = config.gradient_accumulation_steps * data_parallel
    if config.batch_size > 0 and config.gradient_accumulation_steps > 0 and config.batch_size % micro_batches:
        problems.append(
            f"batch_size={config.batch_size} must be divisible by gradient_accumulation_steps"
            f"={config.gradient_accumulation_steps} x {data_parallel} data-parallel process(es) = {micro_batches}."
        )
    if config.eval_batch_size > 0 and config.eval_batch_size % data_parallel:
        problems.append(
            f"eval_batch_size={config.eval_batch_size} must be divisible by the {data_parallel} data-parallel process(es)."
        )


def _check_datasets(config: DictConfig, problems: list[str]) -> None:
    import preference_datasets  # imported here: it pulls in `datasets`, which is slow to import

    if not config.datasets:
        problems.append("datasets=[]: name at least one dataset, e.g. datasets=[hh].")
    for name in config.datasets:
        name = str(name)
        if name.endswith(DATA_FILE_SUFFIXES):
            if not Path(name).is_file():
                problems.append(f"datasets entry {name}: no such file.")
        elif not callable(getattr(preference_datasets, f"get_{name}", None)):
            known = ", ".join(preference_datasets.available_datasets())
            problems.append(
                f"datasets entry {name}: unknown dataset. Known: {known}; or give a path to a "
                ".jsonl/.json/.parquet file with prompt/chosen/rejected fields."
            )


def validate_config(config: DictConfig, world_size: int) -> None:
    """Check the whole config before any weights load; raise ConfigError listing every problem."""
    problems: list[str] = []
    _check_choice("loss.name", config.loss.name, LOSSES, problems)
    _check_choice("trainer", config.trainer, TRAINERS, problems)
    _check_choice("optimizer", config.optimizer, OPTIMIZERS, problems)
    _check_choice("device", config.device, ("auto", "cpu", "cuda"), problems)
    _check_choice("wandb.mode", config.wandb.mode, ("online", "offline", "disabled"), problems)
    _check_positive(
        config,
        ["batch_size", "eval_batch_size", "gradient_accumulation_steps", "lr", "max_grad_norm", "max_length",
         "max_prompt_length", "n_epochs", "n_examples", "n_eval_examples", "eval_every", "sampling.max_new_tokens",
         "logps_chunk_tokens"],
        problems,
    )
    if config.autocast_dtype is not None:
        _check_choice("autocast_dtype", config.autocast_dtype, ("bfloat16", "float16"), problems)
    if config.compile_backend is not None:
        _check_choice("compile_backend", config.compile_backend, COMPILE_BACKENDS, problems)
    if config.fsdp.prefetch_blocks < 0:
        problems.append(f"fsdp.prefetch_blocks={config.fsdp.prefetch_blocks}: must be 0 or more.")
    if config.precompute_ref_logps and not uses_reference_model(config.loss):
        reason = "loss=sft" if config.loss.name == "sft" else "loss.reference_free=true"
        problems.append(f"precompute_ref_logps=true, but with {reason} there is no reference model; drop precompute_ref_logps.")
    if config.warmup_steps < 0:
        problems.append(f"warmup_steps={config.warmup_steps}: must be 0 or more.")
    if config.n_eval_model_samples < 0:
        problems.append(f"n_eval_model_samples={config.n_eval_model_samples}: must be 0 or more.")
    if not 0 < config.sampling.top_p <= 1:
        problems.append(f"sampling.top_p={config.sampling.top_p}: must be in (0, 1].")
    if config.max_prompt_length >= config.max_length:
        problems.append(
            f"max_prompt_length={config.max_prompt_length} must be smaller than max_length={config.max_length}, "
            "or no response token would fit."
        )
    if "beta" in config.loss and not config.loss.beta > 0:
        problems.append(f"loss.beta={config.loss.beta}: must be greater than 0 (typically 0.1 to 0.5).")
    if "label_smoothing" in config.loss and not 0 <= config.loss.label_smoothing < 0.5:
        problems.append(f"loss.label_smoothing={config.loss.label_smoothing}: must be in [0, 0.5).")
    if config.device == "cuda" and not torch.cuda.is_available():
        problems.append("device=cuda but no CUDA device is visible; use device=auto or device=cpu.")
    if not config.local_dirs:
        problems.append("local_dirs=[]: give at least one folder for run outputs.")
    _check_model(config.model, problems)
    _check_resume(config, problems)
    _check_batches(config, world_size, problems)
    _check_datasets(config, problems)
    if problems:
        raise ConfigError(problems)


def make_run_dir(local_dirs: Iterable[str], exp_name: str) -> Path:
    """<first existing of local_dirs>/<exp_name>_<timestamp>; the last of local_dirs is created if none exists."""
    local_dirs = [Path(d) for d in local_dirs]
    parent = next((d for d in local_dirs if d.is_dir()), local_dirs[-1])
    timestamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    run_dir = parent / f"{exp_name}_{timestamp}"
    run_dir.mkdir(parents=True)
    return run_dir


def resolve_device(device: str, local_rank: int) -> torch.device:
    """The device this process trains on: its local GPU when CUDA is used, else the CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class MetricSums:
    """Exact averages over micro-batches, steps and ranks: keep sums and counts, then divide.

    Averaging per-batch averages is wrong when batches differ in size (the last eval
    batch, token-weighted losses); summing first is exact.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, torch.Tensor | float] = {}

    def add(self, name: str, values: torch.Tensor, count: torch.Tensor | float | None = None) -> None:
        """Add per-example values; with `count`, their sum stands for that many units (e.g. tokens)."""
        values = values.detach().double()
        self.sums[name] = self.sums.get(name, 0.0) + values.sum()
        self.counts[name] = self.counts.get(name, 0.0) + (values.numel() if count is None else count)

    def merge(self, other: "MetricSums") -> None:
        for name in other.sums:
            self.sums[name] = self.sums.get(name, 0.0) + other.sums[name]
            self.counts[name] = self.counts.get(name, 0.0) + other.counts[name]

    def summed_over_ranks(self, device: torch.device, distributed: bool) -> "MetricSums":
        """The same sums added up over all ranks, with one collective for every metric."""
        names = sorted(self.sums)
        packed = torch.stack(
            [torch.as_tensor(self.sums[n], dtype=torch.float64, device=device) for n in names]
            + [torch.as_tensor(self.counts[n], dtype=torch.float64, device=device) for n in names]
        )
        if distributed:
            dist.all_reduce(packed)
        packed = packed.cpu()
        total = MetricSums()
        for i, name in enumerate(names):
            total.sums[name] = packed[i].item()
            total.counts[name] = packed[len(names) + i].item()
        return total

    def averages(self) -> dict[str, float]:
        return {n: float(self.sums[n]) / float(self.counts[n]) if self.counts[n] else float("nan") for n in sorted(self.sums)}


def save_config(config: DictConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(config, resolve=True))

"""Checking the whole configuration before any weights load, and reporting every problem at once."""

from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import lora
from chat_templates import chat_template_problem
from checkpoints import AUTO, archive_problem, resume_config_problems, resume_problem
from dataset_loading import dataset_config_problems
from errors import ConfigError
from loss_registry import LossSpec, loss_config_problems, loss_config_warnings
from models import local_model_problem
from optimization import optimization_problems
from tokenization import length_problem
from trainers import TRAINERS, BasicTrainer
from utils import DTYPES

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


# The type of every numeric, switch and list setting train.py reads; checked before the values, so that
# `batch_size=four` is one line of the report instead of a TypeError inside another check.
WHOLE_NUMBER_KEYS = (
    "seed", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "warmup_steps", "max_length",
    "max_prompt_length", "n_epochs", "n_examples", "n_eval_examples", "eval_every", "n_eval_model_samples",
    "sampling.max_new_tokens", "logps_chunk_tokens", "fsdp.prefetch_blocks", "lora.r",
)  # fmt: skip
NUMBER_KEYS = (
    "lr",
    "weight_decay",
    "max_grad_norm",
    "minimum_log_interval_secs",
    "sampling.top_p",
    "lora.alpha",
    "lora.dropout",
)
SWITCH_KEYS = (
    "do_first_eval", "sample_during_eval", "precompute_ref_logps", "debug",
    "sft_every_assistant_turn", "activation_checkpointing", "plots.enabled", "tensorboard.enabled",
    "wandb.enabled", "lora.enabled", "lora.load_in_4bit", "fsdp.reshard_after_forward", "sampling.greedy",
    "model.trust_remote_code", "pairs_as_unpaired",
)  # fmt: skip
AUTO_SWITCH_KEYS = ("packing", "share_prompt")  # true, false or auto (forward_plan.py decides auto at start-up)
LIST_KEYS = ("local_dirs",)  # datasets: dataset_loading.dataset_config_problems
# settings whose null is meaningful (see config.yaml); any other null is a type error
NULLABLE_KEYS = ("n_epochs", "n_examples", "n_eval_examples", "logps_chunk_tokens")


def _type_problem(key: str, value) -> str | None:
    """Why `value` does not have the declared type of `key`, or None. bool is not a number here (True == 1)."""
    if value is None:
        return None if key in NULLABLE_KEYS else f"{key}=null: give a value (see config/config.yaml)."
    if key in WHOLE_NUMBER_KEYS:
        if isinstance(value, float) and value.is_integer():
            return f"{key}={value}: must be a whole number; write {key}={int(value)}."
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{key}={value}: must be a whole number, e.g. {key}=8."
    elif key in NUMBER_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{key}={value}: must be a number, e.g. {key}=1e-4."
    elif key in SWITCH_KEYS and not isinstance(value, bool):
        return f"{key}={value}: must be true or false."
    elif key in AUTO_SWITCH_KEYS and not (isinstance(value, bool) or value == "auto"):
        return f"{key}={value}: must be auto, true or false."
    elif key in LIST_KEYS and not OmegaConf.is_list(value):
        return f"{key}={value}: must be a list; write {key}=[{value}] (entries separated by commas)."
    return None


def type_problems(config: DictConfig) -> list[str]:
    """Each setting whose value has the wrong type (text for a number, a float for a count, a string for a list)."""
    problems = []
    for key in WHOLE_NUMBER_KEYS + NUMBER_KEYS + SWITCH_KEYS + AUTO_SWITCH_KEYS + LIST_KEYS:
        problem = _type_problem(key, OmegaConf.select(config, key))
        if problem:
            problems.append(problem)
    return problems


# nodes whose keys are any dataset's name, checked against the dataset registry (dataset_loading.py)
OPEN_NODES = ("dataset_paths", "dataset_options")


def undeclared_key_problems(config: DictConfig, declared: DictConfig, prefix: str = "") -> list[str]:
    """Each key of `config` that no config file declares (`declared`: the same command composed without its
    `+key=value` additions). Struct mode refuses a misspelt `key=value`; `+key=value` would add it unread."""
    problems = []
    for key in config:
        path = f"{prefix}{key}"
        if key not in declared:
            problems.append(
                f"{path}: no such setting (added with +{path}=...); nothing would read it. "
                "See config/config.yaml for the settings, or python train.py --help."
            )
        elif OmegaConf.is_dict(config[key]) and OmegaConf.is_dict(declared[key]) and path not in OPEN_NODES:
            problems += undeclared_key_problems(config[key], declared[key], f"{path}.")
    return problems


def _check_positive(config: DictConfig, keys: Iterable[str], problems: list[str]) -> None:
    for key in keys:
        value = OmegaConf.select(config, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
            problems.append(f"{key}={value}: must be greater than 0.")


def _check_choice(key: str, value, allowed: Iterable, problems: list[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        problems.append(f"{key}={value}: must be one of {', '.join(map(str, allowed))}.")


def _check_float16(config: DictConfig, problems: list[str]) -> None:
    """float16 training without loss scaling underflows gradients; the trainer does no loss scaling.

    Measured on SmolLM2-135M: 28% of a q_proj gradient's entries became 0, relative error 0.31
    against float32 (bfloat16, which has float32's exponent range: 0.035).
    """
    for key in ("autocast_dtype", "model.fsdp_policy_mp", "model.policy_dtype"):
        if OmegaConf.select(config, key) == "float16":
            problems.append(
                f"{key}=float16: training in float16 needs loss scaling, which this trainer does not do, so "
                f"small gradients become 0. Use {key}=bfloat16 (same speed on GPUs since Ampere, float32's range)."
            )


def _check_lengths_of_run(config: DictConfig, problems: list[str]) -> None:
    if config.n_epochs is None and config.n_examples is None:
        problems.append("n_epochs=null and n_examples=null: set n_examples (n_epochs=null means: stop after it).")
    if config.n_examples is not None and 0 < config.n_examples < config.batch_size:
        problems.append(
            f"n_examples={config.n_examples} is smaller than batch_size={config.batch_size}: not one optimizer "
            "step would run. Raise n_examples or lower batch_size."
        )


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
    for key in ("name_or_path", "tokenizer_name_or_path"):
        problem = None if OmegaConf.is_missing(model, key) else local_model_problem(f"model.{key}", model[key])
        if problem:
            problems.append(problem)
    if model.archive is not None:
        problem = archive_problem(Path(model.archive))
        if problem:
            problems.append(problem)


def _check_resume(config: DictConfig, trainer: type[BasicTrainer], world_size: int, problems: list[str]) -> None:
    if config.resume_from is None:
        return
    if config.resume_from == AUTO:
        problems.append("resume_from=auto reached validation unresolved: train.py's main() resolves it first.")
        return
    problem = resume_problem(Path(config.resume_from), trainer.multi_process, config.trainer, lora=config.lora.enabled)
    if problem:
        problems.append(problem)
    else:
        problems += resume_config_problems(Path(config.resume_from), config, world_size)


def _check_batches(config: DictConfig, trainer: type[BasicTrainer], world_size: int, problems: list[str]) -> None:
    data_parallel = trainer.data_parallel_size(world_size)
    micro_batches = config.gradient_accumulation_steps * data_parallel
    if config.batch_size > 0 and config.gradient_accumulation_steps > 0 and config.batch_size % micro_batches:
        problems.append(
            f"batch_size={config.batch_size} must be divisible by gradient_accumulation_steps"
            f"={config.gradient_accumulation_steps} x {data_parallel} data-parallel process(es) = {micro_batches}."
        )
    if config.eval_batch_size > 0 and config.eval_batch_size % data_parallel:
        problems.append(
            f"eval_batch_size={config.eval_batch_size} must be divisible by the {data_parallel} "
            "data-parallel process(es)."
        )


def _check_datasets(config: DictConfig, problems: list[str]) -> None:
    problems += dataset_config_problems(config)


def _check_values(config: DictConfig, problems: list[str]) -> None:
    """Each setting on its own: names from their lists, numbers in their ranges."""
    _check_choice("trainer", config.trainer, TRAINERS, problems)
    _check_choice("device", config.device, ("auto", "cpu", "cuda"), problems)
    _check_choice("wandb.mode", config.wandb.mode, ("online", "offline", "disabled"), problems)
    positive = [
        "batch_size", "eval_batch_size", "gradient_accumulation_steps", "lr", "max_grad_norm", "max_length",
        "max_prompt_length", "n_epochs", "n_examples", "n_eval_examples", "eval_every", "sampling.max_new_tokens",
        "logps_chunk_tokens",
    ]  # fmt: skip
    _check_positive(config, positive, problems)
    if config.autocast_dtype is not None:
        _check_choice("autocast_dtype", config.autocast_dtype, ("bfloat16", "float16"), problems)
    if config.compile_backend is not None:
        _check_choice("compile_backend", config.compile_backend, COMPILE_BACKENDS, problems)
    for key in ("fsdp.prefetch_blocks", "warmup_steps", "n_eval_model_samples"):
        if OmegaConf.select(config, key) < 0:
            problems.append(f"{key}={OmegaConf.select(config, key)}: must be 0 or more.")
    if not 0 < config.sampling.top_p <= 1:
        problems.append(f"sampling.top_p={config.sampling.top_p}: must be in (0, 1].")
    if not config.local_dirs:
        problems.append("local_dirs=[]: give at least one folder for run outputs.")
    template = chat_template_problem(config.chat_template)
    if template:
        problems.append(template)


def _check_combinations(config: DictConfig, problems: list[str]) -> None:
    """Settings that are fine alone but not together, or not on this machine."""
    loss = LossSpec.from_config(config.loss)
    if config.precompute_ref_logps and not loss.uses_reference:
        problems.append(
            f"precompute_ref_logps=true, but loss={loss.name} (reference_free={loss.reference_free}) uses no "
            "reference model; drop precompute_ref_logps."
        )
    if config.share_prompt is True and not loss.is_preference:
        problems.append("share_prompt=true shares a prompt between the two responses of a pair; loss=sft has no pairs.")
    if config.share_prompt is True and loss.is_unpaired:
        problems.append(
            "share_prompt=true shares a prompt between the two responses of a pair; loss=kto trains on one completion "
            "per prompt (its mismatched completion runs without gradient), so nothing would be shared. Drop it."
        )
    if config.pairs_as_unpaired and not loss.is_unpaired:
        problems.append(f"pairs_as_unpaired=true applies to loss=kto; loss={loss.name} would ignore it. Drop it.")
    if config.sft_every_assistant_turn and loss.is_preference:
        problems.append(
            f"sft_every_assistant_turn=true applies to loss=sft; loss={loss.name} scores the final assistant turn. "
            "Drop it."
        )
    for name, options in config.dataset_options.items():
        if name not in config.datasets and any(options.values()):
            problems.append(f"dataset_options.{name} is set, but {name} is not in datasets={list(config.datasets)}.")
    length = length_problem(config.max_length, config.max_prompt_length)
    if length:
        problems.append(length)
    if config.device == "cuda" and not torch.cuda.is_available():
        problems.append("device=cuda but no CUDA device is visible; use device=auto or device=cpu.")
    on_cpu = config.device == "cpu" or not torch.cuda.is_available()
    if config.model.get("attn_implementation") == "flex_attention" and on_cpu:
        problems.append(
            "model.attn_implementation=flex_attention: FlexAttention has no backward pass on the CPU in this torch, "
            "so the policy could not train here; on the CPU use sdpa (model.attn_implementation=null), which takes "
            "the same packed and prefix-shared rows exactly."
        )


def validate_config(config: DictConfig, world_size: int, declared: DictConfig | None = None) -> list[str]:
    """Check the whole config before any weights load; raise ConfigError listing every problem.

    `declared`: the config without its command line's `+key=value` additions (train.py), whose keys are
    then the only ones allowed. Returns warnings: settings that are allowed but probably not what was meant.
    """
    problems = [] if declared is None else undeclared_key_problems(config, declared)
    problems += type_problems(config)
    try:
        problems += loss_config_problems(config.loss)
        problems += optimization_problems(config.optimizer, config.weight_decay, config.lr_scheduler)
        _check_values(config, problems)
        _check_combinations(config, problems)
        _check_float16(config, problems)
        _check_lengths_of_run(config, problems)
        _check_model(config.model, problems)
        trainer = TRAINERS.get(config.trainer)
        if trainer is not None:  # else _check_values has named the choices
            problems += lora.config_problems(config, trainer)
            _check_resume(config, trainer, world_size, problems)
            _check_batches(config, trainer, world_size, problems)
        _check_datasets(config, problems)
    except (TypeError, ValueError):
        # a value check compared text with a number: the wrong type is reported above, and the
        # checks after this one wait for it to be fixed
        if not problems:
            raise
    if problems:
        raise ConfigError(problems)
    return loss_config_warnings(config.loss)

"""LoRA adapters on the policy (peft): wrapping, the reference as the adapter switched off, saving and merging.

With `lora.enabled` the policy is the frozen base model plus low-rank adapters (Hu et al. 2021,
eq. 3 with the alpha / r scaling of their section 4.1: W x + (alpha / r) B A x, B starting at 0),
and the DPO reference is that same base with the adapters switched off, so no second model is
loaded. A checkpoint holds the adapter in peft's own format and, for LATEST, the merged model
that plain transformers loads (see checkpoints.py for the layout and README.md, "LoRA", for why
step-N holds no merged model).
"""

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from transformers import BitsAndBytesConfig, PreTrainedModel

from errors import ModelLoadError

ADAPTER = "default"  # peft's name for the one adapter a run trains


def config_problems(config: DictConfig, trainer: type) -> list[str]:
    """Everything wrong with the `lora` settings, before any weights load (empty when lora.enabled is false).

    `trainer` is the trainer class config.trainer names (trainers.TRAINERS): its supports_lora and
    supports_4bit say what it can train.
    """
    settings = config.lora
    if not settings.enabled:
        if settings.load_in_4bit:
            return ["lora.load_in_4bit=true needs lora.enabled=true (QLoRA is LoRA on a 4-bit base)."]
        return []
    problems = []
    if not (isinstance(settings.r, int) and settings.r > 0):
        problems.append(f"lora.r={settings.r}: must be a positive integer (the adapters' rank, e.g. 16).")
    if not settings.alpha > 0:
        problems.append(f"lora.alpha={settings.alpha}: must be greater than 0 (adapters scale by alpha / r).")
    if not 0 <= settings.dropout < 1:
        problems.append(f"lora.dropout={settings.dropout}: must be in [0, 1).")
    for key in ("target_modules", "modules_to_save"):
        names = settings[key]
        if names is not None and not (OmegaConf.is_list(names) and all(isinstance(n, str) and n for n in names)):
            problems.append(f"lora.{key}={names}: must be null or a list of module names, e.g. [q_proj, v_proj].")
    if OmegaConf.is_list(settings.target_modules) and not settings.target_modules:
        problems.append(
            "lora.target_modules=[]: name at least one module, or null for every linear layer of the blocks."
        )
    if not trainer.supports_lora:
        problems.append(
            f"lora.enabled=true with trainer={config.trainer}: not supported (the tensor-parallel plan splits "
            "the linear layers that LoRA wraps). Use trainer=FSDPTrainer (it shards the frozen base) or BasicTrainer."
        )
    if settings.load_in_4bit:
        problems += _four_bit_problems(config, trainer)
    return problems


def _four_bit_problems(config: DictConfig, trainer: type) -> list[str]:
    problems = []
    if not torch.cuda.is_available() or config.device == "cpu":
        problems.append("lora.load_in_4bit=true: 4-bit (NF4) weights need a CUDA GPU; on this machine use false.")
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("lora.load_in_4bit=true needs the bitsandbytes package: pip install bitsandbytes.")
    if config.model.from_scratch is not None:
        problems.append("lora.load_in_4bit=true quantizes pretrained weights; model.from_scratch builds fresh ones.")
    if not trainer.supports_4bit:
        problems.append(f"lora.load_in_4bit=true runs with trainer=BasicTrainer only, not trainer={config.trainer}.")
    return problems


def reference_dtype_name(config: DictConfig) -> str:
    """The precision the reference scores in: its own dtype, or the LoRA policy's base (nf4 when 4-bit)."""
    if not config.lora.enabled:
        return config.model.reference_dtype
    return "nf4" if config.lora.load_in_4bit else config.model.policy_dtype


def quantization_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's base (Dettmers et al. 2023): NF4 weights, double quantization, compute in the policy dtype."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def block_linear_names(model: nn.Module, block_name: str) -> list[str]:
    """Distinct names (the last part of the module path) of the linear layers inside the transformer blocks."""
    names = set()
    for module in model.modules():
        if type(module).__name__ == block_name:
            names |= {path.rsplit(".", 1)[-1] for path, m in module.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


def _check_module_names(model: nn.Module, key: str, wanted: list[str], block_name: str) -> None:
    """Every name must match a module the way peft matches it (the end of its path); else name what exists."""
    paths = [path for path, _ in model.named_modules() if path]
    unknown = [name for name in wanted if not any(p == name or p.endswith(f".{name}") for p in paths)]
    if not unknown:
        return
    block_paths = tuple(f"{path}." for path, m in model.named_modules() if type(m).__name__ == block_name)
    outside_blocks = {
        path.rsplit(".", 1)[-1]
        for path, m in model.named_modules()
        if path and not path.startswith(block_paths) and next(m.parameters(recurse=False), None) is not None
    }
    raise ModelLoadError(
        f"lora.{key}={wanted}: {type(model).__name__} has no module named {', '.join(unknown)}. The linear layers "
        f"of its blocks ({block_name}) are {', '.join(block_linear_names(model, block_name))}; its modules with "
        f"weights outside the blocks are {', '.join(sorted(outside_blocks))}."
    )


def _check_not_tied(model: PreTrainedModel, modules_to_save: list[str]) -> None:
    """A fully trained copy of a tied embedding would untie it, and the merged model could not store it."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
    paths = [path for path, m in model.named_modules() if any(m is e for e in embeddings)]
    tied = sorted({name for name in modules_to_save for path in paths if path == name or path.endswith(f".{name}")})
    if tied:
        raise ModelLoadError(
            f"lora.modules_to_save={modules_to_save}: {', '.join(tied)} is one of the model's tied input and output "
            "embeddings (tie_word_embeddings), which share one weight; training it in full would untie them. "
            "Leave it out, or use a model with untied embeddings."
        )


# peft's task type by models.MODEL_CLASSES head: a sequence classifier's score head is trained in full and saved
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "reward": "SEQ_CLS"}


def add_adapter(
    model: PreTrainedModel, config: DictConfig, block_name: str, resume_dir: Path | None, head: str = "causal_lm"
) -> PeftModel:
    """The policy: `model` frozen, with trainable adapters (fresh, or a resumed run's from `resume_dir`)."""
    settings = config.lora
    targets = list(settings.target_modules or block_linear_names(model, block_name))
    modules_to_save = list(settings.modules_to_save or [])
    _check_module_names(model, "target_modules", targets, block_name)
    _check_module_names(model, "modules_to_save", modules_to_save, block_name)
    _check_not_tied(model, modules_to_save)
    if settings.load_in_4bit:
        # norms and embeddings to float32, inputs of checkpointed blocks requiring grad (peft's recipe)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.activation_checkpointing)
    if resume_dir is not None:
        return PeftModel.from_pretrained(model, resume_dir, adapter_name=ADAPTER, is_trainable=True)
    lora_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        bias="none",
        task_type=TASK_TYPES[head],
    )
    return get_peft_model(model, lora_config, adapter_name=ADAPTER)


def merge_adapter(model: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """`model` with an earlier stage's adapter (e.g. an SFT run's) merged into its weights: a plain model again."""
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=ADAPTER).merge_and_unload()


@contextmanager
def adapter_disabled(policy: PeftModel) -> Iterator[PeftModel]:
    """The policy computing as its base model: every adapter (and modules_to_save copy) switched off.

    peft's disable-adapter context; it also clears the adapters' requires_grad and restores it on exit.
    """
    with policy.disable_adapter():
        yield policy


def base_model(policy: PeftModel) -> PreTrainedModel:
    """The transformers model inside the peft wrapper (its config, tied-weight names and save_pretrained)."""
    return policy.get_base_model()


def save_adapter(folder: Path, policy: PeftModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Write the adapter in peft's format (adapter_config.json, adapter_model.safetensors) from the full state dict.

    `state_dict` is the gathered state of the whole peft model (keys `base_model.model....`), so
    this also works on rank 0 of a sharded run, where the live adapters are shards.
    """
    policy.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


def merged_state_dict(policy: PeftModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter merged in: W + (alpha / r) B A, keys as in the base model.

    Computed from the gathered full state dict (rank 0 of a sharded run holds no full live weights),
    with peft's formula (LoraLayer.get_delta_weight), in float32, cast back to the weights' dtype.
    """
    merged = dict(state_dict)
    for path, module in policy.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = merged.pop(f"{path}.base_layer.weight")
        lora_a = merged.pop(f"{path}.lora_A.{ADAPTER}.weight").float()
        lora_b = merged.pop(f"{path}.lora_B.{ADAPTER}.weight").float()
        delta = lora_b @ lora_a
        if module.fan_in_fan_out:  # GPT-2's Conv1D stores weights transposed
            delta = delta.T
        merged[f"{path}.weight"] = (weight.float() + delta * module.scaling[ADAPTER]).to(weight.dtype)
        if f"{path}.base_layer.bias" in merged:
            merged[f"{path}.bias"] = merged.pop(f"{path}.base_layer.bias")
    for key in [k for k in merged if ".original_module." in k]:
        del merged[key]  # a fully trained module's frozen original; its trained copy replaces it below
    prefix = "base_model.model."
    renamed = {}
    for key, tensor in merged.items():
        key = key.removeprefix(prefix).replace(f".modules_to_save.{ADAPTER}.", ".")
        renamed[key] = tensor
    leftover = [k for k in renamed if "lora_" in k or ".base_layer." in k]
    assert not leftover, f"unmerged adapter weights: {leftover[:3]}"
    return renamed

"""Loading tokenizers and models (pretrained, from an earlier stage, or built fresh), and naming their weights."""

import ctypes
import hashlib
import re
from collections import Counter
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

import checkpoints
import embedded
import lora
from errors import ModelLoadError
from utils import DTYPES


def _hub_failure(name_or_path: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"Could not load '{name_or_path}' ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}).\n"
        "If this machine cannot reach the Hugging Face Hub, download the model where it can "
        f"(`huggingface-cli download {name_or_path} --local-dir DIR`) and pass model.name_or_path=DIR "
        "(and model.tokenizer_name_or_path=DIR), or run once online so the Hub cache holds it. "
        "Set HF_HUB_OFFLINE=1 to fail at once instead of retrying."
    )


# what a Hub id looks like (`name` or `org/name`); anything else that does not exist is a missing local folder
HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


def local_model_problem(key: str, name_or_path: str | None) -> str | None:
    """Why the model or tokenizer source `key=name_or_path` cannot load, found without loading it, or None.

    A path that is not there gets "no such folder" (not the Hub's advice); a local folder's weight
    files are checked whole (a cut-short model.safetensors). Hub ids are left to the load.
    """
    if name_or_path is None:
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if HUB_ID.fullmatch(str(name_or_path)) and not str(name_or_path).startswith("."):
            return None
        return f"{key}={name_or_path}: no such folder. Give the folder that holds config.json and the weights."
    for weights in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
        damage = checkpoints.damaged_file_problem(weights)
        if damage:
            return f"{key}={name_or_path}: {damage}. Download or copy the model again."
    return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value


def keep_large_allocations_returnable() -> None:
    """Serve every CPU allocation of 128 KiB or more (every activation tensor) by mmap, returned when freed.

    glibc raises this threshold each time a large block is freed (up to 32 MiB), after which activation
    tensors come from its heap, which fragments and is never given back: measured on SmolLM2-135M
    (benchmarks/lora_memory.py --shape real), a LoRA step then peaked at 6.0-6.4 GB and stayed there
    instead of 3.9-4.0 GB live. Fixing the threshold stops the raise. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def load_tokenizer(model_config: DictConfig) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    source = model_config.tokenizer_name_or_path or model_config.name_or_path
    if source is None:
        tokenizer = embedded.build_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_config.trust_remote_code)
        except OSError as error:
            raise _hub_failure(source, error) from error
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"The tokenizer of '{source}' has no EOS token; responses need one to end.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _zero_dropout(config: transformers.PretrainedConfig) -> None:
    """Dropout off, as in the DPO paper: the policy and reference must score text deterministically."""
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)


def _from_scratch_config(model_config: DictConfig, tokenizer, max_length: int) -> transformers.LlamaConfig:
    shape = model_config.from_scratch
    return transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# What a model computes, by `head`: next-token logits (policies, references), or one score per
# sequence (reward models: a linear head with one output, read at the sequence's last token)
MODEL_CLASSES = {"causal_lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification}


def _with_head(config: transformers.PretrainedConfig, head: str) -> transformers.PretrainedConfig:
    if head == "reward":
        config.num_labels = 1
    return config


def _load_pretrained(
    source: str, model_config: DictConfig, dtype: torch.dtype, load_in_4bit: bool = False, head: str = "causal_lm"
) -> PreTrainedModel:
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=model_config.trust_remote_code)
        _zero_dropout(config)
        return MODEL_CLASSES[head].from_pretrained(
            source,
            config=_with_head(config, head),
            dtype=dtype,
            attn_implementation=model_config.attn_implementation,
            trust_remote_code=model_config.trust_remote_code,
            # bitsandbytes quantizes while the weights move to the GPU
            quantization_config=lora.quantization_config(dtype) if load_in_4bit else None,
            device_map={"": torch.cuda.current_device()} if load_in_4bit else None,
        )
    except OSError as error:
        raise _hub_failure(source, error) from error


# what must agree between the model a run names and the archive it starts from
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _architecture(config: transformers.PretrainedConfig) -> dict:
    text_config = config.get_text_config(decoder=True)
    return {key: getattr(text_config, key, getattr(config, key, None)) for key in ARCHITECTURE_KEYS}


def check_model_matches(model_config: DictConfig, tokenizer, max_length: int) -> None:
    """Raise ModelLoadError when the archive or the tokenizer belongs to another model, reading configs only.

    The archive's config.json must describe the model that model= names (a run of another model
    would load whole and train with the wrong tokenizer), and the tokenizer must fit the embedding:
    more tokens than rows fail inside the embedding, fewer than half are another model's tokenizer
    (models round their vocabulary up a little, never to double).
    """
    if model_config.from_scratch is not None:
        named = _from_scratch_config(model_config, tokenizer, max_length)
    else:
        try:
            named = AutoConfig.from_pretrained(
                model_config.name_or_path, trust_remote_code=model_config.trust_remote_code
            )
        except OSError as error:
            raise _hub_failure(model_config.name_or_path, error) from error
    model_name = model_config.name_or_path or f"model.from_scratch ({model_config.name})"
    weights, weights_name = named, model_name
    archive = Path(model_config.archive) if model_config.archive else None
    if archive is not None and (archive / checkpoints.MODEL_CONFIG_FILE).is_file():
        weights, weights_name = AutoConfig.from_pretrained(archive), f"model.archive={archive}"
        trained, expected = _architecture(weights), _architecture(named)
        differ = [
            f"{key}={trained[key]} (model: {expected[key]})"
            for key in ARCHITECTURE_KEYS
            if trained[key] != expected[key]
        ]
        if differ:
            raise ModelLoadError(
                f"model.archive={archive} is not a checkpoint of {model_name}: its {', '.join(differ)}. "
                "Set model= to the model that archive was trained from."
            )
    rows, tokens = _architecture(weights)["vocab_size"], len(tokenizer)
    if rows is not None and not rows / 2 <= tokens <= rows:
        source = model_config.tokenizer_name_or_path or model_config.name_or_path or "the embedded tokenizer"
        raise ModelLoadError(
            f"The tokenizer ({source}) has {tokens} tokens, but {weights_name} has {rows} embedding rows: they belong "
            "to different models. Use the model's own tokenizer (model.tokenizer_name_or_path), or the model of "
            "this tokenizer."
        )


# Buffers that transformers 4.29 (the reference scripts' version) kept in state dicts and current
# models rebuild instead: GPT-2's causal mask (attn.bias, attn.masked_bias), GPT-NeoX's
# (attention.bias, attention.masked_bias) and the rotary frequencies of GPT-NeoX and Llama.
OLD_BUFFER_KEY = re.compile(r"\.(attn|attention)\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$")


def _load_reference_scripts_archive(model: PreTrainedModel, path: Path) -> None:
    """Load the reference scripts' policy.pt ({"state": state_dict, ...}) without unpickling code."""
    archive = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(archive, dict) or "state" not in archive:
        raise ModelLoadError(
            f"model.archive={path}: expected a dict with a 'state' entry (the reference scripts' policy.pt)."
        )
    result = model.load_state_dict(archive["state"], strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    old_buffers = [k for k in result.unexpected_keys if OLD_BUFFER_KEY.search(k)]
    unexpected = [k for k in result.unexpected_keys if k not in old_buffers]
    if missing or unexpected:
        raise ModelLoadError(
            f"model.archive={path} does not match the model {model.config.name_or_path or model.config.model_type}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}. Is model= the model that was trained?"
        )
    if old_buffers:
        print(
            f"model.archive={path}: ignored {len(old_buffers)} non-parameter buffers of older transformers "
            f"(e.g. {old_buffers[0]}); current models recompute them",
            flush=True,
        )
    model.tie_weights()


def load_model(
    model_config: DictConfig,
    dtype_name: str,
    tokenizer,
    max_length: int,
    seed: int,
    load_in_4bit: bool = False,
    head: str = "causal_lm",
) -> PreTrainedModel:
    """The policy or reference model: an earlier stage's checkpoint, pretrained weights, or fresh weights.

    Models built from scratch draw their weights from `seed`, so two calls give the same model;
    so does a reward model's new score head (`head="reward"`, see MODEL_CLASSES) on pretrained
    or SFT weights. An archive holding only a LoRA adapter (a LoRA run's step-N) is merged into
    the base weights. `load_in_4bit`: the frozen base of QLoRA, in NF4 on the GPU (lora.load_in_4bit).
    """
    dtype = DTYPES[dtype_name]
    archive = Path(model_config.archive) if model_config.archive else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if archive is not None and (archive / checkpoints.MODEL_CONFIG_FILE).is_file():
            model = _load_pretrained(str(archive), model_config, dtype, load_in_4bit, head)
        elif model_config.from_scratch is not None:
            config = _with_head(_from_scratch_config(model_config, tokenizer, max_length), head)
            config._attn_implementation = model_config.attn_implementation or "sdpa"
            model = MODEL_CLASSES[head].from_config(config, dtype=dtype)
        else:
            model = _load_pretrained(model_config.name_or_path, model_config, dtype, load_in_4bit, head)
    if archive is not None and archive.is_file():
        _load_reference_scripts_archive(model, archive)
    elif archive is not None and not (archive / checkpoints.MODEL_CONFIG_FILE).is_file():
        model = lora.merge_adapter(model, checkpoints.adapter_dir(archive))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # reward models generate nothing
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _file_stats(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, modification time) of a weights file, or of every weights file in a folder."""
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_FILE_SUFFIXES) if path.is_dir() else [path]
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _model_config_digest(path: Path) -> str | None:
    """sha256 of a model folder's config.json (the architecture: activation, norms, rotary settings), or None.

    Hashed by content, not by size and time: a same-length edit (hidden_act silu -> gelu) changes
    every log-prob, and the file is small.
    """
    config_file = path / "config.json"
    if not (path.is_dir() and config_file.is_file()):
        return None
    return hashlib.sha256(config_file.read_bytes()).hexdigest()


def weights_fingerprint(model_config: DictConfig, seed: int) -> dict:
    """What identifies the weights load_model would produce, without loading them.

    Local files are identified by name, size and modification time (reading gigabytes to
    hash them would cost what caching saves), and a model folder's config.json by its content;
    a Hub model by its id (pin a revision by
    downloading it, then pass the folder); a model built from scratch by its shape and seed.
    """
    fingerprint: dict = {"name_or_path": model_config.name_or_path}
    if model_config.from_scratch is not None:
        fingerprint["from_scratch"] = OmegaConf.to_container(model_config.from_scratch)
        fingerprint["seed"] = seed
    elif Path(model_config.name_or_path).exists():
        fingerprint["files"] = _file_stats(Path(model_config.name_or_path))
        fingerprint["config"] = _model_config_digest(Path(model_config.name_or_path))
    if model_config.archive:
        archive = Path(model_config.archive).resolve()
        fingerprint["archive"] = [str(archive), _file_stats(archive), _model_config_digest(archive)]
        if not (archive / checkpoints.MODEL_CONFIG_FILE).is_file() and checkpoints.holds_adapter(archive):
            fingerprint["archive_adapter"] = _file_stats(checkpoints.adapter_dir(archive))
    return fingerprint


def block_class_name(model: torch.nn.Module, configured: str | None) -> str:
    """The class name of the transformer blocks to shard, compile and checkpoint, as the model's modules bear it now.

    `configured` (model.block_name), else transformers' hint `_no_split_modules`: a list on the class,
    a set (of every submodule's hints) on an instance since transformers 5.25. Of the hinted classes
    present, the block is the one that repeats most (one per layer); ties go to the first name
    alphabetically, so the choice never depends on set order. FSDP2 renames each sharded module's
    class to FSDP<name>, so classes are matched by ancestry and the block named as it is now.
    """
    wanted = {configured} if configured else set(getattr(model, "_no_split_modules", None) or ())
    present = Counter(
        type(module).__name__
        for module in model.modules()
        if any(cls.__name__ in wanted for cls in type(module).__mro__)
    )
    if configured and not present:
        return configured  # the caller reports that no module has this class
    if not present:
        raise ModelLoadError(
            f"Cannot tell the transformer block class of {type(model).__name__} (its _no_split_modules: "
            f"{sorted(wanted) or 'none'}); set model.block_name to the class of its decoder layers."
        )
    return min(present, key=lambda name: (-present[name], name))

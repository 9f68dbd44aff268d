"""How the trainer's forward passes lay out a batch: decided once, at start-up, from the config and the model.

Three settings shape every forward pass, and each has an exact fast form:
- packing: several sequences (or pairs) share a row of max_length tokens, so that almost no
  position is padding (batching.packed_batch; with share_prompt, shared_prompt.shared_prompt_batch);
- share_prompt: each pair is one segment `prompt, chosen, rejected`, its prompt run once
  (shared_prompt.py);
- logps_chunk_tokens: log-probs from the last hidden states, projected to the vocabulary a
  chunk at a time at labelled positions only (logprobs.label_logps_chunked).

`packing` and `share_prompt` are `auto` by default: on wherever they apply and the model computes
on them exactly what it computes on the plain padded rows, checked here by a probe on the loaded
model (one tiny input, both ways); off with a note elsewhere. `true` insists: a model that cannot
take the layout is then an error rather than a silent fallback. share_prompt applies to paired
preference losses only (its `auto` leaves SFT and KTO on packing alone); `false` is the plain
padded path, the reference of every equivalence test.

The attention implementation decides how the prefix-shared mask reaches the model
(shared_prompt.attention_mask_for): a boolean 4D mask for sdpa, the additive form for eager, a
block-sparse BlockMask for flex_attention (model.attn_implementation=flex_attention, GPU only:
FlexAttention has no backward pass on the CPU). Flash attention takes packed rows (as varlen
sequences) but no prefix-shared mask.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

import console
from errors import ConfigError
from loss_registry import LossSpec
from reward_scores import attention_accepts_shared_prompt_scores
from shared_prompt import attention_accepts_shared_prompt_mask, mask_unsupported_reason

AUTO = "auto"


@dataclass(frozen=True)
class ForwardPlan:
    """The forward-pass layout of a run: what BasicTrainer's pair_logps, sequence_logps and pair_scores follow."""

    packing: bool  # several sequences (pairs, with share_prompt) per row of row_tokens tokens
    share_prompt: bool  # each pair one row segment, its prompt run once
    chunk_tokens: int | None  # chunked log-probs, this many positions at a time; None: the model's full logits
    row_tokens: int  # a packed row's width (max_length; a longer sequence gets a row of its own)
    block_masks: bool = False  # prefix-shared masks as FlexAttention BlockMasks (flex_attention models)

    @property
    def layout(self) -> str:
        """padded, packed, shared or packed-shared: how pairs become rows."""
        return {(False, False): "padded", (True, False): "packed", (False, True): "shared"}.get(
            (self.packing, self.share_prompt), "packed-shared"
        )

    @property
    def pair_row_tokens(self) -> int | None:
        """The row width shared_prompt_batch packs pairs into; None: one pair per row."""
        return self.row_tokens if self.packing else None

    def describe(self) -> str:
        chunks = f", log-probs projected {self.chunk_tokens} positions at a time" if self.chunk_tokens else ""
        masks = ", FlexAttention block masks" if self.block_masks else ""
        return f"{self.layout} rows{masks}{chunks}"


def choose_plan(
    config: DictConfig,
    loss: LossSpec,
    model: nn.Module,
    token_id: int,
    pad_token_id: int,
    autocast: Callable[[], AbstractContextManager],
    release: Callable[[nn.Module], None],
) -> ForwardPlan:
    """The plan for this run: each `auto` switch resolved, each `true` checked, on the loaded (wrapped) policy.

    token_id: any token of the vocabulary (the chunked log-prob probe's input); autocast: the
    trainer's forward-pass context; release: frees weights a sharded model gathered for a probe.
    Raises ConfigError when a switch set to true cannot be honoured by this model.
    """
    max_length = config.max_length
    packing = _switch(config, "packing", True, lambda: attention_accepts_packed_rows(model), model)
    release(model)
    pairs_apply = loss.is_preference and not loss.is_unpaired
    if loss.is_reward_model:
        shares = lambda: attention_accepts_shared_prompt_scores(model, max_length, pad_token_id)  # noqa: E731
    else:
        shares = lambda: attention_accepts_shared_prompt_mask(model, max_length)  # noqa: E731
    share_prompt = _switch(config, "share_prompt", pairs_apply, shares, model)
    release(model)
    chunk_tokens = None
    if config.logps_chunk_tokens is not None and not loss.is_reward_model:
        if logits_are_projected_hidden_states(model, token_id, autocast):
            chunk_tokens = config.logps_chunk_tokens
        else:
            console.say(f"note: {type(model).__name__} post-processes its logits; logps_chunk_tokens is ignored")
        release(model)
    block_masks = share_prompt and model.config._attn_implementation == "flex_attention"
    return ForwardPlan(packing, share_prompt, chunk_tokens, max_length, block_masks)


def _switch(config: DictConfig, key: str, applies: bool, accepted: Callable[[], bool], model: nn.Module) -> bool:
    """A packing/share_prompt setting resolved: auto is on where it applies and the probe accepts it."""
    value = config[key]
    if value is False or (value == AUTO and not applies):
        return False
    if accepted():
        return True
    if key == "packing":
        why = "a probe found its hidden states on a packed row differ from each sequence's alone"
    else:
        why = mask_unsupported_reason(model, config.max_length) or "a probe found it ignores the mask"
    rows = "packed" if key == "packing" else "prefix-shared"
    message = f"{type(model).__name__} ({model.config._attn_implementation} attention) cannot take {rows} rows: {why}"
    if value is True:
        raise ConfigError([f"{key}=true, but {message}. Use {key}=auto (falls back with a note) or {key}=false."])
    console.say(f"note: {message}; {key}=auto runs without it")
    return False


@torch.no_grad()
def attention_accepts_packed_rows(model: nn.Module) -> bool:
    """Whether the model keeps packed sequences apart: a packed row's last hidden states equal each sequence's alone.

    packed_batch passes no attention mask, only position ids restarting at 0 for each sequence;
    transformers reads those restarts as sequence boundaries (a block-diagonal mask, or varlen
    flash kernels). A model whose attention ignores them lets the second sequence see the
    first. Two tiny sequences, autocast off; tolerance 1e-4 in float32, 5e-2 in 16-bit weights.
    """
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    tolerance = 1e-4 if embeddings.weight.dtype in (torch.float32, torch.float64) else 5e-2
    sequences = [[3, 5, 7, 11], [13, 17, 19]]
    sequences = [[token % embeddings.num_embeddings for token in sequence] for sequence in sequences]
    row = torch.tensor([sequences[0] + sequences[1]], device=device)
    positions = torch.tensor([list(range(len(sequences[0]))) + list(range(len(sequences[1])))], device=device)
    with torch.autocast(device.type, enabled=False):
        try:
            packed = _last_hidden(model, input_ids=row, position_ids=positions)[0]
        except (RuntimeError, ValueError):
            return False
        start = 0
        for sequence in sequences:
            alone = _last_hidden(model, input_ids=torch.tensor([sequence], device=device))[0]
            span = packed[start : start + len(sequence)].float()
            if not torch.allclose(span, alone.float(), atol=tolerance, rtol=tolerance):
                return False
            start += len(sequence)
    return True


def _last_hidden(model: nn.Module, **inputs) -> torch.Tensor:
    return model(**inputs, use_cache=False, output_hidden_states=True).hidden_states[-1]


@torch.no_grad()
def logits_are_projected_hidden_states(
    model: nn.Module, token_id: int, autocast: Callable[[], AbstractContextManager]
) -> bool:
    """Whether the model's logits are exactly its output layer applied to its last hidden states.

    Chunked log-probs rely on it. A few models post-process logits (Gemma 2's soft-capping,
    Cohere's logit scale); for those the full logits are used instead.
    """
    input_ids = torch.full((1, 2), token_id, device=model.get_input_embeddings().weight.device)
    with autocast():
        outputs = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        head = model.get_output_embeddings()
        projected = F.linear(outputs.hidden_states[-1], head.weight, head.bias)
    return torch.allclose(projected.float(), outputs.logits.float(), rtol=1e-3, atol=1e-3)

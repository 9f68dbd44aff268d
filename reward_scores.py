"""Reward-model scores: each sequence's score, read at its last token, in padded, packed and prefix-shared rows.

A reward model (loss=reward) is a sequence-classification model: its head maps every
position's final hidden state to one number, and a sequence's score is the head's output at
the sequence's last token that is not the pad token. That is where transformers'
AutoModelForSequenceClassification reads it, so a saved reward model scores a lone sequence
exactly as it scored it in training. (A tokenizer whose pad token is its EOS token therefore
reads the score at the token before a trailing EOS.)

The score is read from the head's per-position output, caught by a forward hook, so the
model's own pooling, which assumes one sequence per row, plays no part: packed rows and
prefix-shared rows (shared_prompt.py) are scored like padded ones.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from batching import score_offset
from logprobs import IGNORE_INDEX
from shared_prompt import attention_mask_for, mask_unsupported_reason, shared_prompt_batch

HEAD_NAME = "score"  # the attribute transformers gives the head of its ...ForSequenceClassification models


def padded_score_index(input_ids: list[list[int]], width: int, pad_token_id: int) -> torch.Tensor:
    """(n,) flat indices (row * width + column) of each sequence's score in a padded_batch (sequence i in row i)."""
    offsets = [score_offset(ids, pad_token_id) for ids in input_ids]
    return torch.tensor([row * width + offset for row, offset in enumerate(offsets)], dtype=torch.long)


def packed_score_index(input_ids: list[list[int]], sequence_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(n,) flat indices of each sequence's score in a packed_batch: where its span starts, plus its offset.

    sequence_ids: (rows, width), the packed batch's index of the sequence at each position (-1: padding).
    """
    owners = sequence_ids.flatten()
    positions = torch.arange(owners.numel(), device=owners.device)
    starts = torch.full((len(input_ids),), owners.numel(), dtype=torch.long, device=owners.device)
    starts = starts.scatter_reduce(0, owners.clamp(min=0), positions, reduce="amin", include_self=True)
    starts = torch.where(torch.bincount(owners[owners >= 0], minlength=len(input_ids)) > 0, starts, -1)
    if (starts < 0).any():
        raise ValueError("packed_score_index: a sequence has no position in the packed batch")
    offsets = torch.tensor([score_offset(ids, pad_token_id) for ids in input_ids], device=owners.device)
    return starts + offsets


def reward_head(model: nn.Module) -> nn.Module:
    """The score head of a sequence-classification model (also inside a peft or FSDP wrapper)."""
    heads = [module for path, module in model.named_modules() if path.rsplit(".", 1)[-1] == HEAD_NAME]
    if not heads:
        raise ValueError(
            f"{type(model).__name__} has no '{HEAD_NAME}' head: loss=reward needs a ...ForSequenceClassification model."
        )
    return heads[0]  # the outermost: peft's wrapper of a trained head, not the copies inside it


@contextmanager
def head_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside: every forward of the model appends its head's per-position output, (rows, width, 1)."""
    caught: list[torch.Tensor] = []
    hook = reward_head(model).register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        yield caught
    finally:
        hook.remove()


def sequence_scores(model: nn.Module, inputs: dict[str, torch.Tensor], score_index: torch.Tensor) -> torch.Tensor:
    """(n,) float32 scores of the sequences in one batch: the model's forward on `inputs`, read at score_index."""
    with head_outputs(model) as caught:
        model(**inputs, use_cache=False)
    (per_position,) = caught
    return per_position.flatten()[score_index].float()


def shared_prompt_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2 * n_pairs,) scores of a shared_prompt_batch: chosen of pairs 0..n-1, then rejected, as the padded path."""
    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": attention_mask_for(model, batch),
    }
    return sequence_scores(model, inputs, batch["score_index"])


@torch.no_grad()
def attention_accepts_shared_prompt_scores(model: nn.Module, max_length: int, pad_token_id: int) -> bool:
    """Whether a reward model scores a shared-prompt pair as it scores its two sequences apart.

    The reward-model twin of shared_prompt.attention_accepts_shared_prompt_mask, with the same
    tiny pair, the same tolerances, and the same reasons to answer False without a forward pass.
    """
    if mask_unsupported_reason(model, max_length) is not None:
        return False
    embeddings = model.get_input_embeddings()
    tolerance = 1e-4 if embeddings.weight.dtype in (torch.float32, torch.float64) else 5e-2
    vocabulary = embeddings.num_embeddings
    prompt = [token % vocabulary for token in (3, 5, 7)]
    example = {"prompt_input_ids": prompt}
    for side, response in {"chosen": [11, 13, 2], "rejected": [17, 19, 23]}.items():
        example[f"{side}_input_ids"] = prompt + [token % vocabulary for token in response]
        example[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + example[f"{side}_input_ids"][len(prompt) :]
    device = embeddings.weight.device
    batch = {k: v.to(device) for k, v in shared_prompt_batch([example], pad_token_id=pad_token_id).items()}
    with torch.autocast(device.type, enabled=False):
        try:
            shared = shared_prompt_scores(model, batch)
        except (RuntimeError, ValueError):  # an attention implementation that refuses a 4D mask
            return False
        for sequence, side in enumerate(("chosen", "rejected")):
            input_ids = example[f"{side}_input_ids"]
            alone = sequence_scores(
                model,
                {"input_ids": torch.tensor([input_ids], device=device)},
                torch.tensor([score_offset(input_ids, pad_token_id)], device=device),
            )
            if (shared[sequence] - alone[0]).abs() > tolerance * max(1.0, alone[0].abs().item()):
                return False
    return True

"""Batches: the training order, each rank's share, padded and packed rows, and prompts for generation."""

import itertools
import random
from collections.abc import Iterator, Sequence

import torch

from errors import DatasetError
from logprobs import IGNORE_INDEX


def ceil_div(numerator: int, denominator: int) -> int:
    """The smallest integer at least numerator / denominator, for positive integers."""
    return -(-numerator // denominator)


def split_evenly(items: list, parts: int) -> list[list]:
    """Split a list into `parts` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        chunks.append(items[start:end])
        start = end
    return chunks


def rank_batches(items: list, n_ranks: int, rank: int, batch_per_rank: int) -> list[list]:
    """This rank's share of `items`, in batches of at most batch_per_rank, for work every rank must join.

    Sharded models need every rank in every forward pass, so all ranks get the same number of
    batches: enough for the largest share (at least one). A rank whose share runs out gets
    empty batches; it runs them on filler input and discards the result.
    """
    shares = split_evenly(items, n_ranks)
    n_batches = max(ceil_div(max(len(share) for share in shares), max(batch_per_rank, 1)), 1)
    return split_evenly(shares[rank], n_batches)


def training_order(
    n_train: int, batch_size: int, seed: int, n_epochs: int | None, n_examples: int | None
) -> Iterator[list[int]]:
    """Positions of the training examples in each global batch, in training order (fixed by the seed)."""
    return iterate_batches(
        list(range(n_train)),
        batch_size=batch_size,
        shuffle=True,
        seed=seed,
        n_epochs=n_epochs,
        n_examples=n_examples,
        drop_last=True,
    )


def iterate_batches(
    examples: Sequence[dict],
    batch_size: int,
    shuffle: bool,
    seed: int,
    n_epochs: int | None = None,
    n_examples: int | None = None,
    drop_last: bool = True,
) -> Iterator[list[dict]]:
    """Batches (lists of examples) for n_epochs epochs or n_examples examples, whichever comes first.

    Neither given: one epoch. With shuffle, epoch e is ordered by random.Random(seed + e), so a
    seed fixes the whole order. With drop_last (training) every batch has exactly batch_size
    examples: each epoch's incomplete last batch is dropped, and so is the remainder when
    n_examples is not a multiple of batch_size. Without it (evaluation) the last batch may be short.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    if drop_last and len(examples) < batch_size:
        raise DatasetError(f"Only {len(examples)} examples, fewer than batch_size={batch_size}: not one full batch.")
    if not examples:
        return
    if n_epochs is None and n_examples is None:
        n_epochs = 1
    n_yielded = 0
    for epoch in range(n_epochs) if n_epochs is not None else itertools.count():
        order = list(range(len(examples)))
        if shuffle:
            random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            if n_examples is not None:
                batch = batch[: n_examples - n_yielded]
            reached_limit = n_examples is not None and n_yielded + len(batch) >= n_examples
            if batch and (len(batch) == batch_size or not drop_last):
                yield batch
                n_yielded += len(batch)
            if reached_limit:
                return


def _pad(sequences: list[list[int]], length: int, value: int, left: bool = False) -> torch.Tensor:
    """(len(sequences), length) LongTensor of the sequences, padded with `value` on the right (or left)."""
    if value is None:
        raise ValueError(
            "pad_token_id is None: the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token)."
        )
    padded = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            values = torch.tensor(sequence, dtype=torch.long)
            if left:
                padded[row, length - len(sequence) :] = values
            else:
                padded[row, : len(sequence)] = values
    return padded


def score_offset(input_ids: list[int], pad_token_id: int) -> int:
    """Where a reward model reads a sequence's score: the index of its last token that is not the pad token.

    (transformers' AutoModelForSequenceClassification reads it there; a sequence of pad tokens only: its last.)
    """
    for offset in range(len(input_ids) - 1, -1, -1):
        if input_ids[offset] != pad_token_id:
            return offset
    return len(input_ids) - 1


def padded_batch(input_ids: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One sequence per row, right-padded to the longest: input_ids, attention_mask, labels, each (n, longest).

    Padding is labelled IGNORE_INDEX. A DPO batch passes its chosen then its rejected
    sequences, so both go through the model in one forward pass.
    """
    length = max(len(ids) for ids in input_ids)
    return {
        "input_ids": _pad(input_ids, length, pad_token_id),
        "attention_mask": _pad([[1] * len(ids) for ids in input_ids], length, 0),
        "labels": _pad(labels, length, IGNORE_INDEX),
    }


def packed_batch(
    input_ids: list[list[int]], labels: list[list[int]], pad_token_id: int, row_tokens: int
) -> dict[str, torch.Tensor]:
    """Several sequences per row, so that almost no position is padding (padding-free batches).

    Sequences are placed first-fit, longest first, into rows of `row_tokens` tokens (or the
    longest sequence, if longer). Each sequence's position ids restart at 0; with no attention
    mask, transformers reads those restarts as sequence boundaries and keeps attention inside
    each sequence (a block-diagonal causal mask for sdpa/eager, varlen kernels for flash
    attention). The first label of every sequence is IGNORE_INDEX, so no token is ever
    predicted from the sequence before it: the log-probs equal the padded path's exactly.

    Returns input_ids, position_ids, labels and sequence_ids (index into the arguments,
    -1 on padding), each (rows, longest row).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i])):
        length = len(input_ids[index])
        row = next((r for r, free in enumerate(room) if length <= free), None)
        if row is None:
            rows.append([])
            room.append(max(row_tokens, length))
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= length
    width = max(sum(len(input_ids[i]) for i in row) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "sequence_ids": torch.full((len(rows), width), -1, dtype=torch.long),
    }
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            end = start + len(input_ids[index])
            batch["input_ids"][row, start:end] = torch.tensor(input_ids[index])
            batch["position_ids"][row, start:end] = torch.arange(end - start)
            batch["labels"][row, start + 1 : end] = torch.tensor(labels[index][1:])
            batch["sequence_ids"][row, start:end] = index
            start = end
        # the padding tail is a sequence of its own (positions from 0) that nothing attends to
        batch["position_ids"][row, start:] = torch.arange(width - start)
    return batch


def collate_prompts(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: prompt_input_ids and prompt_attention_mask, (batch, longest prompt)."""
    prompts = [e["prompt_input_ids"] for e in examples]
    length = max(len(ids) for ids in prompts)
    return {
        "prompt_input_ids": _pad(prompts, length, pad_token_id, left=True),
        "prompt_attention_mask": _pad([[1] * len(ids) for ids in prompts], length, 0, left=True),
    }

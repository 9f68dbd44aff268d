"""Prefix sharing for DPO: each pair as one row `prompt, chosen, rejected`, its prompt run once.

The padded path runs every prompt twice, once before each response. Here a pair is one
segment of a row, and a 4D attention mask plus restarting position ids make the forward pass
compute exactly what the two separate sequences would (the idea of prefix sharing for
preference tuning, Wang et al., 2024, arXiv:2410.20305):

    tokens:     p0 p1 p2 | c0 c1 | r0 r1 r2
    positions:   0  1  2 |  3  4 |  3  4  5
    c_j sees the prompt and c_0..c_j; r_j sees the prompt and r_0..r_j, never the chosen tokens.

The last prompt position predicts the first token of both responses: its output is read
twice. The reference model runs on the same batch, so it saves the same work.

Mask format. transformers 5 uses a 4D `attention_mask` of shape (batch, 1, query, key) as
given, skipping its own mask construction (masking_utils._preprocess_mask_arguments), and
hands it to the attention function unchanged: sdpa passes it to
F.scaled_dot_product_attention (bool: True = attend, or additive float), while eager and
flex attention add a tensor mask to the scores (a bool mask would be added as 0/1 there and
mask nothing). So the batch holds the bool form, which sdpa takes in any dtype (and which keeps
CPU sdpa on its flash kernel), and `attention_mask_for` turns it into what every other
implementation reads: the additive form (0 or finfo.min, in the embedding dtype, as
transformers' own eager masks) for eager, and for flex_attention a BlockMask (transformers
passes one through to the kernel as it is), computed from each position's pair and part by the
rule above, whose fully masked blocks the kernel skips: the chosen-rejected blocks of every pair
and every block between pairs packed in one row. Flash attention takes no arbitrary mask at
all; the probe `attention_accepts_shared_prompt_mask` tells a trainer when it cannot share prompts.
"""

import torch
import torch.nn as nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from batching import score_offset
from logprobs import IGNORE_INDEX, label_logps_chunked

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # the part of its pair a row position holds (padding: PROMPT of pair -1)


def shared_prompt_batch(
    examples: list[dict], pad_token_id: int, row_tokens: int | None = None
) -> dict[str, torch.Tensor]:
    """One forward's inputs for DPO pairs with each prompt stored once, and where to read their log-probs.

    examples[i] holds lists of ints: prompt_input_ids, chosen_input_ids (the prompt then the
    chosen response), chosen_labels (IGNORE_INDEX on untrained positions) and the rejected ones.
    Without row_tokens each pair is one right-padded row, in order; with it, pairs are placed
    first-fit, longest first, into rows of row_tokens tokens, or of the longest pair's tokens
    where that is longer (every row is as wide as the batch's widest anyway, so filling each up
    to that width removes rows at no cost), and never attend to each other.

    Returns, with rows x width the batch shape and n_labelled the labelled tokens of all pairs:
      input_ids, position_ids: (rows, width); padding holds pad_token_id at position 0;
      attention_mask: (rows, 1, width, width) bool, True where a query position may attend a key
        position (padding attends only earlier padding, so no row of the mask is empty);
      pair_ids, parts: (rows, width) the pair of each position (-1 on padding) and its part
        (PROMPT, CHOSEN or REJECTED; padding: PROMPT), the mask's compact form (flex_block_mask);
      predictor_index: (n_labelled,) the flat index (row * width + column) of the position whose
        output predicts each labelled token;
      target_ids: (n_labelled,) those tokens;
      sequence_index: (n_labelled,) their sequence: i for pair i's chosen response, n_pairs + i for
        its rejected one, the order of the padded path (all chosen, then all rejected);
      n_tokens: (2 * n_pairs,) labelled tokens per sequence, in that order;
      score_index: (2 * n_pairs,) the flat index of the position a reward model's score of each
        sequence is read at (its last token that is not the pad token; reward_scores.py), same order.
    """
    if not examples:
        raise ValueError("shared_prompt_batch got no pairs: a batch needs at least one.")
    if pad_token_id is None:
        raise ValueError(
            "pad_token_id is None: the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token)."
        )
    segments = [_pair_segment(example, index, pad_token_id) for index, example in enumerate(examples)]
    lengths = [len(segment["input_ids"]) for segment in segments]
    rows = [[index] for index in range(len(examples))] if row_tokens is None else _first_fit(lengths, row_tokens)
    width = max(sum(lengths[index] for index in members) for members in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    pair_ids = torch.full(shape, -1, dtype=torch.long)
    parts = torch.full(shape, PROMPT, dtype=torch.long)
    predictors, targets, owners = [], [], []
    score_index = torch.zeros(2 * len(examples), dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            segment = segments[index]
            columns = slice(start, start + lengths[index])
            input_ids[row, columns] = segment["input_ids"]
            position_ids[row, columns] = segment["position_ids"]
            pair_ids[row, columns] = index
            parts[row, columns] = segment["parts"]
            for side, owner in (("chosen", index), ("rejected", len(examples) + index)):
                score_index[owner] = row * width + start + segment[f"{side}_score_offset"]
                predictors.append(row * width + start + segment[f"{side}_predictors"])
                targets.append(segment[f"{side}_targets"])
                owners.append(torch.full_like(targets[-1], owner))
            start += lengths[index]
    sequence_index = torch.cat(owners)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": _shared_prompt_mask(pair_ids, parts),
        "pair_ids": pair_ids,
        "parts": parts,
        "predictor_index": torch.cat(predictors),
        "target_ids": torch.cat(targets),
        "sequence_index": sequence_index,
        "n_tokens": torch.bincount(sequence_index, minlength=2 * len(examples)),
        "score_index": score_index,
    }


def _pair_segment(example: dict, index: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pair `index` as one segment `prompt, chosen, rejected`: its row contents and labelled positions.

    Returns input_ids, position_ids and parts, each (segment_length,), and for each side
    {side}_predictors (offsets in the segment of the positions that predict its labelled
    tokens), {side}_targets (those tokens), each (labelled tokens of the side,), and
    {side}_score_offset (the offset of the token a reward model's score is read at).
    """
    prompt = example["prompt_input_ids"]
    n_prompt = len(prompt)
    responses = {}
    for side in ("chosen", "rejected"):
        input_ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
        if input_ids[:n_prompt] != prompt:
            raise ValueError(
                f"Pair {index}: {side}_input_ids does not start with prompt_input_ids, so the pair cannot share its "
                "prompt; tokenize the prompt once and append each response to it (as tokenization.py does)."
            )
        if len(labels) != len(input_ids):
            raise ValueError(f"Pair {index}: {side}_labels has {len(labels)} entries for {len(input_ids)} tokens.")
        responses[side] = (input_ids[n_prompt:], torch.tensor(labels, dtype=torch.long))
    (chosen, chosen_labels), (rejected, rejected_labels) = responses["chosen"], responses["rejected"]
    segment = {
        "input_ids": torch.tensor(prompt + chosen + rejected, dtype=torch.long),
        # the rejected response continues the prompt, not the chosen response
        "position_ids": torch.cat(
            [torch.arange(n_prompt + len(chosen)), torch.arange(n_prompt, n_prompt + len(rejected))]
        ),
        "parts": torch.tensor([PROMPT] * n_prompt + [CHOSEN] * len(chosen) + [REJECTED] * len(rejected)),
    }
    for side, labels, shift in (("chosen", chosen_labels, 0), ("rejected", rejected_labels, len(chosen))):
        # token t of the side's own sequence is predicted by its position t - 1 (the one-token shift);
        # in the segment, positions from the prompt's end on move right past the chosen response
        predicted = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1)
        segment[f"{side}_predictors"] = torch.where(predicted >= n_prompt, predicted + shift, predicted)
        segment[f"{side}_targets"] = labels[1:][predicted]
        read_at = score_offset(example[f"{side}_input_ids"], pad_token_id)
        segment[f"{side}_score_offset"] = read_at + shift if read_at >= n_prompt else read_at
    return segment


def _first_fit(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Indices of the items in each row: first-fit, longest first, rows of row_tokens or the longest item's length."""
    if row_tokens < 1:
        raise ValueError(f"row_tokens must be a positive number of tokens, got {row_tokens}")
    row_tokens = max(row_tokens, *lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[index] <= free), None)
        if row is None:
            rows.append([])
            room.append(row_tokens)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def _shared_prompt_mask(pair_ids: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """(rows, 1, width, width) bool: causal within each pair, except that rejected tokens never see chosen ones.

    pair_ids, parts: (rows, width), the pair of each position (-1 on padding) and its part.
    """
    width = pair_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_pair = pair_ids.unsqueeze(2) == pair_ids.unsqueeze(1)
    rejected_sees_chosen = (parts.unsqueeze(2) == REJECTED) & (parts.unsqueeze(1) == CHOSEN)
    return (causal & same_pair & ~rejected_sees_chosen).unsqueeze(1)


def attention_mask_for(model: nn.Module, batch: dict) -> torch.Tensor | BlockMask:
    """The batch's prefix-shared mask in the form the model's attention implementation reads.

    sdpa takes the (rows, 1, width, width) bool `attention_mask` as it is; flex_attention gets
    the batch's `block_mask` if it has one, else one built now (flex_block_mask). Every other
    implementation gets the additive form transformers builds for eager attention: 0 where
    allowed, the dtype's most negative value elsewhere, in the input embedding's dtype (a float32
    mask also works with bf16 scores: the sum promotes).
    """
    implementation = model.config._attn_implementation
    allowed = batch["attention_mask"]
    if implementation == "sdpa":
        return allowed
    if implementation == "flex_attention":
        return batch["block_mask"] if "block_mask" in batch else flex_block_mask(batch["pair_ids"], batch["parts"])
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def flex_block_mask(pair_ids: torch.Tensor, parts: torch.Tensor) -> BlockMask:
    """The prefix-shared mask as a FlexAttention BlockMask, on the device of pair_ids.

    pair_ids, parts: (rows, width), as shared_prompt_batch returns them. A query position may
    attend a key position when both hold the same pair (padding, pair -1, counts as one), the
    key is not later, and the query is not a rejected token looking at a chosen one: the same
    rule as the boolean `attention_mask`, evaluated block by block so that the kernel skips the
    blocks it rules out whole.
    """

    def allowed(batch, head, query, key):
        same_pair = pair_ids[batch, query] == pair_ids[batch, key]
        rejected_sees_chosen = (parts[batch, query] == REJECTED) & (parts[batch, key] == CHOSEN)
        return (key <= query) & same_pair & ~rejected_sees_chosen

    rows, width = pair_ids.shape
    return create_block_mask(allowed, rows, None, width, width, device=pair_ids.device)


def shared_prompt_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen then rejected log-probs of every pair in a shared_prompt_batch, from one forward pass.

    With chunk_tokens the model returns its last hidden states (and the logits of one position
    only), and only the predictor positions reach the output projection, chunk_tokens rows at
    a time (logprobs.label_logps_chunked). Without it, log_softmax runs in float32 on the full
    logits' predictor positions only.

    Returns (logps, n_tokens), both (2 * n_pairs,): summed (or, with average, length-averaged)
    log-probabilities in float32, chosen of pairs 0..n-1 then rejected, as the padded path
    orders them, and the labelled tokens of each sequence.
    """
    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": attention_mask_for(model, batch),
    }
    predictors, targets = batch["predictor_index"], batch["target_ids"]
    if chunk_tokens is None:
        logits = model(**inputs, use_cache=False).logits
        picked = logits.flatten(0, 1)[predictors].float()  # (n_labelled, vocab)
        # log_softmax(x)[y] = x[y] - logsumexp(x)
        per_token = picked.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(picked, dim=-1)
    else:
        outputs = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden = outputs.hidden_states[-1].flatten(0, 1)[predictors]  # (n_labelled, hidden_size)
        head = model.get_output_embeddings()
        per_token = label_logps_chunked(hidden, head.weight, head.bias, targets, chunk_tokens)
    n_tokens = batch["n_tokens"]
    logps = torch.zeros(n_tokens.shape[0], dtype=torch.float32, device=per_token.device)
    logps = logps.index_add(0, batch["sequence_index"], per_token)
    if average:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens


def mask_unsupported_reason(model: nn.Module, max_length: int) -> str | None:
    """Why the model's attention cannot take the prefix-shared mask, known from its config alone; None if it may."""
    implementation = model.config._attn_implementation
    if "flash" in implementation or "paged" in implementation:
        return f"{implementation} attention takes no arbitrary mask"
    window = getattr(model.config, "sliding_window", None)
    if window is not None and window < max_length:
        return f"its sliding window of {window} tokens is shorter than max_length={max_length}"
    return None


@torch.no_grad()
def attention_accepts_shared_prompt_mask(model: nn.Module, max_length: int) -> bool:
    """Whether the model computes on a shared-prompt batch what it computes on the two sequences apart.

    max_length bounds the length of every chosen and rejected sequence. Answered without a
    forward pass: False for flash attention (and paged attention built on it), which takes no
    arbitrary mask and whose kernels can fail on the device rather than raise; and False for a
    sliding window shorter than max_length (Mistral, Gemma 2), which the 4D mask would replace.
    Otherwise one tiny pair (prompt 3 tokens, each response 3) goes through the model once in
    the shared layout and once per sequence, unpadded and unmasked, with autocast off so that
    only the weights' dtype sets the rounding. A model that ignores the 4D mask lets the
    rejected response see the chosen one (or, reading the restarting position ids as
    boundaries, lose its prompt), and its log-prob moves: by whole nats in a trained model, by
    0.01-0.15 in the tests' random ones. The tolerance is 1e-4 nats per token in float32 and
    0.05 in 16-bit weights, where a random model's error can go unnoticed but a trained one's cannot.
    """
    if mask_unsupported_reason(model, max_length) is not None:
        return False
    embeddings = model.get_input_embeddings()
    tolerance = 1e-4 if embeddings.weight.dtype in (torch.float32, torch.float64) else 5e-2
    # any distinct ids the vocabulary holds
    prompt = [token % embeddings.num_embeddings for token in (3, 5, 7)]
    responses = {"chosen": [11, 13, 2], "rejected": [17, 19, 23]}
    example = {"prompt_input_ids": prompt}
    for side, response in responses.items():
        response = [token % embeddings.num_embeddings for token in response]
        example[f"{side}_input_ids"] = prompt + response
        example[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + response
    device = embeddings.weight.device
    batch = {key: value.to(device) for key, value in shared_prompt_batch([example], pad_token_id=0).items()}
    with torch.autocast(device.type, enabled=False):
        try:
            shared, _ = shared_prompt_logps(model, batch)
        except (RuntimeError, ValueError):  # an attention implementation that refuses a 4D mask
            return False
        for sequence, side in enumerate(responses):
            input_ids = torch.tensor([example[f"{side}_input_ids"]], device=device)
            logits = model(input_ids=input_ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
            alone = logits.log_softmax(-1).gather(1, input_ids[0, len(prompt) :].unsqueeze(1)).sum()
            if (shared[sequence] - alone).abs() > tolerance * len(responses[side]):
                return False
    return True

"""Log-probabilities of labelled tokens: per token, per sequence, packed rows, and chunked over the vocabulary.

Labels mark what is trained on: IGNORE_INDEX on prompt and padding positions. The logits at
position t predict token t + 1, so every function here shifts labels left by one, and masked
positions contribute exactly zero to sums and gradients. Losses (losses.py) take the per-sequence
sums these functions return; data code (batching, tokenization, prefix sharing) imports
IGNORE_INDEX and the chunked projection from here.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of positions that are not trained on (prompt, padding)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token under the logits, in float32.

    logits: (batch, seq_len, vocab), labels: (batch, seq_len) with IGNORE_INDEX on
    positions that are not trained on. The logits at position t predict token t + 1,
    so labels are shifted left by one. Returns (batch, seq_len - 1); masked positions
    hold exactly 0.0 so they contribute nothing to sums or gradients.
    """
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe_labels = torch.where(mask, labels, 0)  # any valid index; zeroed by the mask below
    # log_softmax(x)[y] = x[y] - logsumexp(x), without materialising a second (B, T, V) tensor
    picked = torch.gather(logits, dim=2, index=safe_labels.unsqueeze(2)).squeeze(2)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, logps, 0.0)


def labelled_tokens(labels: list[int]) -> int:
    """How many tokens of a sequence are trained on: labels after the one-token shift that are not IGNORE_INDEX."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    average: bool = False,
    sequence_ids: torch.Tensor | None = None,
    n_sequences: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or length-averaged) log-probability of each sequence's labelled tokens.

    logits: (batch, seq_len, vocab), labels: (batch, seq_len). Each row is one sequence,
    or, for packed rows, sequence_ids (batch, seq_len) and n_sequences say which sequence
    each token belongs to (see sequence_logps_from_hidden).
    Returns (logps, n_tokens), both (n_sequences,): logps in float32 and the number of
    labelled tokens per sequence.
    """
    per_token = token_logps(logits, labels)
    if sequence_ids is None:
        logps, n_tokens = per_token.sum(-1), (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    else:
        mask = labels[:, 1:] != IGNORE_INDEX
        logps, n_tokens = _sum_per_sequence(per_token[mask], sequence_ids[:, 1:][mask], n_sequences)
    if average:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens


def _sum_per_sequence(
    values: torch.Tensor, owners: torch.Tensor, n_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums and counts of labelled-token values: values (n,) float32, owners (n,) sequence indices."""
    sums = torch.zeros(n_sequences, dtype=torch.float32, device=values.device).index_add(0, owners, values)
    counts = torch.zeros(n_sequences, dtype=torch.long, device=owners.device).index_add_(
        0, owners, torch.ones_like(owners)
    )
    return sums, counts


class _ChunkedLabelLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[target], one chunk of rows at a time.

    Only the inputs and the per-token logsumexp (n_tokens,) are saved for backward; each
    chunk's (chunk_tokens, vocab) float32 logits are recomputed there, so the peak extra
    memory is one chunk of logits instead of (n_tokens, vocab) logits and their softmax.

    bf16 inputs are upcast to float32 before the matmul rather than the bf16 product after
    it: the upcast is exact, so the logits carry only float32 accumulation error instead of
    bf16 output rounding (up to 0.06 on a logit of 30). The price is a float32 copy of the
    weight (vocab * hidden_size * 4 bytes) while forward and backward run, and float32
    rather than bf16 matmul throughput. Autocast is switched off inside, so an enclosing
    autocast region cannot turn the matmuls back into bf16.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_tokens: int,
    ) -> torch.Tensor:
        weight_float = weight.float()
        bias_float = None if bias is None else bias.float()
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        logsumexp = torch.empty_like(logps)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                logits = F.linear(hidden[rows].float(), weight_float, bias_float)
                logsumexp[rows] = torch.logsumexp(logits, dim=-1)
                logps[rows] = logits.gather(1, targets[rows].unsqueeze(1)).squeeze(1) - logsumexp[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.chunk_tokens = chunk_tokens
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        weight_float = weight.float()
        bias_float = None if bias is None else bias.float()
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # weight and bias gradients sum over every chunk, so they accumulate in float32
        grad_weight = torch.zeros_like(weight_float) if needs_weight else None
        grad_bias = torch.zeros_like(bias_float) if needs_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                hidden_float = hidden[rows].float()
                logits = F.linear(hidden_float, weight_float, bias_float)
                # d logp / d logits = onehot(target) - softmax(logits), times the upstream gradient;
                # computed in place so that backward, too, holds a single chunk of logits
                grad_logits = logits.sub_(logsumexp[rows].unsqueeze(1)).exp_().mul_(-grad_logps[rows].unsqueeze(1))
                grad_logits.scatter_add_(1, targets[rows].unsqueeze(1), grad_logps[rows].unsqueeze(1))
                if needs_hidden:
                    grad_hidden[rows] = (grad_logits @ weight_float).to(hidden.dtype)
                if needs_weight:
                    grad_weight.addmm_(grad_logits.T, hidden_float)
                if needs_bias:
                    grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def label_logps_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_tokens: int,
) -> torch.Tensor:
    """Log-probability of each target token, projecting hidden states chunk by chunk.

    hidden: (n_tokens, hidden_size), weight: (vocab, hidden_size) (the output embedding,
    possibly tied to the input embedding), bias: (vocab,) or None, targets: (n_tokens,)
    valid token ids. Returns (n_tokens,) float32, equal to
    log_softmax(hidden @ weight.T + bias, -1).gather(targets) computed in float32,
    without ever holding more than (chunk_tokens, vocab) logits. Differentiable in hidden,
    weight and bias; gradients come back in each input's dtype.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of tokens, got {chunk_tokens}")
    return _ChunkedLabelLogps.apply(hidden, weight, bias, targets, chunk_tokens)


def sequence_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_tokens: int,
    average: bool = False,
    sequence_ids: torch.Tensor | None = None,
    n_sequences: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps from the final hidden states instead of the logits.

    hidden: (batch, seq_len, hidden_size), the states the output projection (weight:
    (vocab, hidden_size), bias: (vocab,) or None) turns into logits; labels: (batch, seq_len).
    Same one-token shift and IGNORE_INDEX mask as token_logps, but only labelled positions
    reach the vocabulary projection, so prompt and padding tokens cost nothing, and the
    projection runs chunk_tokens rows at a time (see label_logps_chunked).

    Packed rows hold several sequences: sequence_ids (batch, seq_len) says which of the
    n_sequences sequences each token belongs to (-1 on padding, whose labels must be
    IGNORE_INDEX), and a token's log-prob counts towards the sequence of its label position.
    The first token of every packed sequence must carry IGNORE_INDEX, so that no prediction
    crosses from one sequence into the next. Without sequence_ids each row is one sequence
    and n_sequences, if given, must equal batch.

    Returns (logps, n_tokens), both (n_sequences,): summed (or, with average, length-averaged)
    log-probabilities in float32, and the number of labelled tokens per sequence.
    """
    batch = labels.shape[0]
    if sequence_ids is not None and n_sequences is None:
        raise ValueError("packed rows (sequence_ids given) need n_sequences, the number of sequences they hold")
    if sequence_ids is None and n_sequences not in (None, batch):
        raise ValueError(
            f"without sequence_ids each row is one sequence, so n_sequences must be {batch}, got {n_sequences}"
        )
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    if sequence_ids is None:
        n_sequences = batch
        sequence_ids = torch.arange(n_sequences, device=labels.device).unsqueeze(1).expand_as(labels)
    else:
        sequence_ids = sequence_ids[:, 1:]
    owners = sequence_ids[mask]

    per_token = label_logps_chunked(hidden[:, :-1][mask], weight, bias, labels[mask], chunk_tokens)
    logps, n_tokens = _sum_per_sequence(per_token, owners, n_sequences)
    if average:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens

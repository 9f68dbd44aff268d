"""The chunked hidden-state log-prob path against the plain full-logits computation."""

from collections.abc import Callable

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from logprobs import IGNORE_INDEX, label_logps_chunked, sequence_logps, sequence_logps_from_hidden

VOCAB, HIDDEN = 50, 16


def plain_label_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """The computation label_logps_chunked replaces: full (n_tokens, vocab) float32 logits."""
    logits = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def leaf_inputs(n_tokens: int, with_bias: bool, dtype: torch.dtype = torch.float32) -> list[torch.Tensor | None]:
    """Random hidden (n_tokens, HIDDEN), weight (VOCAB, HIDDEN) and bias (VOCAB,) leaves."""
    tensors = [
        torch.randn(n_tokens, HIDDEN),
        torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5,
        torch.randn(VOCAB) if with_bias else None,
    ]
    return [None if t is None else t.to(dtype).requires_grad_() for t in tensors]


def gradients(
    output: torch.Tensor, upstream: torch.Tensor, inputs: list[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """d(output . upstream) / d input for each input that is not None."""
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(output, present, upstream))
    return [None if t is None else next(grads) for t in inputs]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 20, 64])
def test_label_logps_chunked_matches_log_softmax(chunk_tokens, with_bias):
    torch.manual_seed(chunk_tokens)
    n_tokens = 20
    inputs = leaf_inputs(n_tokens, with_bias)
    targets = torch.randint(VOCAB, (n_tokens,))
    upstream = torch.randn(n_tokens)

    chunked = label_logps_chunked(*inputs, targets, chunk_tokens)
    plain = plain_label_logps(*inputs, targets)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    for chunked_grad, plain_grad in zip(gradients(chunked, upstream, inputs), gradients(plain, upstream, inputs)):
        torch.testing.assert_close(chunked_grad, plain_grad, atol=1e-5, rtol=0)


def test_label_logps_chunked_frozen_weight_and_no_grad():
    torch.manual_seed(0)
    hidden, weight, bias = leaf_inputs(9, with_bias=True)
    targets = torch.randint(VOCAB, (9,))
    expected = plain_label_logps(hidden, weight, bias, targets)
    # a frozen projection (the reference model): only hidden gets a gradient
    frozen = label_logps_chunked(hidden, weight.detach(), bias.detach(), targets, chunk_tokens=4)
    (grad_hidden,) = torch.autograd.grad(frozen.sum(), hidden)
    torch.testing.assert_close(grad_hidden, torch.autograd.grad(expected.sum(), hidden)[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        no_grad = label_logps_chunked(hidden, weight, bias, targets, chunk_tokens=4)
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, expected.detach(), atol=1e-5, rtol=0)


def test_label_logps_chunked_stays_float32_under_autocast():
    torch.manual_seed(0)
    inputs = leaf_inputs(10, with_bias=True)
    targets = torch.randint(VOCAB, (10,))
    upstream = torch.randn(10)
    plain = plain_label_logps(*inputs, targets)
    # a bf16 autocast region (as the trainer's) would round the logits to bf16: errors near 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = label_logps_chunked(*inputs, targets, chunk_tokens=4)
        chunked_grads = gradients(chunked, upstream, inputs)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    for chunked_grad, plain_grad in zip(chunked_grads, gradients(plain, upstream, inputs)):
        torch.testing.assert_close(chunked_grad, plain_grad, atol=1e-5, rtol=0)


def test_label_logps_chunked_rejects_empty_chunks():
    hidden, weight, _ = leaf_inputs(3, with_bias=False)
    with pytest.raises(ValueError, match="chunk_tokens"):
        label_logps_chunked(hidden, weight, None, torch.zeros(3, dtype=torch.long), chunk_tokens=0)


def test_label_logps_chunked_bf16_is_float32_with_input_dtype_gradients():
    torch.manual_seed(0)
    inputs = leaf_inputs(12, with_bias=True, dtype=torch.bfloat16)
    targets = torch.randint(VOCAB, (12,))
    upstream = torch.randn(12)
    chunked = label_logps_chunked(*inputs, targets, chunk_tokens=5)
    assert chunked.dtype == torch.float32
    # exact upcasts of the same bf16 numbers: only float32 accumulation order differs
    float_inputs = [t.detach().float().requires_grad_() for t in inputs]
    plain = plain_label_logps(*float_inputs, targets)
    torch.testing.assert_close(chunked, plain, atol=1e-4, rtol=0)
    for chunked_grad, plain_grad, leaf in zip(
        gradients(chunked, upstream, inputs), gradients(plain, upstream, float_inputs), inputs
    ):
        assert chunked_grad.dtype == leaf.dtype == torch.bfloat16
        torch.testing.assert_close(chunked_grad.float(), plain_grad, atol=2e-2, rtol=1e-2)


def prompt_response_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (4, 7, HIDDEN) and labels with IGNORE_INDEX on prompts and padding; row 3 has no labels."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 7, HIDDEN, requires_grad=True)
    labels = torch.randint(VOCAB, (4, 7))
    labels[0, :2] = IGNORE_INDEX  # prompt of 2, no padding
    labels[1, :3] = IGNORE_INDEX  # prompt of 3, 2 padding
    labels[1, 5:] = IGNORE_INDEX
    labels[2, :1] = IGNORE_INDEX  # prompt of 1, 1 padding
    labels[2, 6:] = IGNORE_INDEX
    labels[3, :] = IGNORE_INDEX  # prompt and padding only
    return hidden, labels


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_from_hidden_matches_full_logits(average):
    hidden, labels = prompt_response_batch()
    weight = (torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5).requires_grad_()
    upstream = torch.randn(4)

    chunked, chunked_counts = sequence_logps_from_hidden(hidden, weight, None, labels, chunk_tokens=4, average=average)
    plain, plain_counts = sequence_logps(hidden @ weight.T, labels, average=average)
    assert chunked_counts.tolist() == plain_counts.tolist() == [5, 2, 5, 0]
    assert chunked[3].item() == 0.0
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    for chunked_grad, plain_grad in zip(
        gradients(chunked, upstream, [hidden, weight]), gradients(plain, upstream, [hidden, weight])
    ):
        torch.testing.assert_close(chunked_grad, plain_grad, atol=1e-5, rtol=0)


def test_packed_rows_match_unpacked_sequences():
    torch.manual_seed(0)
    # sequence lengths per packed row: row 0 holds sequences 0, 1, 2 and 2 padding; row 1 holds 3, 4
    lengths = [[3, 4, 2], [5, 4]]
    row_len = 11
    hidden = torch.randn(2, row_len, HIDDEN)
    weight = torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5
    labels = torch.full((2, row_len), IGNORE_INDEX)
    sequence_ids = torch.full((2, row_len), -1)
    pieces = []  # (hidden, labels) of each sequence on its own
    sequence = 0
    for row, row_lengths in enumerate(lengths):
        start = 0
        for length in row_lengths:
            span = slice(start, start + length)
            sequence_labels = torch.randint(VOCAB, (length,))
            sequence_labels[:2] = IGNORE_INDEX  # a 2-token prompt; in particular the first token
            labels[row, span] = sequence_labels
            sequence_ids[row, span] = sequence
            pieces.append((hidden[row, span], sequence_labels))
            sequence, start = sequence + 1, start + length

    for average in (False, True):
        packed, packed_counts = sequence_logps_from_hidden(
            hidden, weight, None, labels, chunk_tokens=3, average=average, sequence_ids=sequence_ids, n_sequences=5
        )
        for index, (piece_hidden, piece_labels) in enumerate(pieces):
            alone, alone_count = sequence_logps(
                piece_hidden.unsqueeze(0) @ weight.T, piece_labels.unsqueeze(0), average=average
            )
            assert packed_counts[index].item() == alone_count.item()
            assert packed[index].item() == pytest.approx(alone.item(), abs=1e-5)


def test_sequence_count_must_fit_the_rows():
    hidden, labels = prompt_response_batch()
    weight = torch.randn(VOCAB, HIDDEN)
    with pytest.raises(ValueError, match="need n_sequences"):
        sequence_logps_from_hidden(hidden, weight, None, labels, chunk_tokens=4, sequence_ids=torch.zeros_like(labels))
    with pytest.raises(ValueError, match="must be 4, got 3"):
        sequence_logps_from_hidden(hidden, weight, None, labels, chunk_tokens=4, n_sequences=3)
    logps, _ = sequence_logps_from_hidden(hidden, weight, None, labels, chunk_tokens=4, n_sequences=4)
    assert logps.shape == (4,)


def tiny_llama() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> torch.nn.Module:
    config = GPT2Config(
        vocab_size=300,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize(("build_model", "tied"), [(tiny_llama, False), (tiny_gpt2, True)])
def test_real_model_hidden_states_match_full_logits(build_model, tied):
    torch.manual_seed(0)
    model = build_model().eval()
    projection = model.get_output_embeddings()
    # with tied embeddings the weight gets gradient from both the input and the output side
    assert (projection.weight is model.get_input_embeddings().weight) == tied
    input_ids = torch.randint(3, 300, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding
    labels = torch.where(attention_mask.bool(), input_ids, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # prompt
    upstream = torch.randn(3)
    parameters = list(model.parameters())

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    plain, _ = sequence_logps(logits, labels)
    plain_grads = torch.autograd.grad(plain, parameters, upstream, allow_unused=True)

    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True, logits_to_keep=1
    )
    chunked, _ = sequence_logps_from_hidden(
        outputs.hidden_states[-1], projection.weight, projection.bias, labels, chunk_tokens=5
    )
    chunked_grads = torch.autograd.grad(chunked, parameters, upstream, allow_unused=True)

    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    for (name, _), chunked_grad, plain_grad in zip(model.named_parameters(), chunked_grads, plain_grads):
        assert (chunked_grad is None) == (plain_grad is None), name
        if plain_grad is not None:
            torch.testing.assert_close(chunked_grad, plain_grad, atol=1e-5, rtol=0, msg=name)


def largest_saved_tensor(compute: Callable[[], object]) -> int:
    """Number of elements of the largest tensor autograd saves for backward while compute() runs."""
    sizes = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute()
    return max(sizes)


def test_chunked_path_saves_no_full_logits():
    torch.manual_seed(0)
    n_tokens, vocab, hidden_size = 1024, 16384, 32
    hidden = torch.randn(n_tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).requires_grad_()
    targets = torch.randint(vocab, (n_tokens,))
    full_logits = n_tokens * vocab
    # the hook does see the logits of the plain computation, so the check below can fail
    assert largest_saved_tensor(lambda: plain_label_logps(hidden, weight, None, targets)) >= full_logits
    assert (
        largest_saved_tensor(lambda: label_logps_chunked(hidden, weight, None, targets, chunk_tokens=128)) < full_logits
    )

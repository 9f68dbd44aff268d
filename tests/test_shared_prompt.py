"""Prefix sharing (shared_prompt.py) against the padded path: the same log-probs and the same gradients."""

import contextlib

import pytest
import torch
import torch.nn as nn
from conftest import compose_config
from torch.nn.attention.flex_attention import create_mask
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from batching import padded_batch
from config_checks import validate_config
from errors import ConfigError
from forward_plan import attention_accepts_packed_rows, choose_plan
from logprobs import IGNORE_INDEX, sequence_logps
from loss_registry import LossSpec
from shared_prompt import (
    _first_fit,
    attention_accepts_shared_prompt_mask,
    flex_block_mask,
    shared_prompt_batch,
    shared_prompt_logps,
)

VOCAB, PAD = 64, 0
# (prompt, chosen, rejected) lengths: 1-token responses and a 1-token prompt, pairs of different lengths
PAIR_LENGTHS = [(5, 3, 4), (2, 1, 6), (7, 4, 1), (1, 2, 2), (4, 6, 3)]
ROW_TOKENS = 24  # packs the five pairs (5 to 13 tokens) into three rows


def tiny_model(architecture: str, attention: str) -> nn.Module:
    """A 2-layer random model; Llama with tied input and output embeddings, GPT-NeoX with partial rotary."""
    torch.manual_seed(0)
    if architecture == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, attn_implementation=attention,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        attn_implementation=attention,
    )  # fmt: skip
    return GPTNeoXForCausalLM(config)


def make_pair(generator: torch.Generator, n_prompt: int, n_chosen: int, n_rejected: int) -> dict:
    """A pair in the trainer's format: prompt ids, and each side's ids and labels (IGNORE_INDEX on the prompt)."""
    prompt, chosen, rejected = (
        torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in (n_prompt, n_chosen, n_rejected)
    )
    pair = {"prompt_input_ids": prompt}
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        pair[f"{side}_input_ids"] = prompt + response
        pair[f"{side}_labels"] = [IGNORE_INDEX] * n_prompt + response
    return pair


def make_pairs(lengths: list[tuple[int, int, int]] = PAIR_LENGTHS, seed: int = 0) -> list[dict]:
    """One pair of each (prompt, chosen, rejected) length, random tokens fixed by the seed."""
    generator = torch.Generator().manual_seed(seed)
    return [make_pair(generator, *pair_lengths) for pair_lengths in lengths]


def padded_logps(model: nn.Module, pairs: list[dict], average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's padded path: chosen then rejected sequences, one per row, in one forward pass."""
    sides = ("chosen", "rejected")
    batch = padded_batch(
        [pair[f"{side}_input_ids"] for side in sides for pair in pairs],
        [pair[f"{side}_labels"] for side in sides for pair in pairs],
        PAD,
    )
    labels = batch.pop("labels")
    return sequence_logps(model(**batch, use_cache=False).logits, labels, average)


def shared_logps(model: nn.Module, pairs: list[dict], row_tokens: int | None = None, **kwargs) -> torch.Tensor:
    """The (2 * n_pairs,) log-probs of the pairs in the shared-prompt layout."""
    return shared_prompt_logps(model, shared_prompt_batch(pairs, PAD, row_tokens), **kwargs)[0]


def parameter_gradients(model: nn.Module, logps: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    """d(logps . upstream) / d parameter, for every parameter."""
    return list(torch.autograd.grad(logps @ upstream, list(model.parameters())))


@pytest.mark.parametrize("chunk_tokens", [None, 5])
@pytest.mark.parametrize("row_tokens", [None, ROW_TOKENS])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["llama", "gpt_neox"])
def test_logps_and_gradients_match_padded_path(architecture, attention, row_tokens, chunk_tokens):
    model = tiny_model(architecture, attention)
    pairs = make_pairs()
    upstream = torch.randn(2 * len(pairs), generator=torch.Generator().manual_seed(1))
    expected, expected_tokens = padded_logps(model, pairs)
    expected_grads = parameter_gradients(model, expected, upstream)

    batch = shared_prompt_batch(pairs, PAD, row_tokens)
    assert batch["input_ids"].shape[0] == (len(pairs) if row_tokens is None else 3)
    logps, n_tokens = shared_prompt_logps(model, batch, chunk_tokens)
    assert logps.dtype == torch.float32
    assert n_tokens.tolist() == expected_tokens.tolist()
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    names = [name for name, _ in model.named_parameters()]
    for name, grad, expected_grad in zip(names, parameter_gradients(model, logps, upstream), expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("chunk_tokens", [None, 3])
def test_averaged_logps_match_padded_path(chunk_tokens):
    model = tiny_model("llama", "sdpa")
    pairs = make_pairs()
    expected, _ = padded_logps(model, pairs, average=True)
    torch.testing.assert_close(
        shared_logps(model, pairs, ROW_TOKENS, chunk_tokens=chunk_tokens, average=True), expected
    )


def test_rejected_first_token_is_predicted_from_the_prompt_end():
    n_prompt, n_chosen = 4, 3
    pair = make_pair(torch.Generator().manual_seed(2), n_prompt, n_chosen, 2)
    batch = shared_prompt_batch([pair], PAD)
    rejected = batch["sequence_index"] == 1
    # the last prompt position (column 3) predicts r0, then r0 (after the prompt and the chosen response) predicts r1
    assert batch["predictor_index"][rejected].tolist() == [n_prompt - 1, n_prompt + n_chosen]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5]

    # a new last chosen token would change r0's log-prob if the last chosen position predicted it
    model = tiny_model("llama", "sdpa")
    changed = dict(pair)
    last = pair["chosen_input_ids"][-1] % (VOCAB - 1) + 1
    changed["chosen_input_ids"] = pair["chosen_input_ids"][:-1] + [last]
    changed["chosen_labels"] = pair["chosen_labels"][:-1] + [last]
    with torch.no_grad():
        before, after = shared_logps(model, [pair]), shared_logps(model, [changed])
    assert (before[0] - after[0]).abs() > 1e-3
    torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=0)


def test_packed_pairs_do_not_see_each_other():
    model = tiny_model("gpt_neox", "sdpa")
    pairs = make_pairs()
    replaced = make_pairs(seed=3)
    mixed = [replaced[1]] + pairs[1:]  # the same pairs but the first
    with torch.no_grad():
        packed = shared_logps(model, pairs, row_tokens=100)
        packed_mixed = shared_logps(model, mixed, row_tokens=100)
        alone = torch.stack([shared_logps(model, [pair]) for pair in pairs], dim=1).flatten()
    assert shared_prompt_batch(pairs, PAD, row_tokens=100)["input_ids"].shape[0] == 1
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    n = len(pairs)
    others = [i for i in range(2 * n) if i % n != 0]
    torch.testing.assert_close(packed_mixed[others], packed[others], atol=1e-5, rtol=1e-5)
    assert (packed_mixed[[0, n]] - packed[[0, n]]).abs().min() > 1e-3


def test_pair_whose_response_does_not_extend_the_prompt_is_named():
    pairs = make_pairs()
    pairs[1]["rejected_input_ids"] = [pairs[1]["prompt_input_ids"][0] % (VOCAB - 1) + 1] + pairs[1][
        "rejected_input_ids"
    ][1:]
    with pytest.raises(ValueError, match="Pair 1: rejected_input_ids does not start with prompt_input_ids"):
        shared_prompt_batch(pairs, PAD)


class MaskIgnoringModel(nn.Module):
    """A causal LM whose forward drops the attention mask, as an attention kernel that cannot take one might."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.model(**kwargs)


@pytest.mark.parametrize("architecture", ["llama", "gpt_neox"])
def test_probe_accepts_sdpa_and_eager_and_rejects_others(architecture):
    for attention in ("sdpa", "eager"):
        model = tiny_model(architecture, attention)
        assert attention_accepts_shared_prompt_mask(model, max_length=16)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer calls it
            assert attention_accepts_shared_prompt_mask(model, max_length=16)
        assert not attention_accepts_shared_prompt_mask(MaskIgnoringModel(model), max_length=16)
    model.config._attn_implementation = "flash_attention_2"
    assert not attention_accepts_shared_prompt_mask(model, max_length=16)


def test_probe_rejects_a_sliding_window_shorter_than_max_length():
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    model = MistralForCausalLM(config)
    assert attention_accepts_shared_prompt_mask(model, max_length=8)
    assert not attention_accepts_shared_prompt_mask(model, max_length=9)


@pytest.fixture
def uncompiled_flex_attention(monkeypatch):
    """transformers' flex_attention and its own block masks without torch.compile: the same semantics, no compiling."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from transformers import masking_utils
    from transformers.integrations import flex_attention as integration

    def plain(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(integration, "compile_friendly_flex_attention", plain)
    monkeypatch.setattr(
        masking_utils, "create_block_mask", lambda *args, _compile=False, **kwargs: create_block_mask(*args, **kwargs)
    )


@pytest.mark.parametrize("row_tokens", [None, ROW_TOKENS])
@pytest.mark.parametrize("architecture", ["llama", "gpt_neox"])
def test_flex_block_mask_gives_the_padded_log_probs(architecture, row_tokens, uncompiled_flex_attention):
    # FlexAttention has no backward on the CPU (torch 2.13): forward only here, gradients on the GPU check
    model = tiny_model(architecture, "flex_attention")
    pairs = make_pairs()
    with torch.no_grad():
        expected, _ = padded_logps(tiny_model(architecture, "sdpa"), pairs)
        batch = shared_prompt_batch(pairs, PAD, row_tokens)
        batch["block_mask"] = flex_block_mask(batch["pair_ids"], batch["parts"])
        logps, _ = shared_prompt_logps(model, batch, chunk_tokens=5)
        torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
        # the rule itself, without the model: the BlockMask's mask agrees with the boolean mask everywhere
        rows, width = batch["pair_ids"].shape
        dense = create_mask(batch["block_mask"].mask_mod, rows, 1, width, width, device="cpu")
        assert torch.equal(dense, batch["attention_mask"])
        assert attention_accepts_shared_prompt_mask(model, max_length=16)
    plan = plan_for(["loss=dpo"], model)  # the trainer builds each batch's BlockMask once (shared_prompt_rows)
    assert (plan.layout, plan.block_masks) == ("packed-shared", True)


class PositionIgnoringModel(MaskIgnoringModel):
    """A causal LM that drops position ids, so that nothing marks where packed sequences start."""

    def forward(self, position_ids: torch.Tensor | None = None, **kwargs):
        return self.model(**kwargs)


@pytest.mark.parametrize("architecture", ["llama", "gpt_neox"])
def test_packing_probe_accepts_position_restarts_and_rejects_a_model_that_ignores_them(architecture):
    for attention in ("sdpa", "eager"):
        model = tiny_model(architecture, attention)
        assert attention_accepts_packed_rows(model)
        assert not attention_accepts_packed_rows(PositionIgnoringModel(model))


def plan_for(overrides: list[str], model: nn.Module):
    config = compose_config(overrides)
    loss = LossSpec.from_config(config.loss)
    return choose_plan(config, loss, model, 1, PAD, contextlib.nullcontext, lambda module: None)


def test_defaults_take_the_fastest_exact_layout_and_an_impossible_true_is_an_error(capsys):
    model = tiny_model("llama", "sdpa")
    for loss, layout in (("dpo", "packed-shared"), ("ipo", "packed-shared"), ("sft", "packed"), ("kto", "packed")):
        plan = plan_for([f"loss={loss}"] + (["pairs_as_unpaired=true"] if loss == "kto" else []), model)
        assert (plan.layout, plan.chunk_tokens) == (layout, 1024), loss
    assert plan_for(["loss=dpo", "packing=false", "share_prompt=false"], model).layout == "padded"

    model.config._attn_implementation = "flash_attention_2"  # takes packed rows, but no prefix-shared mask
    no_forward = ["loss=dpo", "packing=false", "logps_chunk_tokens=null"]  # no flash kernel on the CPU
    assert plan_for(no_forward, model).layout == "padded"
    assert "takes no arbitrary mask; share_prompt=auto runs without it" in capsys.readouterr().out
    with pytest.raises(
        ConfigError, match=r"share_prompt=true, but LlamaForCausalLM \(flash_attention_2 attention\) cannot"
    ):
        plan_for(no_forward + ["share_prompt=true"], model)


def test_flex_attention_on_the_cpu_is_refused_before_loading():
    config = compose_config(["model.attn_implementation=flex_attention", "device=cpu"])
    with pytest.raises(ConfigError, match="FlexAttention has no backward pass on the CPU"):
        validate_config(config, world_size=1)


def test_packed_rows_fill_up_to_the_widest_pair_when_it_is_wider_than_row_tokens():
    # the batch is 10 wide whatever row_tokens says: the 6 and the 4 share a row instead of taking two
    assert _first_fit([10, 3, 4, 6], row_tokens=4) == [[0], [3, 2], [1]]
    assert _first_fit([10, 3, 4, 6], row_tokens=20) == [[0, 3, 2], [1]]

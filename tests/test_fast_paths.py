"""The fast paths of issue 4 compute what the plain path computes.

Packed batches, chunked log-probs, precomputed reference log-probs and compiled blocks are
each checked against the plain padded, full-logits, live-reference run on the same data:
same metrics at every step and the same final weights. Under FSDP and tensor parallel the
fast paths together are checked against the plain one-device run in test_training.py.
"""

import json

import pytest
import torch
from conftest import compose_config, equivalence_overrides, run_in_processes, train_records
from safetensors.torch import load_file

import basic_trainer
from config_checks import validate_config
from errors import ConfigError

PLAIN = ["packing=false", "share_prompt=false", "logps_chunk_tokens=null", "precompute_ref_logps=false"]
FOUR_STEPS = ["n_examples=32"]  # enough for a wrong gradient to show in later steps' metrics
METRIC_PREFIXES = ("loss/", "rewards_", "logps_", "grad_norm")


def run(tmp_path, name: str, overrides: list[str], n_processes: int = 1) -> tuple[list[dict], dict]:
    run_dir = tmp_path / name
    run_in_processes(compose_config(overrides), run_dir, n_processes)
    return train_records(run_dir), load_file(run_dir / "LATEST" / "model.safetensors")


def assert_same_training(expected: tuple[list[dict], dict], actual: tuple[list[dict], dict], label: str) -> None:
    (expected_records, expected_weights), (actual_records, actual_weights) = expected, actual
    assert len(actual_records) == len(expected_records)
    for step, (want, got) in enumerate(zip(expected_records, actual_records)):
        for key in (k for k in want if k.startswith(METRIC_PREFIXES)):
            if step == 0 and key.endswith(("accuracies", "margin_length_correlation", "chosen_below_reference")):
                continue  # policy == reference: rewards are 0 up to rounding, their order (and sign) a coin flip
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), f"{label} step {step} {key}"
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(actual_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{label} {name}")


@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_packed_and_chunked_match_padded_full_logits(loss, tmp_path, monkeypatch):
    # count which batch layout and which log-prob path the trainer really takes
    calls = {"packed_batch": 0, "sequence_logps_from_hidden": 0}
    for name in calls:
        original = getattr(basic_trainer, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(basic_trainer, name, counting)
    base = equivalence_overrides(loss) + FOUR_STEPS
    plain = run(tmp_path, "plain", base + PLAIN)
    assert calls == {"packed_batch": 0, "sequence_logps_from_hidden": 0}
    for variant, packs, chunks in (
        (["logps_chunk_tokens=7"], False, True),
        (["packing=true", "logps_chunk_tokens=null"], True, False),
        (["packing=true", "logps_chunk_tokens=64"], True, True),
    ):
        calls.update(packed_batch=0, sequence_logps_from_hidden=0)
        name = "_".join(v.replace("=", "-") for v in variant)
        assert_same_training(plain, run(tmp_path, name, base + PLAIN + variant), name)
        assert (calls["packed_batch"] > 0, calls["sequence_logps_from_hidden"] > 0) == (packs, chunks), name


def test_precomputed_reference_matches_live_and_is_reused(tmp_path, capsys):
    base = equivalence_overrides("dpo") + FOUR_STEPS + ["do_first_eval=true"]
    live = run(tmp_path, "live", base + PLAIN)
    capsys.readouterr()
    precomputed = run(tmp_path, "precomputed", base + PLAIN + ["precompute_ref_logps=true"])
    assert_same_training(live, precomputed, "precomputed")
    first_output = capsys.readouterr().out
    assert "reference log-probs (train): cached in" in first_output
    assert "reference model: True" in first_output

    again = run(tmp_path, "again", base + PLAIN + ["precompute_ref_logps=true"])
    second_output = capsys.readouterr().out
    assert "reference log-probs (train): loaded from" in second_output
    assert "reference model: False" in second_output, "a cache hit must not load the reference model"
    assert_same_training(live, again, "from cache")
    # eval metrics (the first eval is before any step: rewards exactly 0) match too
    lines = (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if "loss/eval" in line]
    assert evals[0]["rewards_eval/margins"] == 0.0


def test_compiled_blocks_match_eager(tmp_path, monkeypatch):
    # the eager backend traces each block with dynamo like inductor does, but compiles in seconds
    base = equivalence_overrides("sft") + FOUR_STEPS
    eager = run(tmp_path, "eager", base)
    compiled_blocks = []
    original_compile = torch.nn.Module.compile

    def recording_compile(module, *args, **kwargs):
        compiled_blocks.append((type(module).__name__, kwargs["backend"]))
        return original_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", recording_compile)
    compiled = run(tmp_path, "compiled", base + ["compile_backend=eager"])
    assert compiled_blocks == [("LlamaDecoderLayer", "eager")] * 2, "every block of the 2-layer policy is compiled"
    assert_same_training(eager, compiled, "compiled")


def test_bfloat16_autocast_trains_close_to_float32(tmp_path):
    base = equivalence_overrides("sft") + FOUR_STEPS
    records_fp32, _ = run(tmp_path, "fp32", base)
    records_bf16, _ = run(tmp_path, "bf16", base + ["autocast_dtype=bfloat16"])
    for want, got in zip(records_fp32, records_bf16):
        assert got["loss/train"] == pytest.approx(want["loss/train"], abs=0.05)
        assert got["loss/train"] != want["loss/train"], "autocast changed nothing: it is not applied"


@pytest.mark.parametrize(
    "variant",
    [
        ["logps_chunk_tokens=null"],
        ["logps_chunk_tokens=7"],
        ["packing=true", "logps_chunk_tokens=64"],
        ["precompute_ref_logps=true"],
    ],
    ids=["full-logits", "chunked", "packed-chunked", "precomputed"],
)
def test_shared_prompt_matches_padded_pairs(variant, tmp_path, monkeypatch):
    calls = {"shared_prompt_batch": 0}
    original = basic_trainer.shared_prompt_batch

    def counting(*args, **kwargs):
        calls["shared_prompt_batch"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(basic_trainer, "shared_prompt_batch", counting)
    base = equivalence_overrides("dpo") + FOUR_STEPS
    plain = run(tmp_path, "plain", base + PLAIN)
    assert calls["shared_prompt_batch"] == 0
    shared = run(tmp_path, "shared", base + PLAIN + ["share_prompt=true"] + variant)
    assert calls["shared_prompt_batch"] > 0, "the shared-prompt layout was not used"
    assert_same_training(plain, shared, "shared " + " ".join(variant))


def test_shared_prompt_with_sft_is_refused():
    with pytest.raises(ConfigError, match="share_prompt=true .* loss=sft has no pairs"):
        validate_config(compose_config(["loss=sft", "share_prompt=true"]), world_size=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward pass on the CPU")
@pytest.mark.parametrize("packing", ["packing=false", "packing=true"])
def test_flex_attention_block_masks_train_like_the_padded_path(packing, tmp_path):
    # on the GPU check (benchmarks/gpu_check.sh): the BlockMask path's gradients, whole runs long
    base = equivalence_overrides("dpo") + FOUR_STEPS
    plain = run(tmp_path, "plain", base + PLAIN)
    flex = ["model.attn_implementation=flex_attention", "share_prompt=true", packing, "logps_chunk_tokens=64"]
    assert_same_training(plain, run(tmp_path, "flex", base + PLAIN + flex), "flex " + packing)

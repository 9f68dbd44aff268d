"""LoRA DPO: the reference is the adapter switched off, checkpoints load with peft and plain transformers.

One short LoRA DPO run (module fixture) is checked for ln 2 at step 0, its checkpoints, exact
resume and FSDP equivalence; the rest are unit checks and one command-line SFT -> DPO run.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SMALL_MODEL, compose_config, equivalence_overrides, run_in_processes, train_records
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file
from test_training import run_cli, run_folder
from transformers import AutoModelForCausalLM

import checkpoints
import lora
import train
from config_checks import validate_config
from errors import ConfigError, ModelLoadError
from models import load_model, load_tokenizer
from reference import AdapterOff

LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8"]


def lora_dpo_overrides() -> list[str]:
    """8 optimizer steps of LoRA DPO with a checkpoint after 4 (step-32), on the plain forward path."""
    return equivalence_overrides("dpo") + LORA + ["n_examples=64", "eval_every=32", "logps_chunk_tokens=null"]


def tiny_base(config):
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, "float32", tokenizer, config.max_length, config.seed)
    return model, tokenizer


def log_probs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq_len, vocab) next-token log-probs."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1)


INPUT_IDS = torch.arange(3, 35).reshape(2, 16)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished LoRA DPO run on one device: (its trainer, its run folder)."""
    run_dir = tmp_path_factory.mktemp("lora") / "straight"
    run_dir.mkdir()
    config = compose_config(lora_dpo_overrides())
    config.cache_dir = str(run_dir.parent / "cache")
    torch.manual_seed(config.seed)
    trainer = train.build_trainer(config, run_dir, torch.device("cpu"), rank=0, world_size=1)
    trainer.train()
    return trainer, run_dir


def test_adapter_off_gives_the_base_model_exactly():
    config = compose_config(SMALL_MODEL + LORA)
    base, _ = tiny_base(config)
    policy = lora.add_adapter(tiny_base(config)[0], config, "LlamaDecoderLayer", resume_dir=None)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)  # as after training: B is no longer 0
    with lora.adapter_disabled(policy):
        assert torch.equal(log_probs(policy, INPUT_IDS), log_probs(base, INPUT_IDS))
    assert not torch.allclose(log_probs(policy, INPUT_IDS), log_probs(base, INPUT_IDS))
    # every linear layer of the blocks is adapted by default, and only the adapters train
    assert lora.block_linear_names(base, "LlamaDecoderLayer") == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj",
    ]  # fmt: skip
    trained = {name.split(".")[-2] for name, p in policy.named_parameters() if p.requires_grad}
    assert trained == {"default"} and all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)


def test_unknown_target_module_names_the_modules_the_model_has():
    config = compose_config(SMALL_MODEL + LORA + ["lora.target_modules=[q_proj,c_attn]"])
    with pytest.raises(ModelLoadError, match=r"no module named c_attn\..*q_proj, up_proj, v_proj.*lm_head"):
        lora.add_adapter(tiny_base(config)[0], config, "LlamaDecoderLayer", resume_dir=None)
    config = compose_config(SMALL_MODEL + LORA + ["lora.modules_to_save=[lm_head]"])  # tiny ties its embeddings
    with pytest.raises(ModelLoadError, match=r"lm_head is one of the model's tied input and output embeddings"):
        lora.add_adapter(tiny_base(config)[0], config, "LlamaDecoderLayer", resume_dir=None)


def test_bad_lora_settings_are_all_reported_before_loading():
    bad = LORA + ["lora.r=0", "lora.dropout=1.5", "lora.target_modules=[]", "trainer=TensorParallelTrainer"]
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(SMALL_MODEL + bad + ["lora.load_in_4bit=true"]), world_size=2)
    message = str(error.value)
    for expected in ("lora.r=0", "lora.dropout=1.5", "lora.target_modules=[]", "trainer=TensorParallelTrainer"):
        assert expected in message
    if not torch.cuda.is_available():
        assert "lora.load_in_4bit=true: 4-bit (NF4) weights need a CUDA GPU" in message
    assert "model.from_scratch" in message  # 4-bit quantizes pretrained weights only
    validate_config(compose_config(SMALL_MODEL + LORA + ["loss=dpo"]), world_size=1)


def test_step_zero_loss_is_ln2_with_no_reference_model(lora_run):
    trainer, run_dir = lora_run
    assert isinstance(trainer.reference, AdapterOff)  # no reference model: the policy with its adapter off
    first = train_records(run_dir)[0]
    # adapters' B starts at 0: the policy IS the base (its reference) before the first update
    assert first["rewards_train/margins"] == 0.0
    assert first["loss/train"] == pytest.approx(math.log(2), abs=1e-7)
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss/eval" in r]
    assert evals[-1]["rewards_eval/margins"] > 0.005, "the adapters learned"


def test_checkpoints_load_with_peft_and_plain_transformers(lora_run):
    trainer, run_dir = lora_run
    step, latest = run_dir / "step-32", run_dir / checkpoints.FINAL
    for checkpoint in (step, latest):
        for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "trainer_state.pt"):
            assert (checkpoint / name).is_file(), f"{checkpoint.name}/{name}"
    assert not (step / "model.safetensors").exists(), "step-N holds the adapter only"
    trained = log_probs(trainer.policy, INPUT_IDS)
    base, _ = tiny_base(trainer.config)
    base_logps = log_probs(base, INPUT_IDS)
    assert (trained - base_logps).abs().max() > 1e-3, "training moved the adapters"

    with_adapter = PeftModel.from_pretrained(base, latest / checkpoints.ADAPTER_DIR)
    torch.testing.assert_close(log_probs(with_adapter, INPUT_IDS), trained, rtol=0, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(latest)
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(log_probs(merged, INPUT_IDS), trained, rtol=1e-5, atol=1e-5)


def test_resumed_lora_run_continues_exactly(lora_run, tmp_path):
    """The second half resumed from step-32 == the straight run's, with reference log-probs precomputed
    at the resume (after training moved the adapters: they must be off) against the straight run's live ones."""
    _, straight_dir = lora_run
    resumed = [f"resume_from={straight_dir / 'step-32'}", "precompute_ref_logps=true"]
    resumed_config = compose_config(lora_dpo_overrides() + resumed)
    run_in_processes(resumed_config, tmp_path / "resumed", 1)
    straight, resumed = train_records(straight_dir), train_records(tmp_path / "resumed")
    assert [r["counters/examples"] for r in resumed] == [40, 48, 56, 64]
    for expected, actual in zip(straight[4:], resumed):
        for key in ("loss/train", "rewards_train/margins", "grad_norm"):
            assert actual[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    adapter_file = f"{checkpoints.ADAPTER_DIR}/adapter_model.safetensors"
    expected_adapter = load_file(straight_dir / "LATEST" / adapter_file)
    resumed_adapter = load_file(tmp_path / "resumed" / "LATEST" / adapter_file)
    for name, tensor in expected_adapter.items():
        torch.testing.assert_close(resumed_adapter[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


def test_fsdp_lora_matches_one_device(lora_run):
    """2 FSDP ranks (frozen base sharded) with every fast path == the plain one-device LoRA run."""
    _, straight_dir = lora_run
    fast_paths = ["packing=true", "logps_chunk_tokens=32", "precompute_ref_logps=true", "activation_checkpointing=true"]
    config = compose_config(lora_dpo_overrides() + ["trainer=FSDPTrainer"] + fast_paths)
    fsdp_dir = straight_dir.parent / "fsdp"  # beside the straight run: its tokenized data is cached there
    run_in_processes(config, fsdp_dir, 2)
    expected, actual = train_records(straight_dir), train_records(fsdp_dir)
    assert len(actual) == len(expected) == 8
    for step, (one, two) in enumerate(zip(expected, actual)):
        for key in ("loss/train", "rewards_train/margins", "logps_train/chosen", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), f"step {step} {key}"
    for name in ("step-32", "LATEST"):
        adapter_file = straight_dir / name / checkpoints.ADAPTER_DIR / "adapter_model.safetensors"
        fsdp_adapter = load_file(fsdp_dir / name / checkpoints.ADAPTER_DIR / "adapter_model.safetensors")
        for key, tensor in load_file(adapter_file).items():
            torch.testing.assert_close(fsdp_adapter[key], tensor, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    merged, fsdp_merged = (load_file(d / "LATEST" / "model.safetensors") for d in (straight_dir, fsdp_dir))
    assert merged.keys() == fsdp_merged.keys()
    for key, tensor in merged.items():
        torch.testing.assert_close(fsdp_merged[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


def test_sft_lora_then_dpo_lora_from_the_command_line(tmp_path):
    """LoRA SFT (in this process, to save a start-up), then LoRA DPO from it as a user runs it."""
    args = SMALL_MODEL + LORA + ["n_examples=64", "eval_every=32", "n_eval_examples=32", "plots.enabled=false"]
    sft_dir = tmp_path / "sft"
    run_in_processes(compose_config(args + ["loss=sft", "sample_during_eval=false"]), sft_dir, 1)
    # the SFT model as DPO starts from it: LATEST's merged weights, or step-64's adapter merged into the base
    config = OmegaConf.merge(compose_config(SMALL_MODEL), {"model": {"archive": str(sft_dir / "step-64")}})
    from_adapter, _ = tiny_base(config)
    merged = AutoModelForCausalLM.from_pretrained(sft_dir / checkpoints.FINAL)
    base, _ = tiny_base(compose_config(SMALL_MODEL))
    torch.testing.assert_close(log_probs(from_adapter, INPUT_IDS), log_probs(merged, INPUT_IDS), rtol=0, atol=1e-6)
    assert (log_probs(merged, INPUT_IDS) - log_probs(base, INPUT_IDS)).abs().max() > 1e-3

    dpo_args = ["loss=dpo", f"model.archive={sft_dir / checkpoints.FINAL}", "n_eval_model_samples=2"]
    output = run_cli(args + dpo_args + [f"local_dirs=[{tmp_path}]", f"cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert "reference model: the policy with its LoRA adapter off" in output
    dpo_dir = run_folder(output)
    evals = [json.loads(line) for line in (dpo_dir / "metrics.jsonl").read_text().splitlines() if "loss/eval" in line]
    # before the first DPO step the policy is the SFT model plus zero adapters: rewards exactly 0
    assert evals[0]["counters/examples"] == 0 and evals[0]["rewards_eval/margins"] == 0.0
    assert evals[0]["loss/eval"] == pytest.approx(math.log(2), abs=1e-7)
    samples = [json.loads(line) for line in (dpo_dir / "samples" / "examples-64.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "policy", "reference"} <= set(samples[0])
    AutoModelForCausalLM.from_pretrained(dpo_dir / checkpoints.FINAL)
    assert PeftModel.from_pretrained(merged, Path(dpo_dir / checkpoints.FINAL / checkpoints.ADAPTER_DIR))


def test_the_llama_lora_recipe_composes_and_validates():
    config = compose_config(["model=llama3.1-8b-instruct", "recipe=llama3.1-8b-instruct-lora"])
    assert config.lora.enabled and config.loss.name == "dpo" and list(config.datasets) == ["ultrafeedback"]
    assert validate_config(config, world_size=1) == []

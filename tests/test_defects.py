"""Regression tests of the defects found by trying the toolkit as a new user would (issue 8, part 1).

Each test fails on the code before its fix: checkpointing inactive until the first eval,
reference-scripts archives with old buffers, float16 without loss scaling, n_epochs=null,
n_examples below batch_size, and a reference cache key blind to config.json. The eval set
trimmed after the cache was planned (defect 3) is tested in test_crash_safety.py, where its
two-rank run is also the two-rank preemption test (one spawn of two processes, not two).
"""

import json
import os

import pytest
import torch
from conftest import compose_config, equivalence_overrides
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

import train
from config_checks import validate_config
from errors import ConfigError, ModelLoadError
from models import load_model, load_tokenizer, weights_fingerprint

ONE_STEP = equivalence_overrides("sft") + ["n_examples=8", "n_eval_examples=16"]


def save_start_model(config, folder) -> None:
    """A tiny model saved as a folder, so that loading it goes through from_pretrained (eval mode)."""
    tokenizer = load_tokenizer(config.model)
    load_model(config.model, "float32", tokenizer, config.max_length, config.seed).save_pretrained(folder)


def test_activation_checkpointing_recomputes_from_the_first_step(tmp_path):
    """With do_first_eval=false nothing else puts the policy in training mode before step 1."""
    save_start_model(compose_config(ONE_STEP), tmp_path / "start")
    config = compose_config(
        ONE_STEP
        + ["gradient_accumulation_steps=1", "activation_checkpointing=true", f"model.archive={tmp_path / 'start'}"]
        + ["debug=true", f"cache_dir={tmp_path / 'cache'}"]
    )
    (tmp_path / "run").mkdir()
    trainer = train.build_trainer(config, tmp_path / "run", torch.device("cpu"), 0, 1)
    blocks = trainer.transformer_blocks(trainer.policy)
    # activation-function calls that build a graph: the forward, then its recompute in backward
    # (transformers checkpoints a block's forward, not its __call__, so the block's and its MLP's
    # own hooks fire once either way)
    grad_forwards = []
    for activation in {block.mlp.act_fn for block in blocks}:
        activation.register_forward_hook(lambda *_: grad_forwards.append(1) if torch.is_grad_enabled() else None)
    trainer.train()
    assert trainer.optimizer_steps == 1
    assert len(grad_forwards) == 2 * len(blocks), "each block runs twice in a checkpointed step (one micro-batch)"


OLD_BUFFERS = {
    # architecture: (config, the transformers-4.29 buffers of layer 0 and their shapes)
    "gpt2": (
        GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=64),
        {"transformer.h.{i}.attn.bias": (1, 1, 16, 16), "transformer.h.{i}.attn.masked_bias": ()},
    ),
    "gpt_neox": (
        GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64),
        {
            "gpt_neox.layers.{i}.attention.bias": (1, 1, 16, 16),
            "gpt_neox.layers.{i}.attention.masked_bias": (),
            "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq": (4,),
        },
    ),
    "llama": (
        LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64),
        {"model.layers.{i}.self_attn.rotary_emb.inv_freq": (8,)},
    ),
}


def reference_scripts_archive(architecture: str, tmp_path):
    """A model folder, and a policy.pt of trained weights in the reference scripts' (transformers 4.29) layout."""
    model_config, buffers = OLD_BUFFERS[architecture]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config).save_pretrained(tmp_path / "model")
    trained = AutoModelForCausalLM.from_config(model_config)  # other weights: those the archive must give
    state = dict(trained.state_dict())
    for i in range(model_config.num_hidden_layers):
        for key, shape in buffers.items():
            state[key.format(i=i)] = torch.ones(shape)
    return trained.state_dict(), state


class _Tokenizer:
    pad_token_id = 0


def load_with_archive(tmp_path, state: dict):
    torch.save({"state": state, "step_idx": 1}, tmp_path / "policy.pt")
    config = compose_config(
        ["model=blank_model", f"model.name_or_path={tmp_path / 'model'}", f"model.archive={tmp_path / 'policy.pt'}"]
    )
    return load_model(config.model, "float32", _Tokenizer(), 16, 0)


@pytest.mark.parametrize("architecture", sorted(OLD_BUFFERS))
def test_reference_scripts_archive_with_old_buffers_loads(architecture, tmp_path, capsys):
    trained, state = reference_scripts_archive(architecture, tmp_path)
    model = load_with_archive(tmp_path, state)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], msg=name)
    assert "ignored" in capsys.readouterr().out  # said so in the log

    # a real mismatch still fails: an unknown parameter, or a missing one
    first_parameter = next(iter(trained))
    with pytest.raises(ModelLoadError, match="unexpected"):
        load_with_archive(tmp_path, {**state, "extra.weight": torch.ones(2)})
    with pytest.raises(ModelLoadError, match=first_parameter.replace(".", r"\.")):
        load_with_archive(tmp_path, {k: v for k, v in state.items() if k != first_parameter})


@pytest.mark.parametrize(
    "override",
    ["autocast_dtype=float16", "model.fsdp_policy_mp=float16", "model.policy_dtype=float16"],
)
def test_float16_training_is_refused_with_bfloat16_recommended(override):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config([override, "trainer=FSDPTrainer"]), 1)
    key = override.split("=")[0]
    assert f"{key}=float16" in str(error.value) and f"{key}=bfloat16" in str(error.value)
    validate_config(compose_config(["model.reference_dtype=float16"]), 1)  # a frozen reference may be float16


def test_n_epochs_null_trains_n_examples(tmp_path):
    """n_epochs=null means: as many passes as n_examples needs (here 3 passes over 32 examples)."""
    config = compose_config(
        ONE_STEP + ["n_epochs=null", "n_examples=96", "batch_size=32", "debug=true", f"cache_dir={tmp_path / 'cache'}"]
    )
    validate_config(config, 1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = train.build_trainer(config, run_dir, torch.device("cpu"), 0, 1)
    trainer.train_examples = trainer.train_examples.select(range(32))
    assert trainer.total_steps() == 3
    trainer.train()
    assert trainer.examples_seen == 96
    with pytest.raises(ConfigError, match="n_epochs=null and n_examples=null"):
        validate_config(compose_config(["n_epochs=null", "n_examples=null"]), 1)


def test_n_examples_below_batch_size_is_refused():
    with pytest.raises(ConfigError, match="n_examples=4 is smaller than batch_size=8"):
        validate_config(compose_config(["n_examples=4", "batch_size=8"]), 1)


def test_reference_cache_key_covers_the_model_config(tmp_path):
    """A same-length edit of config.json, modification time kept, still changes the key."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    config_file = folder / "config.json"
    config_file.write_text(json.dumps({"hidden_act": "silu"}))
    model_config = OmegaConf.create({"name_or_path": str(folder), "from_scratch": None, "archive": None})
    before = weights_fingerprint(model_config, 0)
    stat = config_file.stat()
    config_file.write_text(json.dumps({"hidden_act": "gelu"}))
    os.utime(config_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_fingerprint(model_config, 0) != before
    archive_config = OmegaConf.merge(model_config, {"archive": str(folder)})
    fingerprint = weights_fingerprint(archive_config, 0)
    config_file.write_text(json.dumps({"hidden_act": "relu"}))
    os.utime(config_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_fingerprint(archive_config, 0)["archive"] != fingerprint["archive"]

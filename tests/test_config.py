"""Every config file composes, the seed's commands compose, and bad configs fail early and clearly."""

import pytest
import torch
from conftest import compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from config_checks import validate_config
from errors import ConfigError
from train import CONFIG_DIR

MODEL_FILES = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
LOSS_FILES = sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml"))

SEED_COMMANDS = [
    "model=pythia28 datasets=[hh] loss=sft exp_name=my_experiment gradient_accumulation_steps=2 batch_size=64 "
    "eval_batch_size=32 trainer=FSDPTrainer sample_during_eval=false",
    "model=pythia28 datasets=[hh] loss=dpo loss.beta=0.1 exp_name=my_experiment gradient_accumulation_steps=2 "
    "batch_size=64 eval_batch_size=32 trainer=FSDPTrainer sample_during_eval=false "
    "model.archive=/path/to/sft/checkpoint",
    "model=pythia28 model.fsdp_policy_mp=bfloat16 activation_checkpointing=true trainer=FSDPTrainer",
    "loss=ipo loss.beta=0.5",
    "loss=dpo loss.label_smoothing=0.2",
    "loss=dpo loss.reference_free=true",
    "trainer=TensorParallelTrainer datasets=[hh,shp,se] n_epochs=2 n_examples=1000 eval_every=500 "
    "n_eval_examples=64 n_eval_model_samples=4 do_first_eval=false lr=1e-6 warmup_steps=10 optimizer=AdamW "
    "max_grad_norm=1.0 max_length=256 max_prompt_length=128 seed=1 wandb.enabled=true wandb.mode=offline "
    "local_dirs=[/tmp/runs] debug=true",
]


@pytest.mark.parametrize("model", MODEL_FILES)
def test_every_model_file_composes(model):
    config = compose_config([f"model={model}"] + (["model.name_or_path=/some/model"] if model == "blank_model" else []))
    OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    assert set(config.model) == set(compose_config([]).model), "every model file declares the same keys"


@pytest.mark.parametrize("loss", LOSS_FILES)
def test_every_loss_file_composes_and_validates(loss):
    config = compose_config([f"loss={loss}"])
    assert config.loss.name == loss
    validate_config(config, world_size=1)


@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_documented_commands_compose(command):
    config = compose_config(command.split())
    OmegaConf.to_container(config, resolve=True)


def test_default_config_validates():
    validate_config(compose_config([]), world_size=1)


def test_misspelt_override_is_rejected():
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_config(["lrr=1e-6"])
    with pytest.raises(ConfigCompositionException, match="loss.beta"):
        compose_config(["loss=sft", "loss.beta=0.1"])  # SFT has no beta


def test_all_problems_reported_at_once(tmp_path):
    config = compose_config(
        [
            "loss=dpo",
            "loss.beta=0",
            "loss.label_smoothing=0.5",
            "max_prompt_length=600",
            "max_length=512",
            "batch_size=10",
            "gradient_accumulation_steps=4",
            "optimizer=Adagrad",
            f"model.archive={tmp_path / 'missing'}",
            "datasets=[nonesuch]",
        ]
    )
    with pytest.raises(ConfigError) as error:
        validate_config(config, world_size=1)
    message = str(error.value)
    for expected in [
        "loss.beta=0",
        "loss.label_smoothing=0.5",
        "max_prompt_length=600",
        "batch_size=10",
        "optimizer=Adagrad",
        "model.archive=",
        "nonesuch",
    ]:
        assert expected in message
    assert len(error.value.problems) == 7


def test_batch_must_split_over_ranks_and_accumulation():
    config = compose_config(
        ["trainer=FSDPTrainer", "batch_size=32", "gradient_accumulation_steps=4", "eval_batch_size=64"]
    )
    validate_config(config, world_size=2)
    with pytest.raises(ConfigError, match="batch_size=32"):
        validate_config(config, world_size=3)


def test_blank_model_needs_a_name():
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        validate_config(compose_config(["model=blank_model", "datasets=[hh]"]), world_size=1)


def test_archive_folder_must_be_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        validate_config(compose_config([f"model.archive={tmp_path}"]), world_size=1)


def test_resume_needs_a_checkpoint_of_the_same_kind_of_trainer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    # the trainer state a resume compares its settings with (checkpoints.resume_config_problems)
    saved_config = OmegaConf.to_container(compose_config([]), resolve=True)
    torch.save({"examples_seen": 0, "config": saved_config}, tmp_path / "trainer_state.pt")
    torch.save({}, tmp_path / "optimizer.pt")  # what a BasicTrainer run saves
    validate_config(compose_config([f"resume_from={tmp_path}"]), world_size=1)
    with pytest.raises(ConfigError, match="resume_from=.*missing optimizer"):
        validate_config(compose_config([f"resume_from={tmp_path}", "trainer=FSDPTrainer"]), world_size=1)
    with pytest.raises(ConfigError, match="missing config.json, trainer_state.pt, optimizer.pt"):
        validate_config(compose_config([f"resume_from={tmp_path / 'nothing'}"]), world_size=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=dpo", "sft_every_assistant_turn=true"], "sft_every_assistant_turn=true applies to loss=sft"),
        (["datasets=[numbers]", "dataset_options.hh.as_messages=true"], "dataset_options.hh is set, but hh is not"),
    ],
)
def test_settings_the_run_would_ignore_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(overrides), world_size=1)
    validate_config(compose_config([o for o in overrides if "=true" not in o]), world_size=1)

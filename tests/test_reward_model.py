"""Reward models (loss=reward): the Bradley-Terry loss, scores read at the last token in every layout, checkpoints."""

import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, equivalence_overrides, run_in_processes, train_records
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification

import train
from batching import score_offset
from config_checks import validate_config
from evaluation.comparisons import Comparison
from evaluation.judges import RewardModelJudge
from evaluation.loading import EvalPrompt
from loss_registry import LossSpec
from losses import reward_model_loss
from reference import NoReference

CPU = torch.device("cpu")
FOUR_STEPS = equivalence_overrides("reward") + ["n_examples=32", "n_eval_examples=16"]


def test_reward_model_loss_in_closed_form():
    equal = torch.tensor([0.0, 1.5, -2.0])
    losses, chosen, rejected = reward_model_loss(equal, equal, margin=0.0, center_weight=0.0)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))  # no preference yet: ln 2 each
    chosen_scores, rejected_scores = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    losses, _, _ = reward_model_loss(chosen_scores, rejected_scores, margin=0.5, center_weight=0.0)
    expected = [math.log1p(math.exp(-(1.0 - 0.5))), math.log1p(math.exp(-(2.0 - 0.5)))]  # -log sigma(r_w - r_l - m)
    assert losses.tolist() == pytest.approx(expected)
    centred, _, _ = reward_model_loss(chosen_scores, rejected_scores, margin=0.5, center_weight=0.01)
    assert (centred - losses).tolist() == pytest.approx([0.01 * 1.0**2, 0.01 * 4.0**2])
    scores = torch.tensor([2.0], requires_grad=True)
    loss, reward, _ = reward_model_loss(scores, torch.zeros(1), 0.0, 0.0)
    assert not reward.requires_grad and loss.requires_grad


def test_the_loss_file_and_what_the_run_loads():
    config = compose_config(FOUR_STEPS)
    assert validate_config(config, 1) == []
    spec = LossSpec.from_config(config.loss)
    assert spec.is_reward_model and spec.is_preference and not spec.uses_reference
    assert (spec.margin, spec.center_weight) == (0.0, 0.0)


def test_score_is_read_at_the_last_token_that_is_not_padding():
    assert score_offset([5, 6, 7, 2], pad_token_id=0) == 3
    assert score_offset([5, 6, 2, 2], pad_token_id=2) == 1  # pad == EOS: before the trailing EOS, as transformers
    assert score_offset([2, 2], pad_token_id=2) == 1


@pytest.fixture(scope="module")
def reward_runs(tmp_path_factory) -> dict[str, Path]:
    """Four steps of the same reward model in each layout, sharing one tokenize cache."""
    root = tmp_path_factory.mktemp("reward")
    layouts = {
        "padded": ["packing=false", "share_prompt=false"],
        "packed": ["packing=true", "share_prompt=false"],
        "shared": ["share_prompt=true", "packing=false"],
        "shared-packed": ["share_prompt=true", "packing=true"],
    }
    runs = {}
    for name, overrides in layouts.items():
        run_dir = root / name
        run_dir.mkdir()
        config = compose_config(FOUR_STEPS + overrides + [f"cache_dir={root / 'cache'}"])
        trainer = train.build_trainer(config, run_dir, CPU, 0, 1)
        trainer.train()
        assert isinstance(trainer.reference, NoReference) and trainer.plan.share_prompt == name.startswith("shared")
        runs[name] = run_dir
    return runs


def test_every_layout_trains_the_same_reward_model(reward_runs):
    padded = train_records(reward_runs["padded"])
    assert len(padded) == 4
    for name in ("packed", "shared", "shared-packed"):
        for expected, actual in zip(padded, train_records(reward_runs[name])):
            for key in ("loss/train", "rewards_train/chosen", "rewards_train/margins", "grad_norm"):
                assert actual[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), f"{name} {key}"
    assert not any(key.startswith("logps_") for key in padded[0]), "a reward model logs no log-probs"


def training_scores(reward_runs: dict[str, Path], checkpoint: Path, name: str):
    """(tokenizer, 4 eval examples, their chosen and rejected scores) as the trainer computes them from `checkpoint`."""
    config = compose_config(FOUR_STEPS + [f"cache_dir={reward_runs['padded'].parent / 'cache'}", "debug=true"])
    config.model.archive = str(checkpoint)
    (reward_runs["padded"].parent / name).mkdir()
    trainer = train.build_trainer(config, reward_runs["padded"].parent / name, CPU, 0, 1)
    trainer.prepare()
    examples = list(trainer.eval_examples)[:4]
    with torch.no_grad():
        chosen, rejected, _, _ = trainer.pair_scores(trainer.policy, examples)
    return trainer.tokenizer, examples, chosen, rejected


def test_a_trained_reward_model_scores_the_same_with_plain_transformers(reward_runs):
    checkpoint = reward_runs["shared-packed"] / "LATEST"
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    assert model.config.num_labels == 1
    _, examples, chosen, rejected = training_scores(reward_runs, checkpoint, "rescored")
    with torch.no_grad():
        for example, trained_chosen, trained_rejected in zip(examples, chosen, rejected):
            for side, expected in (("chosen", trained_chosen), ("rejected", trained_rejected)):
                alone = model(input_ids=torch.tensor([example[f"{side}_input_ids"]])).logits[0, 0]
                assert alone.item() == pytest.approx(expected.item(), abs=1e-5)
    assert (chosen - rejected).abs().max() > 1e-3, "the scores tell the responses apart"


def test_a_lora_reward_model_from_an_sft_checkpoint(tmp_path):
    run_in_processes(compose_config(equivalence_overrides("sft") + ["n_examples=16"]), tmp_path / "sft", 1)
    overrides = FOUR_STEPS + ["lora.enabled=true", "lora.r=4", f"model.archive={tmp_path / 'sft' / 'LATEST'}"]
    run_in_processes(compose_config(overrides), tmp_path / "reward", 1)
    records = train_records(tmp_path / "reward")
    assert len(records) == 4 and all(math.isfinite(r["loss/train"]) for r in records)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward" / "LATEST")
    assert merged.score.weight.abs().sum() > 0  # the head trained in full beside the adapters, and was saved


def test_a_trained_reward_model_judges_evaluations_with_its_training_scores(reward_runs):
    """evaluate.py's reward_model judge reads a trained reward model's score where training read it."""
    checkpoint = reward_runs["packed"] / "LATEST"
    tokenizer, examples, chosen, _ = training_scores(reward_runs, checkpoint, "judged")
    judge = RewardModelJudge(OmegaConf.create({"path": str(checkpoint), "chat_template": "auto", "batch_size": 2,
                                              "max_length": 64, "dtype": "float32"}), CPU)  # fmt: skip
    items = []
    for example in examples:
        prompt = EvalPrompt("id", example["prompt"], None, "")
        response_ids = example["chosen_input_ids"][len(example["prompt_input_ids"]) : -1]  # the text, not its EOS
        items.append((Comparison(prompt, 0.0, "", None, 0, None), tokenizer.decode(response_ids)))
    assert judge.score(items) == pytest.approx(chosen.tolist(), abs=1e-5)

"""KTO on unpaired feedback: the loss, z0, the data (files, converted pairs, mismatched completions), the paths.

The multi-process equivalence (FSDP and tensor parallel, with packing, chunked log-probs and
precomputed reference log-probs, against the plain padded, full-logits, live-reference run on one
device) is test_training.py's parametrized test with loss=kto.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SMALL_MODEL, compose_config, equivalence_overrides, run_in_processes, train_records
from dataset_fixtures import byte_tokenizer, write_preference_file
from safetensors.torch import load_file
from test_chat_templates import chat_tokenizer

import plots
import train
from config_checks import validate_config
from dataset_files import load_preference_file
from errors import ConfigError, DatasetError
from loss_registry import LossSpec
from losses import kto_kl_estimate, kto_loss
from preference_entry import PreferenceEntry, pairs_as_feedback, with_mismatched_completions
from reference import CachedReference
from run_log import MetricSums
from tokenization import TokenizeSettings, tokenize_datasets

CPU = torch.device("cpu")
KTO = equivalence_overrides("kto")
FOUR_STEPS = ["n_examples=32"]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ----- the loss --------------------------------------------------------------------------------------


def test_at_step_zero_each_example_costs_half_its_weight():
    zeros = torch.zeros(4)
    desirable = torch.tensor([True, True, False, False])
    losses, rewards = kto_loss(zeros, zeros, torch.tensor(0.0), desirable, 0.1, 1.5, 0.5)
    assert losses.tolist() == [0.75, 0.75, 0.25, 0.25]
    assert rewards.tolist() == [0.0] * 4


def test_hand_computed_values_and_gradient_directions():
    policy = torch.tensor([-1.0, -3.0], requires_grad=True)
    reference = torch.tensor([-2.0, -2.0])  # r = [1, -1]
    desirable = torch.tensor([True, False])
    losses, rewards = kto_loss(policy, reference, torch.tensor(0.5), desirable, 0.1, 1.0, 2.0)
    # desirable: 1 - sigma(0.1 * (1 - 0.5)); undesirable: 2 * (1 - sigma(0.1 * (0.5 - (-1))))
    expected = [1 - sigmoid(0.05), 2 * (1 - sigmoid(0.15))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.1, -0.1]) and not rewards.requires_grad
    losses.sum().backward()
    # raising a desirable completion's log-prob lowers its loss; raising an undesirable one's raises it
    assert policy.grad[0] == pytest.approx(-0.1 * sigmoid(0.05) * (1 - sigmoid(0.05)), rel=1e-5)
    assert policy.grad[1] == pytest.approx(2 * 0.1 * sigmoid(0.15) * (1 - sigmoid(0.15)), rel=1e-5)


def test_kl_estimate_is_the_clamped_mean_without_gradient():
    log_ratios = torch.tensor([0.5, 1.0, 3.0], requires_grad=True)
    estimate = kto_kl_estimate(log_ratios.sum(), 3)
    assert estimate.item() == pytest.approx(1.5) and not estimate.requires_grad
    assert kto_kl_estimate(torch.tensor(-2.0), 4).item() == 0.0  # clamped at 0


def test_the_class_balance_warning():
    spec = LossSpec(name="kto", beta=0.1)
    assert spec.class_balance_warning(110, 100) is None
    assert "= 0.5, outside the advised [1.0, 1.33]" in spec.class_balance_warning(50, 100)
    assert LossSpec(name="kto", beta=0.1, desirable_weight=2.0).class_balance_warning(50, 100) is None
    assert "infinite" in spec.class_balance_warning(10, 0)


# ----- the data -------------------------------------------------------------------------------------

FEEDBACK_ROWS = [
    {"prompt": "Q1?", "completion": " yes", "label": True},
    {"prompt": "Q1?", "completion": " no", "label": False},
    {"prompt": "Q2?", "completion": " maybe", "label": True},
    {"prompt": [{"role": "user", "content": "Q3?"}], "completion": [{"role": "assistant", "content": " ok"}]}
    | {"label": False},
]


def test_an_unpaired_file_loads_as_feedback(tmp_path):
    path = write_preference_file(tmp_path / "feedback.jsonl", FEEDBACK_ROWS)
    data = load_preference_file(str(path), "train", eval_fraction=0)
    assert data["Q1?"].responses == [" yes", " no"] and data["Q1?"].feedback == [(0, True), (1, False)]
    assert data["Q2?"].feedback == [(0, True)] and data["Q2?"].pairs == []
    conversation = next(prompt for prompt in data if not isinstance(prompt, str))
    assert conversation[0].content == "Q3?" and data[conversation].feedback == [(0, False)]


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": "Q?", "completion": " a"}, "line 2: field 'label' is missing"),
        ({"prompt": "Q?", "completion": " a", "label": "yes"}, "line 2: field 'label' must be true or false"),
        ({"prompt": "Q?", "completion": "", "label": True}, "line 2: field 'completion' must be a non-empty"),
        ({"completion": " a", "label": False}, "line 2: field 'prompt' is missing"),
        (
            {"prompt": "Q?", "completion": [{"role": "user", "content": "a"}], "label": True},
            "line 2: field 'completion' must be one assistant message",
        ),
    ],
)
def test_malformed_unpaired_rows_name_the_file_and_line(tmp_path, row, problem):
    path = write_preference_file(tmp_path / "feedback.jsonl", [FEEDBACK_ROWS[0], row])
    with pytest.raises(DatasetError) as error:
        load_preference_file(str(path), "train")
    assert str(error.value).startswith(f"{path}, {problem}")


def test_pairs_as_unpaired_makes_chosen_desirable_and_rejected_undesirable():
    data = {
        "Q1?": PreferenceEntry([" a", " b", " c"], [(0, 1), (0, 2)], " a"),
        "Q2?": PreferenceEntry([" x", " y"], [(1, 0)], " y"),
        "Q3?": PreferenceEntry([" sft"], [], " sft"),
    }
    converted = pairs_as_feedback(data)
    assert converted["Q1?"].feedback == [(0, True), (1, False), (2, False)]  # " a" once, though in two pairs
    assert converted["Q2?"].feedback == [(1, True), (0, False)]
    assert converted["Q3?"].feedback == [] and converted["Q1?"].pairs == []


def test_mismatched_completions_are_a_fixed_derangement_of_the_completions():
    data = pairs_as_feedback({f"Q{i}?": PreferenceEntry([f" good {i}", f" bad {i}"], [(0, 1)], "") for i in range(6)})
    examples = with_mismatched_completions(data)
    again = with_mismatched_completions(data)
    items = []
    for prompt, entry in examples.items():
        assert entry.labels == again[prompt].labels and entry.pairs == again[prompt].pairs  # deterministic
        for (completion, mismatched), desirable in zip(entry.pairs, entry.labels):
            items.append((prompt, entry.responses[completion], entry.responses[mismatched], desirable))
    assert sorted((p, c, d) for p, c, _, d in items) == sorted(
        (f"Q{i}?", f" {kind} {i}", kind == "good") for i in range(6) for kind in ("good", "bad")
    )
    completions = [c for _, c, _, _ in items]
    assert all(m != c for _, c, m, _ in items)
    assert sorted(m for _, _, m, _ in items) == sorted(completions), "each completion is some other example's once"


def test_one_distinct_completion_cannot_give_mismatched_ones():
    data = {"Q?": PreferenceEntry([" a"], [], " a", feedback=[(0, True)]), "R?": PreferenceEntry([" a"], [], " a")}
    data["R?"].feedback.append((0, False))
    with pytest.raises(DatasetError, match="KTO needs at least two different completions"):
        with_mismatched_completions(data)


def test_an_unpaired_file_tokenizes_with_labels_and_mismatched_completions_under_the_template(tmp_path):
    tokenizer = chat_tokenizer()
    rows = [
        {"prompt": [{"role": "user", "content": f"Q{i}?"}], "completion": f" A{i}", "label": i % 2 == 0}
        for i in range(4)
    ]
    path = write_preference_file(tmp_path / "feedback.parquet", rows)
    settings = TokenizeSettings(max_length=64, max_prompt_length=32, sft_mode=False, unpaired=True)
    examples, n_dropped = tokenize_datasets([str(path)], "train", tokenizer, settings)
    assert n_dropped == 0 and len(examples) == 3  # one of four prompts is held out as "test"
    for example in examples:
        number = int(example["prompt_messages"][0]["content"][1])
        assert example["desirable"] == (number % 2 == 0)
        completion = tokenizer.decode(example["chosen_input_ids"][len(example["prompt_input_ids"]) :])
        mismatched = tokenizer.decode(example["rejected_input_ids"][len(example["prompt_input_ids"]) :])
        assert completion == f" A{number}<|im_end|>" and mismatched != completion and mismatched.endswith("<|im_end|>")
        assert example["prompt"].endswith("<|im_start|>assistant\n")  # the chat template's generation prompt
    assert examples.desirable.tolist() == [e["desirable"] for e in examples]


def test_the_wrong_kind_of_data_for_the_loss_is_one_clear_error(tmp_path):
    tokenizer = byte_tokenizer()
    pairs = write_preference_file(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": " a", "rejected": " b"}])
    feedback = write_preference_file(tmp_path / "feedback.jsonl", FEEDBACK_ROWS[:3])
    kto = TokenizeSettings(max_length=64, max_prompt_length=32, sft_mode=False, unpaired=True)
    with pytest.raises(DatasetError, match="loss=kto trains on unpaired feedback. Set pairs_as_unpaired=true"):
        tokenize_datasets([str(pairs)], "train", tokenizer, kto)
    for sft_mode, loss in ((False, "a pair loss"), (True, "an SFT loss")):
        settings = TokenizeSettings(max_length=64, max_prompt_length=32, sft_mode=sft_mode)
        with pytest.raises(DatasetError, match=f"which {loss} cannot train on: use loss=kto"):
            tokenize_datasets([str(feedback)], "train", tokenizer, settings)


def test_share_prompt_and_pairs_as_unpaired_are_refused_where_they_would_be_ignored():
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(KTO + ["share_prompt=true"]), world_size=1)
    assert "loss=kto trains on one completion per prompt" in str(error.value)
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(equivalence_overrides("dpo") + ["pairs_as_unpaired=true"]), world_size=1)
    assert "pairs_as_unpaired=true applies to loss=kto; loss=dpo would ignore it" in str(error.value)


# ----- the trainer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """A tokenize cache the module's runs share (the reference log-probs stay each test's own)."""
    return tmp_path_factory.mktemp("tokenized")


def share_tokens(tmp_path: Path, tokenized: Path) -> None:
    """Let the runs under tmp_path (their cache is tmp_path / "cache") read and write the module's tokens."""
    (tmp_path / "cache").mkdir(exist_ok=True)
    if not (tmp_path / "cache" / "tokenized").exists():
        (tmp_path / "cache" / "tokenized").symlink_to(tokenized, target_is_directory=True)


@pytest.fixture(scope="module")
def kto_trainer(tmp_path_factory, tokenized):
    """A BasicTrainer for loss=kto on the converted embedded pairs, its policy moved off the reference."""
    tmp_path = tmp_path_factory.mktemp("trainer")
    share_tokens(tmp_path, tokenized)
    config = compose_config(KTO + ["n_examples=16", "debug=true", f"cache_dir={tmp_path / 'cache'}"])
    (tmp_path / "run").mkdir()
    trainer = train.build_trainer(config, tmp_path / "run", CPU, 0, 1)
    trainer.prepare()
    with torch.no_grad():
        for parameter in trainer.policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter, generator=torch.Generator().manual_seed(0)))
    return trainer


def direct_mismatched_logps(model, examples: list[dict]) -> torch.Tensor:
    """Summed log-probs of each example's mismatched completion, one unpadded sequence at a time."""
    values = []
    for example in examples:
        input_ids = torch.tensor([example["rejected_input_ids"]])
        labels = torch.tensor(example["rejected_labels"][1:])
        logits = model(input_ids=input_ids).logits[0, :-1].float()
        token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
        values.append(token_logps[labels != -100].sum())
    return torch.stack(values)


@pytest.mark.parametrize("offset", [0.3, -0.3])
def test_kl_estimate_equals_a_direct_computation_over_micro_batches(kto_trainer, offset):
    examples = [kto_trainer.train_examples[i] for i in range(6)]
    with torch.no_grad():
        policy = direct_mismatched_logps(kto_trainer.policy, examples)
    # a reference whose mismatched log-probs are the policy's minus `offset`: z0 = max(0, offset)
    table = torch.zeros(len(kto_trainer.train_examples), 2)
    table[:6, 1] = policy - offset
    kto_trainer.reference = CachedReference({"train": table})
    kto_trainer.reference.attach(kto_trainer)
    table[:6, 0] = torch.arange(6.0)  # the completions' reference log-probs, handed on to the loss
    metrics = MetricSums()
    inputs = kto_trainer.unpaired_inputs([examples[:2], examples[2:]], metrics, "train")
    assert [i.reference_logps.tolist() for i in inputs] == [[0.0, 1.0], [2.0, 3.0, 4.0, 5.0]]
    estimate = inputs[0].kl_estimate
    assert all(i.kl_estimate is estimate for i in inputs)  # one z0 for the whole batch
    assert estimate.item() == pytest.approx(max(0.0, offset), abs=1e-5)
    assert not estimate.requires_grad and any(p.requires_grad for p in kto_trainer.policy.parameters())
    assert metrics.averages()["kl/train"] == pytest.approx(max(0.0, offset), abs=1e-5)


def test_the_class_balance_warning_is_said_once_the_data_is_tokenized(kto_trainer, capsys):
    kto_trainer.warn_about_class_balance()
    desirable = kto_trainer.train_examples.desirable
    assert f"{int(desirable.sum())} desirable and {int((~desirable).sum())} undesirable" in capsys.readouterr().out


def run(tmp_path, name: str, overrides: list[str]) -> tuple[list[dict], dict]:
    run_dir = tmp_path / name
    run_in_processes(compose_config(overrides), run_dir, 1)
    return train_records(run_dir), load_file(run_dir / "LATEST" / "model.safetensors")


def assert_same(expected, actual, label: str) -> None:
    (expected_records, expected_weights), (actual_records, actual_weights) = expected, actual
    assert len(actual_records) == len(expected_records) > 0
    for step, (want, got) in enumerate(zip(expected_records, actual_records)):
        for key in (k for k in want if k.startswith(("loss/", "rewards_", "logps_", "kl/", "grad_norm"))):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5, nan_ok=True), f"{label} {step} {key}"
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(actual_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{label} {name}")


def test_precomputed_reference_matches_live_and_pictures_are_drawn(tmp_path, tokenized):
    share_tokens(tmp_path, tokenized)
    base = KTO + FOUR_STEPS + ["packing=false", "logps_chunk_tokens=null"]
    live = run(tmp_path, "live", base + ["plots.enabled=true"])
    assert live[0][0]["loss/train"] == pytest.approx(0.5, abs=1e-6)  # r = z0 = 0: half of weight 1 each
    assert live[0][0]["kl/train"] == 0.0 and all(record["kl/train"] >= 0 for record in live[0])
    assert_same(live, run(tmp_path, "precomputed", base + ["precompute_ref_logps=true"]), "precomputed")
    for picture in ("kto_rewards", "kto_logps", "kl_estimate", "loss"):
        assert (tmp_path / "live" / "plots" / f"{picture}.png").stat().st_size > 0
    assert not (tmp_path / "live" / "plots" / "reward_margins.png").exists()
    assert {p.name for p in plots.PICTURES} >= {"kto_rewards", "kto_logps", "kl_estimate"}


def test_lora_with_the_adapter_off_reference_starts_at_half_and_resumes_exactly(tmp_path, capsys, tokenized):
    share_tokens(tmp_path, tokenized)
    overrides = KTO + ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "n_examples=32", "eval_every=16"]
    straight = run(tmp_path, "straight", overrides)
    assert "reference model: the policy with its LoRA adapter off" in capsys.readouterr().out
    assert straight[0][0]["loss/train"] == pytest.approx(0.5, abs=1e-6)  # adapter B = 0: policy == base
    resumed = run(tmp_path, "resumed", overrides + [f"resume_from={tmp_path / 'straight' / 'step-16'}"])
    assert [r["counters/examples"] for r in resumed[0]] == [24, 32]
    assert_same((straight[0][2:], straight[1]), resumed, "resumed")


def test_kto_trains_from_a_thumbs_up_down_file_through_train_py(tmp_path):
    rows = [
        {"prompt": f"Which is larger, {i} or {i + 1}?", "completion": f" {i + i % 2}", "label": i % 2 == 1}
        for i in range(40)
    ]
    path = write_preference_file(tmp_path / "feedback.jsonl", rows)
    overrides = SMALL_MODEL + ["loss=kto", f"datasets=[{path}]", "n_examples=16", "batch_size=8"]
    overrides += ["eval_batch_size=2", "n_eval_examples=2", "sample_during_eval=false", "plots.enabled=false"]
    overrides += ["minimum_log_interval_secs=0", "do_first_eval=false"]
    config = compose_config(overrides)
    validate_config(config, world_size=1)
    run_in_processes(config, tmp_path / "run", 1)
    records = train_records(tmp_path / "run")
    assert len(records) == 2 and records[0]["loss/train"] == pytest.approx(0.5, abs=1e-6)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "kl/eval" in evals[-1] and math.isfinite(evals[-1]["loss/eval"])

"""The preference-loss family (hinge, robust, RPO, R-DPO, SimPO, ORPO), LossSpec.pair_losses, the loss config checks."""

import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, equivalence_overrides, run_in_processes, train_records
from omegaconf import OmegaConf

from config_checks import validate_config
from loss_registry import LOSS_KEYS, LOSS_NAMES, LossSpec, loss_config_problems, loss_config_warnings
from losses import (
    hinge_loss,
    orpo_loss,
    preference_loss,
    rdpo_loss,
    robust_loss,
    simpo_loss,
)

LOSS_DIR = Path(__file__).resolve().parent.parent / "config" / "loss"
ZEROS = torch.zeros(3)
MARGINS = torch.tensor([0.0, 10.0, 20.0])  # h over a neutral reference; with beta 0.1, beta * h = [0, 1, 2]


def loss_file(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(LOSS_DIR / f"{name}.yaml"))


def spec(name: str, **overrides) -> LossSpec:
    return LossSpec.from_config({**loss_file(name), **overrides})


def random_pairs(seed: int = 0, batch: int = 5) -> tuple[torch.Tensor, ...]:
    """Summed log-probs (policy chosen/rejected, reference chosen/rejected) and token counts of a batch."""
    generator = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(1, 40, (batch,), generator=generator)
    rejected_tokens = torch.randint(1, 40, (batch,), generator=generator)
    per_token = -torch.rand(4, batch, generator=generator) * 3
    counts = torch.stack([chosen_tokens, rejected_tokens, chosen_tokens, rejected_tokens])
    return *(per_token * counts), chosen_tokens, rejected_tokens


def assert_same_value_and_gradient(loss_fn, reference_fn, *inputs: torch.Tensor) -> None:
    """loss_fn and reference_fn (the same formula written differently) agree in value and in autograd gradients."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    twins = [x.detach().double().requires_grad_() for x in inputs]
    value, expected = loss_fn(*leaves), reference_fn(*twins)
    assert torch.allclose(value, expected, atol=1e-10)
    value.sum().backward()
    expected.sum().backward()
    for leaf, twin in zip(leaves, twins):
        assert torch.allclose(leaf.grad, twin.grad, atol=1e-10)


# ----- the pure losses against hand-computed values ----------------------------------------------


def test_hinge_is_one_at_zero_margin_and_zero_past_one_over_beta():
    # beta 0.1, h = [0, 5, 20]: 1 - beta * h = [1, 0.5, -1] -> [1, 0.5, 0]
    losses, chosen, rejected = hinge_loss(torch.tensor([0.0, 5.0, 20.0]), ZEROS, ZEROS, ZEROS, beta=0.1)
    assert torch.allclose(losses, torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(chosen, torch.tensor([0.0, 0.5, 2.0])) and torch.equal(rejected, ZEROS)


def test_hinge_gradient_is_minus_beta_inside_the_margin_and_zero_outside():
    policy_chosen = torch.tensor([0.0, 5.0, 20.0], requires_grad=True)
    hinge_loss(policy_chosen, ZEROS, ZEROS, ZEROS, beta=0.1)[0].sum().backward()
    assert torch.allclose(policy_chosen.grad, torch.tensor([-0.1, -0.1, 0.0]))


def test_robust_dpo_values():
    # eps 0.2, beta * h = [0, 1, 2]: [0.8 * -log sig(z) + 0.2 * log sig(-z)] / 0.6;
    # z = 0 gives (0.8 - 0.2) ln 2 / 0.6 = ln 2; z = 1: (0.8 * 0.3132617 - 0.2 * 1.3132617) / 0.6
    losses, chosen, _ = robust_loss(MARGINS, ZEROS, ZEROS, ZEROS, beta=0.1, label_smoothing=0.2)
    assert torch.allclose(losses, torch.tensor([0.6931472, -0.0200716, -0.5397387]), atol=1e-6)
    assert torch.allclose(chosen, torch.tensor([0.0, 1.0, 2.0]))


def test_robust_dpo_at_zero_eps_is_dpo():
    losses, _, _ = robust_loss(MARGINS, ZEROS, ZEROS, ZEROS, beta=0.1, label_smoothing=0.0)
    assert torch.allclose(losses, preference_loss(MARGINS, ZEROS, ZEROS, ZEROS, beta=0.1)[0])


def test_robust_dpo_gradient_matches_its_closed_form():
    # d loss / d h = beta * (sigma(beta * h) - (1 - eps) / (1 - 2 * eps)) (Chowdhury et al.)
    beta, eps = 0.5, 0.3
    policy_chosen = torch.tensor([-3.0, 0.0, 4.0], requires_grad=True)
    robust_loss(policy_chosen, ZEROS, ZEROS, ZEROS, beta=beta, label_smoothing=eps)[0].sum().backward()
    expected = beta * (torch.sigmoid(beta * policy_chosen.detach()) - (1 - eps) / (1 - 2 * eps))
    assert torch.allclose(policy_chosen.grad, expected, atol=1e-6)


def test_rdpo_adds_alpha_times_the_length_difference_inside_the_sigmoid():
    # h = 0, alpha 0.01: chosen 150 vs rejected 50 tokens -> z = +1; 50 vs 150 -> z = -1; equal -> 0
    chosen_tokens, rejected_tokens = torch.tensor([150, 50, 80]), torch.tensor([50, 150, 80])
    losses, chosen, rejected = rdpo_loss(
        ZEROS, ZEROS, ZEROS, ZEROS, chosen_tokens, rejected_tokens, beta=0.1, length_penalty=0.01
    )
    assert torch.allclose(losses, torch.tensor([0.3132617, 1.3132617, 0.6931472]), atol=1e-6)
    assert torch.equal(chosen, ZEROS) and torch.equal(rejected, ZEROS)  # the length term is not a reward


def test_rdpo_is_dpo_without_penalty_or_with_equal_lengths():
    *logps, chosen_tokens, rejected_tokens = random_pairs()
    for eps in (0.0, 0.2):
        dpo = preference_loss(*logps, beta=0.1, label_smoothing=eps)
        no_penalty = rdpo_loss(*logps, chosen_tokens, rejected_tokens, 0.1, 0.0, eps)
        equal_lengths = rdpo_loss(*logps, chosen_tokens, chosen_tokens, 0.1, 0.05, eps)
        for got in (no_penalty, equal_lengths):
            assert all(torch.allclose(a, b) for a, b in zip(got, dpo))


def test_rdpo_gradient_against_autograd_of_the_sigmoid():
    *logps, chosen_tokens, rejected_tokens = random_pairs(seed=1)
    assert_same_value_and_gradient(
        lambda pc, pr, rc, rr: rdpo_loss(pc, pr, rc, rr, chosen_tokens, rejected_tokens, 0.1, 0.02)[0],
        lambda pc, pr, rc, rr: (
            -torch.log(torch.sigmoid(0.1 * ((pc - rc) - (pr - rr)) + 0.02 * (chosen_tokens - rejected_tokens)))
        ),
        *logps,
    )


def test_simpo_values_and_rewards():
    # beta 2, gamma 1. Pair 1: means -4/2 = -2 and -9/3 = -3 -> z = 2 * -2 - 2 * -3 - 1 = 1.
    # Pair 2: means -3/3 = -1 and -2/2 = -1 -> z = -1.
    losses, chosen, rejected = simpo_loss(
        torch.tensor([-4.0, -3.0]), torch.tensor([-9.0, -2.0]), torch.tensor([2, 3]), torch.tensor([3, 2]), 2.0, 1.0
    )
    assert torch.allclose(losses, torch.tensor([0.3132617, 1.3132617]), atol=1e-6)
    assert torch.allclose(chosen, torch.tensor([-4.0, -2.0])) and torch.allclose(rejected, torch.tensor([-6.0, -2.0]))
    assert not chosen.requires_grad


def test_simpo_gradient_against_autograd_of_the_sigmoid():
    policy_chosen, policy_rejected, _, _, chosen_tokens, rejected_tokens = random_pairs(seed=2)
    assert_same_value_and_gradient(
        lambda pc, pr: simpo_loss(pc, pr, chosen_tokens, rejected_tokens, 2.5, 1.4)[0],
        lambda pc, pr: -torch.log(torch.sigmoid(2.5 * pc / chosen_tokens - 2.5 * pr / rejected_tokens - 1.4)),
        policy_chosen,
        policy_rejected,
    )


def test_orpo_values():
    # Pair 1: p_w = 0.5 over 2 tokens (odds 1), p_l = 0.2 over 4 tokens (odds 1/4): log odds ratio ln 4,
    # -log sigma(ln 4) = ln(1 + 1/4) = ln 1.25; NLL -ln 0.5. Loss ln 2 + 0.1 ln 1.25 = 0.7154615.
    # Pair 2: p_w = 0.8 (odds 4), p_l = 0.5 (odds 1): again ln 1.25; NLL -ln 0.8 -> 0.2454579.
    chosen_tokens, rejected_tokens = torch.tensor([2, 5]), torch.tensor([4, 1])
    policy_chosen = torch.log(torch.tensor([0.5, 0.8])) * chosen_tokens
    policy_rejected = torch.log(torch.tensor([0.2, 0.5])) * rejected_tokens
    losses, chosen, rejected = orpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, 0.1)
    assert torch.allclose(losses, torch.tensor([0.7154615, 0.2454579]), atol=1e-6)
    assert torch.allclose(chosen, 0.1 * torch.log(torch.tensor([0.5, 0.8])))
    assert torch.allclose(rejected, 0.1 * torch.log(torch.tensor([0.2, 0.5])))


def test_orpo_gradient_against_autograd_of_the_probability_form():
    policy_chosen, policy_rejected, _, _, chosen_tokens, rejected_tokens = random_pairs(seed=3)

    def probability_form(pc: torch.Tensor, pr: torch.Tensor) -> torch.Tensor:
        p_w, p_l = torch.exp(pc / chosen_tokens), torch.exp(pr / rejected_tokens)
        odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
        return -torch.log(p_w) - 0.3 * torch.log(odds_ratio / (1 + odds_ratio))

    assert_same_value_and_gradient(
        lambda pc, pr: orpo_loss(pc, pr, chosen_tokens, rejected_tokens, 0.3)[0],
        probability_form,
        policy_chosen,
        policy_rejected,
    )


def test_orpo_log_odds_stay_accurate_when_p_is_near_one_in_float32():
    # mean log-probs a = -1e-6 and -4e-6: 1 - p = -expm1(a) is 1e-6 and 4e-6 to first order, so the log odds
    # ratio is ln 4, L_OR = ln(1 + 1/4) = 0.2231436 and the loss 1e-6 + 0.1 * 0.2231436 = 0.0223154.
    # 1 - p as 1 - exp(a) in float32 would give a ratio of exp(1.3715) and a loss of 0.0226.
    losses, _, _ = orpo_loss(torch.tensor([-1e-6]), torch.tensor([-4e-6]), torch.tensor([1]), torch.tensor([1]), 0.1)
    assert losses.item() == pytest.approx(0.0223154, rel=1e-5)


def test_orpo_is_finite_with_gradients_at_the_extremes():
    # p = 1 exactly (a response with no labelled tokens) and a vanishing p: loss and gradients stay finite
    policy_chosen = torch.tensor([0.0, -200.0], requires_grad=True)
    policy_rejected = torch.tensor([-300.0, 0.0], requires_grad=True)
    losses, _, _ = orpo_loss(policy_chosen, policy_rejected, torch.tensor([0, 2]), torch.tensor([3, 1]), 0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(policy_chosen.grad).all() and torch.isfinite(policy_rejected.grad).all()


# ----- LossSpec.pair_losses: summed log-probs and token counts in -------------------------------


def test_pair_losses_dpo_is_preference_loss():
    *logps, chosen_tokens, rejected_tokens = random_pairs()
    expected = preference_loss(*logps, beta=0.1, label_smoothing=0.1)
    got = spec("dpo", label_smoothing=0.1).pair_losses(*logps, chosen_tokens, rejected_tokens)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_pair_losses_ipo_averages_inside_the_spec():
    *logps, chosen_tokens, rejected_tokens = random_pairs()
    counts = (chosen_tokens, rejected_tokens, chosen_tokens, rejected_tokens)
    averaged = [summed / n for summed, n in zip(logps, counts)]
    expected = preference_loss(*averaged, beta=0.1, ipo=True)
    got = spec("ipo").pair_losses(*logps, chosen_tokens, rejected_tokens)
    assert all(torch.allclose(a, b) for a, b in zip(got, expected))
    summed = spec("ipo", average_log_prob=False).pair_losses(*logps, chosen_tokens, rejected_tokens)
    assert torch.allclose(summed[0], preference_loss(*logps, beta=0.1, ipo=True)[0])


def test_pair_losses_rpo_adds_alpha_times_the_per_token_nll():
    # chosen sums [-6, -2] over [3, 4] tokens: NLL per token [2, 0.5]; alpha 0.5 adds [1, 0.25]
    logps = (
        torch.tensor([-6.0, -2.0]),
        torch.tensor([-5.0, -1.0]),
        torch.tensor([-6.0, -3.0]),
        torch.tensor([-4.0, -1.0]),
    )
    counts = (torch.tensor([3, 4]), torch.tensor([2, 2]))
    for name in ("dpo", "ipo", "hinge", "robust"):
        plain = spec(name).pair_losses(*logps, *counts)
        with_nll = spec(name, sft_weight=0.5).pair_losses(*logps, *counts)
        assert torch.allclose(with_nll[0] - plain[0], torch.tensor([1.0, 0.25])), name
        assert torch.equal(with_nll[1], plain[1]) and torch.equal(with_nll[2], plain[2])


def test_pair_losses_rpo_at_zero_alpha_is_dpo():
    *logps, chosen_tokens, rejected_tokens = random_pairs()
    got = spec("dpo", sft_weight=0.0).pair_losses(*logps, chosen_tokens, rejected_tokens)
    assert torch.equal(got[0], preference_loss(*logps, beta=0.1)[0])


def test_pair_losses_dispatch_to_each_pure_loss():
    *logps, chosen_tokens, rejected_tokens = random_pairs()
    pc, pr, rc, rr = logps
    cases = {
        "hinge": hinge_loss(*logps, 0.1),
        "robust": robust_loss(*logps, 0.1, 0.1),
        "simpo": simpo_loss(pc, pr, chosen_tokens, rejected_tokens, 2.0, 1.0),
        "orpo": orpo_loss(pc, pr, chosen_tokens, rejected_tokens, 0.1),
        "dpo": rdpo_loss(*logps, chosen_tokens, rejected_tokens, 0.1, 0.01),
    }
    for name, expected in cases.items():
        overrides = {"length_penalty": 0.01} if name == "dpo" else {}
        got = spec(name, **overrides).pair_losses(*logps, chosen_tokens, rejected_tokens)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), name


def test_pair_losses_ignore_the_reference_when_the_spec_uses_none():
    *logps, chosen_tokens, rejected_tokens = random_pairs()
    pc, pr, rc, rr = logps
    for name in ("dpo", "hinge", "robust", "simpo", "orpo"):
        loss = spec(name, reference_free=True) if name in ("dpo", "hinge", "robust") else spec(name)
        with_reference = loss.pair_losses(pc, pr, rc, rr, chosen_tokens, rejected_tokens)
        with_zeros = loss.pair_losses(pc, pr, torch.zeros(5), torch.zeros(5), chosen_tokens, rejected_tokens)
        assert all(torch.equal(a, b) for a, b in zip(with_reference, with_zeros)), name


def test_pair_losses_refuses_sft():
    with pytest.raises(ValueError, match="loss.name=sft has no pair loss"):
        spec("sft").pair_losses(*random_pairs())


def test_scored_logps_are_averaged_where_the_loss_averages():
    sums, counts = torch.tensor([-6.0, -2.0]), torch.tensor([3, 4])
    for name in ("simpo", "orpo", "ipo"):
        assert torch.allclose(spec(name).scored_logps(sums, counts), torch.tensor([-2.0, -0.5])), name
    for loss in (spec("dpo"), spec("hinge"), spec("ipo", average_log_prob=False)):
        assert torch.equal(loss.scored_logps(sums, counts), sums), loss.name


# ----- the spec and the loss files -----------------------------------------------------------------


def test_which_losses_use_a_reference_model():
    uses = {name: spec(name).uses_reference for name in LOSS_NAMES}
    assert uses == {
        "sft": False,
        "dpo": True,
        "ipo": True,
        "hinge": True,
        "robust": True,
        "simpo": False,
        "orpo": False,
        "kto": True,
        "reward": False,
    }
    assert not spec("dpo", reference_free=True).uses_reference
    assert not spec("sft").is_preference and spec("orpo").is_preference


def test_every_loss_has_a_file_declaring_exactly_the_keys_it_reads():
    assert sorted(p.stem for p in LOSS_DIR.glob("*.yaml")) == sorted(LOSS_NAMES)
    for name in LOSS_NAMES:
        assert set(loss_file(name)) == {"name", *LOSS_KEYS[name]}, name
        assert set(LOSS_KEYS[name]) <= set(LossSpec.__dataclass_fields__), name


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_file_has_no_problems_and_no_warnings(name):
    assert loss_config_problems(loss_file(name)) == []
    assert loss_config_warnings(loss_file(name)) == []


def test_paper_defaults_in_the_files():
    assert (spec("simpo").beta, spec("simpo").gamma) == (2.0, 1.0)  # gamma / beta = 0.5
    assert spec("orpo").odds_ratio_weight == 0.1
    assert all(spec(name).sft_weight == 0 for name in ("dpo", "ipo", "hinge", "robust"))
    assert spec("dpo").length_penalty == 0


# ----- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, key, value, readers",
    [
        ("ipo", "label_smoothing", 0.1, "only loss=dpo, loss=robust read it"),
        ("hinge", "label_smoothing", 0.1, "only loss=dpo, loss=robust read it"),
        ("simpo", "label_smoothing", 0.1, "only loss=dpo, loss=robust read it"),
        ("simpo", "reference_free", True, "only loss=dpo, loss=ipo, loss=hinge, loss=robust read it"),
        ("orpo", "reference_free", True, "only loss=dpo, loss=ipo, loss=hinge, loss=robust read it"),
        ("orpo", "beta", 0.1, "only loss=dpo, loss=ipo, loss=hinge, loss=robust, loss=simpo, loss=kto read it"),
        ("ipo", "length_penalty", 0.01, "only loss=dpo read it"),
        ("dpo", "average_log_prob", True, "only loss=ipo read it"),
        ("dpo", "lenght_penalty", 0.01, "no loss reads it"),
    ],
)
def test_settings_the_loss_would_ignore_are_refused(name, key, value, readers):
    problems = loss_config_problems({**loss_file(name), key: value})
    assert len(problems) == 1
    assert problems[0].startswith(f"loss.{key}={value}: loss={name} would ignore it.") and readers in problems[0]


@pytest.mark.parametrize(
    "name, key, value, expected",
    [
        ("dpo", "beta", 0, "loss.beta=0: must be greater than 0"),
        ("simpo", "beta", -2.0, "loss.beta=-2.0: must be greater than 0"),
        ("dpo", "label_smoothing", 0.5, "loss.label_smoothing=0.5: must be in [0, 0.5)"),
        ("robust", "label_smoothing", -0.1, "loss.label_smoothing=-0.1: must be in [0, 0.5)"),
        ("hinge", "sft_weight", -1.0, "loss.sft_weight=-1.0: must be 0 or more"),
        ("dpo", "length_penalty", -0.01, "loss.length_penalty=-0.01: must be 0 or more"),
        ("simpo", "gamma", -0.5, "loss.gamma=-0.5: must be 0 or more"),
        ("orpo", "odds_ratio_weight", 0, "loss.odds_ratio_weight=0: must be greater than 0"),
        ("dpo", "beta", "high", "loss.beta=high: must be a number"),
        ("dpo", "reference_free", "yes", "loss.reference_free=yes: must be true or false"),
    ],
)
def test_out_of_range_values_are_refused(name, key, value, expected):
    problems = loss_config_problems({**loss_file(name), key: value})
    assert len(problems) == 1 and problems[0].startswith(expected)


def test_unknown_name_and_missing_keys_are_refused():
    assert loss_config_problems({"name": "cpo"}) == [
        "loss.name=cpo: must be one of sft, dpo, ipo, hinge, robust, simpo, orpo, kto, reward "
        "(loss=<name> picks config/loss/<name>.yaml)."
    ]
    problems = loss_config_problems({"name": "simpo", "beta": 2.0})
    assert problems == ["loss.gamma is missing: loss=simpo reads it; declare it in config/loss/simpo.yaml."]


def test_every_problem_is_reported_at_once():
    problems = loss_config_problems({**loss_file("dpo"), "beta": 0, "label_smoothing": 0.5, "gamma": 1.0})
    assert len(problems) == 3


@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        ("dpo", {"beta": 2.0}, "loss.beta=2.0 is outside 0.01 to 0.5"),
        ("hinge", {"beta": 5.0}, "loss.beta=5.0 is outside 0.01 to 1.0"),
        ("simpo", {"beta": 0.1, "gamma": 0.0}, "loss.beta=0.1 is outside 1.0 to 10.0"),
        ("simpo", {"gamma": 3.0}, "gamma / beta = 1.5 is above 1.0"),
        ("orpo", {"odds_ratio_weight": 5.0}, "loss.odds_ratio_weight=5.0 is outside 0.05 to 2.0"),
        ("robust", {"label_smoothing": 0.0}, "loss=robust with loss.label_smoothing=0 is plain DPO"),
    ],
)
def test_warnings_for_settings_outside_the_papers_ranges(name, overrides, expected):
    config = {**loss_file(name), **overrides}
    assert loss_config_problems(config) == []
    warnings = loss_config_warnings(config)
    assert len(warnings) == 1 and expected in warnings[0]


def test_no_warnings_while_there_are_problems():
    assert loss_config_warnings({**loss_file("simpo"), "beta": 0.0}) == []


def test_spec_reads_a_composed_omegaconf_node():
    node = OmegaConf.create({**loss_file("dpo"), "length_penalty": 0.02})
    assert LossSpec.from_config(node).length_penalty == 0.02 and loss_config_problems(node) == []


@pytest.mark.parametrize("loss_file", sorted(p.stem for p in LOSS_DIR.glob("*.yaml")))
def test_every_loss_file_trains_two_steps_through_train_py(loss_file, tmp_path, capsys):
    overrides = equivalence_overrides(loss_file) + ["n_examples=16"]
    config = compose_config(overrides)
    validate_config(config, world_size=1)
    run_in_processes(config, tmp_path / "run", 1)
    records = train_records(tmp_path / "run")
    assert len(records) == 2 and all(math.isfinite(r["loss/train"]) for r in records)
    assert (tmp_path / "run" / "LATEST" / "model.safetensors").is_file()
    loads_reference = LossSpec.from_config(config.loss).uses_reference
    assert f"reference model: {loads_reference}" in capsys.readouterr().out
    if loss_file in ("simpo", "orpo"):
        assert not loads_reference, f"{loss_file} must not load a reference model"

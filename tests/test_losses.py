"""The loss functions against values computed by hand."""

import math

import pytest
import torch

from logprobs import IGNORE_INDEX, sequence_logps, token_logps
from losses import preference_loss
from trainers import preference_loss as reexported_preference_loss


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_equal_policy_and_reference_give_ln2():
    logps = torch.tensor([-3.0, -10.0, -0.5])
    losses, chosen, rejected = preference_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)))
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_dpo_margins_match_minus_logsigmoid():
    # policy margins 0, 10, 20 over a neutral reference; beta 0.1 -> -log sigmoid([0, 1, 2])
    zeros = torch.zeros(3)
    losses, chosen, rejected = preference_loss(torch.tensor([0.0, 10.0, 20.0]), zeros, zeros, zeros, beta=0.1)
    expected = torch.tensor([-logsigmoid(0.0), -logsigmoid(1.0), -logsigmoid(2.0)])
    assert torch.allclose(losses, expected, atol=1e-6)
    assert torch.allclose(chosen, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(rejected, zeros)


def test_rewards_are_beta_times_log_ratios_and_detached():
    policy_chosen = torch.tensor([-1.0], requires_grad=True)
    losses, chosen, rejected = preference_loss(
        policy_chosen, torch.tensor([-4.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5
    )
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)
    assert not chosen.requires_grad and losses.requires_grad


def test_conservative_dpo_mixes_both_directions():
    eps, beta, h = 0.2, 0.1, 10.0
    losses, _, _ = preference_loss(
        torch.tensor([h]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=beta, label_smoothing=eps
    )
    expected = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    assert losses.item() == pytest.approx(expected, rel=1e-6)


def test_ipo_is_squared_distance_to_target_margin():
    # h = (-1 - -3) - (-2 - -2) = 2; beta 0.25 -> target 2; loss 0.  h = 0 -> loss 4
    losses, _, _ = preference_loss(
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-3.0, -2.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([-2.0, -2.0]),
        beta=0.25,
        ipo=True,
    )
    assert torch.allclose(losses, torch.tensor([0.0, 4.0]))


def test_reference_free_ignores_the_reference():
    policy_chosen, policy_rejected = torch.tensor([-1.0]), torch.tensor([-2.0])
    free, _, _ = preference_loss(
        policy_chosen, policy_rejected, torch.tensor([5.0]), torch.tensor([-9.0]), beta=1.0, reference_free=True
    )
    assert free.item() == pytest.approx(-logsigmoid(1.0))


def test_trainers_reexports_preference_loss():
    assert reexported_preference_loss is preference_loss


def test_token_logps_shift_and_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 6, 0]])
    per_token = token_logps(logits, labels)
    log_softmax = logits.detach().log_softmax(-1)
    # position t of the output scores labels[t + 1] with logits[t]
    assert per_token[0, 1].item() == pytest.approx(log_softmax[0, 1, 3].item(), abs=1e-6)
    assert per_token[1, 3].item() == pytest.approx(log_softmax[1, 3, 0].item(), abs=1e-6)
    assert per_token[0, 0].item() == 0.0 and per_token[0, 3].item() == 0.0
    # masked positions contribute exactly zero gradient
    per_token.sum().backward()
    assert torch.count_nonzero(logits.grad[0, 0]) == 0 and torch.count_nonzero(logits.grad[0, 3]) == 0
    assert torch.count_nonzero(logits.grad[0, 4]) == 0  # the last position predicts nothing


def test_sequence_logps_sum_and_average():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 4, IGNORE_INDEX]])
    summed, n_tokens = sequence_logps(logits, labels)
    averaged, _ = sequence_logps(logits, labels, average=True)
    assert n_tokens.tolist() == [3, 1]
    assert torch.allclose(averaged, summed / torch.tensor([3.0, 1.0]))
    log_softmax = logits.log_softmax(-1)
    assert summed[1].item() == pytest.approx(log_softmax[1, 1, 4].item(), abs=1e-6)


def test_token_logps_is_float32_for_bf16_logits():
    logits = torch.randn(1, 3, 4).bfloat16()
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    assert token_logps(logits, labels).dtype == torch.float32

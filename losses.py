"""Loss functions for SFT and preference optimization.

Every function here is pure: tensors in, tensors out, no model and no config. Each is declared
once in loss_registry.py (its config keys, whether it uses a reference, its usual beta), which
turns `config.loss` into the call.

Notation follows the DPO paper (Rafailov et al., 2023, arXiv:2305.18290):
pi_theta is the policy, pi_ref the frozen reference, y_w the preferred (chosen)
response and y_l the dispreferred (rejected) one, and
h = [log pi_theta(y_w) - log pi_ref(y_w)] - [log pi_theta(y_l) - log pi_ref(y_l)].
"""

import math

import torch
import torch.nn.functional as F


def length_averaged(summed_logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token mean of summed log-probs: (batch,) sums and (batch,) token counts; 0 tokens count as 1."""
    return summed_logps / n_tokens.clamp(min=1)


def _log_ratio_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h, (batch,): how much more the policy than the reference prefers y_w to y_l."""
    return (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)


def _implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards beta * (log pi_theta - log pi_ref) (paper section 5), detached: ((batch,), (batch,))."""
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return chosen_rewards, rejected_rewards


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    ipo: bool = False,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO, conservative DPO or IPO loss.

    All inputs have shape (batch,) and hold log-probabilities of whole responses
    (summed over tokens, or length-averaged for IPO as its authors advise).

    With h as in the module docstring:
      DPO (paper eq. 7):      -log sigma(beta * h)
      conservative DPO:       -(1 - eps) log sigma(beta * h) - eps log sigma(-beta * h),
                              eps = label_smoothing, the assumed rate of flipped labels
      IPO (Azar et al., 2023, eq. 17): (h - 1 / (2 * beta))^2
    reference_free=True drops the reference terms (an implicit uniform reference).

    Returns (losses, chosen_rewards, rejected_rewards), each (batch,). Rewards are the
    implicit rewards beta * (log pi_theta - log pi_ref) of paper section 5, detached.
    """
    if reference_free:
        reference_chosen_logps = torch.zeros_like(reference_chosen_logps)
        reference_rejected_logps = torch.zeros_like(reference_rejected_logps)
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    h = _log_ratio_margin(*logps)

    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, *_implicit_rewards(*logps, beta)


def rdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    length_penalty: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Length-regularised DPO (R-DPO; Park et al., 2024, arXiv:2403.19159), optionally conservative.

    Summed log-probs (batch,) and token counts (batch,). With z = beta * h + alpha * (|y_w| - |y_l|),
    alpha = length_penalty:  -(1 - eps) log sigma(z) - eps log sigma(-z),  eps = label_smoothing.
    R-DPO maximises reward minus alpha * |y| under DPO's KL constraint, so its Bradley-Terry reward
    is beta * log(pi_theta / pi_ref) + alpha * |y|: the length term explains the part of a preference
    that length alone accounts for, and the policy is not trained on it. alpha = 0, or equal lengths,
    is exactly preference_loss's DPO (cDPO with eps > 0).

    Returns (losses, chosen_rewards, rejected_rewards), each (batch,); rewards as in preference_loss.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    z = beta * _log_ratio_margin(*logps) + length_penalty * (chosen_tokens - rejected_tokens)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, *_implicit_rewards(*logps, beta)


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinge loss on the log-ratio margin: max(0, 1 - beta * h).

    SLiC-HF's calibration loss (Zhao et al., 2023, arXiv:2305.10425) in the reference-normalised
    form of RSO (Liu et al., 2023, arXiv:2309.06657): a pair stops contributing once h >= 1 / beta.
    Inputs (batch,) summed log-probs; returns (losses, chosen_rewards, rejected_rewards), each
    (batch,), rewards as in preference_loss.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = torch.relu(1 - beta * _log_ratio_margin(*logps))
    return losses, *_implicit_rewards(*logps, beta)


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Provably robust DPO (Chowdhury et al., 2024, arXiv:2403.00409).

    [-(1 - eps) log sigma(beta * h) + eps log sigma(-beta * h)] / (1 - 2 * eps), eps = label_smoothing
    in [0, 0.5): an unbiased estimate of the DPO loss on clean labels when each label is flipped with
    probability eps. Unlike cDPO it is unbounded below (it rewards large margins), and eps = 0 is DPO.
    Inputs (batch,) summed log-probs; returns (losses, chosen_rewards, rejected_rewards), each
    (batch,), rewards as in preference_loss.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    z = beta * _log_ratio_margin(*logps)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return losses, *_implicit_rewards(*logps, beta)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al., 2024, arXiv:2405.14734): -log sigma(r_w - r_l - gamma), no reference model.

    r = (beta / |y|) log pi_theta(y), SimPO's length-normalised reward; gamma is the target reward
    margin. Inputs: summed log-probs (batch,) and token counts (batch,). Returns (losses,
    chosen_rewards, rejected_rewards), each (batch,), the rewards being r, detached.
    """
    chosen_rewards = beta * length_averaged(policy_chosen_logps, chosen_tokens)
    rejected_rewards = beta * length_averaged(policy_rejected_logps, rejected_tokens)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler, 2012, "Accurately computing log(1 - exp(-|a|))")."""
    # log(-expm1(x)) is accurate for x > -ln 2, log1p(-exp(x)) below it; each branch sees only its own
    # range, so the branch torch.where discards has a finite (zero) gradient instead of NaN
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far_from_zero = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far_from_zero)


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    odds_ratio_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al., 2024, arXiv:2403.07691): L_SFT + lambda * L_OR, no reference model.

    With p(y) = exp(mean log pi_theta(y)) the length-averaged probability and odds(y) = p / (1 - p):
      L_SFT = -mean log pi_theta(y_w), the chosen response's per-token NLL
      L_OR  = -log sigma(log odds(y_w) - log odds(y_l)),  lambda = odds_ratio_weight
    log odds = log p - log(1 - p) is computed in log space. Inputs: summed log-probs (batch,) and
    token counts (batch,). Returns (losses, chosen_rewards, rejected_rewards), each (batch,); ORPO
    has no beta, so its rewards are lambda * mean log pi_theta, detached.
    """
    # p = 1 exactly (every token certain, or no labelled token) has infinite odds; capping the mean
    # log-prob just below 0 bounds log odds at about 13.8 and keeps both the loss and its gradient finite
    chosen_mean = length_averaged(policy_chosen_logps, chosen_tokens).clamp(max=-1e-6)
    rejected_mean = length_averaged(policy_rejected_logps, rejected_tokens).clamp(max=-1e-6)
    log_odds_ratio = (chosen_mean - _log1mexp(chosen_mean)) - (rejected_mean - _log1mexp(rejected_mean))
    losses = -chosen_mean - odds_ratio_weight * F.logsigmoid(log_odds_ratio)
    return losses, odds_ratio_weight * chosen_mean.detach(), odds_ratio_weight * rejected_mean.detach()


def reward_model_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: float, center_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bradley-Terry loss of a reward model (InstructGPT, Ouyang et al., 2022, eq. 1): -log sigma(r_w - r_l - m).

    chosen_scores, rejected_scores: (batch,) the model's scalar scores r of each pair's two
    responses. m = margin asks the chosen score to lead by at least that much (0: the plain
    Bradley-Terry model). center_weight adds lambda * (r_w + r_l)^2, which keeps scores near 0
    without changing which response wins (Eisenstein et al., 2023, arXiv:2312.09244).
    Returns (losses, chosen_rewards, rejected_rewards), each (batch,), the rewards being the scores, detached.
    """
    losses = -F.logsigmoid(chosen_scores - rejected_scores - margin)
    if center_weight:
        losses = losses + center_weight * (chosen_scores + rejected_scores) ** 2
    return losses, chosen_scores.detach(), rejected_scores.detach()


def kto_kl_estimate(mismatched_log_ratio_sum: torch.Tensor, n_mismatched: torch.Tensor | float) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al., 2024, arXiv:2402.01306, eq. 7's KL term), a scalar.

    z0 = max(0, mean over mismatched completions y' of log pi_theta(y'|x) - log pi_ref(y'|x)), given the
    SUM of those log-ratios and their number (so the mean is exact over micro-batches and ranks). It
    estimates KL(pi_theta || pi_ref) and is detached: the paper passes no gradient through it.
    """
    return (torch.as_tensor(mismatched_log_ratio_sum) / n_mismatched).clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    kl_estimate: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al., 2024, arXiv:2402.01306, eq. 8) on unpaired feedback.

    policy_logps, reference_logps: (batch,) summed log-probs of each example's completion y given its
    prompt x; desirable: (batch,) bool, the label; kl_estimate: z0, a scalar (kto_kl_estimate). With
    r = log pi_theta(y|x) - log pi_ref(y|x):
      desirable:   lambda_D * (1 - sigma(beta * (r - z0)))
      undesirable: lambda_U * (1 - sigma(beta * (z0 - r)))
    lambda_D = desirable_weight, lambda_U = undesirable_weight. At r = z0 each costs half its weight.

    Returns (losses, rewards), each (batch,); rewards are beta * r, detached.
    """
    log_ratio = policy_logps - reference_logps
    value = torch.where(desirable, beta * (log_ratio - kl_estimate), beta * (kl_estimate - log_ratio))
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(value.dtype)
    losses = weights * (1 - torch.sigmoid(value))
    return losses, beta * log_ratio.detach()

"""Loss functions for SFT and preference optimization.

Every function here is pure: tensors in, tensors out, no model and no config.
The trainer turns config keys into keyword arguments.

Notation follows the DPO paper (Rafailov et al., 2023, arXiv:2305.18290):
pi_theta is the policy, pi_ref the frozen reference, y_w the preferred (chosen)
response and y_l the dispreferred (rejected) one.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of positions that are not trained on (prompt, padding)


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

    With h = [log pi_theta(y_w) - log pi_ref(y_w)] - [log pi_theta(y_l) - log pi_ref(y_l)]:
      DPO (paper eq. 7):      -log sigma(beta * h)
      conservative DPO:       -(1 - eps) log sigma(beta * h) - eps log sigma(-beta * h),
                              eps = label_smoothing, the assumed rate of flipped labels
      IPO (Azar et al., 2023, eq. 17): (h - 1 / (2 * beta))^2
    reference_free=True drops the reference terms (an implicit uniform reference).

    Returns (losses, chosen_rewards, rejected_rewards), each (batch,). Rewards are the
    implicit rewards beta * (log pi_theta - log pi_ref) of paper section 5, detached.
    """
    policy_log_ratio = policy_chosen_logps - policy_rejected_logps
    reference_log_ratio = reference_chosen_logps - reference_rejected_logps
    if reference_free:
        reference_log_ratio = torch.zeros_like(reference_log_ratio)
    h = policy_log_ratio - reference_log_ratio

    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token under the logits, in float32.

    logits: (batch, seq_len, vocab), labels: (batch, seq_len) with IGNORE_INDEX on
    positions that are not trained on. The logits at position t predict token t + 1,
    so labels are shifted left by one. Returns (batch, seq_len - 1); masked positions
    hold exactly 0.0 so they contribute nothing to sums or gradients.
    """
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe_labels = torch.where(mask, labels, 0)  # any valid index; zeroed by the mask below
    # log_softmax(x)[y] = x[y] - logsumexp(x), without materialising a second (B, T, V) tensor
    picked = torch.gather(logits, dim=2, index=safe_labels.unsqueeze(2)).squeeze(2)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, logps, 0.0)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or length-averaged) log-probability of each sequence's labelled tokens.

    logits: (batch, seq_len, vocab), labels: (batch, seq_len).
    Returns (logps, n_tokens), both (batch,): logps in float32 and the number of
    labelled tokens per sequence.
    """
    per_token = token_logps(logits, labels)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    logps = per_token.sum(-1)
    if average:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens

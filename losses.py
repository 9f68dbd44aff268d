"""Loss functions for SFT and preference optimization.

Every function here is pure: tensors in, tensors out, no model and no config.
LossSpec turns `config.loss` into the call; loss_config_problems and loss_config_warnings check it.

Notation follows the DPO paper (Rafailov et al., 2023, arXiv:2305.18290):
pi_theta is the policy, pi_ref the frozen reference, y_w the preferred (chosen)
response and y_l the dispreferred (rejected) one, and
h = [log pi_theta(y_w) - log pi_ref(y_w)] - [log pi_theta(y_l) - log pi_ref(y_l)].
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of positions that are not trained on (prompt, padding)

# The keys of `config.loss` each loss reads besides `name`; config/loss/<name>.yaml declares exactly these.
LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "sft": ("per_token_mean",),
    "dpo": ("beta", "label_smoothing", "reference_free", "sft_weight", "length_penalty"),
    "ipo": ("beta", "average_log_prob", "reference_free", "sft_weight"),
    "hinge": ("beta", "reference_free", "sft_weight"),
    "robust": ("beta", "label_smoothing", "reference_free", "sft_weight"),
    "simpo": ("beta", "gamma"),
    "orpo": ("odds_ratio_weight",),
}
LOSS_NAMES = tuple(LOSS_KEYS)
REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # scored by the policy's length-averaged log-probs alone


@dataclass(frozen=True)
class LossSpec:
    """What every part of a run needs to know about `config.loss`, decided once from it.

    The trainer reads it to choose its forward passes and loss, train.py to decide whether a
    reference model is loaded, the reference log-probs cache for its key, and the config
    checks for what is allowed; none of them compares loss names as strings.
    """

    name: str  # one of LOSS_NAMES
    beta: float = 0.0  # inverse temperature (reward scale) of preference losses
    label_smoothing: float = 0.0  # cDPO's and robust DPO's assumed rate of flipped labels
    reference_free: bool = False  # an implicit uniform reference: no reference model at all
    average_log_prob: bool = False  # IPO: responses scored by length-averaged, not summed, log-probs
    per_token_mean: bool = False  # SFT: the batch loss is the mean over target tokens
    sft_weight: float = 0.0  # RPO: weight of the chosen response's per-token NLL
    length_penalty: float = 0.0  # R-DPO: weight of the chosen-minus-rejected token count
    gamma: float = 0.0  # SimPO: target reward margin
    odds_ratio_weight: float = 0.0  # ORPO: lambda, the weight of the odds-ratio term

    @classmethod
    def from_config(cls, loss_config) -> "LossSpec":
        """The spec of a `config.loss` node (any mapping with its keys); absent keys take the defaults."""
        fields = {key: loss_config[key] for key in cls.__dataclass_fields__ if key in loss_config}
        return cls(**fields)

    @property
    def is_preference(self) -> bool:
        """Whether examples are (chosen, rejected) pairs; SFT trains on single targets."""
        return self.name != "sft"

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares the policy against a frozen reference model."""
        return self.is_preference and self.name not in REFERENCE_FREE_LOSSES and not self.reference_free

    @property
    def averages_log_probs(self) -> bool:
        """Whether the loss scores responses by length-averaged rather than summed log-probs."""
        return self.name in REFERENCE_FREE_LOSSES or (self.name == "ipo" and self.average_log_prob)

    def scored_logps(self, summed_logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """The log-probs this loss scores responses by, (batch,) from (batch,) sums and counts: for logging."""
        return length_averaged(summed_logps, n_tokens) if self.averages_log_probs else summed_logps

    def pair_losses(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
        chosen_tokens: torch.Tensor,
        rejected_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(losses, chosen_rewards, rejected_rewards) of this loss, each (batch,).

        The log-probs are (batch,) float32, SUMMED over each response's labelled tokens, and
        chosen_tokens / rejected_tokens (batch,) count those tokens; every length average (IPO's
        average_log_prob, SimPO, ORPO, RPO's per-token NLL) is taken here from sums and counts.
        The reference log-probs are not read when uses_reference is False (pass zeros).
        """
        if self.name == "simpo":
            return simpo_loss(
                policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens, self.beta, self.gamma
            )
        if self.name == "orpo":
            return orpo_loss(
                policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens, self.odds_ratio_weight
            )
        if not self.uses_reference:
            reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
            reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
        logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
        if self.averages_log_probs:
            counts = (chosen_tokens, rejected_tokens, chosen_tokens, rejected_tokens)
            logps = tuple(length_averaged(summed, n_tokens) for summed, n_tokens in zip(logps, counts))

        if self.name == "dpo":
            losses, chosen_rewards, rejected_rewards = rdpo_loss(
                *logps, chosen_tokens, rejected_tokens, self.beta, self.length_penalty, self.label_smoothing
            )
        elif self.name == "ipo":
            losses, chosen_rewards, rejected_rewards = preference_loss(*logps, beta=self.beta, ipo=True)
        elif self.name == "hinge":
            losses, chosen_rewards, rejected_rewards = hinge_loss(*logps, self.beta)
        elif self.name == "robust":
            losses, chosen_rewards, rejected_rewards = robust_loss(*logps, self.beta, self.label_smoothing)
        else:
            raise ValueError(
                f"loss.name={self.name} has no pair loss; the pair losses are {', '.join(LOSS_NAMES[1:])}."
            )
        # RPO (Pang et al., 2024, arXiv:2404.19733): plus alpha times the chosen response's NLL, here
        # per labelled response token (the paper normalises it by sequence length)
        losses = losses - self.sft_weight * length_averaged(policy_chosen_logps, chosen_tokens)
        return losses, chosen_rewards, rejected_rewards


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


# Where beta gives sensible training, per loss; outside it loss_config_warnings warns (never refuses).
BETA_RANGES: dict[str, tuple[float, float, str]] = {
    "dpo": (0.01, 0.5, "the DPO paper uses 0.1 for dialogue and 0.5 for summarisation"),
    "robust": (0.01, 0.5, "robust DPO keeps DPO's beta"),
    "ipo": (0.01, 1.0, "IPO's tau; the target margin 1 / (2 * beta) is then 0.5 to 50"),
    "hinge": (0.01, 1.0, "the margin 1 / beta is then 1 to 100 nats of log-ratio"),
    "simpo": (1.0, 10.0, "the SimPO paper uses 2.0 or 2.5, and its authors report up to 10 can help"),
}
ODDS_RATIO_WEIGHT_RANGE = (0.05, 2.0)  # around the ORPO authors' lambda = 0.1 (their Mistral-ORPO runs)
SIMPO_GAMMA_BETA_RATIO_MAX = 1.0  # the SimPO authors tune gamma / beta in [0, 1], starting from 0.5

_FLAG_KEYS = ("reference_free", "average_log_prob", "per_token_mean")  # the true/false keys; the rest are numbers
# for each numeric key: (whether a value is allowed, the message saying what is and how to fix it)
_NUMBER_RULES = {
    "beta": (lambda v: v > 0, "must be greater than 0 (typically 0.1 for DPO and its variants, 2.0 for SimPO)."),
    "label_smoothing": (
        lambda v: 0 <= v < 0.5,
        "must be in [0, 0.5), the assumed fraction of flipped labels (at 0.5 labels carry no information); "
        "0 turns it off.",
    ),
    "sft_weight": (
        lambda v: v >= 0,
        "must be 0 or more: RPO's weight of the chosen response's NLL (Pang et al. use 1.0); 0 turns it off.",
    ),
    "length_penalty": (
        lambda v: v >= 0,
        "must be 0 or more: R-DPO's alpha (a negative one would reward length); 0 turns it off.",
    ),
    "gamma": (lambda v: v >= 0, "must be 0 or more: SimPO's target reward margin (typically beta / 2); 0 for none."),
    "odds_ratio_weight": (
        lambda v: v > 0,
        "must be greater than 0 (typically 0.1); with 0, ORPO is SFT on the chosen responses: use loss=sft for that.",
    ),
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _key_problems(name: str, loss_config: Mapping) -> list[str]:
    """Keys loss `name` reads that the node lacks, and keys it has that the loss would ignore."""
    reads = LOSS_KEYS[name]
    problems = [
        f"loss.{key} is missing: loss={name} reads it; declare it in config/loss/{name}.yaml."
        for key in reads
        if key not in loss_config
    ]
    for key in loss_config:
        if key == "name" or key in reads:
            continue
        users = [f"loss={other}" for other, keys in LOSS_KEYS.items() if key in keys]
        fix = (
            f"only {', '.join(users)} read it; remove it or choose one of those"
            if users
            else "no loss reads it; remove it"
        )
        problems.append(f"loss.{key}={loss_config[key]}: loss={name} would ignore it. {fix}.")
    return problems


def _value_problems(name: str, loss_config: Mapping) -> list[str]:
    """Values of the keys loss `name` reads that are of the wrong type or out of range."""
    problems = []
    for key in LOSS_KEYS[name]:
        if key not in loss_config:
            continue
        value = loss_config[key]
        if key in _FLAG_KEYS:
            if not isinstance(value, bool):
                problems.append(f"loss.{key}={value}: must be true or false.")
        elif not _is_number(value):
            problems.append(f"loss.{key}={value}: must be a number.")
        elif not _NUMBER_RULES[key][0](value):
            problems.append(f"loss.{key}={value}: {_NUMBER_RULES[key][1]}")
    return problems


def loss_config_problems(loss_config: Mapping) -> list[str]:
    """Every problem of a `config.loss` node, each one line naming the key, its value, what is allowed and the fix.

    Refused: an unknown loss name, a key the chosen loss reads but the node lacks, a key the chosen
    loss would ignore (label_smoothing on ipo, reference_free on simpo, ...), and values of the
    wrong type or out of range.
    """
    name = loss_config.get("name")
    if name not in LOSS_KEYS:
        return [
            f"loss.name={name}: must be one of {', '.join(LOSS_NAMES)} (loss=<name> picks config/loss/<name>.yaml)."
        ]
    return _key_problems(name, loss_config) + _value_problems(name, loss_config)


def loss_config_warnings(loss_config: Mapping) -> list[str]:
    """Allowed but probably unintended settings of a `config.loss` node, one line each; [] while it has problems."""
    if loss_config_problems(loss_config):
        return []
    spec = LossSpec.from_config(loss_config)
    warnings = []
    if spec.name in BETA_RANGES:
        low, high, reason = BETA_RANGES[spec.name]
        if not low <= spec.beta <= high:
            warnings.append(
                f"loss.beta={spec.beta} is outside {low} to {high}, sensible for loss={spec.name}: {reason}."
            )
    if spec.name == "simpo" and spec.gamma / spec.beta > SIMPO_GAMMA_BETA_RATIO_MAX:
        warnings.append(
            f"loss.gamma={spec.gamma} with loss.beta={spec.beta}: gamma / beta = {spec.gamma / spec.beta:.3g} is above "
            f"{SIMPO_GAMMA_BETA_RATIO_MAX}; the SimPO authors tune it in [0, 1], starting from 0.5."
        )
    low, high = ODDS_RATIO_WEIGHT_RANGE
    if spec.name == "orpo" and not low <= spec.odds_ratio_weight <= high:
        warnings.append(
            f"loss.odds_ratio_weight={spec.odds_ratio_weight} is outside {low} to {high}; the ORPO authors use 0.1."
        )
    if spec.name == "robust" and spec.label_smoothing == 0:
        warnings.append(
            "loss=robust with loss.label_smoothing=0 is plain DPO; set it to the fraction of flipped labels you expect."
        )
    return warnings


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


def labelled_tokens(labels: list[int]) -> int:
    """How many tokens of a sequence are trained on: labels after the one-token shift that are not IGNORE_INDEX."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    average: bool = False,
    sequence_ids: torch.Tensor | None = None,
    n_sequences: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or length-averaged) log-probability of each sequence's labelled tokens.

    logits: (batch, seq_len, vocab), labels: (batch, seq_len). Each row is one sequence,
    or, for packed rows, sequence_ids (batch, seq_len) and n_sequences say which sequence
    each token belongs to (see sequence_logps_from_hidden).
    Returns (logps, n_tokens), both (n_sequences,): logps in float32 and the number of
    labelled tokens per sequence.
    """
    per_token = token_logps(logits, labels)
    if sequence_ids is None:
        logps, n_tokens = per_token.sum(-1), (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    else:
        mask = labels[:, 1:] != IGNORE_INDEX
        logps, n_tokens = _sum_per_sequence(per_token[mask], sequence_ids[:, 1:][mask], n_sequences)
    if average:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens


def _sum_per_sequence(
    values: torch.Tensor, owners: torch.Tensor, n_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums and counts of labelled-token values: values (n,) float32, owners (n,) sequence indices."""
    sums = torch.zeros(n_sequences, dtype=torch.float32, device=values.device).index_add(0, owners, values)
    counts = torch.zeros(n_sequences, dtype=torch.long, device=owners.device).index_add_(
        0, owners, torch.ones_like(owners)
    )
    return sums, counts


class _ChunkedLabelLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[target], one chunk of rows at a time.

    Only the inputs and the per-token logsumexp (n_tokens,) are saved for backward; each
    chunk's (chunk_tokens, vocab) float32 logits are recomputed there, so the peak extra
    memory is one chunk of logits instead of (n_tokens, vocab) logits and their softmax.

    bf16 inputs are upcast to float32 before the matmul rather than the bf16 product after
    it: the upcast is exact, so the logits carry only float32 accumulation error instead of
    bf16 output rounding (up to 0.06 on a logit of 30). The price is a float32 copy of the
    weight (vocab * hidden_size * 4 bytes) while forward and backward run, and float32
    rather than bf16 matmul throughput. Autocast is switched off inside, so an enclosing
    autocast region cannot turn the matmuls back into bf16.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_tokens: int,
    ) -> torch.Tensor:
        weight_float = weight.float()
        bias_float = None if bias is None else bias.float()
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        logsumexp = torch.empty_like(logps)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                logits = F.linear(hidden[rows].float(), weight_float, bias_float)
                logsumexp[rows] = torch.logsumexp(logits, dim=-1)
                logps[rows] = logits.gather(1, targets[rows].unsqueeze(1)).squeeze(1) - logsumexp[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.chunk_tokens = chunk_tokens
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        weight_float = weight.float()
        bias_float = None if bias is None else bias.float()
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # weight and bias gradients sum over every chunk, so they accumulate in float32
        grad_weight = torch.zeros_like(weight_float) if needs_weight else None
        grad_bias = torch.zeros_like(bias_float) if needs_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                hidden_float = hidden[rows].float()
                logits = F.linear(hidden_float, weight_float, bias_float)
                # d logp / d logits = onehot(target) - softmax(logits), times the upstream gradient;
                # computed in place so that backward, too, holds a single chunk of logits
                grad_logits = logits.sub_(logsumexp[rows].unsqueeze(1)).exp_().mul_(-grad_logps[rows].unsqueeze(1))
                grad_logits.scatter_add_(1, targets[rows].unsqueeze(1), grad_logps[rows].unsqueeze(1))
                if needs_hidden:
                    grad_hidden[rows] = (grad_logits @ weight_float).to(hidden.dtype)
                if needs_weight:
                    grad_weight.addmm_(grad_logits.T, hidden_float)
                if needs_bias:
                    grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def label_logps_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_tokens: int,
) -> torch.Tensor:
    """Log-probability of each target token, projecting hidden states chunk by chunk.

    hidden: (n_tokens, hidden_size), weight: (vocab, hidden_size) (the output embedding,
    possibly tied to the input embedding), bias: (vocab,) or None, targets: (n_tokens,)
    valid token ids. Returns (n_tokens,) float32, equal to
    log_softmax(hidden @ weight.T + bias, -1).gather(targets) computed in float32,
    without ever holding more than (chunk_tokens, vocab) logits. Differentiable in hidden,
    weight and bias; gradients come back in each input's dtype.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of tokens, got {chunk_tokens}")
    return _ChunkedLabelLogps.apply(hidden, weight, bias, targets, chunk_tokens)


def sequence_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_tokens: int,
    average: bool = False,
    sequence_ids: torch.Tensor | None = None,
    n_sequences: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps from the final hidden states instead of the logits.

    hidden: (batch, seq_len, hidden_size), the states the output projection (weight:
    (vocab, hidden_size), bias: (vocab,) or None) turns into logits; labels: (batch, seq_len).
    Same one-token shift and IGNORE_INDEX mask as token_logps, but only labelled positions
    reach the vocabulary projection, so prompt and padding tokens cost nothing, and the
    projection runs chunk_tokens rows at a time (see label_logps_chunked).

    Packed rows hold several sequences: sequence_ids (batch, seq_len) says which of the
    n_sequences sequences each token belongs to (-1 on padding, whose labels must be
    IGNORE_INDEX), and a token's log-prob counts towards the sequence of its label position.
    The first token of every packed sequence must carry IGNORE_INDEX, so that no prediction
    crosses from one sequence into the next. Without sequence_ids each row is one sequence
    and n_sequences, if given, must equal batch.

    Returns (logps, n_tokens), both (n_sequences,): summed (or, with average, length-averaged)
    log-probabilities in float32, and the number of labelled tokens per sequence.
    """
    batch = labels.shape[0]
    if sequence_ids is not None and n_sequences is None:
        raise ValueError("packed rows (sequence_ids given) need n_sequences, the number of sequences they hold")
    if sequence_ids is None and n_sequences not in (None, batch):
        raise ValueError(
            f"without sequence_ids each row is one sequence, so n_sequences must be {batch}, got {n_sequences}"
        )
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    if sequence_ids is None:
        n_sequences = batch
        sequence_ids = torch.arange(n_sequences, device=labels.device).unsqueeze(1).expand_as(labels)
    else:
        sequence_ids = sequence_ids[:, 1:]
    owners = sequence_ids[mask]

    per_token = label_logps_chunked(hidden[:, :-1][mask], weight, bias, labels[mask], chunk_tokens)
    logps, n_tokens = _sum_per_sequence(per_token, owners, n_sequences)
    if average:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens

"""The loss registry: one row per loss, and LossSpec, the run's loss decided once from `config.loss`.

A row says everything the rest of the code needs to know about a loss: the keys of
config/loss/<name>.yaml it reads, how its pure function (losses.py) is called, whether it
compares against a reference model, whether it scores responses by length-averaged log-probs,
and where its beta is sensible. The config checks, the warnings, the trainer's forward passes,
train.py's choice of reference and the test that every loss file declares exactly its keys are
all derived from the rows. Adding a loss: its function in losses.py, its row in LOSSES, its YAML
(and, for a key no loss has yet, a LossSpec field and a KEY_RULES entry).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from losses import (
    hinge_loss,
    kto_loss,
    length_averaged,
    orpo_loss,
    preference_loss,
    rdpo_loss,
    reward_model_loss,
    robust_loss,
    simpo_loss,
)

# (losses, chosen_rewards, rejected_rewards), each (batch,)
LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """The run's loss: `config.loss` read once, built once per process and passed down.

    The trainer reads it to choose its forward passes and loss, train.py to decide which
    reference the run has, the config checks for what is allowed; none of them compares loss
    names as strings. Fields are every key a loss file can declare; a loss reads those of its row.
    """

    name: str  # a key of LOSSES
    beta: float = 0.0  # inverse temperature (reward scale) of preference losses
    label_smoothing: float = 0.0  # cDPO's and robust DPO's assumed rate of flipped labels
    reference_free: bool = False  # an implicit uniform reference: no reference model at all
    average_log_prob: bool = False  # IPO: responses scored by length-averaged, not summed, log-probs
    per_token_mean: bool = False  # SFT: the batch loss is the mean over target tokens
    sft_weight: float = 0.0  # RPO: weight of the chosen response's per-token NLL
    length_penalty: float = 0.0  # R-DPO: weight of the chosen-minus-rejected token count
    gamma: float = 0.0  # SimPO: target reward margin
    odds_ratio_weight: float = 0.0  # ORPO: lambda, the weight of the odds-ratio term
    margin: float = 0.0  # reward model: how far the chosen score must lead the rejected one
    center_weight: float = 0.0  # reward model: weight of (r_chosen + r_rejected)^2, keeping scores near 0
    desirable_weight: float = 1.0  # KTO: lambda_D, the weight of each desirable example's loss
    undesirable_weight: float = 1.0  # KTO: lambda_U, the weight of each undesirable example's loss

    @classmethod
    def from_config(cls, loss_config: Mapping) -> "LossSpec":
        """The spec of a `config.loss` node (any mapping with its keys); absent keys take the defaults."""
        fields = {key: loss_config[key] for key in cls.__dataclass_fields__ if key in loss_config}
        return cls(**fields)

    @property
    def definition(self) -> "LossDefinition":
        return LOSSES[self.name]

    @property
    def is_preference(self) -> bool:
        """Whether the loss learns from feedback (pairs, or KTO's labelled completions); SFT learns targets."""
        return self.definition.pair_loss is not None or self.is_unpaired

    @property
    def is_unpaired(self) -> bool:
        """Whether examples are single completions labelled desirable or not (KTO), rather than pairs.

        Such an example is tokenized as a pair (completion, mismatched completion) with a label: see
        preference_entry.with_mismatched_completions.
        """
        return self.definition.unpaired

    @property
    def head(self) -> str:
        """What the trained model computes: "causal_lm" (log-probs of responses) or "reward" (one score each)."""
        return self.definition.head

    @property
    def is_reward_model(self) -> bool:
        """Whether the run trains a reward model: pairs get scores from a score head, not log-probs."""
        return self.head == "reward"

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares the policy against a frozen reference model."""
        return self.definition.compares_to_reference and not self.reference_free

    @property
    def averages_log_probs(self) -> bool:
        """Whether the loss scores responses by length-averaged rather than summed log-probs."""
        averages = self.definition.averages_log_probs
        return getattr(self, averages) if isinstance(averages, str) else averages

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
    ) -> LossOutput:
        """(losses, chosen_rewards, rejected_rewards) of this loss, each (batch,).

        The log-probs are (batch,) float32, SUMMED over each response's labelled tokens, and
        chosen_tokens / rejected_tokens (batch,) count those tokens; every length average (IPO's
        average_log_prob, SimPO, ORPO, RPO's per-token NLL) is taken from sums and counts.
        The reference log-probs are not read when uses_reference is False (pass zeros).
        """
        if self.definition.pair_loss is None:
            raise ValueError(
                f"loss.name={self.name} has no pair loss: it trains on single targets or unpaired feedback."
            )
        if not self.uses_reference:
            reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
            reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
        logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
        losses, chosen_rewards, rejected_rewards = self.definition.pair_loss(
            self, logps, chosen_tokens, rejected_tokens
        )
        if self.sft_weight:
            # RPO (Pang et al., 2024, arXiv:2404.19733): plus alpha times the chosen response's NLL, here
            # per labelled response token (the paper normalises it by sequence length)
            losses = losses - self.sft_weight * length_averaged(policy_chosen_logps, chosen_tokens)
        return losses, chosen_rewards, rejected_rewards

    def unpaired_losses(
        self,
        policy_logps: torch.Tensor,
        reference_logps: torch.Tensor,
        kl_estimate: torch.Tensor,
        desirable: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """KTO's (losses, rewards), each (batch,), from summed completion log-probs, z0 and (batch,) bool labels."""
        return kto_loss(
            policy_logps,
            reference_logps,
            kl_estimate,
            desirable,
            self.beta,
            self.desirable_weight,
            self.undesirable_weight,
        )

    def class_balance_warning(self, n_desirable: int, n_undesirable: int) -> str | None:
        """KTO: a warning when lambda_D n_D / (lambda_U n_U) leaves the paper's advised [1, 4/3]; None inside it."""
        low, high = KTO_BALANCE_RANGE
        desirable, undesirable = self.desirable_weight * n_desirable, self.undesirable_weight * n_undesirable
        if undesirable and low <= desirable / undesirable <= high:
            return None
        ratio = f"{desirable / undesirable:.3g}" if undesirable else "infinite"
        return (
            f"loss=kto with {n_desirable} desirable and {n_undesirable} undesirable training examples: "
            f"desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {ratio}, outside the advised "
            f"[{low}, {high:.3g}] (Ethayarajh et al., 2024, section 4.2); set loss.desirable_weight or "
            "loss.undesirable_weight to bring it inside."
        )


KTO_BALANCE_RANGE = (1.0, 4 / 3)  # lambda_D n_D / (lambda_U n_U), as the KTO paper advises

# A row's pair loss: (spec, (policy chosen, policy rejected, reference chosen, reference rejected) summed
# log-probs, chosen token counts, rejected token counts) -> LossOutput
PairLoss = Callable[[LossSpec, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor], LossOutput]


@dataclass(frozen=True)
class LossDefinition:
    """One loss: what the rest of the code needs to know about it."""

    keys: tuple[str, ...]  # the keys of config/loss/<name>.yaml besides `name`: exactly these
    pair_loss: PairLoss | None  # None: the loss trains on single targets (SFT)
    compares_to_reference: bool  # against a reference model (unless reference_free turns it off)
    averages_log_probs: bool | str = False  # True, or the flag key that turns length averaging on
    head: str = "causal_lm"  # "reward": the model scores each response (models.MODEL_CLASSES); pairs get scores
    unpaired: bool = False  # examples are single completions with a desirable/undesirable label (KTO)
    beta_range: tuple[float, float, str] | None = None  # where beta is sensible, and why; outside it: a warning
    warnings: Callable[[LossSpec], list[str]] = field(default=lambda spec: [])  # other unlikely settings


def _averaged(logps: tuple[torch.Tensor, ...], chosen_tokens, rejected_tokens) -> tuple[torch.Tensor, ...]:
    counts = (chosen_tokens, rejected_tokens, chosen_tokens, rejected_tokens)
    return tuple(length_averaged(summed, n_tokens) for summed, n_tokens in zip(logps, counts))


def _dpo(spec: LossSpec, logps, chosen_tokens, rejected_tokens) -> LossOutput:
    # R-DPO's length term and cDPO's smoothing are both 0 in the paper's plain DPO
    return rdpo_loss(*logps, chosen_tokens, rejected_tokens, spec.beta, spec.length_penalty, spec.label_smoothing)


def _ipo(spec: LossSpec, logps, chosen_tokens, rejected_tokens) -> LossOutput:
    if spec.average_log_prob:  # IPO's authors score responses by their length-averaged log-probs
        logps = _averaged(logps, chosen_tokens, rejected_tokens)
    return preference_loss(*logps, beta=spec.beta, ipo=True)


def _hinge(spec: LossSpec, logps, chosen_tokens, rejected_tokens) -> LossOutput:
    return hinge_loss(*logps, spec.beta)


def _robust(spec: LossSpec, logps, chosen_tokens, rejected_tokens) -> LossOutput:
    return robust_loss(*logps, spec.beta, spec.label_smoothing)


def _simpo(spec: LossSpec, logps, chosen_tokens, rejected_tokens) -> LossOutput:
    return simpo_loss(logps[0], logps[1], chosen_tokens, rejected_tokens, spec.beta, spec.gamma)


def _orpo(spec: LossSpec, logps, chosen_tokens, rejected_tokens) -> LossOutput:
    return orpo_loss(logps[0], logps[1], chosen_tokens, rejected_tokens, spec.odds_ratio_weight)


def _reward(spec: LossSpec, scores, chosen_tokens, rejected_tokens) -> LossOutput:
    return reward_model_loss(scores[0], scores[1], spec.margin, spec.center_weight)


SIMPO_GAMMA_BETA_RATIO_MAX = 1.0  # the SimPO authors tune gamma / beta in [0, 1], starting from 0.5
ODDS_RATIO_WEIGHT_RANGE = (0.05, 2.0)  # around the ORPO authors' lambda = 0.1 (their Mistral-ORPO runs)


def _simpo_warnings(spec: LossSpec) -> list[str]:
    if spec.gamma / spec.beta <= SIMPO_GAMMA_BETA_RATIO_MAX:
        return []
    return [
        f"loss.gamma={spec.gamma} with loss.beta={spec.beta}: gamma / beta = {spec.gamma / spec.beta:.3g} is above "
        f"{SIMPO_GAMMA_BETA_RATIO_MAX}; the SimPO authors tune it in [0, 1], starting from 0.5."
    ]


def _orpo_warnings(spec: LossSpec) -> list[str]:
    low, high = ODDS_RATIO_WEIGHT_RANGE
    if low <= spec.odds_ratio_weight <= high:
        return []
    return [f"loss.odds_ratio_weight={spec.odds_ratio_weight} is outside {low} to {high}; the ORPO authors use 0.1."]


def _robust_warnings(spec: LossSpec) -> list[str]:
    if spec.label_smoothing:
        return []
    return [
        "loss=robust with loss.label_smoothing=0 is plain DPO; set it to the fraction of flipped labels you expect."
    ]


# The loss family, one row each; `loss=<name>` picks config/loss/<name>.yaml, whose keys are the row's.
LOSSES: dict[str, LossDefinition] = {
    "sft": LossDefinition(keys=("per_token_mean",), pair_loss=None, compares_to_reference=False),
    "dpo": LossDefinition(
        keys=("beta", "label_smoothing", "reference_free", "sft_weight", "length_penalty"),
        pair_loss=_dpo,
        compares_to_reference=True,
        beta_range=(0.01, 0.5, "the DPO paper uses 0.1 for dialogue and 0.5 for summarisation"),
    ),
    "ipo": LossDefinition(
        keys=("beta", "average_log_prob", "reference_free", "sft_weight"),
        pair_loss=_ipo,
        compares_to_reference=True,
        averages_log_probs="average_log_prob",
        beta_range=(0.01, 1.0, "IPO's tau; the target margin 1 / (2 * beta) is then 0.5 to 50"),
    ),
    "hinge": LossDefinition(
        keys=("beta", "reference_free", "sft_weight"),
        pair_loss=_hinge,
        compares_to_reference=True,
        beta_range=(0.01, 1.0, "the margin 1 / beta is then 1 to 100 nats of log-ratio"),
    ),
    "robust": LossDefinition(
        keys=("beta", "label_smoothing", "reference_free", "sft_weight"),
        pair_loss=_robust,
        compares_to_reference=True,
        beta_range=(0.01, 0.5, "robust DPO keeps DPO's beta"),
        warnings=_robust_warnings,
    ),
    "simpo": LossDefinition(
        keys=("beta", "gamma"),
        pair_loss=_simpo,
        compares_to_reference=False,  # scored by the policy's length-averaged log-probs alone
        averages_log_probs=True,
        beta_range=(1.0, 10.0, "the SimPO paper uses 2.0 or 2.5, and its authors report up to 10 can help"),
        warnings=_simpo_warnings,
    ),
    "orpo": LossDefinition(
        keys=("odds_ratio_weight",),
        pair_loss=_orpo,
        compares_to_reference=False,
        averages_log_probs=True,
        warnings=_orpo_warnings,
    ),
    "kto": LossDefinition(
        keys=("beta", "desirable_weight", "undesirable_weight"),
        pair_loss=None,
        compares_to_reference=True,
        unpaired=True,
        beta_range=(0.01, 1.0, "the KTO paper uses 0.1"),
    ),
    "reward": LossDefinition(
        keys=("margin", "center_weight"),
        pair_loss=_reward,
        compares_to_reference=False,
        head="reward",
    ),
}
LOSS_NAMES = tuple(LOSSES)
LOSS_KEYS: dict[str, tuple[str, ...]] = {name: row.keys for name, row in LOSSES.items()}


@dataclass(frozen=True)
class KeyRule:
    """What values a key of config.loss allows: a flag (true/false), or a number passing `allows`."""

    flag: bool = False
    allows: Callable[[float], bool] = lambda value: True
    rule: str = ""  # what is allowed and how to fix it, for the error message


KEY_RULES: dict[str, KeyRule] = {
    "reference_free": KeyRule(flag=True),
    "average_log_prob": KeyRule(flag=True),
    "per_token_mean": KeyRule(flag=True),
    "beta": KeyRule(
        allows=lambda v: v > 0,
        rule="must be greater than 0 (typically 0.1 for DPO and its variants, 2.0 for SimPO).",
    ),
    "label_smoothing": KeyRule(
        allows=lambda v: 0 <= v < 0.5,
        rule="must be in [0, 0.5), the assumed fraction of flipped labels (at 0.5 labels carry no information); "
        "0 turns it off.",
    ),
    "sft_weight": KeyRule(
        allows=lambda v: v >= 0,
        rule="must be 0 or more: RPO's weight of the chosen response's NLL (Pang et al. use 1.0); 0 turns it off.",
    ),
    "length_penalty": KeyRule(
        allows=lambda v: v >= 0,
        rule="must be 0 or more: R-DPO's alpha (a negative one would reward length); 0 turns it off.",
    ),
    "gamma": KeyRule(
        allows=lambda v: v >= 0,
        rule="must be 0 or more: SimPO's target reward margin (typically beta / 2); 0 for none.",
    ),
    "margin": KeyRule(
        allows=lambda v: v >= 0,
        rule="must be 0 or more: how far the chosen score must lead (0: plain Bradley-Terry).",
    ),
    "center_weight": KeyRule(
        allows=lambda v: v >= 0,
        rule="must be 0 or more: the weight of (r_chosen + r_rejected)^2 (e.g. 0.01); 0 turns it off.",
    ),
    "desirable_weight": KeyRule(
        allows=lambda v: v > 0,
        rule="must be greater than 0: KTO's lambda_D (1.0 by default; see the class-balance warning).",
    ),
    "undesirable_weight": KeyRule(
        allows=lambda v: v > 0,
        rule="must be greater than 0: KTO's lambda_U (1.0 by default; see the class-balance warning).",
    ),
    "odds_ratio_weight": KeyRule(
        allows=lambda v: v > 0,
        rule="must be greater than 0 (typically 0.1); with 0, ORPO is SFT on the chosen responses: "
        "use loss=sft for that.",
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
        value, rule = loss_config[key], KEY_RULES[key]
        if rule.flag:
            if not isinstance(value, bool):
                problems.append(f"loss.{key}={value}: must be true or false.")
        elif not _is_number(value):
            problems.append(f"loss.{key}={value}: must be a number.")
        elif not rule.allows(value):
            problems.append(f"loss.{key}={value}: {rule.rule}")
    return problems


def loss_config_problems(loss_config: Mapping) -> list[str]:
    """Every problem of a `config.loss` node, each one line naming the key, its value, what is allowed and the fix.

    Refused: an unknown loss name, a key the chosen loss reads but the node lacks, a key the chosen
    loss would ignore (label_smoothing on ipo, reference_free on simpo, ...), and values of the
    wrong type or out of range.
    """
    name = loss_config.get("name")
    if name not in LOSSES:
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
    if spec.definition.beta_range is not None:
        low, high, reason = spec.definition.beta_range
        if not low <= spec.beta <= high:
            warnings.append(
                f"loss.beta={spec.beta} is outside {low} to {high}, sensible for loss={spec.name}: {reason}."
            )
    return warnings + spec.definition.warnings(spec)

"""What a judge is given (a Comparison) and what it returns (a Judgment), shared by every judge."""

from dataclasses import dataclass, field

from evaluation.loading import EvalPrompt


@dataclass(frozen=True)
class Comparison:
    """The policy's response to one prompt at one temperature, and the baseline's (None with baseline=none)."""

    prompt: EvalPrompt
    temperature: float
    policy: str
    baseline: str | None
    policy_length: int  # tokens, in the policy's tokenizer
    baseline_length: int | None


@dataclass
class Judgment:
    """A judge's decision on one Comparison.

    preference: the policy's share, 1.0 (its response won), 0.5 (a tie, or two orders that disagree)
    or 0.0; None when a verdict could not be read or there was no baseline. Scoring judges also
    give each response's score; pairwise judges each order shown, as
    {"shown": "policy_first" | "baseline_first", "verdict": "A" | "B" | "tie" | None, "reply": text}.
    """

    preference: float | None
    policy_score: float | None = None
    baseline_score: float | None = None
    verdicts: list[dict] = field(default_factory=list)
    orders_agree: bool | None = None  # judged in both orders: whether they named the same winner


def preference_from_scores(policy_score: float, baseline_score: float | None) -> float | None:
    """1.0, 0.5 or 0.0 as the policy's score is above, equal to or below the baseline's; None without one."""
    if baseline_score is None:
        return None
    return 1.0 if policy_score > baseline_score else 0.0 if policy_score < baseline_score else 0.5

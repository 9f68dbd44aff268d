"""Evaluation metrics as pure functions of per-prompt numbers: win rate, bootstrap interval, length control, KL.

A preference is the policy's share of one comparison: 1.0 the policy's response won, 0.0 the
baseline's won, 0.5 a tie (or two orders that disagree), None a verdict that could not be read.
Every function takes plain sequences and returns floats, so each is tested on synthetic numbers
with known answers (tests/test_evaluate.py).
"""

import math
from collections.abc import Sequence

import numpy as np

# ridge penalty on the length slope of the length-controlled fit: keeps it finite when the judge
# always prefers the longer response (separable data), where the unpenalised slope is infinite
LENGTH_SLOPE_PENALTY = 1e-4  # per comparison: small enough not to bias a fit with a real slope


def valid(preferences: Sequence[float | None]) -> list[float]:
    """The readable preferences (None dropped)."""
    return [p for p in preferences if p is not None]


def win_rate(preferences: Sequence[float | None]) -> float | None:
    """Mean of the readable preferences: wins count 1, ties 0.5, losses 0; None when none is readable."""
    readable = valid(preferences)
    return sum(readable) / len(readable) if readable else None


def bootstrap_interval(
    values: Sequence[float], seed: int, n_resamples: int = 2000, confidence: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (one value per prompt), seeded.

    Resamples prompts with replacement n_resamples times and returns the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles of the resampled means. None for no values.
    """
    if not values:
        return None
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(n_resamples, len(data)))  # (n_resamples, n_values)
    means = data[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def length_controlled_win_rate(
    preferences: Sequence[float | None], length_differences: Sequence[float], max_iterations: int = 100
) -> float | None:
    """The win rate the judge would give if the two responses were equally long.

    Model (a logistic regression, in the spirit of AlpacaEval 2.0's length control, without its
    per-instruction terms): P(policy preferred) = sigmoid(a + b * d / s), where d is the policy's
    response length minus the baseline's (tokens) and s the standard deviation of d over the
    comparisons. a and b are fitted by maximum likelihood to the preferences as soft labels (a tie
    is 0.5), with a small ridge penalty on b (LENGTH_SLOPE_PENALTY) so that a judge that always
    prefers the longer response still gives a finite fit. The length-controlled win rate is the
    fit read at d = 0: sigmoid(a). Unreadable preferences are left out. With no spread in d, or
    preferences all equal, there is nothing to regress on and the plain win rate is returned.
    """
    pairs = [(p, d) for p, d in zip(preferences, length_differences, strict=True) if p is not None]
    if not pairs:
        return None
    targets = np.array([p for p, _ in pairs], dtype=np.float64)
    differences = np.array([d for _, d in pairs], dtype=np.float64)
    spread = differences.std()
    if spread == 0 or np.all(targets == targets[0]):
        return float(targets.mean())
    features = np.stack([np.ones_like(differences), differences / spread], axis=1)  # (n, 2)
    penalty = np.diag([0.0, LENGTH_SLOPE_PENALTY]) * len(targets)
    weights = np.zeros(2)
    for _ in range(max_iterations):  # Newton's method on the penalised log-likelihood
        probabilities = 1.0 / (1.0 + np.exp(-(features @ weights)))
        gradient = features.T @ (probabilities - targets) + penalty @ weights
        hessian = features.T @ (features * (probabilities * (1 - probabilities))[:, None]) + penalty
        step = np.linalg.solve(hessian + 1e-9 * np.eye(2), gradient)
        weights -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1.0 / (1.0 + math.exp(-weights[0])))


def order_agreement(agreements: Sequence[bool | None]) -> float | None:
    """Share of comparisons judged in both orders whose two verdicts name the same winner (or both a tie)."""
    judged = [a for a in agreements if a is not None]
    return sum(judged) / len(judged) if judged else None


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def sequence_kl_estimates(policy_logps: Sequence[float], reference_logps: Sequence[float]) -> list[float]:
    """Per-sample log pi(y|x) - log pi_ref(y|x); their mean over samples y ~ pi estimates KL(pi || pi_ref).

    The samples are the policy's own generations: at temperature 1 the mean is an unbiased
    estimate of the sequence-level KL divergence (the DPO paper's Figure 2 x-axis); at other
    temperatures it is the same statistic on the tempered samples.
    """
    return [p - r for p, r in zip(policy_logps, reference_logps, strict=True)]

"""Turning scored samples of one prompt into preference pairs (make_pairs.py): which sample is chosen over which.

Pure functions of the scores and texts, so that the pairs a set of scored samples gives can be
checked by hand. A score of None (a judge reply that could not be read) takes part in no pair.
Identical texts never form a pair, and neither do equal scores: a pair teaches a preference only
where the judge expressed one.
"""

PAIRINGS = ("best_vs_worst", "all_above_gap")


def preference_pairs(scores: list[float | None], texts: list[str], mode: str, min_gap: float) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs of one prompt's samples.

    best_vs_worst: the highest-scored sample against the lowest-scored one, if their scores differ
      by at least min_gap (and by more than 0); ties are broken by the shorter text, then by the
      lower index, so the result never depends on anything but the scores and texts.
    all_above_gap: every (i, j) with score_i - score_j >= min_gap and > 0, in index order, each
      distinct pair of texts once.
    """
    if mode not in PAIRINGS:
        raise ValueError(f"pairing mode {mode!r}: one of {', '.join(PAIRINGS)}")
    scored = [i for i, score in enumerate(scores) if score is not None]
    if mode == "best_vs_worst":
        if not scored:
            return []
        # best: highest score, then shortest text, then first; worst: lowest score, then longest, then last
        best = min(scored, key=lambda i: (-scores[i], len(texts[i]), i))
        worst = max(scored, key=lambda i: (-scores[i], len(texts[i]), i))
        return [(best, worst)] if _teaches(scores[best], scores[worst], texts[best], texts[worst], min_gap) else []
    pairs, seen = [], set()
    for i in scored:
        for j in scored:
            if (texts[i], texts[j]) not in seen and _teaches(scores[i], scores[j], texts[i], texts[j], min_gap):
                seen.add((texts[i], texts[j]))
                pairs.append((i, j))
    return pairs


def _teaches(chosen_score: float, rejected_score: float, chosen: str, rejected: str, min_gap: float) -> bool:
    gap = chosen_score - rejected_score
    return gap > 0 and gap >= min_gap and chosen != rejected

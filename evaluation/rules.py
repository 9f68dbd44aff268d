"""Rule scorers for `judge=rule`: exact, free judging of tasks whose answers can be checked. Add yours here.

A scorer takes the prompt (its text as the dataset gives it, and its messages for conversational
data, else None) and a response, and returns a score; the higher-scored response wins, equal
scores tie. Register it under a name with the decorator, then `judge=rule judge.scorer=<name>`:

    @rule_scorer("polite")
    def polite(prompt: str, messages: list[dict] | None, response: str) -> float:
        return float("please" in response.lower())
"""

from collections.abc import Callable

import chat_task
import embedded

Scorer = Callable[[str, list[dict] | None, str], float]

RULE_SCORERS: dict[str, Scorer] = {}


def rule_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Register the decorated function as the rule scorer `name` (a name registered twice is an error)."""

    def register(scorer: Scorer) -> Scorer:
        if name in RULE_SCORERS:
            raise ValueError(f"A rule scorer named {name!r} is already registered ({RULE_SCORERS[name].__name__}).")
        RULE_SCORERS[name] = scorer
        return scorer

    return register


@rule_scorer("numbers")
def numbers(prompt: str, messages: list[dict] | None, response: str) -> float:
    """The embedded task (datasets=[numbers]): 1 when the response names the right number, else 0."""
    return float(embedded.score_completion(prompt, response))


@rule_scorer("chat_numbers")
def chat_numbers(prompt: str, messages: list[dict] | None, response: str) -> float:
    """The demo-chat task (chat_task.py): 1 for the right number alone, else 0."""
    if messages is None:
        raise ValueError("The chat_numbers scorer needs conversational prompts (the demo-chat task's files).")
    return float(chat_task.score_answer(messages, response))


@rule_scorer("chat_numbers_graded")
def chat_numbers_graded(prompt: str, messages: list[dict] | None, response: str) -> float:
    """The demo-chat task, content and form apart: 1 for the right number alone, 0.5 for the right number as the
    answer in other words ("The largest of 24, 14, 78 is 78."), 0 for anything else (chat_task.score_content).

    With make_pairs.py's pairing=all_above_gap min_gap=0.5 a prompt's samples pair right against wrong and
    well-formed right against wordy right.
    """
    if messages is None:
        raise ValueError("The chat_numbers_graded scorer needs conversational prompts (the demo-chat task's files).")
    if chat_task.score_answer(messages, response):
        return 1.0
    return 0.5 if chat_task.score_content(messages, response) else 0.0

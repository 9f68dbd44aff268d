"""The judges behind `judge=`: one registry row each (config/judge/<name>.yaml holds its settings).

A judge is called with every Comparison of an evaluation and returns one Judgment per comparison
(evaluation/comparisons.py). Pairwise judges read both responses at once and need a baseline;
scoring judges score each response alone (higher wins, equal scores tie) and work with
baseline=none too, giving mean scores only.

To add a judge: write its class (callable on a list of Comparison, with close()), a
config/judge/<name>.yaml declaring its settings, and a JudgeRow below.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoModelForSequenceClassification

from evaluation import llm_judge
from evaluation.comparisons import Comparison, Judgment, preference_from_scores
from evaluation.generation import batches
from evaluation.loading import free_memory, render_conversation, tokenizer_for
from evaluation.rules import RULE_SCORERS
from utils import DTYPES


class ScoringJudge:
    """Scores each response alone with score(comparisons' prompts, texts) and compares the two scores."""

    def score(self, items: list[tuple[Comparison, str]]) -> list[float]:
        raise NotImplementedError

    def __call__(self, comparisons: list[Comparison]) -> list[Judgment]:
        items = [(c, c.policy) for c in comparisons] + [(c, c.baseline) for c in comparisons if c.baseline is not None]
        scores = self.score(items)
        policy_scores, baseline_scores = scores[: len(comparisons)], iter(scores[len(comparisons) :])
        judgments = []
        for comparison, policy_score in zip(comparisons, policy_scores):
            baseline_score = next(baseline_scores) if comparison.baseline is not None else None
            judgments.append(
                Judgment(preference_from_scores(policy_score, baseline_score), policy_score, baseline_score)
            )
        return judgments

    def close(self) -> None:
        pass


class RuleJudge(ScoringJudge):
    """judge=rule: a registered Python scorer (evaluation/rules.py); exact and free."""

    def __init__(self, settings: DictConfig) -> None:
        self.scorer = RULE_SCORERS[settings.scorer]

    def score(self, items: list[tuple[Comparison, str]]) -> list[float]:
        return [float(self.scorer(c.prompt.text, c.prompt.messages, text)) for c, text in items]


class RewardModelJudge(ScoringJudge):
    """judge=reward_model: a sequence-classification model's output (its first logit) for prompt + response.

    Texts are rendered with the reward model's own chat template for conversational prompts
    (plain prompt + response otherwise). Each distinct text is scored once, so equal responses
    get exactly equal rewards whatever batch they fall in.
    """

    def __init__(self, settings: DictConfig, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.tokenizer = tokenizer_for(Path(settings.path), settings.chat_template)
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(settings.path, dtype=DTYPES[settings.dtype]).to(
            device
        )
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()

    @torch.no_grad()
    def score(self, items: list[tuple[Comparison, str]]) -> list[float]:
        texts = [render_conversation(self.tokenizer, c.prompt, text) for c, text in items]
        distinct = sorted(set(texts))
        rewards: dict[str, float] = {}
        for batch in batches(distinct, self.settings.batch_size):
            encoded = self.tokenizer(
                list(batch), padding=True, truncation=True, max_length=self.settings.max_length, return_tensors="pt"
            ).to(self.device)
            logits = self.model(**encoded).logits  # (batch, num_labels): the reward is the first
            rewards.update(zip(batch, logits[:, 0].float().cpu().tolist()))
        return [rewards[text] for text in texts]

    def close(self) -> None:
        self.model = None
        free_memory()


@dataclass(frozen=True)
class JudgeRow:
    """Everything the rest of the code needs to know about one judge."""

    name: str
    pairwise: bool  # reads both responses at once: needs a baseline (no scores, no baseline=none)
    loads_model: bool  # loads weights locally (the evaluation frees its own models first)
    config_problems: Callable[[DictConfig], list[str]]  # checks of its settings that need no model, no request
    server_problems: Callable[[DictConfig], list[str]]  # checks that ask its server, after config_problems pass
    build: Callable[[DictConfig, int, torch.device], Callable[[list[Comparison]], list[Judgment]]]
    describe: Callable[[DictConfig], str]  # one line for the table and summary.json


def _rule_problems(settings: DictConfig) -> list[str]:
    if settings.scorer in RULE_SCORERS:
        return []
    return [
        f"judge.scorer={settings.scorer}: no rule scorer of that name. Registered: {', '.join(sorted(RULE_SCORERS))}; "
        "add one with @rule_scorer in evaluation/rules.py."
    ]


def _reward_model_problems(settings: DictConfig) -> list[str]:
    problems = []
    if not (Path(settings.path) / "config.json").is_file():
        problems.append(
            f"judge.path={settings.path}: not a model folder (no config.json); give an "
            "AutoModelForSequenceClassification folder (save_pretrained's output)."
        )
    if settings.dtype not in DTYPES:
        problems.append(f"judge.dtype={settings.dtype}: one of {', '.join(DTYPES)}.")
    if settings.batch_size < 1 or settings.max_length < 1:
        problems.append(f"judge.batch_size={settings.batch_size}, judge.max_length={settings.max_length}: positive.")
    return problems


def _no_server(settings: DictConfig) -> list[str]:
    return []


JUDGES = {
    row.name: row
    for row in (
        JudgeRow(
            "openai", pairwise=True, loads_model=False,
            config_problems=llm_judge.config_problems, server_problems=llm_judge.server_problems,
            build=lambda settings, seed, device: llm_judge.PairwiseLLMJudge(settings, seed),
            describe=lambda settings: f"openai {settings.model} at {settings.base_url}",
        ),
        JudgeRow(
            "reward_model", pairwise=False, loads_model=True,
            config_problems=_reward_model_problems, server_problems=_no_server,
            build=lambda settings, seed, device: RewardModelJudge(settings, device),
            describe=lambda settings: f"reward_model {settings.path}",
        ),
        JudgeRow(
            "rule", pairwise=False, loads_model=False,
            config_problems=_rule_problems, server_problems=_no_server,
            build=lambda settings, seed, device: RuleJudge(settings),
            describe=lambda settings: f"rule {settings.scorer}",
        ),
    )
}  # fmt: skip

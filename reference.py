"""The reference a preference loss compares the policy against: one object, asked for log-probs of pairs.

train.py decides once which kind a run has and builds exactly one; the trainer asks it
`pair_logps(examples, split)` and never asks which kind it is:

    NoReference          reference-free losses (SimPO, ORPO, reference_free=true): zeros, never read
    ReferenceModel       a frozen copy of the starting model, scoring every batch live
    AdapterOff           LoRA: the policy itself with its adapter switched off (no second model)
    CachedReference      tables of precomputed log-probs (reference_logps.py reads and writes them)
    PrecomputeReference  a ReferenceModel or AdapterOff that scores the run's examples once before
                         training and becomes a CachedReference, freeing its model

The trainer passes itself to `attach` (construction: the model goes onto the trainer's devices)
and to `ready` (before the first step: precomputing happens there); the reference uses only the
trainer's `wrap_reference`, `pair_logps`, `score_pairs`, `policy`, `device` and `is_main`.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from transformers import PreTrainedModel

import lora
from reference_logps import SPLITS, ReferencePlan


class Reference:
    """The reference's summed (chosen, rejected) log-probs of a batch of pairs."""

    description = "False (the loss uses none)"  # train.py's start-up line: "reference model: <description>"
    has_model = False  # whether it computes with a model, given by its model() context (sampling uses it)

    def attach(self, trainer) -> None:
        """Place whatever the reference computes with on the trainer's device(s); once, at construction."""

    def ready(self, trainer) -> "Reference":
        """The reference to train with, once the trainer has chosen its forward passes (precomputing happens here)."""
        return self

    def pair_logps(self, examples: list[dict], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed chosen and rejected log-probs of the examples under the reference, each (len(examples),)."""
        raise NotImplementedError


class NoReference(Reference):
    """Reference-free losses: the reference log-probs are zeros, which those losses never read."""

    def attach(self, trainer) -> None:
        self.device = trainer.device

    def pair_logps(self, examples: list[dict], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(len(examples), device=self.device)
        return zeros, zeros


class _ScoringReference(Reference):
    """A reference that computes: its log-probs come from the trainer's own forward pass over pairs.

    Each kind's `model()` is a no-grad context giving the module that computes as the reference
    (the trainer also samples from it).
    """

    has_model = True

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def pair_logps(self, examples: list[dict], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        with self.model() as reference:
            chosen, rejected, _, _ = self.trainer.pair_logps(reference, examples)
        return chosen, rejected


class ReferenceModel(_ScoringReference):
    """A frozen model (the policy's starting weights, loaded a second time) scoring every batch live."""

    description = "True (a frozen copy of the starting weights)"

    def __init__(self, reference_model: PreTrainedModel):
        self.reference_model = reference_model

    def attach(self, trainer) -> None:
        super().attach(trainer)
        self.reference_model = trainer.wrap_reference(self.reference_model)

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        with torch.no_grad():
            yield self.reference_model


class AdapterOff(_ScoringReference):
    """LoRA: the policy with its adapter switched off is its own base model, so no second model is loaded."""

    description = "the policy with its LoRA adapter off"

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        with torch.no_grad(), lora.adapter_disabled(self.trainer.policy) as base:
            yield base


class CachedReference(Reference):
    """Precomputed log-probs: per split, a (n_examples, 2) float32 table indexed by each example's "index"."""

    description = "False (precomputed log-probs, read from the cache)"

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    def attach(self, trainer) -> None:
        self.device = trainer.device

    def pair_logps(self, examples: list[dict], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.tables[split][[e["index"] for e in examples]].to(self.device)
        return table[:, 0], table[:, 1]


class PrecomputeReference(Reference):
    """A computing reference that scores the plan's examples once, before training, then steps aside.

    `ready` computes every split's table with the trainer's batched, rank-split scoring, stores it
    through the plan (the cache), and returns a CachedReference; the model is then no longer held.
    """

    def __init__(self, plan: ReferencePlan, scorer: _ScoringReference):
        self.plan = plan
        self.scorer = scorer
        self.description = f"{scorer.description}, scoring the run's examples once before training"

    def attach(self, trainer) -> None:
        self.scorer.attach(trainer)

    def ready(self, trainer) -> Reference:
        tables = {}
        for split in SPLITS:
            logps = trainer.score_pairs(self.plan.used_examples(split), split, self.scorer)
            tables[split] = self.plan.store(split, logps, write_cache=trainer.is_main)
        cached = CachedReference(tables)
        cached.attach(trainer)
        return cached

"""Precomputed reference log-probs: which examples a run needs, their cache key and file, reading and writing.

With `precompute_ref_logps=true`, train.py builds one ReferencePlan before any model loads. If
the cache already holds every split's table, the plan carries them and no reference model is
loaded at all; otherwise the trainer computes the tables once with the reference model, stores
them through the plan, and frees the model. Nothing else decides this.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

import lora
from batching import training_order
from models import weights_fingerprint
from tokenized_examples import TokenizedExamples

FORMAT = 2  # 2: summed log-probs (length averaging, where a loss wants it, happens in the loss)
SPLITS = ("train", "eval")


def needed_positions(config: DictConfig, n_examples: int, split: str) -> list[int]:
    """Positions of the split's examples whose reference log-probs the run uses.

    All of the eval set; of the train set only what the run trains on, so that a short run
    (n_examples) over a large dataset does not score all of it first.
    """
    if split == "eval":
        return list(range(n_examples))
    order = training_order(n_examples, config.batch_size, config.seed, config.n_epochs, config.n_examples)
    return sorted({i for batch in order for i in batch})


def cache_file(config: DictConfig, examples: TokenizedExamples) -> Path | None:
    """Where the reference log-probs of these examples are cached; None without cache_dir.

    The key covers everything the values depend on: the reference weights (see
    models.weights_fingerprint), their dtype and compute precision, and the tokenized examples.
    """
    if config.cache_dir is None:
        return None
    key = {
        "format": FORMAT,
        "weights": weights_fingerprint(config.model, config.seed),
        "reference_dtype": lora.reference_dtype_name(config),  # a LoRA run's reference is its base
        "autocast_dtype": config.autocast_dtype,
        "fsdp_policy_mp": config.model.fsdp_policy_mp if config.trainer == "FSDPTrainer" else None,
        "examples": examples.fingerprint,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(config.cache_dir) / "reference_logps" / f"{digest}.safetensors"


@dataclass
class ReferencePlan:
    """The reference log-probs a run precomputes: per split, which examples and where they are cached.

    `tables[split]` is (len(split examples), 2) float32: the (chosen, rejected) summed log-probs
    of each example under the reference model, NaN for examples the run never uses. None until
    read from the cache (load_cached) or stored after computing (store).
    """

    examples: dict[str, TokenizedExamples]  # the whole split, as the trainer indexes it
    positions: dict[str, list[int]]
    cache_files: dict[str, Path | None]
    tables: dict[str, torch.Tensor] | None = None

    @classmethod
    def for_run(
        cls, config: DictConfig, train_examples: TokenizedExamples, eval_examples: TokenizedExamples
    ) -> "ReferencePlan":
        examples = {"train": train_examples, "eval": eval_examples}
        positions = {split: needed_positions(config, len(examples[split]), split) for split in SPLITS}
        cache_files = {split: cache_file(config, examples[split].select(positions[split])) for split in SPLITS}
        return cls(examples, positions, cache_files)

    def used_examples(self, split: str) -> TokenizedExamples:
        """The examples whose log-probs the run needs, in the order the stored values follow."""
        return self.examples[split].select(self.positions[split])

    def load_cached(self, announce: bool) -> bool:
        """Read every split's table from the cache; False (nothing read) unless all of them are there."""
        files = self.cache_files.values()
        if not all(path is not None and path.is_file() for path in files):
            return False
        self.tables = {}
        for split in SPLITS:
            self.tables[split] = self._table(split, load_file(self.cache_files[split])["logps"])
            if announce:
                print(f"reference log-probs ({split}): loaded from {self.cache_files[split]}", flush=True)
        return True

    def store(self, split: str, logps: torch.Tensor, write_cache: bool) -> None:
        """Keep freshly computed log-probs of used_examples(split), (n_used, 2), and cache them (on one rank)."""
        self.tables = self.tables or {}
        self.tables[split] = self._table(split, logps)
        path = self.cache_files[split]
        if path is None or not write_cache:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".partial-{os.getpid()}")
        save_file({"logps": logps.contiguous()}, partial)
        os.replace(partial, path)  # never a half-written file under the final name
        print(f"reference log-probs ({split}): cached in {path}", flush=True)

    def _table(self, split: str, logps: torch.Tensor) -> torch.Tensor:
        table = torch.full((len(self.examples[split]), 2), float("nan"))
        table[self.positions[split]] = logps.float()
        return table

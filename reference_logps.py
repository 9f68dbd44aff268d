"""Precomputed reference log-probs: which examples a run needs, their cache key and file, reading and writing.

With `precompute_ref_logps=true`, train.py builds one ReferencePlan before any model loads. If
the cache already holds every split's table, the run's reference is those tables and no reference
model is loaded at all; otherwise the reference computes the tables once before training, stores
them through the plan, and frees its model (reference.py). Nothing else decides this.
"""

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import console
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


def cache_file(config: DictConfig, examples: TokenizedExamples, param_dtype: str | None) -> Path | None:
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
        "param_dtype": param_dtype,  # the dtype the trainer computes parameters in, if not their own (FSDP)
        "examples": examples.fingerprint,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(config.cache_dir) / "reference_logps" / f"{digest}.safetensors"


@dataclass(frozen=True)
class ReferencePlan:
    """The reference log-probs a run precomputes: per split, which examples and where they are cached.

    A table is (len(split examples), 2) float32: the (chosen, rejected) summed log-probs of each
    example under the reference model, NaN for examples the run never uses. `load_cached` reads
    every split's table or none; `store` makes one from freshly computed values and caches it.
    """

    examples: dict[str, TokenizedExamples]  # the whole split, as the trainer indexes it
    positions: dict[str, list[int]]
    cache_files: dict[str, Path | None]  # None: not cached (no cache_dir, or one that cannot be written)

    @classmethod
    def for_run(
        cls,
        config: DictConfig,
        train_examples: TokenizedExamples,
        eval_examples: TokenizedExamples,
        param_dtype: str | None,
    ) -> "ReferencePlan":
        """The plan of a run; `param_dtype`: a dtype the trainer computes parameters in (FSDP's mixed precision)."""
        examples = {"train": train_examples, "eval": eval_examples}
        positions = {split: needed_positions(config, len(examples[split]), split) for split in SPLITS}
        cache_files = {
            split: cache_file(config, examples[split].select(positions[split]), param_dtype) for split in SPLITS
        }
        folders = {path.parent for path in cache_files.values() if path is not None}
        if any(not _writable(folder) for folder in folders):
            console.say(
                f"note: cannot write reference log-probs under {config.cache_dir} (read-only or not a folder); "
                "they are computed and kept in memory for this run only. Point cache_dir at a writable folder "
                "to reuse them."
            )
            cache_files = {split: None for split in SPLITS}
        return cls(examples, positions, cache_files)

    def used_examples(self, split: str) -> TokenizedExamples:
        """The examples whose log-probs the run needs, in the order the stored values follow."""
        return self.examples[split].select(self.positions[split])

    def load_cached(self) -> dict[str, torch.Tensor] | None:
        """Every split's table from the cache; None unless all are there and readable.

        A damaged file (cut short by a full disk or a kill) is removed with a note, so the values
        are computed again and the cache repairs itself.
        """
        if not all(path is not None and path.is_file() for path in self.cache_files.values()):
            return None
        tables = {}
        for split in SPLITS:
            path = self.cache_files[split]
            try:
                tables[split] = self._table(split, load_file(path)["logps"])
            except (OSError, KeyError, ValueError, SafetensorError) as error:
                console.say(f"note: the reference log-probs cache {path} is damaged ({error}); computing it again.")
                path.unlink(missing_ok=True)
                return None
            console.say(f"reference log-probs ({split}): loaded from {path}")
        return tables

    def store(self, split: str, logps: torch.Tensor, write_cache: bool) -> torch.Tensor:
        """The table of freshly computed log-probs of used_examples(split), (n_used, 2), cached (on one rank)."""
        path = self.cache_files[split]
        if path is not None and write_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + f".partial-{os.getpid()}")
            save_file({"logps": logps.contiguous()}, partial)
            os.replace(partial, path)  # never a half-written file under the final name
            print(f"reference log-probs ({split}): cached in {path}", flush=True)
        return self._table(split, logps)

    def _table(self, split: str, logps: torch.Tensor) -> torch.Tensor:
        if logps.shape != (len(self.positions[split]), 2):
            raise ValueError(f"{tuple(logps.shape)} values where ({len(self.positions[split])}, 2) belong")
        table = torch.full((len(self.examples[split]), 2), float("nan"))
        table[self.positions[split]] = logps.float()
        return table


def _writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (made if missing): tried for real, as permissions can mislead."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False

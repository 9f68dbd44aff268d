"""Shared test setup (no network, the repository root importable) and helpers for whole training runs."""

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import train  # noqa: E402
from train import compose_config  # noqa: E402, F401  (tests import it from here)
from utils import free_port  # noqa: E402

# a smaller model than the demo's, so each run takes seconds
SMALL_MODEL = [
    "model.from_scratch.hidden_size=64",
    "model.from_scratch.intermediate_size=128",
    "model.from_scratch.num_hidden_layers=2",
    "model.from_scratch.num_attention_heads=4",
]


def run_in_processes(config: DictConfig, run_dir: Path, n_processes: int) -> None:
    """What train.py does for one run, in this process (1) or in spawned ranks (> 1).

    Runs of one test share a cache beside their run folders, never the repository's.
    """
    run_dir.mkdir(parents=True)
    config.cache_dir = str(run_dir.parent / "cache")
    if n_processes == 1:
        train.train_worker(0, 1, config, run_dir)
        return
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    mp.spawn(train.train_worker, nprocs=n_processes, args=(n_processes, config, run_dir), join=True)


def train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss/train" in r]


def equivalence_overrides(loss: str) -> list[str]:
    # loss=kto trains on the same pairs as unpaired feedback (chosen desirable, rejected undesirable)
    unpaired = ["pairs_as_unpaired=true"] if loss == "kto" else []
    return SMALL_MODEL + [
        *unpaired,
        f"loss={loss}",
        "batch_size=8",
        "gradient_accumulation_steps=2",
        "eval_batch_size=16",
        "n_examples=80",  # 10 optimizer steps
        "n_eval_examples=32",
        "eval_every=1000000",
        "do_first_eval=false",
        "sample_during_eval=false",
        "minimum_log_interval_secs=0",  # one metrics line per optimizer step
        "lr=1e-3",
        "warmup_steps=2",
        "max_grad_norm=0.5",  # small enough that clipping is exercised
        "plots.enabled=false",  # pictures are tested on their own (test_run_log.py, the CLI runs)
    ]


@pytest.fixture(scope="session")
def tiny_sft_policy(tmp_path_factory) -> Path:
    """A few SFT steps of the small model on the embedded task (its samples differ): <run>/LATEST, made once."""
    root = tmp_path_factory.mktemp("tiny_sft")
    run_in_processes(compose_config(equivalence_overrides("sft") + ["n_examples=32"]), root / "sft", 1)
    return root / "sft" / "LATEST"

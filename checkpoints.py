"""The checkpoint folder: its layout, writing it atomically, reading it back, and checking it before use.

A checkpoint `<run>/step-N` or `<run>/LATEST` is a Hugging Face model folder (config.json,
model.safetensors, tokenizer files) that plain `from_pretrained` loads, plus what a resume needs:

    trainer_state.pt   counters, scheduler and RNG states, the run's resolved config (tensors and
                       plain Python values only, loaded with weights_only=True)
    optimizer.pt       the optimizer state of a one-device run, or
    optimizer/         one shard per rank (torch.distributed.checkpoint) of a distributed run
"""

import os
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel

MODEL_CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.pt"
OPTIMIZER_FILE = "optimizer.pt"
OPTIMIZER_SHARDS = "optimizer"
FINAL = "LATEST"


def step_name(examples_seen: int) -> str:
    """The name of the checkpoint written after this many training examples."""
    return f"step-{examples_seen}"


def optimizer_state_name(distributed: bool) -> str:
    """Where a checkpoint holds its optimizer state: one file, or a folder of per-rank shards."""
    return OPTIMIZER_SHARDS if distributed else OPTIMIZER_FILE


def partial_dir(run_dir: Path, name: str) -> Path:
    """The folder a checkpoint is written in before it is renamed to `name`."""
    return run_dir / f"{name}.partial"


def write_checkpoint(
    checkpoint_dir: Path,
    tmp_dir: Path,
    model: PreTrainedModel,
    state_dict: dict[str, torch.Tensor],
    tokenizer,
    trainer_state: dict,
) -> None:
    """Complete a checkpoint in `tmp_dir` (Hugging Face model folder plus trainer state), then rename it.

    The rename happens only once everything is written, so a crash mid-save never leaves a
    half-written folder under the final name, and an older checkpoint of the same name is
    replaced only by a complete one. The optimizer state is already in tmp_dir (every rank
    writes its own part first).
    """
    if getattr(model.config, "tie_word_embeddings", False):
        # a gathered state dict holds tied weights twice; the checkpoint stores them once
        for key in getattr(model, "_tied_weights_keys", None) or {}:
            state_dict.pop(key, None)
    model.save_pretrained(tmp_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    torch.save(trainer_state, tmp_dir / TRAINER_STATE_FILE)
    replace_dir(tmp_dir, checkpoint_dir)


def replace_dir(new_dir: Path, final_dir: Path) -> None:
    """Move a complete folder to its final name, replacing an older one only after the move."""
    old_dir = final_dir.with_name(final_dir.name + ".old")
    shutil.rmtree(old_dir, ignore_errors=True)
    if final_dir.exists():
        os.replace(final_dir, old_dir)
    os.replace(new_dir, final_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


def read_trainer_state(checkpoint_dir: Path) -> dict:
    """The trainer state saved with a checkpoint (see BasicTrainer.trainer_state)."""
    return torch.load(checkpoint_dir / TRAINER_STATE_FILE, weights_only=True)


def resume_problem(checkpoint_dir: Path, distributed: bool, trainer: str) -> str | None:
    """Why `resume_from=checkpoint_dir` cannot resume a run of this trainer, or None."""
    needed = (MODEL_CONFIG_FILE, TRAINER_STATE_FILE, optimizer_state_name(distributed))
    missing = [name for name in needed if not (checkpoint_dir / name).exists()]
    if not missing:
        return None
    return (
        f"resume_from={checkpoint_dir}: missing {', '.join(missing)}. Point it at a checkpoint folder of a "
        f"{trainer} run (<run>/step-N or <run>/{FINAL})."
    )


def archive_problem(archive: Path) -> str | None:
    """Why `model.archive=archive` cannot give starting weights, or None.

    An archive is a checkpoint folder of this project or a `policy.pt` of the reference scripts.
    """
    if not archive.exists():
        return (
            f"model.archive={archive}: no such file or folder. Point it at a checkpoint folder "
            f"(e.g. <run>/{FINAL}) or a policy.pt file."
        )
    if archive.is_dir() and not (archive / MODEL_CONFIG_FILE).exists():
        return (
            f"model.archive={archive}: this folder has no {MODEL_CONFIG_FILE}, so it is not a checkpoint folder "
            f"(expected e.g. <run>/{FINAL})."
        )
    if archive.is_file() and archive.suffix != ".pt":
        return f"model.archive={archive}: expected a checkpoint folder or a .pt file from the reference scripts."
    return None

"""The checkpoint folder: its layout, writing it atomically, reading it back, and checking it before use.

A checkpoint `<run>/step-N` or `<run>/LATEST` is a Hugging Face model folder (config.json,
model.safetensors, tokenizer files) that plain `from_pretrained` loads, plus what a resume needs:

    trainer_state.pt   counters, scheduler and RNG states, the run's resolved config (tensors and
                       plain Python values only, loaded with weights_only=True)
    optimizer.pt       the optimizer state of a one-device run, or
    optimizer/         one shard per rank (torch.distributed.checkpoint) of a distributed run

A LoRA run (lora.enabled) trains adapters only, so each checkpoint holds them, and the trainer
state and optimizer above, and only LATEST holds the merged model as well (keeps_merged_model):

    adapter/           the adapter in peft's format: PeftModel.from_pretrained(base, <checkpoint>/adapter)
"""

import glob
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel

MODEL_CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.pt"
OPTIMIZER_FILE = "optimizer.pt"
OPTIMIZER_SHARDS = "optimizer"
FINAL = "LATEST"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def step_name(examples_seen: int) -> str:
    """The name of the checkpoint written after this many training examples."""
    return f"step-{examples_seen}"


def optimizer_state_name(distributed: bool) -> str:
    """Where a checkpoint holds its optimizer state: one file, or a folder of per-rank shards."""
    return OPTIMIZER_SHARDS if distributed else OPTIMIZER_FILE


def adapter_dir(checkpoint_dir: Path) -> Path:
    """Where a LoRA run's checkpoint holds its adapter (a subfolder: transformers' from_pretrained would
    take an adapter_config.json beside config.json for an adapter to load onto a base from the Hub)."""
    return checkpoint_dir / ADAPTER_DIR


def holds_adapter(checkpoint_dir: Path) -> bool:
    """Whether a checkpoint folder is a LoRA run's (it holds an adapter)."""
    return (adapter_dir(checkpoint_dir) / ADAPTER_CONFIG_FILE).is_file()


def keeps_merged_model(name: str, load_in_4bit: bool) -> bool:
    """Whether a LoRA checkpoint also holds the merged model: LATEST only, as a merged 8B model is 16 GB
    in bfloat16 against tens of MB of adapter; never from a 4-bit base (merging would bake in its rounding)."""
    return name == FINAL and not load_in_4bit


def partial_dir(run_dir: Path, name: str) -> Path:
    """The folder a checkpoint is written in before it is renamed to `name`."""
    return run_dir / f"{name}.partial"


def start_partial(tmp_dir: Path) -> None:
    """An empty partial folder: one left by a killed save may hold files of another state or world size."""
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()


def write_checkpoint(
    checkpoint_dir: Path,
    tmp_dir: Path,
    model: PreTrainedModel,
    state_dict: dict[str, torch.Tensor] | None,
    tokenizer,
    trainer_state: dict,
) -> None:
    """Complete a checkpoint in `tmp_dir` (Hugging Face model folder plus trainer state), then rename it.

    The rename happens only once everything is written, so a crash mid-save never leaves a
    half-written folder under the final name, and an older checkpoint of the same name is
    replaced only by a complete one. The optimizer state is already in tmp_dir (every rank
    writes its own part first), and so is a LoRA run's adapter; `state_dict` None: no model
    weights (a LoRA run's step-N, see keeps_merged_model).
    """
    if state_dict is not None:
        if getattr(model.config, "tie_word_embeddings", False):
            # a gathered state dict holds tied weights twice; the checkpoint stores them once
            for key in getattr(model, "_tied_weights_keys", None) or {}:
                state_dict.pop(key, None)
        model.save_pretrained(tmp_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    torch.save(trainer_state, tmp_dir / TRAINER_STATE_FILE)  # written last: its presence marks a complete folder
    _fsync_tree(tmp_dir)  # on disk before the rename, so a power cut cannot leave a renamed but empty folder
    replace_dir(tmp_dir, checkpoint_dir)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` and the folders themselves (their entries) to disk."""
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def previous_copy(final_dir: Path) -> Path:
    """Where replace_dir keeps the older checkpoint of a name while the new one moves in."""
    return final_dir.with_name(final_dir.name + ".old")


def replace_dir(new_dir: Path, final_dir: Path) -> None:
    """Move a complete folder to its final name; at every moment a complete copy is under `final_dir` or its .old.

    Between the two renames only `<name>.old` holds a checkpoint, so readers fall back to it
    (readable_checkpoint). An .old left by a save killed there is the only complete copy when
    `final_dir` is absent, so it is removed only once `final_dir` is complete again.
    """
    old_dir = previous_copy(final_dir)
    if final_dir.exists():
        shutil.rmtree(old_dir, ignore_errors=True)  # final_dir is complete, so old_dir is redundant
        os.replace(final_dir, old_dir)
    os.replace(new_dir, final_dir)
    _fsync_dir(final_dir.parent)
    shutil.rmtree(old_dir, ignore_errors=True)


def is_complete(checkpoint_dir: Path) -> bool:
    """Whether a checkpoint folder was completely written (only complete folders are ever renamed into place)."""
    return (checkpoint_dir / TRAINER_STATE_FILE).is_file()


def readable_checkpoint(checkpoint_dir: Path) -> Path:
    """The folder to read `checkpoint_dir` from: itself, or its .old when a save was killed between renames."""
    old_dir = previous_copy(checkpoint_dir)
    if not is_complete(checkpoint_dir) and is_complete(old_dir):
        return old_dir
    return checkpoint_dir


def read_trainer_state(checkpoint_dir: Path) -> dict:
    """The trainer state saved with a checkpoint (see BasicTrainer.trainer_state)."""
    return torch.load(checkpoint_dir / TRAINER_STATE_FILE, weights_only=True)


def damaged_file_problem(path: Path) -> str | None:
    """Why a weights or state file cannot be read (cut short by a full disk or a killed copy), or None.

    Reads only what proves the file whole without loading it: a safetensors header and the length it
    promises, a torch.save archive's zip directory (written last, so a cut-short file lacks it).
    """
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{path} is not a complete torch.save file (cut short, or not written by torch.save)"
    except (SafetensorError, OSError) as error:
        return f"{path} cannot be read ({error})"
    return None


def checkpoint_damage(checkpoint_dir: Path) -> str | None:
    """Why a complete-looking checkpoint folder cannot be resumed from: its first damaged file, or None."""
    files = sorted(checkpoint_dir.glob("*.safetensors")) + sorted(adapter_dir(checkpoint_dir).glob("*.safetensors"))
    files += [checkpoint_dir / name for name in (OPTIMIZER_FILE, TRAINER_STATE_FILE)]
    for path in files:
        problem = damaged_file_problem(path) if path.is_file() else None
        if problem:
            return problem
    try:
        read_trainer_state(checkpoint_dir)["examples_seen"]
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as error:
        return f"{checkpoint_dir / TRAINER_STATE_FILE} cannot be read ({type(error).__name__}: {error})"
    return None


def resume_problem(checkpoint_dir: Path, distributed: bool, trainer: str, lora: bool = False) -> str | None:
    """Why `resume_from=checkpoint_dir` cannot resume a run of this trainer (a LoRA run when `lora`), or None."""
    if checkpoint_dir.is_dir() and holds_adapter(checkpoint_dir) != lora:
        held = "a LoRA adapter" if holds_adapter(checkpoint_dir) else "no LoRA adapter"
        return f"resume_from={checkpoint_dir} holds {held}, but lora.enabled={lora}: resume with the run's own config."
    weights = f"{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}" if lora else MODEL_CONFIG_FILE
    needed = (weights, TRAINER_STATE_FILE, optimizer_state_name(distributed))
    missing = [name for name in needed if not (checkpoint_dir / name).exists()]
    if not missing:
        damage = checkpoint_damage(checkpoint_dir)
        return (
            f"resume_from={checkpoint_dir}: {damage}. Resume from an earlier checkpoint of the run." if damage else None
        )
    return (
        f"resume_from={checkpoint_dir}: missing {', '.join(missing)}. Point it at a checkpoint folder of a "
        f"{trainer} run (<run>/step-N or <run>/{FINAL})."
    )


def archive_problem(archive: Path) -> str | None:
    """Why `model.archive=archive` cannot give starting weights, or None.

    An archive is a checkpoint folder of this project (a LoRA run's step-N holds only an adapter,
    merged into the base when loaded) or a `policy.pt` of the reference scripts.
    """
    if not archive.exists():
        return (
            f"model.archive={archive}: no such file or folder. Point it at a checkpoint folder "
            f"(e.g. <run>/{FINAL}) or a policy.pt file."
        )
    if archive.is_dir() and not (archive / MODEL_CONFIG_FILE).exists() and not holds_adapter(archive):
        return (
            f"model.archive={archive}: this folder has no {MODEL_CONFIG_FILE} and no {ADAPTER_DIR}/, so it is not a "
            f"checkpoint folder (expected e.g. <run>/{FINAL})."
        )
    if archive.is_file() and archive.suffix != ".pt":
        return f"model.archive={archive}: expected a checkpoint folder or a .pt file from the reference scripts."
    files = [archive] if archive.is_file() else sorted(archive.glob("*.safetensors"))
    for path in files + sorted(adapter_dir(archive).glob("*.safetensors")):
        damage = damaged_file_problem(path)
        if damage:
            return f"model.archive={archive}: {damage}. Copy it again, or point model.archive at another checkpoint."
    return None


AUTO = "auto"
RUN_FOLDER_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d{6}")
CHECKPOINT_NAME = re.compile(rf"({FINAL}|step-\d+)(\.old)?")


def newest_checkpoint(local_dirs: Iterable[str], exp_name: str) -> tuple[Path | None, list[str]]:
    """The complete, readable checkpoint of runs named `exp_name` under local_dirs that has seen the most
    examples (or None), and a note for each damaged checkpoint passed over.

    Ties (a LATEST and the step-N of the same step, or a run resumed from an earlier one) go to
    the newer run folder, then to LATEST.
    """
    candidates, skipped = [], []
    for parent in map(Path, local_dirs):
        for run_dir in parent.glob(f"{glob.escape(exp_name)}_*") if parent.is_dir() else []:
            if not RUN_FOLDER_TIMESTAMP.fullmatch(run_dir.name.removeprefix(f"{exp_name}_")):
                continue
            for checkpoint_dir in run_dir.iterdir():
                if not (CHECKPOINT_NAME.fullmatch(checkpoint_dir.name) and is_complete(checkpoint_dir)):
                    continue
                damage = checkpoint_damage(checkpoint_dir)
                if damage:
                    skipped.append(f"resume_from=auto: skipped {checkpoint_dir}: {damage}")
                    continue
                examples_seen = read_trainer_state(checkpoint_dir)["examples_seen"]
                candidates.append((examples_seen, run_dir.name, checkpoint_dir.name == FINAL, checkpoint_dir))
    return (max(candidates)[-1] if candidates else None), skipped


def resume_target(resume_from: str | None, local_dirs: Iterable[str], exp_name: str) -> tuple[str | None, str | None]:
    """The checkpoint folder a run resumes from (None: a fresh run) and the lines saying why, if any.

    `auto`: the newest complete, readable checkpoint of earlier runs of exp_name, else a fresh run. A
    folder whose save was killed between its two renames is read from its .old copy.
    """
    if resume_from is None:
        return None, None
    if resume_from == AUTO:
        found, skipped = newest_checkpoint(local_dirs, exp_name)
        if found is None:
            searched = ", ".join(map(str, local_dirs))
            note = f"resume_from=auto: no complete checkpoint of {exp_name} under {searched}; starting fresh"
        else:
            note = f"resume_from=auto: resuming from {found}"
        return (None if found is None else str(found)), "\n".join(skipped + [note])
    return readable_setting("resume_from", resume_from)


def readable_setting(key: str, value: str | None) -> tuple[str | None, str | None]:
    """A checkpoint folder named by a config key (resume_from, model.archive), or its complete .old copy when
    its save was killed between the two renames, and a line saying so."""
    if value is None:
        return None, None
    readable = readable_checkpoint(Path(value))
    if readable != Path(value):
        return str(readable), f"{key}={value}: its save was interrupted; reading the complete {readable}"
    return value, None


# What a resumed run must share with the run it continues: anything that changes which examples
# are trained on, in which order, with which loss and optimizer, from which starting weights.
# Everything else (evaluation cadence, sampling, logging, wandb, local_dirs, cache_dir, speed
# settings that compute the same values) may change between the two.
TRAINING_KEYS = (
    "seed",
    "datasets",
    "dataset_paths",
    "batch_size",
    "gradient_accumulation_steps",
    "loss",
    "lr",
    "lr_scheduler",
    "optimizer",
    "weight_decay",
    "warmup_steps",
    "max_grad_norm",
    "max_length",
    "max_prompt_length",
    "n_epochs",
    "n_examples",
    "trainer",
    "model.name_or_path",
    "model.archive",
    "model.from_scratch",
    "model.policy_dtype",
    "lora",
)


def resume_config_problems(checkpoint_dir: Path, config: DictConfig, world_size: int) -> list[str]:
    """Each setting that differs from the checkpointed run's and changes what is trained, with both values."""
    try:
        trainer_state = read_trainer_state(checkpoint_dir)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
        return [f"resume_from={checkpoint_dir}: {TRAINER_STATE_FILE} cannot be read ({error}); use another checkpoint."]
    saved = OmegaConf.create(trainer_state["config"])
    problems = []
    for key in TRAINING_KEYS:
        before, now = OmegaConf.select(saved, key), OmegaConf.select(config, key)
        before = OmegaConf.to_container(before) if OmegaConf.is_config(before) else before
        now = OmegaConf.to_container(now, resolve=True) if OmegaConf.is_config(now) else now
        if before != now:
            problems.append(f"{key}={now}, but the run in {checkpoint_dir} trained with {key}={before}")
    if "world_size" in trainer_state and trainer_state["world_size"] != world_size:  # older ones lack it
        problems.append(
            f"{world_size} processes, but the run in {checkpoint_dir} trained with {trainer_state['world_size']}"
        )
    if problems:
        problems[-1] += ". Resume with the run's own settings (its config.yaml), or start a new run."
    return problems

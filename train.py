"""Fine-tune a causal language model with SFT or a preference loss (DPO and its family: see losses.py).

    python -u train.py                                      # the embedded tiny demo, offline on CPU
    python -u train.py model=pythia28 datasets=[hh] loss=dpo loss.beta=0.1 model.archive=<sft run>/LATEST

Configuration lives in config/ (see README.md); `python train.py --help` lists it.
"""

import os
import random
import sys
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

import checkpoints
import console
import lora
import stopping
from chat_templates import set_chat_template
from config_checks import validate_config
from dataset_loading import register_config_schema
from errors import USER_ERRORS, ConfigError, DatasetError
from loss_registry import LossSpec
from models import block_class_name, check_model_matches, keep_large_allocations_returnable, load_model, load_tokenizer
from reference import AdapterOff, CachedReference, NoReference, PrecomputeReference, Reference, ReferenceModel
from reference_logps import ReferencePlan
from run_log import check_run_dir_shared, make_run_dir, save_config
from tokenization import TokenizeSettings, tokenize_datasets
from tokenized_examples import TokenizedExamples
from trainers import TRAINERS, BasicTrainer
from utils import free_port, raise_open_files_limit, resolve_device, seed_everything

CONFIG_DIR = Path(__file__).resolve().parent / "config"
register_config_schema()  # before any config is composed: dataset_paths/dataset_options take any dataset's name


def compose_config(overrides: list[str]) -> DictConfig:
    """The configuration `python train.py <overrides>` runs with, for tests, benchmarks and scripts."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def load_examples(
    config: DictConfig, loss: LossSpec, tokenizer, data_parallel: int = 1
) -> tuple[TokenizedExamples, TokenizedExamples]:
    """Tokenized train and eval examples.

    Eval is a fixed random subset of n_eval_examples, trimmed to a multiple of the data-parallel
    ranks so that each gets the same share of every eval batch; everything downstream (the
    reference log-probs cache among it) sees this one eval set.
    """
    splits = {}
    settings = TokenizeSettings.from_config(config, sft_mode=not loss.is_preference, unpaired=loss.is_unpaired)
    for split in ("train", "test"):
        examples, n_dropped = tokenize_datasets(list(config.datasets), split, tokenizer, settings)
        console.say(f"{split}: {len(examples)} examples; dropped {n_dropped} pairs with nothing to train on")
        if not len(examples):
            why = (
                f": all {n_dropped} were dropped (their chosen and rejected responses are the same, or cut to the same)"
                if n_dropped
                else " (the notes above say what was left out)"
            )
            raise DatasetError(f"The {split} split of datasets={list(config.datasets)} holds no usable examples{why}.")
        splits[split] = examples
    order = list(range(len(splits["test"])))
    random.Random(0).shuffle(order)  # fixed, so every run evaluates on the same subset
    if config.n_eval_examples is not None:
        order = order[: config.n_eval_examples]
    order = order[: len(order) - len(order) % data_parallel]
    if not order:
        raise DatasetError(f"Fewer eval examples than the {data_parallel} data-parallel ranks: lower the rank count.")
    return splits["train"], splits["test"].select(order)


def policy_model_config(config: DictConfig) -> DictConfig:
    """Where the policy's weights come from: model.archive, or a resumed run's checkpoint (the reference stays).

    A resumed LoRA run starts from the same base as before; its adapter comes from the checkpoint.
    """
    if config.resume_from is None or config.lora.enabled:
        return config.model
    return OmegaConf.merge(config.model, {"archive": config.resume_from})


def load_policy(config: DictConfig, loss: LossSpec, tokenizer) -> PreTrainedModel:
    """The model trained (from model.archive or the pretrained weights); with lora.enabled the base with adapters.

    A language model, or for loss=reward the same architecture with a score head (loss.head).
    A resumed LoRA run starts from the same base as before; its adapter comes from the checkpoint.
    """
    policy = load_model(
        policy_model_config(config), config.model.policy_dtype, tokenizer, config.max_length, config.seed,
        load_in_4bit=config.lora.load_in_4bit, head=loss.head,
    )  # fmt: skip
    if config.lora.enabled:
        resume_dir = None if config.resume_from is None else checkpoints.adapter_dir(Path(config.resume_from))
        block = block_class_name(policy, config.model.block_name)
        policy = lora.add_adapter(policy, config, block, resume_dir, loss.head)
    return policy


def load_reference_model(config: DictConfig, tokenizer) -> PreTrainedModel:
    """A frozen copy of the policy's starting weights (model.archive or the pretrained weights)."""
    model = config.model
    return load_model(model, model.reference_dtype, tokenizer, config.max_length, config.seed)


def choose_reference(config: DictConfig, loss: LossSpec, tokenizer, train_examples, eval_examples) -> Reference:
    """The one decision about the reference (reference.py), made before any reference weights load.

    None for reference-free losses. Otherwise the model that computes as the reference: the LoRA
    policy with its adapter off (never a second model), else a reference model; with
    precompute_ref_logps it scores the run's examples once, unless the cache already holds them,
    in which case no reference model is loaded at all.
    """
    if not loss.uses_reference:
        return NoReference()
    plan = None
    if config.precompute_ref_logps:
        param_dtype_key = TRAINERS[config.trainer].param_dtype_key  # e.g. FSDP's mixed precision
        param_dtype = None if param_dtype_key is None else OmegaConf.select(config, param_dtype_key)
        plan = ReferencePlan.for_run(config, train_examples, eval_examples, param_dtype)
        tables = plan.load_cached()
        if tables is not None:
            return CachedReference(tables)
    scorer = AdapterOff() if config.lora.enabled else ReferenceModel(load_reference_model(config, tokenizer))
    return scorer if plan is None else PrecomputeReference(plan, scorer)


def build_trainer(
    config: DictConfig, run_dir: Path | None, device: torch.device, rank: int, world_size: int
) -> BasicTrainer:
    """Load data and models as the run needs them and build its trainer (nothing is trained yet)."""
    loss = LossSpec.from_config(config.loss)
    trainer_class = TRAINERS[config.trainer]
    tokenizer = load_tokenizer(config.model)
    check_model_matches(policy_model_config(config), tokenizer, config.max_length)  # configs only: before weights
    set_chat_template(tokenizer, config.chat_template)  # conversational data and sampling both use it
    data_parallel = trainer_class.data_parallel_size(world_size)
    train_examples, eval_examples = load_examples(config, loss, tokenizer, data_parallel)
    policy = load_policy(config, loss, tokenizer)
    reference = choose_reference(config, loss, tokenizer, train_examples, eval_examples)
    n_params = sum(p.numel() for p in policy.parameters())
    n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    console.say(
        f"policy: {type(policy).__name__}, {n_params / 1e6:.1f}M parameters ({n_trainable / 1e6:.2f}M trained); "
        f"reference model: {reference.description}"
    )
    return trainer_class(
        config, loss, policy, reference, tokenizer, train_examples, eval_examples, run_dir, device, rank, world_size
    )


def train_worker(rank: int, world_size: int, config: DictConfig, run_dir: Path | None) -> None:
    """Everything one process does: join the process group, build the trainer, train."""
    if TRAINERS[config.trainer].multi_process:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        use_cuda = resolve_device(config.device, local_rank).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)  # under torchrun only rank 0 made the folder
        run_dir = shared[0]
    else:
        local_rank = 0
    console.set_main_process(rank == 0)
    device = resolve_device(config.device, local_rank)
    if device.type == "cpu" and world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        # processes sharing this machine's cores would otherwise each start one thread per core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    seed_everything(config.seed)
    if device.type == "cpu":
        keep_large_allocations_returnable()  # or activations stay resident after each step (models.py)
    signals_before_training = stopping.PreemptionSignals(at_once=True)  # the training loop installs its own
    signals_before_training.install()
    try:
        if dist.is_initialized():
            check_run_dir_shared(run_dir, device)  # before any weights load, on every rank at once
        build_trainer(config, run_dir, device, rank, world_size).train()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        checkpoints.remove_unused_run_dir(run_dir if rank == 0 else None)
        sys.exit(2)
    except stopping.RunStopped as stop:  # preempted (exit code 75) or a non-finite step (3): see stopping.py
        print(f"{'stopped' if rank == 0 else f'rank {rank} stopped'}: {stop}", file=sys.stderr, flush=True)
        checkpoints.remove_unused_run_dir(run_dir if rank == 0 else None)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C (stopping.PreemptionSignals)
        print("stopped at once by a second Ctrl-C; resume_from=auto continues from the last checkpoint",
              file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(stopping.EXIT_INTERRUPTED)
    finally:
        signals_before_training.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def declared_config() -> DictConfig | None:
    """The config this command composes without its `+key=value` additions: only keys config files declare.

    `+group=option` (a config group such as +recipe=tiny) stays: its file declares what it adds.
    None when main() runs without Hydra's command line (tests call it with a composed config).
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    kept = [o for o in HydraConfig.get().overrides.task if not o.startswith("+") or _names_group(o)]
    return hydra.compose(config_name="config", overrides=kept)


def _names_group(override: str) -> bool:
    return (CONFIG_DIR / override.lstrip("+").split("=", 1)[0].split("@", 1)[0]).is_dir()


@hydra.main(version_base=None, config_path="config", config_name="config")
def main(config: DictConfig) -> None:
    OmegaConf.resolve(config)
    launched_by_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    trainer_class = TRAINERS.get(config.trainer)  # None: validate_config names the choices
    world_size = trainer_class.processes_wanted() if trainer_class else 1
    config.resume_from, resume_note = checkpoints.resume_target(config.resume_from, config.local_dirs, config.exp_name)
    config.model.archive, archive_note = checkpoints.readable_setting("model.archive", config.model.archive)
    for note in (resume_note, archive_note):
        if note and int(os.environ.get("RANK", 0)) == 0:
            print(note, flush=True)
    try:
        warnings = validate_config(config, world_size, declared=declared_config())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    rank = int(os.environ.get("RANK", 0))
    for warning in warnings if rank == 0 else []:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    run_dir = None
    if rank == 0:
        try:
            run_dir = make_run_dir(config.local_dirs, config.exp_name)
            save_config(config, run_dir)  # also shows, before any weights load, that checkpoints can be written
        except OSError as error:
            print(f"error: cannot write a run folder under local_dirs={list(config.local_dirs)}: {error}. "
                  "Point local_dirs at a writable folder with free space.", file=sys.stderr, flush=True)  # fmt: skip
            sys.exit(2)
        print(f"run folder: {run_dir}", flush=True)

    if not trainer_class.multi_process:
        if launched_by_torchrun and world_size > 1:
            print(
                "error: BasicTrainer is single-process; "
                "use trainer=FSDPTrainer or TensorParallelTrainer under torchrun.",
                file=sys.stderr,
            )
            sys.exit(2)
        train_worker(0, 1, config, run_dir)
    elif launched_by_torchrun:
        train_worker(rank, world_size, config, run_dir)
    else:
        # one machine: one process per GPU (or a single CPU process), as torchrun would start
        raise_open_files_limit()
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        print(f"starting {world_size} processes for {config.trainer}", flush=True)
        try:
            mp.spawn(train_worker, nprocs=world_size, args=(world_size, config, run_dir), join=True)
        except mp.ProcessExitedException as exited:  # a worker's clean stop: pass its exit code on
            sys.exit(exited.exit_code if exited.exit_code in (2, *stopping.EXIT_CODES) else 1)


if __name__ == "__main__":
    main()

"""Fine-tune a causal language model with SFT, DPO, conservative DPO or IPO.

    python -u train.py                                      # the embedded tiny demo, offline on CPU
    python -u train.py model=pythia28 datasets=[hh] loss=dpo loss.beta=0.1 model.archive=<sft run>/LATEST

Configuration lives in config/ (see README.md); `python train.py --help` lists it.
"""

import os
import random
import resource
import socket
import sys
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

import trainers
from models import ModelLoadError, load_model, load_tokenizer
from preference_datasets import DatasetError, TokenizedExamples, tokenize_datasets
from utils import (
    ConfigError,
    make_run_dir,
    resolve_device,
    save_config,
    seed_everything,
    uses_reference_model,
    validate_config,
    world_size_from_environment,
)

USER_ERRORS = (ConfigError, DatasetError, ModelLoadError)


def load_examples(config: DictConfig, tokenizer, is_main: bool) -> tuple[TokenizedExamples, TokenizedExamples]:
    """Tokenized train and eval examples; eval is a fixed random subset of n_eval_examples."""
    splits = {}
    for split in ("train", "test"):
        examples, n_dropped = tokenize_datasets(
            list(config.datasets),
            split,
            tokenizer,
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            sft_mode=config.loss.name == "sft",
            dataset_paths=config.dataset_paths,
            silent=not is_main,
            tokenized_cache_dir=None if config.cache_dir is None else str(Path(config.cache_dir) / "tokenized"),
        )
        if is_main:
            print(f"{split}: {len(examples)} examples; dropped {n_dropped} pairs with nothing to train on", flush=True)
        if not len(examples):
            raise DatasetError(f"The {split} split of datasets={list(config.datasets)} holds no usable examples.")
        splits[split] = examples
    order = list(range(len(splits["test"])))
    random.Random(0).shuffle(order)  # fixed, so every run evaluates on the same subset
    if config.n_eval_examples is not None:
        order = order[: config.n_eval_examples]
    return splits["train"], splits["test"].select(order)


def needs_reference_model(config: DictConfig, train_examples, eval_examples) -> bool:
    """Whether to load the reference model: the loss uses one and its log-probs are not all cached."""
    if not uses_reference_model(config.loss):
        return False
    if not config.precompute_ref_logps:
        return True
    paths = [
        trainers.reference_logps_cache_file(config, trainers.reference_logps_examples(config, examples, split)[1])
        for split, examples in (("train", train_examples), ("eval", eval_examples))
    ]
    return not all(path is not None and path.is_file() for path in paths)


def train_worker(rank: int, world_size: int, config: DictConfig, run_dir: Path | None) -> None:
    """Everything one process does: load data and models, then train."""
    if config.trainer != "BasicTrainer":
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
    device = resolve_device(config.device, local_rank)
    if device.type == "cpu" and world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        # processes sharing this machine's cores would otherwise each start one thread per core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    is_main = rank == 0
    seed_everything(config.seed)
    try:
        tokenizer = load_tokenizer(config.model)
        train_examples, eval_examples = load_examples(config, tokenizer, is_main)
        # a resumed run's policy continues from its checkpoint; its reference stays model.archive
        policy_source = config.model if config.resume_from is None else OmegaConf.merge(config.model, {"archive": config.resume_from})
        policy = load_model(policy_source, config.model.policy_dtype, tokenizer, config.max_length, config.seed)
        reference_model = None
        if needs_reference_model(config, train_examples, eval_examples):
            reference_model = load_model(config.model, config.model.reference_dtype, tokenizer, config.max_length, config.seed)
        if is_main:
            n_params = sum(p.numel() for p in policy.parameters())
            print(f"policy: {type(policy).__name__}, {n_params / 1e6:.1f}M parameters; reference model: {reference_model is not None}", flush=True)
        trainer_class = getattr(trainers, config.trainer)
        trainer = trainer_class(
            config, policy, reference_model, tokenizer, train_examples, eval_examples, run_dir, device, rank, world_size
        )
        trainer.train()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def raise_open_files_limit() -> None:
    """Many processes with many shared-memory tensors need more file handles than the usual 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@hydra.main(version_base=None, config_path="config", config_name="config")
def main(config: DictConfig) -> None:
    OmegaConf.resolve(config)
    launched_by_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world_size = world_size_from_environment(config.trainer)
    try:
        validate_config(config, world_size)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)

    rank = int(os.environ.get("RANK", 0))
    run_dir = None
    if rank == 0:
        run_dir = make_run_dir(config.local_dirs, config.exp_name)
        save_config(config, run_dir / "config.yaml")
        print(f"run folder: {run_dir}", flush=True)

    if config.trainer == "BasicTrainer":
        if launched_by_torchrun and world_size > 1:
            print("error: BasicTrainer is single-process; use trainer=FSDPTrainer or TensorParallelTrainer under torchrun.", file=sys.stderr)
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
        mp.spawn(train_worker, nprocs=world_size, args=(world_size, config, run_dir), join=True)


if __name__ == "__main__":
    main()

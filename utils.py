"""Process setup: dtypes by name, devices, seeding, ports and file-handle limits."""

import random
import resource
import socket

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str, local_rank: int) -> torch.device:
    """The device this process trains on: its local GPU when CUDA is used, else the CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (for the rendezvous of spawned ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_open_files_limit() -> None:
    """Many processes with many shared-memory tensors need more file handles than the usual 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

"""Output for people: printed by the main process only, decided once when a process starts.

train.py calls set_main_process(rank == 0) in each process; everything else calls say() and, for
progress bars, is_main_process(). Scripts that print only their own tables wrap calls in silenced().
"""

import contextlib
from collections.abc import Iterator

_main_process = True  # a process that never calls set_main_process (a test, a script) speaks


def set_main_process(is_main: bool) -> None:
    """Called once per process, as it starts: only the main process (rank 0) prints."""
    global _main_process
    _main_process = is_main


def is_main_process() -> bool:
    return _main_process


def say(message: str) -> None:
    """Print a line (flushed, so it interleaves with progress bars and other ranks' errors) on the main process."""
    if _main_process:
        print(message, flush=True)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Nothing printed inside the block (a benchmark's table stays readable)."""
    global _main_process
    was_main, _main_process = _main_process, False
    try:
        yield
    finally:
        _main_process = was_main

"""How a run stops before its end: preemption signals, the step every rank stops after, and the exit codes.

A cluster preempts a job with SIGTERM (Slurm also sends SIGUSR1 ahead of a time limit with
`--signal=USR1@<seconds>`). The trainer then finishes its current optimizer step, writes a
resumable checkpoint `step-N` and exits with EXIT_PREEMPTED; resubmitting the same command
with `resume_from=auto` continues from that checkpoint. Ctrl-C (SIGINT) does the same the first
time; a second Ctrl-C stops at once (KeyboardInterrupt, exit 130), losing the step in progress.
Before the training loop (loading data and models, precomputing) there is nothing to save, so
these signals stop the run at once with a message and EXIT_PREEMPTED. A step whose gradient norm or loss is
not finite stops the run instead (before the optimizer applies it), naming the last good checkpoint.
"""

import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: a temporary failure, try again (resume_from=auto)
EXIT_NON_FINITE = 3
EXIT_CODES = (EXIT_PREEMPTED, EXIT_NON_FINITE)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a second Ctrl-C, as a shell reports it


class RunStopped(Exception):
    """The run stopped early on purpose; train.py prints the message and exits with `exit_code`."""

    exit_code = 1


class Preempted(RunStopped):
    """A preemption signal arrived; the run saved a resumable checkpoint after the step in progress."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signal_name: str, checkpoint: Path | None):
        super().__init__(
            f"{signal_name} received: stopped after the current optimizer step; resumable checkpoint: {checkpoint}. "
            "Run the same command with resume_from=auto (or resume_from=<that folder>) to continue."
        )


class StoppedBeforeTraining(RunStopped):
    """A preemption signal (or Ctrl-C) arrived before the training loop: nothing was trained, nothing to save."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signal_name: str):
        super().__init__(
            f"{signal_name} received before training started (while loading or preparing); nothing was trained "
            "since the last checkpoint, if any. Run the same command (with resume_from=auto) to start again."
        )


class NonFiniteStepError(RunStopped):
    """A step's loss or gradient norm was NaN or infinite; the optimizer did not apply it."""

    exit_code = EXIT_NON_FINITE

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint: Path | None):
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"optimizer step {step}: loss {loss}, gradient norm {grad_norm}; stopped before applying it, and {kept}. "
            "Lower lr, check the data of this step, or resume from that checkpoint with other settings."
        )


class PreemptionSignals:
    """Remembers whether SIGTERM, SIGUSR1 or SIGINT arrived between `install()` and `restore()`, instead of dying.

    `at_once`: raise StoppedBeforeTraining from the handler instead (for the time before the training
    loop, whose own PreemptionSignals replace these while it runs). A second SIGINT always stops at once.
    """

    def __init__(self, at_once: bool = False) -> None:
        self.at_once = at_once
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a run in a thread keeps the defaults
        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.at_once:
            raise StoppedBeforeTraining(name)
        if signum == signal.SIGINT and self.received == name:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if signum == signal.SIGINT:
            print(
                "\nCtrl-C: finishing the step in progress, then saving a checkpoint and stopping "
                "(press Ctrl-C again to stop at once and lose it)",
                file=sys.stderr,
                flush=True,
            )
        self.received = self.received or name


def any_rank_requests(requested: bool, device: torch.device, distributed: bool) -> bool:
    """Whether any rank asks to stop: one all-reduce (max) per step, so all ranks stop after the same step."""
    if not distributed:
        return requested
    flag = torch.tensor(float(requested), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())

"""Optimizers and learning-rate schedules: built from their config names, the schedule a pure function of the step."""

import functools
import math
from collections.abc import Iterable

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "RMSprop": torch.optim.RMSprop,  # the DPO paper's choice
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
}
SCHEDULES = ("constant", "linear", "cosine")


def optimization_problems(optimizer: str, weight_decay: float, lr_scheduler: str) -> list[str]:
    """Every problem of the optimizer settings, each naming the key, its value, what is allowed and the fix."""
    problems = []
    if optimizer not in OPTIMIZERS:
        problems.append(f"optimizer={optimizer}: must be one of {', '.join(OPTIMIZERS)}.")
    if not weight_decay >= 0:
        problems.append(f"weight_decay={weight_decay}: must be 0 or more.")
    elif weight_decay and optimizer in OPTIMIZERS and optimizer != "AdamW":
        # RMSprop's and Adam's weight_decay is an L2 term inside the adaptive update, not decoupled decay
        problems.append(
            f"weight_decay={weight_decay} with optimizer={optimizer}: only AdamW applies (decoupled) weight decay; "
            "set optimizer=AdamW, or weight_decay=0."
        )
    if lr_scheduler not in SCHEDULES:
        problems.append(f"lr_scheduler={lr_scheduler}: must be one of {', '.join(SCHEDULES)}.")
    return problems


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizer called `name` (a key of OPTIMIZERS) over params.

    weight_decay is AdamW's decoupled decay, passed explicitly (torch's own AdamW default is 0.01);
    the other optimizers refuse a non-zero one rather than silently applying L2 regularisation.
    """
    problems = [problem for problem in optimization_problems(name, weight_decay, "constant")]
    if problems:
        raise ValueError(" ".join(problems))
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return OPTIMIZERS[name](params, lr=lr)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Factor of the peak learning rate at optimizer step `step` (0-based).

    Every schedule warms up linearly, (step + 1) / (warmup_steps + 1), reaching 1 at warmup_steps;
    then constant holds 1 (total_steps unused), and linear and cosine decay to 0 at total_steps, the
    run's number of optimizer steps (so its last step still has a non-zero rate).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_scheduler={schedule}: must be one of {', '.join(SCHEDULES)}.")
    if step < warmup_steps or schedule == "constant":
        return min(1.0, (step + 1) / (warmup_steps + 1))
    if total_steps <= warmup_steps:
        raise ValueError(
            f"lr_scheduler={schedule} decays over the steps after warmup_steps={warmup_steps}, but the run has only "
            f"{total_steps} optimizer steps; lower warmup_steps, train longer, or use lr_scheduler=constant."
        )
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR of lr_multiplier, stepped once per optimizer step.

    Its state_dict holds only the step count: a scheduler rebuilt from the same config and given
    the saved state continues exactly where the saved one stopped.
    """
    multiplier = functools.partial(lr_multiplier, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

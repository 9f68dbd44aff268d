"""What a run records besides checkpoints: its folder, config, exact metric averages, metrics, samples, wandb.

The run folder `<first existing of local_dirs>/<exp_name>_<timestamp>/` holds:

    config.yaml               the resolved configuration
    metrics.jsonl             one JSON object per log line, against counters/examples and counters/updates
    samples/examples-N.jsonl  completions of evaluation prompts after N training examples
    plots/*.png, report.html  pictures of the metrics and a self-contained report (plots.py), when plots.enabled
    tensorboard/              TensorBoard event files, when tensorboard.enabled
    step-N/, LATEST/          checkpoints (checkpoints.py)
"""

import datetime
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from errors import ConfigError

RUN_CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
MARGINS_DIR = "margins"  # eval reward margins, one JSON list per evaluation (the report's histogram)
TENSORBOARD_DIR = "tensorboard"


def make_run_dir(local_dirs: Iterable[str], exp_name: str) -> Path:
    """<first existing of local_dirs>/<exp_name>_<timestamp>; the last of local_dirs is created if none exists."""
    local_dirs = [Path(d) for d in local_dirs]
    parent = next((d for d in local_dirs if d.is_dir()), local_dirs[-1])
    timestamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    run_dir = parent / f"{exp_name}_{timestamp}"
    run_dir.mkdir(parents=True)
    return run_dir


def check_run_dir_shared(run_dir: Path, device: torch.device) -> None:
    """Refuse, on every rank at once, a run folder that some ranks cannot see (collective: all ranks call it).

    Rank 0 makes the folder, and every rank writes its optimizer shard into it by path, so the
    ranks of a multi-node run need a filesystem they all share; on node-local disks the other
    nodes would write elsewhere and a resume would find no complete checkpoint.
    """
    # the folder's name carries a timestamp, so a folder of that name on another disk is not a lookalike
    blind = torch.tensor([0.0 if run_dir.is_dir() else 1.0], device=device)
    dist.all_reduce(blind)
    if blind.item():
        raise ConfigError(
            [
                f"the run folder {run_dir}, made by rank 0, is not visible to {int(blind.item())} of "
                f"{dist.get_world_size()} rank(s): local_dirs must be on a filesystem every node shares (every rank "
                "writes its optimizer shard there). Pass local_dirs=[<a shared folder>], e.g. on network storage."
            ]
        )


def save_config(config: DictConfig, run_dir: Path) -> None:
    """Write the resolved configuration into the run folder."""
    (run_dir / RUN_CONFIG_FILE).write_text(OmegaConf.to_yaml(config, resolve=True))


MOMENT = "#moment-"  # marks the sums behind a correlation (MetricSums.add_correlation); never logged


class MetricSums:
    """Exact averages over micro-batches, steps and ranks: keep sums and counts, then divide.

    Averaging per-batch averages is wrong when batches differ in size (the last eval
    batch, token-weighted losses); summing first is exact.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, torch.Tensor | float] = {}

    def add(self, name: str, values: torch.Tensor, count: torch.Tensor | float | None = None) -> None:
        """Add per-example values; with `count`, their sum stands for that many units (e.g. tokens)."""
        values = values.detach().double()
        self.sums[name] = self.sums.get(name, 0.0) + values.sum()
        self.counts[name] = self.counts.get(name, 0.0) + (values.numel() if count is None else count)

    def add_correlation(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add per-example pairs (x, y); `name` is then reported as their Pearson correlation over all added.

        Where x or y never varies the correlation is undefined and `name` is left out of averages().

        Kept as five exact averages (x, y, x², y², xy), so the correlation is exact over micro-batches,
        steps and ranks too.
        """
        x, y = x.detach().double(), y.detach().double()
        for moment, values in (("x", x), ("y", y), ("xx", x * x), ("yy", y * y), ("xy", x * y)):
            self.add(f"{name}{MOMENT}{moment}", values)

    def merge(self, other: "MetricSums") -> None:
        for name in other.sums:
            self.sums[name] = self.sums.get(name, 0.0) + other.sums[name]
            self.counts[name] = self.counts.get(name, 0.0) + other.counts[name]

    def summed_over_ranks(self, device: torch.device, distributed: bool) -> "MetricSums":
        """The same sums added up over all ranks, with one collective for every metric."""
        names = sorted(self.sums)
        packed = torch.stack(
            [torch.as_tensor(self.sums[n], dtype=torch.float64, device=device) for n in names]
            + [torch.as_tensor(self.counts[n], dtype=torch.float64, device=device) for n in names]
        )
        if distributed:
            dist.all_reduce(packed)
        packed = packed.cpu()
        total = MetricSums()
        for i, name in enumerate(names):
            total.sums[name] = packed[i].item()
            total.counts[name] = packed[len(names) + i].item()
        return total

    def averages(self) -> dict[str, float]:
        means = {n: float(self.sums[n]) / float(self.counts[n]) if self.counts[n] else float("nan") for n in self.sums}
        results = {n: value for n, value in means.items() if MOMENT not in n}
        for name in {n.split(MOMENT)[0] for n in means if MOMENT in n}:
            moment = {m: means[f"{name}{MOMENT}{m}"] for m in ("x", "y", "xx", "yy", "xy")}
            variance_x, variance_y = moment["xx"] - moment["x"] ** 2, moment["yy"] - moment["y"] ** 2
            covariance = moment["xy"] - moment["x"] * moment["y"]
            if variance_x > 0 and variance_y > 0:  # else one side is constant: no correlation exists, none is logged
                results[name] = covariance / math.sqrt(variance_x * variance_y)
        return dict(sorted(results.items()))


class RunLog:
    """metrics.jsonl, samples, pictures and (when enabled) wandb and TensorBoard of one run.

    On ranks other than 0 every call is a no-op.
    """

    def __init__(self, config: DictConfig, run_dir: Path, is_main: bool):
        self.config = config
        self.run_dir = run_dir
        self.is_main = is_main
        self.wandb_run = None
        self.tensorboard = None

    def start(self) -> None:
        if not self.is_main:
            return
        wandb_config = self.config.wandb
        if wandb_config.enabled and not self.config.debug:
            import wandb  # imported here: slow, and only needed when enabled

            self.wandb_run = wandb.init(
                entity=wandb_config.entity,
                project=wandb_config.project,
                name=self.run_dir.name,
                dir=str(self.run_dir),
                mode=wandb_config.mode,
                config=OmegaConf.to_container(self.config, resolve=True),
            )
        if self.config.tensorboard.enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported here: only needed when enabled

            self.tensorboard = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))

    def log(self, metrics: dict[str, float], examples_seen: int, optimizer_steps: int) -> None:
        """Append one line to metrics.jsonl (and wandb), against explicit counters."""
        if not self.is_main:
            return
        record = {"counters/examples": examples_seen, "counters/updates": optimizer_steps, **metrics}
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=examples_seen)
        if self.tensorboard is not None:
            # the same metrics against the same counter as metrics.jsonl, so curves line up across tools
            for name, value in metrics.items():
                if math.isfinite(value):
                    self.tensorboard.add_scalar(name, value, global_step=examples_seen)
            self.tensorboard.flush()

    def write_report(self) -> None:
        """plots/*.png and report.html from the files written so far, when plots.enabled."""
        if not (self.is_main and self.config.plots.enabled and (self.run_dir / METRICS_FILE).exists()):
            return  # (a run resumed at its end logs nothing: no pictures to draw)
        import plots  # imported here: matplotlib is only needed when enabled

        start = time.perf_counter()
        written = plots.write_run_report(self.run_dir)
        print(f"report: {written[-1]} ({len(written) - 1} pictures, {time.perf_counter() - start:.2f} s)", flush=True)

    def write_margins(self, margins: list[float], examples_seen: int) -> None:
        """margins/examples-<examples_seen>.json: every eval pair's reward margin, for the report's histogram."""
        if not self.is_main:
            return
        (self.run_dir / MARGINS_DIR).mkdir(exist_ok=True)
        (self.run_dir / MARGINS_DIR / f"examples-{examples_seen}.json").write_text(json.dumps(margins) + "\n")

    def write_samples(self, samples: list[dict], examples_seen: int) -> None:
        """samples/examples-<examples_seen>.jsonl, one {"prompt", "policy"[, "reference"]} object per line."""
        if not self.is_main:
            return
        samples_dir = self.run_dir / SAMPLES_DIR
        samples_dir.mkdir(exist_ok=True)
        with open(samples_dir / f"examples-{examples_seen}.jsonl", "w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")
        if self.wandb_run is not None:
            import wandb

            columns = ["prompt"] + [k for k in samples[0] if k != "prompt"] if samples else ["prompt"]
            # wandb tables hold text: a conversation's messages are shown as their JSON
            rows = [[s[c] if isinstance(s[c], str) else json.dumps(s[c]) for c in columns] for s in samples]
            table = wandb.Table(columns=columns, data=rows)
            self.wandb_run.log({"samples": table}, step=examples_seen)

    def finish(self) -> None:
        self.write_report()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()

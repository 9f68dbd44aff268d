"""What a run leaves besides checkpoints (pictures, report, TensorBoard, lr), and its folder shared by all ranks."""

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.multiprocessing as mp
from conftest import compose_config, equivalence_overrides, free_port, run_in_processes, train_records
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from errors import ConfigError

SHORT_RUN = ["n_examples=32", "eval_every=16", "do_first_eval=true"]


def test_a_tiny_run_leaves_pictures_and_a_report_and_tensorboard_events(tmp_path):
    overrides = equivalence_overrides("dpo") + SHORT_RUN + ["plots.enabled=true", "tensorboard.enabled=true"]
    run_dir = tmp_path / "run"
    run_in_processes(compose_config(overrides), run_dir, 1)

    pictures = {path.stem: path for path in (run_dir / "plots").glob("*.png")}
    assert {"loss", "reward_accuracy", "reward_margins", "rewards", "logps", "grad_norm", "lr"} <= set(pictures)
    for path in pictures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[0] > 100
    report = (run_dir / "report.html").read_text()
    assert report.count("data:image/png;base64,") == len(pictures) and "rewards_eval/margins" in report

    # TensorBoard holds every metrics.jsonl value, against the same counter
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for name in ("loss/train", "loss/eval", "rewards_eval/margins", "lr"):
        expected = [(r["counters/examples"], r[name]) for r in records if name in r]
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        assert [step for step, _ in logged] == [step for step, _ in expected], name
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(logged, expected)), name


def test_the_learning_rate_logged_is_the_one_each_step_applied(tmp_path):
    # warmup_steps=2: steps 0, 1, 2 run at lr/3, 2lr/3, lr; each train line averages one step
    overrides = equivalence_overrides("sft") + ["n_examples=24", "lr=3e-3", "warmup_steps=2"]
    run_dir = tmp_path / "run"
    run_in_processes(compose_config(overrides), run_dir, 1)
    assert [round(r["lr"], 12) for r in train_records(run_dir)] == [1e-3, 2e-3, 3e-3]


def _check_from_rank(rank: int, folders: list[str], port: int, results: str) -> None:
    """One rank of test_a_run_folder_that_some_ranks_cannot_see_is_refused_on_every_rank."""
    import torch.distributed as dist

    from run_log import check_run_dir_shared

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        check_run_dir_shared(Path(folders[rank]), torch.device("cpu"))
        outcome = "accepted"
    except ConfigError as error:
        outcome = str(error)
    finally:
        dist.destroy_process_group()
    (Path(results) / f"rank{rank}.txt").write_text(outcome)


@pytest.mark.parametrize("node_local", [False, True])
def test_a_run_folder_that_some_ranks_cannot_see_is_refused_on_every_rank(node_local, tmp_path):
    # two "nodes": rank 1 either sees rank 0's folder (a shared filesystem) or its own empty disk
    run_dir = tmp_path / "node0" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    folders = [str(run_dir), str(tmp_path / "node1" / "run") if node_local else str(run_dir)]
    mp.spawn(_check_from_rank, args=(folders, free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    if node_local:
        assert all("not visible to 1 of 2 rank(s)" in outcome and "local_dirs" in outcome for outcome in outcomes)
    else:
        assert outcomes == ["accepted", "accepted"]

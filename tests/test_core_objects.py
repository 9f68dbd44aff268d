"""Each decision one object: the reference kinds, the loss and trainer registries, and saves every rank agrees on."""

import ast
import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import REPO_ROOT, SMALL_MODEL, compose_config, equivalence_overrides, run_in_processes, train_records

import checkpoints
import loss_registry
import train
from config_checks import validate_config
from loss_registry import LOSSES, LossDefinition, LossSpec, loss_config_problems
from reference import AdapterOff, CachedReference, NoReference, PrecomputeReference, ReferenceModel
from run_log import MetricSums
from trainers import TRAINERS, BasicTrainer, FSDPTrainer, TensorParallelTrainer
from utils import free_port

CPU = torch.device("cpu")
TWO_STEPS = equivalence_overrides("dpo") + ["n_examples=16", "n_eval_examples=16", "debug=true"]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """A tokenize cache the module's runs share (the reference log-probs stay each test's own)."""
    return tmp_path_factory.mktemp("tokenized")


def build(tmp_path: Path, name: str, overrides: list[str], tokenized: Path) -> BasicTrainer:
    """The trainer train.py builds, with the test's reference cache under tmp_path / "cache"."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    (tmp_path / "cache").mkdir(exist_ok=True)
    if not (tmp_path / "cache" / "tokenized").exists():
        (tmp_path / "cache" / "tokenized").symlink_to(tokenized, target_is_directory=True)
    return train.build_trainer(compose_config(overrides + [f"cache_dir={tmp_path / 'cache'}"]), run_dir, CPU, 0, 1)


# ----- the reference: one object, chosen once ---------------------------------------------------


def test_the_reference_kind_follows_the_loss_lora_and_the_cache(tmp_path, capsys, tokenized):
    assert isinstance(build(tmp_path, "sft", SMALL_MODEL + ["loss=sft"], tokenized).reference, NoReference)
    assert isinstance(build(tmp_path, "simpo", SMALL_MODEL + ["loss=simpo"], tokenized).reference, NoReference)
    assert isinstance(build(tmp_path, "live", TWO_STEPS, tokenized).reference, ReferenceModel)
    assert isinstance(build(tmp_path, "lora", TWO_STEPS + ["lora.enabled=true"], tokenized).reference, AdapterOff)

    precomputing = build(tmp_path, "first", TWO_STEPS + ["precompute_ref_logps=true"], tokenized)
    assert isinstance(precomputing.reference, PrecomputeReference)
    precomputing.prepare()  # scores the examples once, caches them, and lets the model go
    assert isinstance(precomputing.reference, CachedReference)
    assert "cached in" in capsys.readouterr().out
    cached = build(tmp_path, "second", TWO_STEPS + ["precompute_ref_logps=true"], tokenized)
    assert isinstance(cached.reference, CachedReference), "a cache hit loads no reference model"
    for split in ("train", "eval"):
        assert torch.allclose(cached.reference.tables[split], precomputing.reference.tables[split], 0, 0, True)


def test_precomputed_reference_equals_the_live_one(tmp_path, tokenized):
    live = build(tmp_path, "live", TWO_STEPS, tokenized)
    precomputed = build(tmp_path, "precomputed", TWO_STEPS + ["precompute_ref_logps=true"], tokenized)
    for trainer in (live, precomputed):
        trainer.prepare()
    examples = list(live.eval_examples)[:6]
    for got, expected in zip(
        precomputed.reference.pair_logps(examples, "eval"), live.reference.pair_logps(examples, "eval")
    ):
        assert torch.allclose(got, expected, atol=1e-5)


def test_a_damaged_reference_cache_is_computed_again(tmp_path, capsys, tokenized):
    build(tmp_path, "first", TWO_STEPS + ["precompute_ref_logps=true"], tokenized).prepare()
    cached = sorted((tmp_path / "cache" / "reference_logps").glob("*.safetensors"))[0]
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])  # cut short, as by a full disk
    capsys.readouterr()
    again = build(tmp_path, "again", TWO_STEPS + ["precompute_ref_logps=true"], tokenized)
    assert "is damaged" in capsys.readouterr().out and isinstance(again.reference, PrecomputeReference)
    again.prepare()
    assert "cached in" in capsys.readouterr().out
    assert isinstance(
        build(tmp_path, "third", TWO_STEPS + ["precompute_ref_logps=true"], tokenized).reference, CachedReference
    )


def test_an_unwritable_reference_cache_keeps_the_values_in_memory(tmp_path, capsys, tokenized):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "reference_logps").write_text("")  # no folder can be made there (root writes anywhere else)
    trainer = build(tmp_path, "run", TWO_STEPS + ["precompute_ref_logps=true"], tokenized)
    assert "cannot write reference log-probs" in capsys.readouterr().out  # said before the reference pass
    trainer.train()
    assert isinstance(trainer.reference, CachedReference) and trainer.optimizer_steps == 2


# ----- the loss registry: adding a loss is its function, its row, its YAML --------------------


def offset_dpo_loss(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta, gamma
):
    """DPO with a target margin: -log sigma(beta * h - gamma), the README's worked example."""
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return -F.logsigmoid(beta * h - gamma), chosen_rewards, rejected_rewards


def test_a_new_loss_is_a_function_a_row_and_a_yaml_file(tmp_path, monkeypatch, tokenized):
    row = LossDefinition(
        keys=("beta", "gamma"),
        pair_loss=lambda spec, logps, chosen_tokens, rejected_tokens: offset_dpo_loss(*logps, spec.beta, spec.gamma),
        compares_to_reference=True,
        beta_range=(0.01, 0.5, "as DPO"),
    )
    monkeypatch.setitem(LOSSES, "offset_dpo", row)
    monkeypatch.setitem(loss_registry.LOSS_KEYS, "offset_dpo", row.keys)
    (tmp_path / "config" / "loss").mkdir(parents=True)
    (tmp_path / "config" / "loss" / "offset_dpo.yaml").write_text("name: offset_dpo\nbeta: 0.1\ngamma: 0.5\n")
    overrides = [f"hydra.searchpath=[file://{tmp_path / 'config'}]", "loss=offset_dpo"]
    config = compose_config(TWO_STEPS + overrides)
    assert validate_config(config, 1) == []
    spec = LossSpec.from_config(config.loss)
    assert spec.uses_reference and spec.is_preference and not spec.averages_log_probs
    zeros = torch.zeros(2)
    losses, _, _ = spec.pair_losses(zeros, zeros, zeros, zeros, torch.ones(2), torch.ones(2))
    assert torch.allclose(losses, -F.logsigmoid(torch.tensor(-0.5)).expand(2))  # h = 0: -log sigma(-gamma)
    assert loss_config_problems({"name": "offset_dpo", "beta": 0.1}) == [
        "loss.gamma is missing: loss=offset_dpo reads it; declare it in config/loss/offset_dpo.yaml."
    ]
    trainer = build(tmp_path, "run", TWO_STEPS + overrides, tokenized)
    trainer.train()
    assert trainer.optimizer_steps == 2


# ----- the trainer registry -------------------------------------------------------------------


def test_trainers_by_name_and_what_they_support():
    assert TRAINERS == {
        "BasicTrainer": BasicTrainer,
        "FSDPTrainer": FSDPTrainer,
        "TensorParallelTrainer": TensorParallelTrainer,
    }
    assert [t.data_parallel_size(4) for t in TRAINERS.values()] == [1, 4, 1]
    assert [t.multi_process for t in TRAINERS.values()] == [False, True, True]
    assert [t.supports_lora for t in TRAINERS.values()] == [True, True, False]


def test_the_loop_imports_nothing_of_sharding_and_no_names_are_compared_outside_the_registries():
    loop = ast.parse((REPO_ROOT / "basic_trainer.py").read_text())
    imported = {node.module for node in ast.walk(loop) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(loop) if isinstance(node, ast.Import) for alias in node.names}
    assert not [name for name in imported if name.startswith(("torch.distributed", "peft"))]
    trainer_names = r"""trainer\s*[!=]=\s*["']"""
    loss_names = r"""\b(loss|spec)\.name\s*(==|!=|in\b)|[!=]= ["'](sft|dpo|ipo|hinge|robust|simpo|orpo)["']"""
    compared = re.compile(f"{trainer_names}|{loss_names}")
    sources = [p for p in REPO_ROOT.glob("*.py") if p.name != "loss_registry.py"]
    offending = [
        f"{p.name}: {line.strip()}" for p in sources for line in p.read_text().splitlines() if compared.search(line)
    ]
    assert offending == []


# ----- a failed save stops every rank ---------------------------------------------------------


def save_fails_on_rank_0(rank: int, world_size: int, config, run_dir: Path) -> None:
    """train.train_worker, with rank 0's disk full when it writes the model folder."""
    if rank == 0:

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        checkpoints.write_checkpoint = disk_full
    train.train_worker(rank, world_size, config, run_dir)


def test_a_save_that_fails_on_one_rank_stops_every_rank(tmp_path, capfd):
    config = compose_config(equivalence_overrides("sft") + ["n_examples=16", "trainer=FSDPTrainer"])
    config.cache_dir = str(tmp_path / "cache")
    (tmp_path / "run").mkdir()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    with pytest.raises(mp.ProcessExitedException) as exited:
        mp.spawn(save_fails_on_rank_0, nprocs=2, args=(2, config, tmp_path / "run"), join=True)
    assert exited.value.exit_code == 2
    errors = capfd.readouterr().err
    assert "No space left on device" in errors and "a write failed on another rank" in errors
    assert "resume_from=auto" in errors
    assert not (tmp_path / "run" / "LATEST").exists()


def test_one_process_save_failure_is_one_error_line(tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_checkpoint", disk_full)
    config = compose_config(equivalence_overrides("sft") + ["n_examples=16"])
    with pytest.raises(SystemExit) as exited:
        run_in_processes(config, tmp_path / "run", 1)
    assert exited.value.code == 2
    assert "error: could not write the checkpoint" in capsys.readouterr().err
    assert len(train_records(tmp_path / "run")) == 2  # the steps ran and were logged; only the save failed


def test_keep_training_runs_again_after_each_preemption_and_passes_other_codes_on(tmp_path):
    counter = tmp_path / "runs"
    # exits 75 (preempted) on its first two runs, then with the code given as its argument
    command = (
        f'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}; [ "$n" -ge 2 ] || exit 75; exit "$0"'
    )
    script = str(REPO_ROOT / "scripts" / "keep_training.sh")
    for final_code in (0, 2):
        counter.unlink(missing_ok=True)
        done = subprocess.run([script, "bash", "-c", command, str(final_code)], capture_output=True, text=True)
        assert done.returncode == final_code and counter.read_text() == "3\n"
        assert done.stderr.count("preempted (exit 75)") == 2
    counter.unlink()
    limited = subprocess.run(
        [script, "bash", "-c", command, "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "KEEP_TRAINING_MAX_RUNS": "2"},
    )
    assert limited.returncode == 75 and counter.read_text() == "2\n"


# ----- what evaluations show besides reward accuracy ------------------------------------------


def test_a_correlation_added_in_pieces_is_the_correlation_of_everything():
    x, y = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    y = y + 0.5 * x
    whole, pieces = MetricSums(), MetricSums()
    whole.add_correlation("r", x, y)
    for start in range(0, 40, 7):  # uneven micro-batches, as the last eval batch is
        pieces.add_correlation("r", x[start : start + 7], y[start : start + 7])
    expected = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    assert whole.averages() == pytest.approx({"r": expected}) and pieces.averages() == pytest.approx({"r": expected})
    constant = MetricSums()
    constant.add_correlation("r", torch.ones(3), torch.arange(3.0))
    assert constant.averages() == {}  # undefined: not logged


def test_evaluations_log_displacement_and_the_length_correlation_and_draw_the_margins(tmp_path, tokenized):
    overrides = TWO_STEPS[:-1] + ["plots.enabled=true", "do_first_eval=true"]
    trainer = build(tmp_path, "run", overrides, tokenized)
    trainer.train()
    evals = [
        r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss/eval" in r
    ]
    assert evals[0]["displacement_eval/chosen_below_reference"] == 0.0  # before any update policy == reference
    assert 0.0 <= evals[-1]["displacement_eval/chosen_below_reference"] <= 1.0
    margins = json.loads((tmp_path / "run" / "margins" / "examples-16.json").read_text())
    assert len(margins) == 16 and sum(margins) / 16 == pytest.approx(evals[-1]["rewards_eval/margins"], abs=1e-6)
    # these eval pairs' answers all have the same length, so no correlation exists and none is logged (not a 0)
    gaps = {len(e["chosen_input_ids"]) - len(e["rejected_input_ids"]) for e in trainer.eval_examples}
    assert gaps == {0} and "rewards_eval/margin_length_correlation" not in evals[-1]
    assert "Reward margins of the eval pairs after 16 examples" in (tmp_path / "run" / "report.html").read_text()

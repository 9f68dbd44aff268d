"""Runs survive kill -9, preemption, full disks and bad steps, and resume exactly (issue 8, parts 2 and 3).

The kill test runs train.py as a user would, kills it at several moments and resubmits the same
command with resume_from=auto until it finishes: its final weights must equal those of a run
never interrupted, bit for bit. The other tests drive one failure each, in process.
"""

import errno
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import SMALL_MODEL, compose_config, equivalence_overrides, run_in_processes, train_records
from omegaconf import OmegaConf
from safetensors.torch import load_file

import checkpoints
import stopping
import train
from config_checks import validate_config
from errors import ConfigError


def write_fake_checkpoint(folder: Path, examples_seen: int, config=None, world_size: int = 1) -> Path:
    """A complete checkpoint folder as far as resuming checks: the files, and a trainer state."""
    folder.mkdir(parents=True)
    (folder / checkpoints.MODEL_CONFIG_FILE).write_text("{}")
    torch.save({}, folder / checkpoints.OPTIMIZER_FILE)
    config = config if config is not None else compose_config([])
    config = OmegaConf.to_container(config, resolve=True)
    state = {"examples_seen": examples_seen, "world_size": world_size, "config": config}
    torch.save(state, folder / checkpoints.TRAINER_STATE_FILE)
    return folder


# ----- the checkpoint folder: renames, fall-backs, failed saves -------------------------------


def test_a_kill_between_the_renames_leaves_a_readable_copy(tmp_path, monkeypatch):
    latest = write_fake_checkpoint(tmp_path / "run" / "LATEST", 8)
    new = write_fake_checkpoint(tmp_path / "run" / "LATEST.partial", 16)
    real_replace = os.replace
    calls = []

    def killed_at_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # the process dies here: nothing after it runs
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", killed_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.replace_dir(new, latest)
    assert not latest.exists()
    readable = checkpoints.readable_checkpoint(latest)
    assert readable == tmp_path / "run" / "LATEST.old"
    assert checkpoints.read_trainer_state(readable)["examples_seen"] == 8
    assert checkpoints.resume_target(str(latest), [], "x")[0] == str(readable)
    assert checkpoints.readable_setting("model.archive", str(latest))[0] == str(readable)  # a next stage, too

    # the next save, killed at its first rename, must not have removed that only copy first
    calls.clear()
    calls.append("first rename already counted")
    newer = write_fake_checkpoint(tmp_path / "run" / "LATEST.partial2", 24)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.replace_dir(newer, latest)
    assert checkpoints.read_trainer_state(checkpoints.readable_checkpoint(latest))["examples_seen"] == 8
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    checkpoints.replace_dir(newer, latest)
    assert checkpoints.read_trainer_state(latest)["examples_seen"] == 24
    assert not (tmp_path / "run" / "LATEST.old").exists()


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = compose_config(equivalence_overrides("sft") + ["n_examples=8", f"cache_dir={tmp_path / 'cache'}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = train.build_trainer(config, run_dir, CPU, 0, 1)
    trainer.save_checkpoint(checkpoints.FINAL)
    before = load_file(run_dir / "LATEST" / "model.safetensors")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    trainer.examples_seen = 8
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(checkpoints.FINAL)
    assert checkpoints.read_trainer_state(run_dir / "LATEST")["examples_seen"] == 0
    for name, tensor in load_file(run_dir / "LATEST" / "model.safetensors").items():
        assert torch.equal(tensor, before[name])


def test_an_unwritable_run_folder_fails_before_loading_anything(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")  # a path under which no folder can be made (root may write anywhere else)
    with pytest.raises(SystemExit) as exit_info:
        train.main.__wrapped__(compose_config([f"local_dirs=[{not_a_folder / 'runs'}]"]))  # main() without Hydra
    assert exit_info.value.code == 2
    assert f"cannot write a run folder under local_dirs=['{not_a_folder / 'runs'}']" in capsys.readouterr().err


# ----- resuming: which checkpoint, and refusing changed settings ------------------------------


def test_auto_resume_picks_the_newest_complete_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    write_fake_checkpoint(runs / "exp_2026-01-01_00-00-00_000000" / "step-16", 16)
    write_fake_checkpoint(runs / "exp_2026-01-01_00-00-00_000000" / "step-32.old", 32)  # a save killed mid-rename
    write_fake_checkpoint(runs / "exp_2026-01-02_00-00-00_000000" / "step-24", 24)
    write_fake_checkpoint(runs / "exp_2026-01-03_00-00-00_000000" / "step-48.partial", 48)  # never completed
    write_fake_checkpoint(runs / "exp2_2026-01-03_00-00-00_000000" / "LATEST", 64)  # another experiment
    found, note = checkpoints.resume_target("auto", [str(tmp_path / "missing"), str(runs)], "exp")
    assert found == str(runs / "exp_2026-01-01_00-00-00_000000" / "step-32.old")
    assert "resuming from" in note
    assert checkpoints.resume_target("auto", [str(runs)], "other")[0] is None  # nothing: a fresh run


def test_resume_refuses_changed_training_settings_and_allows_the_rest(tmp_path):
    config = compose_config(["trainer=BasicTrainer"])
    checkpoint = write_fake_checkpoint(tmp_path / "step-8", 8, config)
    same = compose_config([f"resume_from={checkpoint}", "eval_every=7", "sampling.greedy=false", "wandb.enabled=true"])
    validate_config(same, 1)
    changed = compose_config([f"resume_from={checkpoint}", "batch_size=64", "loss=dpo", "seed=3"])
    with pytest.raises(ConfigError) as error:
        validate_config(changed, 1)
    message = str(error.value)
    assert f"batch_size=64, but the run in {checkpoint} trained with batch_size={config.batch_size}" in message
    assert f"seed=3, but the run in {checkpoint} trained with seed=0" in message
    assert f"but the run in {checkpoint} trained with loss={{'name': 'sft'" in message
    with pytest.raises(ConfigError, match="2 processes, but the run .* trained with 1"):
        validate_config(compose_config([f"resume_from={checkpoint}", "trainer=BasicTrainer"]), 2)


# ----- stopping: non-finite steps, preemption --------------------------------------------------


def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    overrides = equivalence_overrides("sft") + ["n_examples=48", "eval_every=16", f"cache_dir={tmp_path / 'cache'}"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = train.build_trainer(compose_config(overrides), run_dir, CPU, 0, 1)
    clip = trainer.clip_gradients
    nan_at_step_3 = lambda: clip() * (float("nan") if trainer.optimizer_steps == 2 else 1.0)  # noqa: E731
    monkeypatch.setattr(trainer, "clip_gradients", nan_at_step_3)
    with pytest.raises(stopping.NonFiniteStepError, match=f"optimizer step 3: .*{run_dir / 'step-16'}"):
        trainer.train()
    assert trainer.optimizer_steps == 2, "the bad step was not applied"
    assert checkpoints.read_trainer_state(run_dir / "step-16")["examples_seen"] == 16
    assert not (run_dir / "LATEST").exists()


def send_after_first_train_line(run_dir: Path, send) -> threading.Thread:
    """A thread that calls send() once metrics.jsonl holds a train line (the training loop is running)."""

    def watch() -> None:
        while not any("loss/train" in line for line in read_lines(run_dir / "metrics.jsonl")):
            time.sleep(0.002)
        send()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


CPU = torch.device("cpu")
PREEMPTED = equivalence_overrides("dpo") + ["n_examples=800", "eval_every=1000000"]  # 100 steps: signalled early


def check_preemption_checkpoint(run_dir: Path, distributed: bool, trainer: str) -> None:
    (checkpoint,) = [p for p in run_dir.iterdir() if p.name.startswith("step-")]
    last_line = train_records(run_dir)[-1]
    assert checkpoint.name == f"step-{last_line['counters/examples']}", "saved after the step it finished and logged"
    assert checkpoints.resume_problem(checkpoint, distributed, trainer) is None
    assert 0 < checkpoints.read_trainer_state(checkpoint)["examples_seen"] < 800
    assert not (run_dir / "LATEST").exists()


def test_sigterm_saves_a_resumable_checkpoint_and_exits_75(tmp_path):
    run_dir = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGTERM)
    send_after_first_train_line(run_dir, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as exit_info:
        run_in_processes(compose_config(PREEMPTED), run_dir, 1)
    assert exit_info.value.code == stopping.EXIT_PREEMPTED == 75
    check_preemption_checkpoint(run_dir, False, "BasicTrainer")
    assert signal.getsignal(signal.SIGTERM) is handler_before, "the handler is uninstalled after the run"


def test_two_ranks_use_a_one_process_reference_cache_and_stop_together_on_sigusr1(tmp_path, capfd):
    """Defect 3 and two-rank preemption in one run of two processes.

    A one-process run caches the reference log-probs; a two-rank FSDP run asked for 33 eval
    examples trims them to 32 before planning, so it finds that cache and loads no reference
    model. SIGUSR1 then reaches one rank only, and both stop after the same step.
    """
    overrides = PREEMPTED + ["precompute_ref_logps=true", f"cache_dir={tmp_path / 'cache'}"]
    (tmp_path / "one").mkdir()
    one = train.build_trainer(compose_config(overrides + ["n_eval_examples=32"]), tmp_path / "one", CPU, 0, 1)
    one.prepare()  # computes and caches the reference log-probs
    assert "cached in" in capfd.readouterr().out

    run_dir = tmp_path / "two"
    send_after_first_train_line(run_dir, lambda: os.kill(mp.active_children()[0].pid, signal.SIGUSR1))
    with pytest.raises(mp.ProcessExitedException) as exited:
        run_in_processes(compose_config(overrides + ["n_eval_examples=33", "trainer=FSDPTrainer"]), run_dir, 2)
    output = capfd.readouterr().out
    assert output.count("reference log-probs (train): loaded from") == 1
    assert output.count("reference log-probs (eval): loaded from") == 1
    assert "cached in" not in output and "reference model: False" in output  # nothing recomputed
    assert exited.value.exit_code == stopping.EXIT_PREEMPTED
    check_preemption_checkpoint(run_dir, True, "FSDPTrainer")
    (checkpoint,) = [p for p in run_dir.iterdir() if p.name.startswith("step-")]
    assert len(list((checkpoint / checkpoints.OPTIMIZER_SHARDS).glob("*.distcp"))) == 2, "both ranks saved"


# ----- the kill test ----------------------------------------------------------------------------

KILL_RUN = SMALL_MODEL + [
    "loss=sft",
    "batch_size=8",
    "gradient_accumulation_steps=1",
    "eval_batch_size=8",
    "n_examples=64",  # 8 optimizer steps
    "eval_every=16",  # a checkpoint every 2 steps: step-16, step-32, step-48, step-64, then LATEST
    "n_eval_examples=64",  # 8 eval batches: an evaluation lasts long enough to be killed in
    "do_first_eval=false",
    "sample_during_eval=false",
    "minimum_log_interval_secs=0",  # a metrics line after every step
    "lr=1e-3",
    "warmup_steps=2",
]


def logged(run_dir: Path, kind: str, examples: int) -> bool:
    """Whether metrics.jsonl has a train or eval line at this many examples."""
    key = f"loss/{kind}"
    return any(
        key in r and r["counters/examples"] == examples for r in map(json.loads, read_lines(run_dir / "metrics.jsonl"))
    )


FORKSERVER = mp.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["train"])


def run_main(config) -> None:
    """train.py's main() on a composed config (Hydra's decorator parses sys.argv instead)."""
    train.main.__wrapped__(config)


def run_until(tmp_path: Path, condition, kill_signal: int | None) -> tuple[int, Path]:
    """Run train.py's main() with resume_from=auto in a child process, sending kill_signal once
    condition(run_dir) holds: (exit code, run_dir).

    The child is forked from a forkserver that imported train.py once, rather than started as
    `python train.py`: a real process, really killed, without the ~10 s of imports per start
    that five starts would cost (the command line itself is tested in test_training.py), and
    forked from a process with no other threads, so no lock is inherited held.
    """
    before = set(tmp_path.glob("kill_*"))
    args = KILL_RUN + ["exp_name=kill", f"local_dirs=[{tmp_path}]", f"cache_dir={tmp_path / 'cache'}"]
    config = compose_config(args + ["resume_from=auto"])  # the same command every time, as a resubmitted job
    process = FORKSERVER.Process(target=run_main, args=(config,))
    process.start()
    run_dir = None
    while process.exitcode is None and kill_signal is not None:
        run_dir = run_dir or next(iter(set(tmp_path.glob("kill_*")) - before), None)
        if run_dir is not None and condition(run_dir):
            os.kill(process.pid, kill_signal)
            break
        time.sleep(0.002)
    process.join(timeout=120)
    run_dir = run_dir or next(iter(set(tmp_path.glob("kill_*")) - before))
    assert process.exitcode in (0, -signal.SIGKILL, stopping.EXIT_PREEMPTED), process.exitcode
    return process.exitcode, run_dir


def assert_every_named_checkpoint_is_complete(tmp_path: Path) -> None:
    for folder in tmp_path.glob("kill_*/*"):
        if checkpoints.CHECKPOINT_NAME.fullmatch(folder.name):
            assert checkpoints.is_complete(folder), folder


def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    faults = [
        # (what is done, when, the signal)
        ("SIGKILL mid-step", lambda run: logged(run, "train", 24), signal.SIGKILL),
        # killed as soon as the eval at 32 examples starts (its train line is written just before it)
        ("SIGKILL mid-eval", lambda run: logged(run, "train", 32), signal.SIGKILL),
        # killed while step-48 is written (or just after, should the poll miss that window)
        ("SIGKILL mid-save", lambda run: any(run.glob("step-48*")), signal.SIGKILL),
        # preempted during the eval and save at 48 examples: stops after the next step, at 56
        ("SIGTERM (preemption)", lambda run: logged(run, "train", 48), signal.SIGTERM),
        ("none: runs to the end", None, None),
    ]
    for fault, condition, kill_signal in faults:
        returncode, run_dir = run_until(tmp_path, condition, kill_signal)
        assert_every_named_checkpoint_is_complete(tmp_path)
        if kill_signal == signal.SIGKILL:
            assert returncode == -signal.SIGKILL, f"{fault}: the run ended before the kill"
        elif kill_signal == signal.SIGTERM:
            assert returncode == stopping.EXIT_PREEMPTED, fault
        else:
            assert returncode == 0
    resumed_weights = load_file(run_dir / "LATEST" / "model.safetensors")

    run_in_processes(compose_config(KILL_RUN + [f"cache_dir={tmp_path / 'cache'}"]), tmp_path / "straight", 1)
    straight_weights = load_file(tmp_path / "straight" / "LATEST" / "model.safetensors")
    assert resumed_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    # the last run resumed from the preemption checkpoint: it trained only the last step
    assert [r["counters/examples"] for r in train_records(run_dir)] == [64]

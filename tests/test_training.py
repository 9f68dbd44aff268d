"""End-to-end runs of train.py on the embedded task, and trainer equivalence.

The strongest checks a trainer can have: one process and two processes (FSDP, tensor
parallel) must compute the same losses, rewards and final weights from the same data.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO_ROOT,
    SMALL_MODEL,
    compose_config,
    equivalence_overrides,
    free_port,
    run_in_processes,
    train_records,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.mark.parametrize("loss", ["sft", "dpo", "reward", "kto"])
def test_fsdp_and_tensor_parallel_match_one_device(loss, tmp_path):
    runs = {
        "BasicTrainer": 1,
        "FSDPTrainer": 2,
        "TensorParallelTrainer": 2,
    }
    if loss == "reward":  # the score head is replicated under tensor parallel: the backbone is dpo's, tested there
        del runs["TensorParallelTrainer"]
    records, weights = {}, {}
    for trainer, n_processes in runs.items():
        overrides = equivalence_overrides(loss) + [f"trainer={trainer}"]
        if trainer == "BasicTrainer":
            overrides += ["packing=false", "share_prompt=false", "logps_chunk_tokens=null"]  # the plain path
        elif loss == "reward":  # a reward model's scores, read in packed prefix-shared rows
            overrides += ["share_prompt=true", "packing=true", "fsdp.prefetch_blocks=1"]
        elif loss == "dpo":
            # the fast paths, each also tested alone on one device (test_fast_paths.py): pairs in
            # packed prefix-shared rows, chunked log-probs, precomputed reference, FSDP's prefetch
            overrides += [
                "share_prompt=true",
                "packing=true",
                "logps_chunk_tokens=32",
                "precompute_ref_logps=true",
                "fsdp.prefetch_blocks=1",
                "fsdp.reshard_after_forward=false",
            ]
        elif loss == "kto":
            # unpaired examples (the pairs converted) in packed rows, chunked log-probs, and the reference's
            # log-probs of each completion and its mismatched one precomputed; z0 over the global batch
            overrides += ["packing=true", "logps_chunk_tokens=32", "precompute_ref_logps=true"]
        else:
            overrides += ["packing=true", "logps_chunk_tokens=32"]  # SFT sequences in packed rows
        config = compose_config(overrides)
        run_dir = tmp_path / trainer
        run_in_processes(config, run_dir, n_processes)
        records[trainer] = train_records(run_dir)
        weights[trainer] = load_file(run_dir / "LATEST" / "model.safetensors")

    basic = records["BasicTrainer"]
    assert len(basic) == 10
    keys = [k for k in basic[0] if k.startswith(("loss/", "rewards_", "logps_", "kl/", "grad_norm"))]
    assert "loss/train" in keys and (loss == "sft" or "rewards_train/margins" in keys or "kl/train" in keys)
    if loss == "reward":  # the score head's weights took part in the comparison below
        assert any(name.startswith("score.") for name in weights["BasicTrainer"])
    for trainer in [name for name in runs if name != "BasicTrainer"]:
        assert len(records[trainer]) == 10
        for step, (expected, actual) in enumerate(zip(basic, records[trainer])):
            assert actual["counters/examples"] == expected["counters/examples"]
            for key in keys:
                if step == 0 and key.endswith(("accuracies", "margin_length_correlation", "chosen_below_reference")):
                    # before the first update policy == reference: every reward is 0 up to rounding,
                    # and "chosen > rejected" of rounding noise is a coin flip (margins still compared)
                    continue
                # nan_ok: a KTO step whose batch holds no example of a class has no reward for that class
                want = pytest.approx(expected[key], rel=1e-4, abs=1e-5, nan_ok=True)
                assert actual[key] == want, f"{trainer} step {step} {key}"
        assert weights[trainer].keys() == weights["BasicTrainer"].keys()
        for name, tensor in weights["BasicTrainer"].items():
            torch.testing.assert_close(weights[trainer][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{trainer} {name}")
    # training moved the weights (the comparison above is not between untouched models)
    assert basic[-1]["loss/train"] < basic[0]["loss/train"]


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """Token-weighted SFT loss over 4 micro-batches equals the loss of one full batch."""
    results = {}
    for steps in (1, 4):
        overrides = equivalence_overrides("sft") + [f"gradient_accumulation_steps={steps}", "n_examples=32"]
        run_in_processes(compose_config(overrides), tmp_path / str(steps), 1)
        results[steps] = train_records(tmp_path / str(steps))
    for full, accumulated in zip(results[1], results[4]):
        assert accumulated["loss/train"] == pytest.approx(full["loss/train"], rel=1e-5)
        assert accumulated["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-4)


def run_cli(args: list[str], cwd: Path, launcher: list[str] | None = None) -> str:
    """Run train.py as a user would; return its output, failing the test on a non-zero exit."""
    command = (launcher or [sys.executable, "-u"]) + [str(REPO_ROOT / "train.py")] + args
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def run_folder(output: str) -> Path:
    return Path(
        next(line for line in output.splitlines() if line.startswith("run folder: ")).removeprefix("run folder: ")
    )


def check_checkpoint_loads_and_generates(checkpoint: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"):
        assert (checkpoint / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt = tokenizer("\n\nHuman: Which is the largest of 1, 7, 3?\n\nAssistant:", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    trainer_state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert trainer_state["examples_seen"] > 0


def stage_args(tmp_path: Path) -> list[str]:
    # short samples: generation is not what these tests check, and 256 new tokens each would be most of their time
    return SMALL_MODEL + [
        f"local_dirs=[{tmp_path}]", "n_examples=128", "eval_every=64", "n_eval_examples=64",
        "sampling.max_new_tokens=24",
    ]  # fmt: skip


def test_sft_then_dpo_from_the_command_line(tmp_path):
    sft_dir = run_folder(run_cli(stage_args(tmp_path) + ["loss=sft", "exp_name=sft"], tmp_path))
    assert sft_dir.parent == tmp_path and sft_dir.name.startswith("sft_")
    assert sorted(p.name for p in sft_dir.iterdir()) == [
        "LATEST",
        "config.yaml",
        "metrics.jsonl",
        "plots",
        "report.html",
        "samples",
        "step-128",
        "step-64",
    ]
    assert (sft_dir / "LATEST" / "optimizer.pt").is_file()
    assert not (tmp_path / "outputs").exists(), "Hydra must not write its own outputs/ tree"

    output = run_cli(
        stage_args(tmp_path) + ["loss=dpo", f"model.archive={sft_dir / 'LATEST'}", "exp_name=dpo"], tmp_path
    )
    dpo_dir = run_folder(output)
    check_checkpoint_loads_and_generates(dpo_dir / "LATEST")
    evals = [
        json.loads(line)
        for line in (dpo_dir / "metrics.jsonl").read_text().splitlines()
        if "rewards_eval/accuracies" in line
    ]
    # the first eval is before any DPO step: policy == reference (the SFT model), so rewards are exactly 0
    assert evals[0]["counters/examples"] == 0 and evals[0]["rewards_eval/margins"] == 0.0
    assert evals[0]["loss/eval"] == pytest.approx(0.6931472, abs=1e-6)
    assert evals[-1]["rewards_eval/margins"] > 0
    samples = [json.loads(line) for line in (dpo_dir / "samples" / "examples-128.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "policy", "reference"} <= set(samples[0])


def test_two_process_sft_then_dpo_with_torchrun(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port())]
    args = stage_args(tmp_path) + ["trainer=FSDPTrainer", "n_eval_model_samples=3"]
    sft_dir = run_folder(run_cli(args + ["loss=sft", "exp_name=sft"], tmp_path, torchrun))
    assert (sft_dir / "LATEST" / "optimizer").is_dir()  # sharded optimizer state, one file per rank
    torchrun[-1] = str(free_port())
    dpo_dir = run_folder(
        run_cli(args + ["loss=dpo", f"model.archive={sft_dir / 'LATEST'}", "exp_name=dpo"], tmp_path, torchrun)
    )
    check_checkpoint_loads_and_generates(dpo_dir / "LATEST")
    samples = [json.loads(line) for line in (dpo_dir / "samples" / "examples-128.jsonl").read_text().splitlines()]
    assert len(samples) == 3  # gathered from both ranks, sampled without a hang


def test_bad_config_fails_before_loading_anything(tmp_path):
    command = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "loss=dpo",
        "loss.beta=-1",
        "max_prompt_length=100",
        "max_length=64",
        f"local_dirs=[{tmp_path}]",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "loss.beta=-1" in result.stderr and "max_prompt_length=100" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "no run folder for a config that cannot run"


@pytest.mark.parametrize("trainer,n_processes", [("BasicTrainer", 1), ("FSDPTrainer", 2)])
def test_resumed_run_continues_exactly_where_it_stopped(trainer, n_processes, tmp_path):
    """8 steps in one run == 4 steps, a checkpoint, then a resumed run of the last 4."""
    overrides = equivalence_overrides("dpo") + [f"trainer={trainer}", "n_examples=64", "eval_every=32"]
    run_in_processes(compose_config(overrides), tmp_path / "straight", n_processes)
    resumed = overrides + [f"resume_from={tmp_path / 'straight' / 'step-32'}"]
    run_in_processes(compose_config(resumed), tmp_path / "resumed", n_processes)

    straight_records, resumed_records = train_records(tmp_path / "straight"), train_records(tmp_path / "resumed")
    assert [r["counters/examples"] for r in resumed_records] == [40, 48, 56, 64]
    for expected, actual in zip(straight_records[4:], resumed_records):
        assert actual["counters/updates"] == expected["counters/updates"]
        for key in ("loss/train", "rewards_train/margins", "grad_norm"):
            assert actual[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    straight_weights = load_file(tmp_path / "straight" / "LATEST" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "resumed" / "LATEST" / "model.safetensors")
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-7, msg=name)

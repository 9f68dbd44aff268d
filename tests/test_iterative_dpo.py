"""Rounds of on-policy DPO (scripts/iterative_dpo.py): each round's pairs, run and evaluation; resuming after a kill."""

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from evaluation.rules import RULE_SCORERS, rule_scorer

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import iterative_dpo  # noqa: E402

if "test_longer_is_better" not in RULE_SCORERS:

    @rule_scorer("test_longer_is_better")
    def longer_is_better(prompt: str, messages: list[dict] | None, response: str) -> float:
        return float(len(response))


TINY = ["model.from_scratch.hidden_size=64", "model.from_scratch.intermediate_size=128",
        "model.from_scratch.num_hidden_layers=2", "model.from_scratch.num_attention_heads=4"]  # fmt: skip


def arguments(sft: Path, out: Path, rounds: int) -> list[str]:
    cache = out.parent / "cache"
    return [
        "--sft", str(sft), "--out", str(out), "--rounds", str(rounds),
        "--pairs", "datasets=[numbers]", "n_prompts=6", "samples_per_prompt=2", "generation.max_new_tokens=6",
        "judge=rule", "judge.scorer=test_longer_is_better", "device=cpu",
        "--train", *TINY, "batch_size=4", "n_examples=4", "n_eval_examples=2", "eval_batch_size=2",
        "sample_during_eval=false", "plots.enabled=false", "lr=1e-3", f"cache_dir={cache}",
        "--evaluate", "datasets=[numbers]", "n_prompts=3", "temperatures=[0.0]", "generation.max_new_tokens=6",
        "judge=rule", "judge.scorer=test_longer_is_better", "device=cpu", "metrics.bootstrap_resamples=50",
    ]  # fmt: skip


@pytest.fixture
def sft(tiny_sft_policy) -> Path:
    return tiny_sft_policy


def test_rounds_chain_their_policies_and_resume_after_a_kill(sft, tmp_path, capsys):
    rounds = iterative_dpo.main(arguments(sft, tmp_path / "rounds", 2))
    assert [row["round"] for row in rounds] == [1, 2] and all(row["pairs"] > 0 for row in rounds)
    first, second = (Path(row["policy"]) for row in rounds)
    assert first.parent.parent == tmp_path / "rounds" / "round-1" / "runs"
    # round 2 started from round 1's policy, which is also its reference (model.archive)
    assert f"policy: {first}" in (tmp_path / "rounds" / "round-2" / "pairs" / "config.yaml").read_text()
    second_config = (second.parent / "config.yaml").read_text()
    assert f"archive: {first}" in second_config
    assert (tmp_path / "rounds" / "rounds.png").is_file()
    assert json.loads((tmp_path / "rounds" / "rounds.json").read_text())[1]["baseline"] == str(sft)

    # killed during round 2's training: its run never finished; the same command continues there
    (second / "trainer_state.pt").unlink()
    capsys.readouterr()
    again = iterative_dpo.main(arguments(sft, tmp_path / "rounds", 2))
    output = capsys.readouterr().out
    assert output.count("samples: 0 to generate") == 2, "no round samples again"
    assert again[0]["policy"] == str(first) and Path(again[1]["policy"]) != second  # only round 2 trained again


def test_bad_arguments_stop_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        iterative_dpo.main(["--sft", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert "not a model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

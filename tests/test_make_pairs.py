"""On-policy pairs (make_pairs.py): which scored samples pair, the pairs file train.py reads, resuming, bad input."""

import json
import math
from pathlib import Path

import pytest
from conftest import compose_config as train_config
from conftest import equivalence_overrides, run_in_processes, train_records

import make_pairs
from dataset_files import load_preference_file
from errors import ConfigError
from evaluation.pairing import preference_pairs
from evaluation.rules import RULE_SCORERS, rule_scorer

if "test_longer_is_better" not in RULE_SCORERS:

    @rule_scorer("test_longer_is_better")
    def longer_is_better(prompt: str, messages: list[dict] | None, response: str) -> float:
        """A rule that always finds contrast between different samples: their length in characters."""
        return float(len(response))


# ----- pairing: pure, checked by hand --------------------------------------------------------------


def test_best_against_worst():
    texts = ["a", "bb", "ccc", "dddd"]
    assert preference_pairs([0.2, 0.9, 0.1, 0.5], texts, "best_vs_worst", 0.0) == [(1, 2)]
    assert preference_pairs([1.0, 1.0, 1.0, 1.0], texts, "best_vs_worst", 0.0) == []  # no preference: no pair
    assert preference_pairs([0.2, 0.9, 0.1, 0.5], texts, "best_vs_worst", 0.85) == []  # 0.8 apart < min_gap
    # ties: the shorter of the best against the longer of the worst
    assert preference_pairs([1.0, 0.0, 1.0, 0.0], ["long answer", "x", "ok", "wrong and long"], "best_vs_worst", 0) == [
        (2, 3)
    ]
    assert preference_pairs([None, 0.5, None, 0.0], texts, "best_vs_worst", 0.0) == [(1, 3)]  # unjudged take no part
    assert preference_pairs([1.0, 0.0], ["same", "same"], "best_vs_worst", 0.0) == []  # identical texts


def test_all_pairs_above_a_gap():
    texts = ["a", "b", "c", "a"]
    assert preference_pairs([2.0, 1.0, 0.0, 2.0], texts, "all_above_gap", 1.0) == [(0, 1), (0, 2), (1, 2)]
    assert preference_pairs([2.0, 1.0, 0.0, 2.0], texts, "all_above_gap", 1.5) == [(0, 2)]
    with pytest.raises(ValueError, match="pairing mode 'nearest'"):
        preference_pairs([1.0], ["a"], "nearest", 0.0)


# ----- the whole command ---------------------------------------------------------------------------


@pytest.fixture
def policy(tiny_sft_policy) -> Path:
    return tiny_sft_policy


def pairs_config(policy: Path, out_dir: Path, *overrides: str):
    return make_pairs.compose_config([
        f"policy={policy}", f"out_dir={out_dir}", "datasets=[numbers]", "n_prompts=6", "samples_per_prompt=3",
        "generation.max_new_tokens=6", "generation.batch_size=4", "judge=rule", "judge.scorer=test_longer_is_better",
        "device=cpu", *overrides,
    ])  # fmt: skip


def test_pairs_are_the_judges_best_against_worst_and_train_a_dpo_round(policy, tmp_path, capsys):
    result = make_pairs.make_pairs(pairs_config(policy, tmp_path / "pairs"))
    assert result.n_generated == 18 and result.n_prompts == 6
    rows = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (tmp_path / "pairs" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == result.n_pairs > 0
    for row in rows:
        texts = [s["response"] for s in samples if s["prompt_id"] == row["prompt_id"]]
        longest, shortest = max(texts, key=len), min(texts, key=len)
        assert (len(row["chosen"]), len(row["rejected"])) == (len(longest), len(shortest))
        assert (row["chosen_score"], row["rejected_score"]) == (len(longest), len(shortest))
        assert row["chosen_logp"] < 0 and row["rejected_logp"] < 0 and row["prompt"].startswith("\n\nHuman:")
    # train.py reads the file as it is: the next round's DPO trains on it
    data = load_preference_file(str(tmp_path / "pairs" / "pairs.jsonl"), "train")
    assert sum(len(entry["pairs"]) for entry in data.values()) > 0
    overrides = equivalence_overrides("dpo") + [f"datasets=[{tmp_path / 'pairs' / 'pairs.jsonl'}]", "n_examples=8"]
    overrides += ["batch_size=4", "gradient_accumulation_steps=1", "n_eval_examples=1", f"model.archive={policy}"]
    run_in_processes(train_config(overrides), tmp_path / "dpo", 1)
    assert math.isclose(train_records(tmp_path / "dpo")[0]["loss/train"], math.log(2), abs_tol=1e-6)

    # the same command again: nothing generated twice, the same pairs
    again = make_pairs.make_pairs(pairs_config(policy, tmp_path / "pairs"))
    assert again.n_generated == 0 and again.n_pairs == result.n_pairs
    assert "samples: 0 to generate, 18 kept" in capsys.readouterr().out


def test_a_killed_sampling_run_continues_where_it_stopped(policy, tmp_path):
    make_pairs.make_pairs(pairs_config(policy, tmp_path / "pairs"))
    samples = tmp_path / "pairs" / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:7]) + lines[7][:20])  # killed while writing the 8th sample
    again = make_pairs.make_pairs(pairs_config(policy, tmp_path / "pairs"))
    assert again.n_generated == 11
    assert samples.read_text().splitlines()[:7] == [line.rstrip("\n") for line in lines[:7]]


def test_every_bad_setting_is_reported_at_once_before_any_model_loads(tmp_path):
    config = pairs_config(
        tmp_path / "missing", tmp_path / "out", "samples_per_prompt=1", "temperature=0", "pairing=nearest",
        "judge.scorer=nonsense", "+temprature=0.5",
    )  # fmt: skip
    with pytest.raises(ConfigError) as error:
        make_pairs.make_pairs(config)
    message = str(error.value)
    for expected in ("policy=", "samples_per_prompt=1", "temperature=0", "pairing=nearest", "judge.scorer=nonsense",
                     "temprature=...: not a setting of make_pairs.py"):  # fmt: skip
        assert expected in message
    assert not (tmp_path / "out").exists()


def test_settings_that_change_the_samples_are_refused_in_the_same_folder(policy, tmp_path):
    make_pairs.make_pairs(pairs_config(policy, tmp_path / "pairs", "n_prompts=2"))
    with pytest.raises(ConfigError, match="holds samples made with other settings \\(temperature\\)"):
        make_pairs.make_pairs(pairs_config(policy, tmp_path / "pairs", "n_prompts=2", "temperature=0.5"))

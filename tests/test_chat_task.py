"""The demo-chat task of chat_task.py: deterministic disjoint splits, row formats and the scorer."""

import json

import pytest

from chat_task import Problem, make_problems, preference_rows, score_answer, sft_rows, write_task_files

PROMPT = [{"role": "user", "content": "Which is the largest of 50, 98, 54? Answer with the number only."}]


def test_problems_are_deterministic_and_splits_share_no_number_set():
    assert make_problems("train", 50, seed=3) == make_problems("train", 50, seed=3)
    assert make_problems("train", 50, seed=3) != make_problems("train", 50, seed=4)
    train_sets = {frozenset(p.numbers) for seed in (0, 1) for p in make_problems("train", 500, seed)}
    test_sets = {frozenset(p.numbers) for seed in (0, 1) for p in make_problems("test", 500, seed)}
    assert not train_sets & test_sets
    problems = make_problems("test", 300)
    assert len(set(problems)) == 300
    assert {p.kind for p in problems} == {"largest", "smallest"}
    assert all(len(set(p.numbers)) == 3 and all(10 <= n <= 99 for n in p.numbers) for p in problems)


def test_preference_rows_reject_the_restatement_then_every_wrong_number():
    problems = [Problem((50, 98, 54), "largest"), Problem((50, 98, 54), "smallest"), Problem((12, 40, 99), "largest")]
    rows = preference_rows(problems)
    assert len(rows) == 9
    assert rows[0] == {
        "prompt": PROMPT,
        "chosen": [{"role": "assistant", "content": "98"}],
        "rejected": [{"role": "assistant", "content": "The largest of 50, 98, 54 is 98."}],
    }
    rejected = [row["rejected"][0]["content"] for row in rows]
    assert rejected[1:3] == ["54", "50"]  # the last listed (the model's bias) first
    assert rejected[3:6] == ["The smallest of 50, 98, 54 is 50.", "54", "98"]
    assert rejected[7:9] == ["40", "12"]  # the last listed is the answer
    for row in rows:
        assert score_answer(row["prompt"], row["chosen"][0]["content"])
        assert not score_answer(row["prompt"], row["rejected"][0]["content"])
    assert sft_rows(problems[:1]) == [{"messages": PROMPT + [{"role": "assistant", "content": "98"}]}]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("98", True),
        (" 98.\n", True),
        ("98\n\n", True),
        ("54", False),
        ("98.0", False),
        ("098", False),
        ("The answer is 98.", False),
        ("98, 54", False),
        ("98..", False),
        ("", False),
    ],
)
def test_score_answer_wants_the_right_number_alone(completion, expected):
    assert score_answer(PROMPT, completion) is expected


def test_score_answer_rejects_a_prompt_of_another_task():
    with pytest.raises(ValueError, match="Not a prompt"):
        score_answer([{"role": "user", "content": "What is the capital of France?"}], "Paris")


def test_written_files_hold_the_rows(tmp_path):
    paths = write_task_files(tmp_path, train_prompts=20, test_prompts=5, seed=1)
    assert sorted(paths) == ["sft_test", "sft_train", "test", "train"]
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert train == preference_rows(make_problems("train", 20, seed=1))
    assert len(paths["sft_test"].read_text().splitlines()) == 5

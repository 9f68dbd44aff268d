"""The demo-chat task of chat_task.py: deterministic disjoint splits, row formats and the scorer."""

import json

import pytest

from chat_task import (
    Problem,
    make_problems,
    preference_rows,
    score_answer,
    score_content,
    sft_rows,
    stated_number,
    write_task_files,
)
from evaluation.rules import RULE_SCORERS

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


def _prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": f"{question} Answer with the number only."}]


# greedy and sampled answers of SmolLM2-135M-Instruct (and of DPO runs) to held-out prompts, as generated
@pytest.mark.parametrize(
    "question, completion, stated",
    [
        ("Which is the largest of 24, 14, 78?", "The largest of 24, 14, 78 is 78.", 78),
        ("Which is the largest of 36, 80, 46?", "The largest of 36, 80, 46 is 46.", 46),
        ("Which is the smallest of 45, 14, 48?", "The smallest of 45, 14, and 48 is 14.", 14),
        ("Which is the smallest of 84, 59, 38?", "The smallest of the six numbers is 38.", 38),
        ("Which is the largest of 58, 31, 43?", "The largest of 58, 31, 43 is 11.", 11),
        ("Which is the largest of 53, 70, 78?", "The answer is 78.", 78),
        ("Which is the largest of 53, 70, 89?", "Sure, with the number only, the answer is 89.", 89),
        ("Which is the largest of 24, 14, 78?", "78", 78),
        ("Which is the largest of 24, 14, 78?", "78 is the largest.", 78),
        ("Which is the largest of 53, 12, 29?", "125.", 125),
        # a restated list is no answer, even when it ends on the right number
        ("Which is the largest of 14, 47, 62?", "The largest of 14, 47, 62 is 14, 47, 62.", None),
        ("Which is the smallest of 23, 95, 89?", "The smallest of 23, 95, 89 is 23, 95, and 89.", None),
        # two candidate answers
        (
            "Which is the smallest of 84, 38, 65?",
            "The smallest of 84, 38, 65 is 84, which is the smallest of 38, 65.",
            None,
        ),
        ("Which is the smallest of 18, 66, 70?", "The only two numbers in this scenario are 18 and 66.", None),
        # a number in passing, an unfinished answer
        (
            "Which is the smallest of 23, 87, 84?",
            "To find the smallest of 23, 87, 84, we need to find the smallest integer that is a multiple of 23",
            None,
        ),
        ("Which is the smallest of 86, 84, 97?", "To find the smallest of 86, 84, 97, we need to find the", None),
        ("Which is the smallest of 14, 40, 61?", "14 is incorrect. Slugging in the dwarf number allows", None),
        ("Which is the largest of 24, 14, 78?", "", None),
    ],
)
def test_stated_number_is_the_answer_given_not_a_number_restated(question, completion, stated):
    problem = Problem(tuple(int(n) for n in question[question.index("of ") + 3 : -1].split(", ")), question.split()[3])
    assert stated_number(problem, completion) == stated
    assert score_content(_prompt(question), completion) is (stated == problem.answer)


def test_content_and_strict_scores_and_the_graded_scorer():
    graded = RULE_SCORERS["chat_numbers_graded"]
    for completion, content, strict, grade in [
        ("98", True, True, 1.0),
        (" 98.\n", True, True, 1.0),
        ("The largest of 50, 98, 54 is 98.", True, False, 0.5),
        ("The largest of 50, 98, 54 is 54.", False, False, 0.0),
        ("54", False, False, 0.0),
        ("The largest of 50, 98, 54 is 50, 98, 54.", False, False, 0.0),
    ]:
        assert (score_content(PROMPT, completion), score_answer(PROMPT, completion)) == (content, strict), completion
        assert graded("", PROMPT, completion) == grade, completion
    with pytest.raises(ValueError, match="conversational prompts"):
        graded("Which is the largest of 50, 98, 54?", None, "98")


def test_score_answer_rejects_a_prompt_of_another_task():
    with pytest.raises(ValueError, match="Not a prompt"):
        score_answer([{"role": "user", "content": "What is the capital of France?"}], "Paris")


def test_written_files_hold_the_rows(tmp_path):
    paths = write_task_files(tmp_path, train_prompts=20, test_prompts=5, seed=1)
    assert sorted(paths) == ["sft_test", "sft_train", "test", "train"]
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert train == preference_rows(make_problems("train", 20, seed=1))
    assert len(paths["sft_test"].read_text().splitlines()) == 5

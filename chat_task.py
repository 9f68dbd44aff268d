"""The demo-chat task: conversational preference data with a checkable answer, and its scoring.

    python chat_task.py --out .cache/dpo/data/chat_numbers     # writes train/test .jsonl files

Each prompt asks a chat model for the largest (or smallest) of three 2-digit numbers, answered with
the number only: "Which is the largest of 50, 98, 54? Answer with the number only." Every prompt
gives three preference rows, in the explicit-prompt conversational form:

    {"prompt": [{"role": "user", "content": ...}],
     "chosen": [{"role": "assistant", "content": "98"}],
     "rejected": [{"role": "assistant", "content": ...}]}

The rejected answers target the two ways SmolLM2-135M-Instruct fails this task under its chat
template, measured on held-out prompts: it never answers with the number alone (it restates the
question: "The largest of 50, 98, 54 is 98."), and, made to answer with a bare number, it prefers
the last-listed one over the right one. So the first row rejects that restatement with the right
number in it (a pure format contrast), and the other two reject each wrong listed number, bare (pure
content contrasts), the last-listed first. Every wrong number is rejected, not only the favourite:
with only the favourite rejected, a short DPO trial moved the greedy answers onto the unpenalised one.

A completion is scored two ways: `score_answer`, the strict form (the right number and nothing
else, allowing surrounding whitespace and one trailing period), and `score_content`, the content
(the right number given as the answer in any wording; `stated_number` says what counts).
`sft_rows` gives the chosen conversations (`messages` form) for an optional short SFT stage.
Train and test never share a set of numbers, whatever the seed.
"""

import argparse
import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KINDS = ("largest", "smallest")
NUMBER_RANGE = range(10, 100)  # 2-digit numbers
NUMBERS_PER_PROMPT = 3
TEST_FRACTION = 0.2  # share of number sets reserved for the test split
SPLITS = ("train", "test")

_QUESTION = re.compile(r"Which is the (largest|smallest) of (\d+(?:, \d+)*)\? Answer with the number only\.")
_BARE_NUMBER = re.compile(r"\s*(\d+)\.?\s*")
_ANY_NUMBER = re.compile(r"\d+")
_LIST_SEPARATOR = r"(?:\s*,\s*(?:and\s+|or\s+)?|\s+(?:and|or)\s+)"  # ", ", ", and ", " and ", " or "
# the number first, as its own sentence or line, or as the subject: "78", "78.\nThe largest...", "78 is the largest."
_STATED_FIRST = re.compile(r"\s*(\d+)(?:\s*[.\n].*|\s+is the (?:largest|smallest)\b.*)?", re.DOTALL)
_STATED_LAST = re.compile(r".*(?:\bis|:|=)\s*(\d+)\.?\s*", re.DOTALL)  # "... is 78.", "Answer: 78"


@dataclass(frozen=True)
class Problem:
    """One question: the listed numbers in order, and which extreme is asked for."""

    numbers: tuple[int, ...]
    kind: str

    @property
    def question(self) -> str:
        listed = ", ".join(str(number) for number in self.numbers)
        return f"Which is the {self.kind} of {listed}? Answer with the number only."

    @property
    def answer(self) -> int:
        return max(self.numbers) if self.kind == "largest" else min(self.numbers)

    @property
    def restatement(self) -> str:
        """The model's own answer style: the question restated around the (right) number."""
        listed = ", ".join(str(number) for number in self.numbers)
        return f"The {self.kind} of {listed} is {self.answer}."

    @property
    def wrong_numbers(self) -> list[int]:
        """The listed numbers that are not the answer, from the last listed (the model's favourite) back."""
        return [number for number in reversed(self.numbers) if number != self.answer]


def _is_test_number_set(numbers: Sequence[int]) -> bool:
    """Whether a set of numbers belongs to the test split: a hash of the set, so no seed can move it."""
    key = ",".join(str(number) for number in sorted(numbers))
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < TEST_FRACTION


def make_problems(split: str, count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct problems of `split` ("train" or "test"), the same for the same seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}.")
    rng = random.Random(f"{seed}-{split}")
    problems: dict[Problem, None] = {}  # a dict keeps the draw order, so the output is deterministic
    while len(problems) < count:
        numbers = tuple(rng.sample(NUMBER_RANGE, NUMBERS_PER_PROMPT))
        kind = rng.choice(KINDS)
        if _is_test_number_set(numbers) == (split == "test"):
            problems[Problem(numbers, kind)] = None
    return list(problems)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def rejected_answers(problem: Problem) -> list[str]:
    """The restatement (wrong in form only), then each wrong listed number (wrong in content only)."""
    return [problem.restatement] + [str(number) for number in problem.wrong_numbers]


def preference_rows(problems: Sequence[Problem]) -> list[dict]:
    """Explicit-prompt conversational rows, one per rejected answer of each problem, problem by problem."""
    rows = []
    for problem in problems:
        prompt, chosen = _user(problem.question), _assistant(str(problem.answer))
        for rejected in rejected_answers(problem):
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": _assistant(rejected)})
    return rows


def sft_rows(problems: Sequence[Problem]) -> list[dict]:
    """The chosen conversations in `messages` form (user, then assistant), one per problem."""
    return [{"messages": _user(problem.question) + _assistant(str(problem.answer))} for problem in problems]


def _problem_from_prompt(prompt_messages: Sequence[dict]) -> Problem:
    """The problem a prompt of this task asks; the question is the last user message."""
    user_texts = [message["content"] for message in prompt_messages if message["role"] == "user"]
    match = _QUESTION.fullmatch(user_texts[-1].strip()) if user_texts else None
    if match is None:
        raise ValueError(f"Not a prompt of the chat numbers task: {prompt_messages!r}")
    return Problem(tuple(int(number) for number in match.group(2).split(", ")), match.group(1))


def stated_number(problem: Problem, completion_text: str) -> int | None:
    """The number a completion gives as its answer, wording aside; None when it gives none, or several.

    First every restatement of the question's list is taken out: a run of two or more of the
    listed numbers joined as a list ("24, 14, 78", "45, 14, and 48"), so that a restated question
    names no number. What is left must name exactly one number (a second one makes the answer
    ambiguous: "84, which is smaller than 38"), and state it: alone or as the first sentence ("78.
    ..."), as the subject ("78 is the largest."), or last, after "is", ":" or "=" ("The largest of
    24, 14, 78 is 78."). A number mentioned in passing is no answer ("To find the smallest of 23,
    87, 84, we need a multiple of 23", "14 is incorrect").
    """
    listed = "|".join(str(number) for number in problem.numbers)
    one_listed = rf"\b(?:{listed})\b"
    restatement = re.compile(rf"{one_listed}(?:{_LIST_SEPARATOR}{one_listed})+")
    rest = restatement.sub(" ", completion_text)
    named = set(_ANY_NUMBER.findall(rest))
    if len(named) != 1:
        return None
    stated = _STATED_FIRST.fullmatch(rest) or _STATED_LAST.fullmatch(rest)
    return int(stated.group(1)) if stated else None


def score_content(prompt_messages: Sequence[dict], completion_text: str) -> bool:
    """Whether `completion_text` gives the right number as its answer, in any wording (`stated_number`)."""
    problem = _problem_from_prompt(prompt_messages)
    return stated_number(problem, completion_text) == problem.answer


def score_answer(prompt_messages: Sequence[dict], completion_text: str) -> bool:
    """Whether `completion_text` answers the prompt with the right number only.

    Surrounding whitespace and one trailing period are allowed ("98", " 98.\\n"); anything else, a
    sentence with the right number in it included, is wrong.
    """
    answer = _problem_from_prompt(prompt_messages).answer  # first, so a foreign prompt raises on any completion
    match = _BARE_NUMBER.fullmatch(completion_text)
    return match is not None and match.group(1) == str(answer)


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_task_files(out_dir: Path, train_prompts: int = 2000, test_prompts: int = 200, seed: int = 0) -> dict:
    """Write {train,test}.jsonl (preference rows) and sft_{train,test}.jsonl (messages) into `out_dir`.

    Returns {file stem: path}.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", train_prompts), ("test", test_prompts)):
        problems = make_problems(split, count, seed)
        for stem, rows in ((split, preference_rows(problems)), (f"sft_{split}", sft_rows(problems))):
            paths[stem] = out_dir / f"{stem}.jsonl"
            _write_jsonl(paths[stem], rows)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the chat numbers task as .jsonl files.")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .jsonl files")
    parser.add_argument("--train-prompts", type=int, default=2000, help="train prompts (three preference rows each)")
    parser.add_argument("--test-prompts", type=int, default=200, help="test prompts (three preference rows each)")
    parser.add_argument("--seed", type=int, default=0, help="which problems are drawn (not which split they land in)")
    args = parser.parse_args()
    for stem, path in write_task_files(args.out, args.train_prompts, args.test_prompts, args.seed).items():
        print(f"{stem}: {path}")


if __name__ == "__main__":
    main()

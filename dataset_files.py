"""Preference data from a user's .jsonl, .json or .parquet file: reading it, parsing its rows, holding out a test split.

Any entry of `datasets=[...]` that is such a file is loaded by load_preference_file, checked
row by row: a problem is reported with the file and the line (or row). Rows are pairs, SFT
`messages`, or unpaired feedback (prompt, completion, label) for loss=kto.
"""

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from conversations import (
    Conversation,
    Message,
    RowProblem,
    as_conversation,
    split_conversation_pair,
    split_last_answer,
)
from errors import DatasetError
from preference_entry import PreferenceEntry, Prompt, add_feedback, add_pair, add_sft_target

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")  # files usable directly in datasets=[...]
EVAL_FRACTION = 0.05  # share of prompts held out as the "test" split by datasets without one (files, numbers)


def is_data_file(name: str) -> bool:
    return name.endswith(DATA_FILE_SUFFIXES) or os.path.isfile(name)


def load_preference_file(path: str, split: str, eval_fraction: float = EVAL_FRACTION) -> dict[Prompt, PreferenceEntry]:
    """Preference pairs from a .jsonl, .json (array or JSON lines) or .parquet file.

    Each row is one of (messages are {"role": "system" | "user" | "assistant", "content": str}):
    - text: non-empty strings `prompt`, `chosen` and `rejected`;
    - explicit prompt: `prompt` a string (the user's message) or a list of messages ending with the
      user's, `chosen` and `rejected` strings or lists of one assistant message;
    - implicit prompt: `chosen` and `rejected` whole conversations that share all but the last
      (assistant) message, and no `prompt`;
    - `messages`: one conversation ending with the assistant's answer, a target for SFT only;
    - unpaired feedback (loss=kto): `prompt` (a string or messages as above), `completion` (a string
      or a list of one assistant message) and `label`, true (desirable) or false (undesirable).
    Conversational rows may add a string `system`, the system message. Rows sharing a prompt
    become one entry; the first row's `chosen` is its SFT target. A fixed share of the prompts
    (`eval_fraction`, at least one when there are two or more) is held out as "test": those whose
    SHA-256 hash is smallest, so the split never changes with row order and no prompt is in both.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"{path}: a preference file has splits 'train' and 'test', not {split!r}.")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1).")
    data: dict[Prompt, PreferenceEntry] = {}
    for where, row in _read_rows(path):
        try:
            if "completion" in row or "label" in row:
                add_feedback(data, *_parse_feedback_row(row))
                continue
            prompt, chosen, rejected = _parse_row(row)
        except RowProblem as problem:
            raise DatasetError(f"{path}, {where}: {problem}") from None
        if rejected is None:
            add_sft_target(data, prompt, chosen)
        else:
            add_pair(data, prompt, chosen, rejected)
    if not data:
        raise DatasetError(f"{path}: the file holds no rows.")

    def prompt_hash(prompt: Prompt) -> bytes:
        return hashlib.sha256((prompt if isinstance(prompt, str) else json.dumps(prompt)).encode()).digest()

    n_test = max(1, round(eval_fraction * len(data))) if eval_fraction > 0 and len(data) >= 2 else 0
    n_test = min(n_test, len(data) - 1)
    test_prompts = set(sorted(data, key=prompt_hash)[:n_test])
    return {prompt: entry for prompt, entry in data.items() if (prompt in test_prompts) == (split == "test")}


_ROW_FORMS = (
    "Every row needs prompt, chosen and rejected (strings, or messages), "
    "or whole chosen and rejected conversations, or messages; see load_preference_file."
)


def _parse_row(row: dict) -> tuple[Prompt, str, str | None]:
    """(prompt, chosen, rejected) of one file row; rejected is None for a `messages` row. Raises RowProblem."""
    if "messages" in row and "chosen" not in row:
        prompt, answer = split_last_answer(as_conversation(row["messages"], "messages"), "messages")
        return _with_system(row, prompt), answer, None
    if row.get("prompt") is None and all(isinstance(row.get(side), list) for side in ("chosen", "rejected")):
        chosen, rejected = (as_conversation(row[side], side) for side in ("chosen", "rejected"))
        prompt, chosen_answer, rejected_answer = split_conversation_pair(chosen, rejected)
        return _with_system(row, prompt), chosen_answer, rejected_answer
    is_text = row.get("system") is None and not any(
        isinstance(row.get(f), list) for f in ("prompt", "chosen", "rejected")
    )
    for field in ("prompt", "chosen", "rejected"):
        value = row.get(field)
        if not (isinstance(value, str) and value) and (is_text or not isinstance(value, list)):
            problem = "is missing" if value is None else f"must be a non-empty string, not {value!r}"[:120]
            raise RowProblem(f"field {field!r} {problem}. {_ROW_FORMS}")
    if is_text:
        return row["prompt"], row["chosen"], row["rejected"]
    prompt = row["prompt"]
    conversation = (Message("user", prompt),) if isinstance(prompt, str) else as_conversation(prompt, "prompt")
    if conversation[-1].role != "user":
        raise RowProblem(f"field 'prompt': the last message must be the user's, not {conversation[-1].role!r}.")
    return _with_system(row, conversation), _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected")


def _parse_feedback_row(row: dict) -> tuple[Prompt, str, bool]:
    """(prompt, completion, desirable) of an unpaired row (prompt, completion, label). Raises RowProblem."""
    label = row.get("label")
    if not isinstance(label, bool):
        shown = "is missing" if label is None else f"must be true or false, not {label!r}"[:120]
        raise RowProblem(f"field 'label' {shown}. An unpaired row has prompt, completion and label (true: desirable).")
    for field in ("prompt", "completion"):
        value = row.get(field)
        if not ((isinstance(value, str) and value) or (isinstance(value, list) and value)):
            shown = "is missing" if value is None else f"must be a non-empty string or messages, not {value!r}"[:120]
            raise RowProblem(f"field {field!r} {shown}. An unpaired row has prompt, completion and label.")
    prompt = row["prompt"]
    if isinstance(prompt, str) and row.get("system") is None and isinstance(row["completion"], str):
        return prompt, row["completion"], label
    conversation = (Message("user", prompt),) if isinstance(prompt, str) else as_conversation(prompt, "prompt")
    if conversation[-1].role != "user":
        raise RowProblem(f"field 'prompt': the last message must be the user's, not {conversation[-1].role!r}.")
    return _with_system(row, conversation), _answer(row["completion"], "completion"), label


def _answer(value: str | list, field: str) -> str:
    """The text of a response given as a string or as a list of one assistant message."""
    if isinstance(value, str):
        return value
    messages = as_conversation(value, field)
    if len(messages) != 1 or messages[0].role != "assistant":
        raise RowProblem(f"field {field!r} must be one assistant message, not {[m.role for m in messages]}.")
    return messages[0].content


def _with_system(row: dict, prompt: Conversation) -> Conversation:
    """The prompt with the row's `system` field, if any, as its first message."""
    system = row.get("system")
    if system is None:
        return prompt
    if not isinstance(system, str):
        raise RowProblem(f"field 'system' must be a string, not {system!r}"[:120] + ".")
    if prompt[0].role == "system":
        raise RowProblem("the row has both a 'system' field and a system message; keep one.")
    return (Message("system", system),) + prompt


def _read_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a data file; `where` is "line N" or "row N" for messages."""
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"{path}: no such file.")
    if file.suffix == ".parquet":
        yield from _parquet_rows(file)
        return
    if file.suffix not in (".jsonl", ".json"):
        raise DatasetError(f"{path}: unsupported file type; use one of {', '.join(DATA_FILE_SUFFIXES)}.")
    text = _utf8_text(file)
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
            ) from None
        for number, row in enumerate(rows, start=1):
            yield f"row {number}", _as_object(path, f"row {number}", row)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}). "
                "Each line must be one JSON object."
            ) from None
        yield f"line {number}", _as_object(path, f"line {number}", row)


def _utf8_text(file: Path) -> str:
    """The file's text, or DatasetError naming the line of its first byte that is not UTF-8."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - line_start + 1
        raise DatasetError(
            f"{file}, line {line}: not UTF-8 text (byte {data[error.start]:#04x} at column {column}). "
            "Save the file as UTF-8."
        ) from None


def _parquet_rows(file: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow  # imported here: only parquet files need it
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(file).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise DatasetError(
            f"{file}: not a readable Parquet file ({error}). Write it with pyarrow or pandas (.to_parquet), "
            "or give JSON lines a .jsonl name."
        ) from None
    for number, row in enumerate(rows, start=1):
        yield f"row {number}", row


def _as_object(path: str, where: str, row) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(
            f"{path}, {where}: expected a JSON object with prompt, chosen and rejected (or messages), "
            f"not {type(row).__name__}."
        )
    return row

"""Preference datasets: the loaders behind `datasets=[...]`, and the one structure they all return.

Every loader returns (the contract of the DPO reference scripts):

    {prompt: {"responses": [str, ...],
              "pairs": [(preferred_index, dispreferred_index), ...],
              "sft_target": str}}

`responses` holds each distinct response to the prompt once; `pairs` index into it; `sft_target`
is the response supervised fine-tuning imitates. Prompts of the built-in datasets use the
Anthropic-HH dialogue format ("\\n\\nHuman: ...\\n\\nAssistant:") and responses start with a
space, as in the paper.

Conversational data uses the same structure with a conversation as the prompt: a tuple of
Message(role, content), an optional "system" message first, the last the user's; responses are
then the text of the assistant's answer (no leading space). tokenization.py renders them with the
model's chat template (chat_templates.py), so a chat model sees its own format:

    {(Message("user", "Capital of France?"),): {"responses": ["Paris.", "Lyon."], "pairs": [(0, 1)],
                                                "sft_target": "Paris."}}

To add a dataset, define a `get_<name>` function here; `datasets=[<name>]` then works:

    @dataset_settings(keep_prompt_end=False)  # optional: settings of this dataset, see below
    def get_mydata(split: str, silent: bool = False, cache_dir: str | None = None) -> dict[str, dict]:
        rows = [json.loads(line) for line in open(f"/data/mydata-{split}.jsonl")]
        data = {}
        for row in rows:
            entry = data.setdefault(row["question"], {"responses": [], "pairs": [], "sft_target": row["good"]})
            entry["responses"] += [" " + row["good"], " " + row["bad"]]
            n = len(entry["responses"])
            entry["pairs"].append((n - 2, n - 1))
        return data

Give it a `source: str = <Hub id>` parameter to make `dataset_paths.<name>=DIR` point it at a
local copy (see get_hh), an `sft_mode: bool` parameter to read other splits for SFT (see
get_ultrafeedback), and keyword options to set them from `dataset_options.<name>` (see get_hh's
as_messages). Or skip code entirely: a .jsonl/.json/.parquet file of prompt/chosen/rejected rows,
as text or as messages, is a dataset too (see load_preference_file).

What happens next (tokenizing, truncating, caching, batching) lives in tokenization.py and
batching.py and needs no change for a new dataset.
"""

import hashlib
import inspect
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import tqdm

import embedded
from conversations import (
    Conversation,
    Message,
    RowProblem,
    as_conversation,
    conversation_problem,
    split_conversation_pair,
    split_last_answer,
)
from data_sources import html_to_text, iterate_rows, load_hub_rows
from errors import DatasetError

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")  # files usable directly in datasets=[...]
EVAL_FRACTION = 0.05  # share of prompts held out as the "test" split by datasets without one (files, numbers)
ASSISTANT_TURN = "\n\nAssistant:"


def dataset_settings(*, keep_prompt_end: bool = False) -> Callable[[Callable], Callable]:
    """Declare a loader's settings beside it.

    keep_prompt_end: when an example is too long, keep the end of its prompt (the last turns of a
    dialogue) instead of its start.
    """

    def declare(loader: Callable) -> Callable:
        loader.keep_prompt_end = keep_prompt_end
        return loader

    return declare


# ----- the built-in datasets -----------------------------------------------------------


HH_HUB_ID = "Anthropic/hh-rlhf"


@dataset_settings(keep_prompt_end=True)  # the last turns of a dialogue matter most
def get_hh(
    split: str, silent: bool = False, cache_dir: str | None = None, source: str = HH_HUB_ID, as_messages: bool = False
) -> dict[str, dict]:
    """Anthropic Helpful-Harmless dialogues (Bai et al., 2022); splits "train" and "test".

    Each row holds a whole chosen and a whole rejected conversation. The prompt is the
    conversation up to and including its last "\\n\\nAssistant:"; the responses are what follows.
    as_messages (`dataset_options.hh.as_messages=true`): prompts are Conversations of user and
    assistant turns and responses lose their leading space, so a chat model sees its own template.
    """
    rows = load_hub_rows(
        "hh",
        source,
        split,
        hub_id=HH_HUB_ID,
        splits=("train", "test"),
        fields=("chosen", "rejected"),
        cache_dir=cache_dir,
        silent=silent,
    )
    data: dict[str, dict] = {}
    skipped: dict[str, list[int]] = {}
    for row_number, row in enumerate(
        tqdm.tqdm(iterate_rows(rows), total=len(rows), desc=f"hh {split}", disable=silent)
    ):
        chosen, rejected = row["chosen"], row["rejected"]
        prompt_end = chosen.rfind(ASSISTANT_TURN)
        if prompt_end == -1:
            skipped.setdefault("its chosen conversation has no '\\n\\nAssistant:' turn", []).append(row_number)
            continue
        prompt = chosen[: prompt_end + len(ASSISTANT_TURN)]
        if not rejected.startswith(prompt):
            # A few Hub rows differ before the last turn; the reference scripts cut them at the
            # wrong place and trained on garbage. Nothing to learn from them, so skip them.
            skipped.setdefault("its rejected conversation differs before the last Assistant turn", []).append(
                row_number
            )
            continue
        responses = chosen[len(prompt) :], rejected[len(prompt) :]
        if as_messages:
            conversation = hh_conversation(prompt)
            if conversation is None:
                skipped.setdefault("its dialogue does not start with a Human turn", []).append(row_number)
                continue
            prompt, responses = conversation, tuple(response.strip() for response in responses)
        entry = data.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": ""})
        n_responses = len(entry["responses"])
        entry["responses"] += responses
        entry["pairs"].append((n_responses, n_responses + 1))
        entry["sft_target"] = responses[0]  # the last row's chosen response, as the reference scripts
    _report_skipped("hh", split, skipped, silent)
    return data


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_conversation(prompt: str) -> Conversation | None:
    """An HH prompt ("\\n\\nHuman: ...\\n\\nAssistant:") as user and assistant Messages; None if not one."""
    pieces = _HH_TURN.split(prompt)  # ["", "Human", " text", "Assistant", " text", ..., "Assistant", ""]
    if pieces[0] or len(pieces) < 5 or pieces[1] != "Human" or pieces[-1]:
        return None
    speakers, texts = pieces[1:-2:2], pieces[2:-2:2]
    return tuple(Message("user" if who == "Human" else "assistant", text.strip()) for who, text in zip(speakers, texts))


ULTRAFEEDBACK_HUB_ID = "HuggingFaceH4/ultrafeedback_binarized"


def get_ultrafeedback(
    split: str,
    silent: bool = False,
    cache_dir: str | None = None,
    source: str = ULTRAFEEDBACK_HUB_ID,
    sft_mode: bool = False,
) -> dict[str, dict]:
    """UltraFeedback binarized (Cui et al., 2023; the H4 release that trained Zephyr); splits "train" and "test".

    Conversational: preference losses read train_prefs/test_prefs, whose rows hold a whole chosen
    and a whole rejected conversation (the best-rated answer and a random other one); SFT reads
    train_sft/test_sft, whose `messages` end with the best-rated answer.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"Dataset 'ultrafeedback' has splits 'train' and 'test', not {split!r}.")
    hub_split = f"{split}_{'sft' if sft_mode else 'prefs'}"
    rows = load_hub_rows(
        "ultrafeedback",
        source,
        hub_split,
        hub_id=ULTRAFEEDBACK_HUB_ID,
        splits=(hub_split,),
        fields=("messages",) if sft_mode else ("chosen", "rejected"),
        cache_dir=cache_dir,
        silent=silent,
    )
    data: dict = {}
    skipped: dict[str, list[int]] = {}
    progress = tqdm.tqdm(iterate_rows(rows), total=len(rows), desc=f"ultrafeedback {hub_split}", disable=silent)
    for row_number, row in enumerate(progress):
        try:
            if sft_mode:
                prompt, answer = split_last_answer(as_conversation(row["messages"], "messages"), "messages")
                data.setdefault(prompt, {"responses": [answer], "pairs": [], "sft_target": answer})
            else:
                chosen, rejected = (as_conversation(row[side], side) for side in ("chosen", "rejected"))
                _add_pair(data, *split_conversation_pair(chosen, rejected))
        except RowProblem as problem:
            skipped.setdefault(str(problem).rstrip("."), []).append(row_number)
    _report_skipped("ultrafeedback", hub_split, skipped, silent)
    return data


SHP_HUB_ID = "stanfordnlp/SHP"
SHP_MIN_SCORE_RATIO = 2.0  # pairs whose scores differ by less than this factor are too noisy (SHP paper)


def get_shp(
    split: str, silent: bool = False, cache_dir: str | None = None, source: str = SHP_HUB_ID
) -> dict[str, dict]:
    """Stanford Human Preferences: Reddit comments ranked by score (Ethayarajh et al., 2022).

    Splits "train", "validation" and "test". A pair is kept only when one comment's score is
    at least twice the other's; the SFT target is the best-scored kept comment.
    """
    rows = load_hub_rows(
        "shp",
        source,
        split,
        hub_id=SHP_HUB_ID,
        splits=("train", "validation", "test"),
        fields=("history", "human_ref_A", "human_ref_B", "score_A", "score_B", "labels"),
        cache_dir=cache_dir,
        silent=silent,
    )
    rankings: dict[str, _Rankings] = {}
    for row in tqdm.tqdm(iterate_rows(rows), total=len(rows), desc=f"shp {split}", disable=silent):
        scores = (row["score_A"], row["score_B"])
        ratio = row.get("score_ratio")
        if ratio is None:
            ratio = max(scores) / min(scores) if min(scores) > 0 else float("inf")
        if ratio < SHP_MIN_SCORE_RATIO:
            continue
        prompt = "\n\nHuman: " + row["history"] + ASSISTANT_TURN
        ranking = rankings.setdefault(prompt, _Rankings())
        index_a = ranking.add(" " + row["human_ref_A"], scores[0])
        index_b = ranking.add(" " + row["human_ref_B"], scores[1])
        ranking.add_pair((index_a, index_b) if row["labels"] == 1 else (index_b, index_a))
    return {prompt: ranking.entry() for prompt, ranking in rankings.items() if ranking.pairs}


SE_HUB_ID = "HuggingFaceH4/stack-exchange-preferences"
SE_TEST_FRACTION = 0.01  # the reference scripts' held-out share (the Hub has a train split only)
SE_SHUFFLE_SEED = 42


def get_se(split: str, silent: bool = False, cache_dir: str | None = None, source: str = SE_HUB_ID) -> dict[str, dict]:
    """Stack Exchange questions with scored answers (Askell et al., 2021; H4 release).

    The Hub has only a train split: as in the reference scripts it is shuffled with seed 42,
    the first 1% is "test" and the rest "train". Every two answers with different scores
    make a pair; the SFT target is the best-scored answer. HTML is reduced to plain text.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"Dataset 'se' has splits 'train' and 'test', not {split!r}.")
    rows = load_hub_rows(
        "se",
        source,
        "train",
        hub_id=SE_HUB_ID,
        splits=("train",),
        fields=("question", "answers"),
        cache_dir=cache_dir,
        silent=silent,
    )
    # the same permutation as the reference scripts' `dataset.shuffle(seed=42)`
    rows = rows.shuffle(seed=SE_SHUFFLE_SEED, keep_in_memory=True)
    n_test = int(len(rows) * SE_TEST_FRACTION)
    rows = rows.select(range(n_test) if split == "test" else range(n_test, len(rows)))
    rankings: dict[str, _Rankings] = {}
    for row in tqdm.tqdm(iterate_rows(rows), total=len(rows), desc=f"se {split}", disable=silent):
        prompt = "\n\nHuman: " + html_to_text(row["question"]) + ASSISTANT_TURN
        ranking = rankings.setdefault(prompt, _Rankings())
        answers = [(ranking.add(" " + html_to_text(a["text"]), a["pm_score"]), a["pm_score"]) for a in row["answers"]]
        for (index_i, score_i), (index_j, score_j) in itertools.combinations(answers, 2):
            if score_i != score_j:
                ranking.add_pair((index_i, index_j) if score_i > score_j else (index_j, index_i))
    return {prompt: ranking.entry() for prompt, ranking in rankings.items() if ranking.pairs}


def get_numbers(split: str, silent: bool = False, cache_dir: str | None = None) -> dict[str, dict]:
    """The embedded synthetic task; see embedded.py."""
    return embedded.number_preferences(split, EVAL_FRACTION)


class _Rankings:
    """Scored responses to one prompt, each distinct text once, and the pairs between them."""

    def __init__(self) -> None:
        self.responses: list[str] = []
        self.scores: list[float] = []
        self.index_of: dict[str, int] = {}
        self.pairs: list[tuple[int, int]] = []

    def add(self, response: str, score: float) -> int:
        """Index of the response, adding it if new; a text seen twice keeps its best score."""
        index = self.index_of.get(response)
        if index is None:
            index = self.index_of[response] = len(self.responses)
            self.responses.append(response)
            self.scores.append(score)
        else:
            self.scores[index] = max(self.scores[index], score)
        return index

    def add_pair(self, pair: tuple[int, int]) -> None:
        if pair[0] != pair[1]:  # the same text on both sides teaches nothing
            self.pairs.append(pair)

    def entry(self) -> dict:
        best = max(range(len(self.responses)), key=self.scores.__getitem__)
        return {"responses": self.responses, "pairs": self.pairs, "sft_target": self.responses[best]}


def _add_pair(data: dict, prompt, chosen: str, rejected: str) -> None:
    """Add chosen over rejected to the prompt's entry (each distinct text once; a tie adds no pair)."""
    entry = data.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": chosen})
    indices = []
    for response in (chosen, rejected):
        if response not in entry["responses"]:
            entry["responses"].append(response)
        indices.append(entry["responses"].index(response))
    if indices[0] != indices[1]:
        entry["pairs"].append(tuple(indices))


def _report_skipped(name: str, split: str, skipped: dict[str, list[int]], silent: bool) -> None:
    if silent:
        return
    for reason, row_numbers in skipped.items():
        shown = ", ".join(str(n) for n in row_numbers[:5]) + (", ..." if len(row_numbers) > 5 else "")
        print(f"{name} {split}: skipped {len(row_numbers)} row(s) because {reason} (row indices {shown}).")


# ----- user files --------------------------------------------------------------------


def load_preference_file(path: str, split: str, eval_fraction: float = EVAL_FRACTION) -> dict[str, dict]:
    """Preference pairs from a .jsonl, .json (array or JSON lines) or .parquet file.

    Each row is one of (messages are {"role": "system" | "user" | "assistant", "content": str}):
    - text: non-empty strings `prompt`, `chosen` and `rejected`;
    - explicit prompt: `prompt` a string (the user's message) or a list of messages ending with the
      user's, `chosen` and `rejected` strings or lists of one assistant message;
    - implicit prompt: `chosen` and `rejected` whole conversations that share all but the last
      (assistant) message, and no `prompt`;
    - `messages`: one conversation ending with the assistant's answer, a target for SFT only.
    Conversational rows may add a string `system`, the system message. Rows sharing a prompt
    become one entry; the first row's `chosen` is its SFT target. A fixed share of the prompts
    (`eval_fraction`, at least one when there are two or more) is held out as "test": those whose
    SHA-256 hash is smallest, so the split never changes with row order and no prompt is in both.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"{path}: a preference file has splits 'train' and 'test', not {split!r}.")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1).")
    data: dict = {}
    for where, row in _read_rows(path):
        try:
            prompt, chosen, rejected = _parse_row(row)
        except RowProblem as problem:
            raise DatasetError(f"{path}, {where}: {problem}") from None
        if rejected is None:
            data.setdefault(prompt, {"responses": [chosen], "pairs": [], "sft_target": chosen})
        else:
            _add_pair(data, prompt, chosen, rejected)
    if not data:
        raise DatasetError(f"{path}: the file holds no rows.")

    def prompt_hash(prompt: str | Conversation) -> bytes:
        return hashlib.sha256((prompt if isinstance(prompt, str) else json.dumps(prompt)).encode()).digest()

    n_test = max(1, round(eval_fraction * len(data))) if eval_fraction > 0 and len(data) >= 2 else 0
    n_test = min(n_test, len(data) - 1)
    test_prompts = set(sorted(data, key=prompt_hash)[:n_test])
    return {prompt: entry for prompt, entry in data.items() if (prompt in test_prompts) == (split == "test")}


_ROW_FORMS = (
    "Every row needs prompt, chosen and rejected (strings, or messages), "
    "or whole chosen and rejected conversations, or messages; see load_preference_file."
)


def _parse_row(row: dict) -> tuple[str | Conversation, str, str | None]:
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
        import pyarrow.parquet  # imported here: only parquet files need it

        for number, row in enumerate(pyarrow.parquet.read_table(file).to_pylist(), start=1):
            yield f"row {number}", row
        return
    if file.suffix not in (".jsonl", ".json"):
        raise DatasetError(f"{path}: unsupported file type; use one of {', '.join(DATA_FILE_SUFFIXES)}.")
    text = file.read_text(encoding="utf-8")
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


def _as_object(path: str, where: str, row) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(
            f"{path}, {where}: expected a JSON object with prompt, chosen and rejected (or messages), "
            f"not {type(row).__name__}."
        )
    return row


# ----- choosing and checking datasets -------------------------------------------------


def available_datasets() -> list[str]:
    """Names usable in `datasets=[...]`: every get_<name> loader defined in this module."""
    loaders = [name for name, value in globals().items() if name.startswith("get_") and callable(value)]
    return sorted(name[len("get_") :] for name in loaders if name != "get_dataset")


def get_dataset(
    name: str,
    split: str,
    silent: bool = False,
    cache_dir: str | None = None,
    dataset_paths: Mapping[str, str] | None = None,
    sft_mode: bool = False,
    dataset_options: Mapping[str, Mapping] | None = None,
) -> dict[str, dict]:
    """One split of a dataset by name (a get_<name> loader) or file path, checked against the contract.

    A loader gets `source` from dataset_paths, `sft_mode` when it takes one, and the keyword
    arguments in dataset_options[name].
    """
    if is_data_file(name):
        data = load_preference_file(name, split)
    else:
        loader, source = loader_and_source(name, dataset_paths)
        arguments = loader_options(name, loader, dataset_options)
        if source is not None:
            arguments["source"] = source
        if "sft_mode" in inspect.signature(loader).parameters:
            arguments["sft_mode"] = sft_mode
        data = loader(split, silent=silent, cache_dir=cache_dir, **arguments)
    check_contract(name, data)
    return data


def loader_options(name: str, loader: Callable, dataset_options: Mapping[str, Mapping] | None) -> dict:
    """dataset_options[name] as keyword arguments of the loader, each checked to be one of its parameters."""
    options = dict((dataset_options or {}).get(name) or {})
    parameters = inspect.signature(loader).parameters
    unknown = [key for key in options if key not in parameters or key in ("split", "silent", "cache_dir", "source")]
    if unknown:
        raise DatasetError(f"dataset_options.{name} sets {unknown}, which get_{name} does not take; remove them.")
    return options


def is_data_file(name: str) -> bool:
    return name.endswith(DATA_FILE_SUFFIXES) or os.path.isfile(name)


def loader_and_source(name: str, dataset_paths: Mapping[str, str] | None) -> tuple[Callable[..., dict], str | None]:
    """The get_<name> loader, and its dataset_paths entry to pass as `source` (None when absent or null)."""
    if name not in available_datasets():
        raise DatasetError(
            f"Unknown dataset {name!r}. Known: {', '.join(available_datasets())}; or give a path to a "
            f".jsonl/.json/.parquet file of prompt/chosen/rejected rows (see load_preference_file); or add a "
            f"get_{name}(split, silent=False, cache_dir=None) function to preference_datasets.py."
        )
    loader = globals()[f"get_{name}"]
    if dataset_paths is None or dataset_paths.get(name) is None:
        return loader, None
    if "source" not in inspect.signature(loader).parameters:
        raise DatasetError(f"dataset_paths.{name} is set, but get_{name} takes no source; remove that entry.")
    return loader, str(dataset_paths[name])


def check_contract(name: str, data: dict[str, dict]) -> None:
    """Raise DatasetError naming the prompt and the problem if `data` breaks the contract."""
    if not isinstance(data, dict):
        raise DatasetError(
            f"Dataset {name!r}: the loader returned {type(data).__name__}, not a dict of prompt -> entry."
        )
    for prompt, entry in data.items():
        problem = _contract_problem(prompt, entry)
        if problem:
            shown = repr(prompt)[:80] + ("..." if len(repr(prompt)) > 80 else "")
            raise DatasetError(f"Dataset {name!r}, prompt {shown}: {problem}")


def _contract_problem(prompt, entry) -> str | None:
    if isinstance(prompt, tuple):
        problem = conversation_problem(prompt)
        if problem:
            return problem
    elif not isinstance(prompt, str):
        return f"prompts must be strings or Conversations (tuples of Message), not {type(prompt).__name__}."
    if not isinstance(entry, dict):
        return f"the entry must be a dict with responses, pairs and sft_target, not {type(entry).__name__}."
    missing = [key for key in ("responses", "pairs", "sft_target") if key not in entry]
    if missing:
        return f"the entry lacks {missing}."
    responses, pairs = entry["responses"], entry["pairs"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        return "responses must be a list of strings."
    if not isinstance(entry["sft_target"], str):
        return f"sft_target must be a string, not {type(entry['sft_target']).__name__}."
    if not isinstance(pairs, list):
        return f"pairs must be a list of (preferred, dispreferred) index pairs, not {type(pairs).__name__}."
    for pair in pairs:
        valid = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(type(i) is int for i in pair)
        if not valid or not all(0 <= i < len(responses) for i in pair) or pair[0] == pair[1]:
            return f"pair {pair!r} is not two different indices into its {len(responses)} responses."
    return None


def truncation_mode_for(name: str) -> str:
    """Which end of an over-long prompt to keep, as the dataset's loader declares (dataset_settings)."""
    if is_data_file(name):
        return "keep_start"
    loader, _ = loader_and_source(name, None)
    return "keep_end" if getattr(loader, "keep_prompt_end", False) else "keep_start"

"""Preference datasets: the loaders behind `datasets=[...]`, and the one structure they all return.

Every loader returns (the contract of the DPO reference scripts):

    {prompt: {"responses": [str, ...],
              "pairs": [(preferred_index, dispreferred_index), ...],
              "sft_target": str}}

`responses` holds each distinct response to the prompt once; `pairs` index into it; `sft_target`
is the response supervised fine-tuning imitates. Prompts of the built-in datasets use the
Anthropic-HH dialogue format ("\\n\\nHuman: ...\\n\\nAssistant:") and responses start with a
space, as in the paper.

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
local copy (see get_hh). Or skip code entirely: a .jsonl/.json/.parquet file with string fields
`prompt`, `chosen` and `rejected` is a dataset too (see load_preference_file).

What happens next (tokenizing, truncating, caching, batching) lives in tokenization.py and
batching.py and needs no change for a new dataset.
"""

import hashlib
import inspect
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import tqdm

import embedded
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
def get_hh(split: str, silent: bool = False, cache_dir: str | None = None, source: str = HH_HUB_ID) -> dict[str, dict]:
    """Anthropic Helpful-Harmless dialogues (Bai et al., 2022); splits "train" and "test".

    Each row holds a whole chosen and a whole rejected conversation. The prompt is the
    conversation up to and including its last "\\n\\nAssistant:"; the responses are what follows.
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
        entry = data.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": ""})
        n_responses = len(entry["responses"])
        entry["responses"] += [chosen[len(prompt) :], rejected[len(prompt) :]]
        entry["pairs"].append((n_responses, n_responses + 1))
        entry["sft_target"] = chosen[len(prompt) :]  # the last row's chosen response, as the reference scripts
    if not silent:
        for reason, row_numbers in skipped.items():
            shown = ", ".join(str(n) for n in row_numbers[:5]) + (", ..." if len(row_numbers) > 5 else "")
            print(f"hh {split}: skipped {len(row_numbers)} row(s) because {reason} (row indices {shown}).")
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


# ----- user files --------------------------------------------------------------------


def load_preference_file(path: str, split: str, eval_fraction: float = EVAL_FRACTION) -> dict[str, dict]:
    """Preference pairs from a .jsonl, .json (array or JSON lines) or .parquet file.

    Each row has non-empty string fields `prompt`, `chosen` and `rejected`. Rows sharing a
    prompt become one entry; the first row's `chosen` is its SFT target. A fixed share of the
    prompts (`eval_fraction`, at least one when there are two or more) is held out as "test":
    those whose SHA-256 hash is smallest, so the split never changes with row order and no
    prompt is in both.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"{path}: a preference file has splits 'train' and 'test', not {split!r}.")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1).")
    data: dict[str, dict] = {}
    for where, row in _read_rows(path):
        for field in ("prompt", "chosen", "rejected"):
            value = row.get(field)
            if not isinstance(value, str) or not value:
                problem = "is missing" if value is None else f"must be a non-empty string, not {value!r}"[:120]
                raise DatasetError(
                    f"{path}, {where}: field {field!r} {problem}. "
                    "Every row needs string fields prompt, chosen and rejected."
                )
        entry = data.setdefault(row["prompt"], {"responses": [], "pairs": [], "sft_target": row["chosen"]})
        indices = []
        for response in (row["chosen"], row["rejected"]):
            if response not in entry["responses"]:
                entry["responses"].append(response)
            indices.append(entry["responses"].index(response))
        if indices[0] != indices[1]:
            entry["pairs"].append(tuple(indices))
    if not data:
        raise DatasetError(f"{path}: the file holds no rows.")

    def prompt_hash(prompt: str) -> bytes:
        return hashlib.sha256(prompt.encode()).digest()

    n_test = max(1, round(eval_fraction * len(data))) if eval_fraction > 0 and len(data) >= 2 else 0
    n_test = min(n_test, len(data) - 1)
    test_prompts = set(sorted(data, key=prompt_hash)[:n_test])
    return {prompt: entry for prompt, entry in data.items() if (prompt in test_prompts) == (split == "test")}


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
            f"{path}, {where}: expected a JSON object with prompt, chosen and rejected, not {type(row).__name__}."
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
) -> dict[str, dict]:
    """One split of a dataset by name (a get_<name> loader) or file path, checked against the contract."""
    if is_data_file(name):
        data = load_preference_file(name, split)
    else:
        loader, source = loader_and_source(name, dataset_paths)
        data = loader(split, silent=silent, cache_dir=cache_dir, **({} if source is None else {"source": source}))
    check_contract(name, data)
    return data


def is_data_file(name: str) -> bool:
    return name.endswith(DATA_FILE_SUFFIXES) or os.path.isfile(name)


def loader_and_source(name: str, dataset_paths: Mapping[str, str] | None) -> tuple[Callable[..., dict], str | None]:
    """The get_<name> loader, and its dataset_paths entry to pass as `source` (None when absent or null)."""
    if name not in available_datasets():
        raise DatasetError(
            f"Unknown dataset {name!r}. Known: {', '.join(available_datasets())}; or give a path to a "
            f".jsonl/.json/.parquet file with string fields prompt, chosen and rejected; or add a "
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
    if not isinstance(prompt, str):
        return f"prompts must be strings, not {type(prompt).__name__}."
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

"""Preference data: loading, tokenizing, batching and padding.

Every dataset loader returns the same structure (the contract of the DPO reference scripts):

    {prompt: {"responses": [str, ...],
              "pairs": [(preferred_index, dispreferred_index), ...],
              "sft_target": str}}

`responses` holds each distinct response to the prompt once; `pairs` index into it; `sft_target`
is the response supervised fine-tuning imitates. To add a dataset, define
`get_<name>(split, silent=False, cache_dir=None)` in this file returning that structure; then
`datasets=[<name>]` works. Or skip code entirely: give a .jsonl/.json/.parquet file with string
fields `prompt`, `chosen` and `rejected` (see load_preference_file).

Prompts of the built-in datasets use the Anthropic-HH dialogue format
("\\n\\nHuman: ...\\n\\nAssistant:") and responses start with a space, as in the paper.

tokenize_datasets tokenizes every distinct text once, in batched calls to the tokenizer, into a
TokenizedExamples (flat token arrays; examples[i] is the dict the trainer consumes). Given a
tokenized_cache_dir it stores the untruncated tokens as one .npz per dataset, so later runs, with
any max_length, load them in about a second without reading the raw data. The cache key covers
the data files' sizes and mtimes, the tokenizer and the source of this module and embedded.py:
editing this file re-tokenizes on the next run.
"""

import functools
import hashlib
import inspect
import itertools
import json
import marshal
import operator
import os
import random
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import tokenizers
import torch
import tqdm
import transformers

import embedded
from losses import IGNORE_INDEX

HH_HUB_ID = "Anthropic/hh-rlhf"
SHP_HUB_ID = "stanfordnlp/SHP"
SE_HUB_ID = "HuggingFaceH4/stack-exchange-preferences"
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
EVAL_FRACTION = 0.05  # share of a user file's prompts held out as the "test" split
SE_TEST_FRACTION = 0.01  # the reference scripts' held-out share of Stack Exchange (train split only on the Hub)
SE_SHUFFLE_SEED = 42
SHP_MIN_SCORE_RATIO = 2.0  # SHP pairs whose scores differ by less than this factor are too noisy (SHP paper)
ASSISTANT_TURN = "\n\nAssistant:"
TOKENIZE_CHUNK = 1024  # texts per batched tokenizer call


class DatasetError(ValueError):
    """A problem with the data a user asked for: it names the dataset, file or row, and the fix."""


# ----- the built-in datasets -----------------------------------------------------------


def get_hh(split: str, silent: bool = False, cache_dir: str | None = None, source: str = HH_HUB_ID) -> dict[str, dict]:
    """Anthropic Helpful-Harmless dialogues (Bai et al., 2022); splits "train" and "test".

    Each row holds a whole chosen and a whole rejected conversation. The prompt is the
    conversation up to and including its last "\\n\\nAssistant:"; the responses are what follows.
    """
    rows = _load_hub_rows(
        "hh", source, split, hub_id=HH_HUB_ID, splits=("train", "test"), fields=("chosen", "rejected"),
        cache_dir=cache_dir, silent=silent,
    )
    data: dict[str, dict] = {}
    skipped: dict[str, list[int]] = {}
    for row_number, row in enumerate(tqdm.tqdm(_iterate_rows(rows), total=len(rows), desc=f"hh {split}", disable=silent)):
        chosen, rejected = row["chosen"], row["rejected"]
        prompt_end = chosen.rfind(ASSISTANT_TURN)
        if prompt_end == -1:
            skipped.setdefault("its chosen conversation has no '\\n\\nAssistant:' turn", []).append(row_number)
            continue
        prompt = chosen[: prompt_end + len(ASSISTANT_TURN)]
        if not rejected.startswith(prompt):
            # A few Hub rows differ before the last turn; the reference scripts cut them at the
            # wrong place and trained on garbage. Nothing to learn from them, so skip them.
            skipped.setdefault("its rejected conversation differs before the last Assistant turn", []).append(row_number)
            continue
        entry = data.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": ""})
        n_responses = len(entry["responses"])
        entry["responses"] += [chosen[len(prompt):], rejected[len(prompt):]]
        entry["pairs"].append((n_responses, n_responses + 1))
        entry["sft_target"] = chosen[len(prompt):]  # the last row's chosen response, as the reference scripts
    if not silent:
        for reason, row_numbers in skipped.items():
            shown = ", ".join(str(n) for n in row_numbers[:5]) + (", ..." if len(row_numbers) > 5 else "")
            print(f"hh {split}: skipped {len(row_numbers)} row(s) because {reason} (row indices {shown}).")
    return data


def get_shp(split: str, silent: bool = False, cache_dir: str | None = None, source: str = SHP_HUB_ID) -> dict[str, dict]:
    """Stanford Human Preferences: Reddit comments ranked by score (Ethayarajh et al., 2022).

    Splits "train", "validation" and "test". A pair is kept only when one comment's score is
    at least twice the other's; the SFT target is the best-scored kept comment.
    """
    rows = _load_hub_rows(
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
    for row in tqdm.tqdm(_iterate_rows(rows), total=len(rows), desc=f"shp {split}", disable=silent):
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


def get_se(split: str, silent: bool = False, cache_dir: str | None = None, source: str = SE_HUB_ID) -> dict[str, dict]:
    """Stack Exchange questions with scored answers (Askell et al., 2021; H4 release).

    The Hub has only a train split: as in the reference scripts it is shuffled with seed 42,
    the first 1% is "test" and the rest "train". Every two answers with different scores
    make a pair; the SFT target is the best-scored answer. HTML is reduced to plain text.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"Dataset 'se' has splits 'train' and 'test', not {split!r}.")
    rows = _load_hub_rows(
        "se", source, "train", hub_id=SE_HUB_ID, splits=("train",), fields=("question", "answers"),
        cache_dir=cache_dir, silent=silent,
    )
    # the same permutation as the reference scripts' `dataset.shuffle(seed=42)`
    rows = rows.shuffle(seed=SE_SHUFFLE_SEED, keep_in_memory=True)
    n_test = int(len(rows) * SE_TEST_FRACTION)
    rows = rows.select(range(n_test) if split == "test" else range(n_test, len(rows)))
    rankings: dict[str, _Rankings] = {}
    for row in tqdm.tqdm(_iterate_rows(rows), total=len(rows), desc=f"se {split}", disable=silent):
        prompt = "\n\nHuman: " + html_to_text(row["question"]) + ASSISTANT_TURN
        ranking = rankings.setdefault(prompt, _Rankings())
        answers = [(ranking.add(" " + html_to_text(a["text"]), a["pm_score"]), a["pm_score"]) for a in row["answers"]]
        for (index_i, score_i), (index_j, score_j) in itertools.combinations(answers, 2):
            if score_i != score_j:
                ranking.add_pair((index_i, index_j) if score_i > score_j else (index_j, index_i))
    return {prompt: ranking.entry() for prompt, ranking in rankings.items() if ranking.pairs}


def get_numbers(split: str, silent: bool = False, cache_dir: str | None = None) -> dict[str, dict]:
    """The embedded synthetic task; see embedded.py."""
    return embedded.number_preferences(split)


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


# ----- loading from the Hub or a local copy of it ------------------------------------


def _looks_like_path(source: str) -> bool:
    return os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source)


def _load_hub_rows(
    name: str,
    source: str,
    split: str,
    *,
    hub_id: str,
    splits: tuple[str, ...],
    fields: tuple[str, ...],
    cache_dir: str | None,
    silent: bool,
) -> "datasets.Dataset":
    """One split of a Hub dataset (a `datasets.Dataset`), from the Hub or a local copy of its repository.

    `datasets` infers the data files of a local copy exactly as it does for the Hub repository
    (split from file names, hidden folders such as .cache/ ignored), so one call serves both.
    """
    import datasets  # imported here: slow to import, and only the Hub datasets need it

    if split not in splits:
        raise DatasetError(f"Dataset {name!r} has splits {', '.join(map(repr, splits))}, not {split!r}.")
    download = f"`hf download --repo-type dataset {hub_id} --local-dir DIR` (`huggingface-cli download` in older huggingface_hub)"
    is_local = _looks_like_path(source)
    if is_local and not os.path.isdir(os.path.expanduser(source)):
        raise DatasetError(f"dataset_paths.{name}={source}: no such directory. Download it with {download} and pass that DIR.")
    if not silent:
        print(f"Loading dataset {name!r} ({split}) from {source}", flush=True)
    progress_bars_were_disabled = datasets.are_progress_bars_disabled()
    if silent:
        datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(os.path.expanduser(source) if is_local else source, split=split, cache_dir=cache_dir)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        if is_local:
            raise DatasetError(
                f"Could not read dataset {name!r} from the directory {source} ({error}). It should hold a copy of "
                f"the Hub repository {hub_id} as {download} leaves it."
            ) from error
        raise DatasetError(
            f"Could not load dataset {name!r} from {source!r} ({type(error).__name__}: {error}). {_hub_problem(error)} "
            f"Either download it where the Hub is reachable with {download} and pass `dataset_paths.{name}=DIR`, "
            "or run once online so the datasets cache holds it."
        ) from error
    finally:
        if silent and not progress_bars_were_disabled:
            datasets.enable_progress_bars()
    missing = [field for field in fields if field not in rows.column_names]
    if missing:
        raise DatasetError(
            f"Dataset {name!r} from {source}: the {split} split has columns {rows.column_names} but lacks {missing}. "
            f"Is this a copy of {hub_id}?"
        )
    return rows


def _iterate_rows(rows: "datasets.Dataset", batch_size: int = 1000) -> Iterator[dict]:
    """The rows of a Dataset as dicts, read a batch of columns at a time: about 10x faster than `for row in rows`."""
    for batch in rows.iter(batch_size=batch_size):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _hub_problem(error: Exception) -> str:
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "This machine cannot reach the Hugging Face Hub: offline mode is set (HF_HUB_OFFLINE=1)."
    if isinstance(error, ConnectionError):
        return "This machine cannot reach the Hugging Face Hub (set HF_HUB_OFFLINE=1 to fail at once instead of retrying)."
    return "Check the dataset id; if the Hub is unreachable from here:"


# ----- plain text from Stack Exchange HTML --------------------------------------------

_PARAGRAPH_TAGS = {"p", "div", "pre", "blockquote", "ul", "ol", "table", "hr", "h1", "h2", "h3", "h4", "h5", "h6"}
_LINE_TAGS = {"br", "li", "tr"}


class _TextExtractor(HTMLParser):
    """Text of an HTML fragment: block elements become blank lines, <br>/<li>/<tr> line breaks.

    Whitespace inside <pre> (code) is kept as written; elsewhere runs of it collapse to one
    space, as a browser shows them.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text = ""
        self.pending_newlines = 0
        self.pre_depth = 0
        self.after_bullet = False  # "<li><p>" should read "- text", not "- " then a blank line

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break_before(tag)
        if tag == "li":
            self._write("- ", verbatim=True)
            self.after_bullet = True
        if tag == "pre":
            self.pre_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break_before(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self.pre_depth = max(self.pre_depth - 1, 0)
        self._break_before(tag)

    def handle_data(self, data: str) -> None:
        if self.pre_depth:
            self._write(data, verbatim=True)
        else:
            self._write(re.sub(r"\s+", " ", data), verbatim=False)

    def _break_before(self, tag: str) -> None:
        if self.after_bullet:
            return
        if tag in _PARAGRAPH_TAGS:
            self.pending_newlines = 2
        elif tag in _LINE_TAGS:
            self.pending_newlines = max(self.pending_newlines, 1)

    def _write(self, data: str, verbatim: bool) -> None:
        at_line_start = self.pending_newlines > 0 or not self.text or self.text.endswith("\n")
        if at_line_start and not verbatim:
            data = data.lstrip(" ")
        if not data:
            return
        if self.pending_newlines and self.text:
            self.text = self.text.rstrip(" \n") + "\n" * self.pending_newlines
        self.pending_newlines = 0
        self.after_bullet = False
        self.text += data


def html_to_text(html: str) -> str:
    """Plain text of an HTML fragment, using only the standard library's html.parser."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return extractor.text.strip()


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
                    f"{path}, {where}: field {field!r} {problem}. Every row needs string fields prompt, chosen and rejected."
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
            raise DatasetError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}).") from None
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
                f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}). Each line must be one JSON object."
            ) from None
        yield f"line {number}", _as_object(path, f"line {number}", row)


def _as_object(path: str, where: str, row) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(f"{path}, {where}: expected a JSON object with prompt, chosen and rejected, not {type(row).__name__}.")
    return row


# ----- choosing and checking datasets -------------------------------------------------


def available_datasets() -> list[str]:
    """Names usable in `datasets=[...]`: every get_<name> loader defined in this module."""
    loaders = [name for name, value in globals().items() if name.startswith("get_") and callable(value)]
    return sorted(name[len("get_"):] for name in loaders if name != "get_dataset")


def get_dataset(
    name: str, split: str, silent: bool = False, cache_dir: str | None = None, dataset_paths: Mapping[str, str] | None = None
) -> dict[str, dict]:
    """One split of a dataset by name (a get_<name> loader) or file path, checked against the contract."""
    if _is_data_file(name):
        data = load_preference_file(name, split)
    else:
        loader, source = _loader_and_source(name, dataset_paths)
        data = loader(split, silent=silent, cache_dir=cache_dir, **({} if source is None else {"source": source}))
    check_contract(name, data)
    return data


def _is_data_file(name: str) -> bool:
    return name.endswith(DATA_FILE_SUFFIXES) or os.path.isfile(name)


def _loader_and_source(name: str, dataset_paths: Mapping[str, str] | None) -> tuple[Callable[..., dict], str | None]:
    """The get_<name> loader, and its dataset_paths entry (None without one) to pass as `source`."""
    if name not in available_datasets():
        raise DatasetError(
            f"Unknown dataset {name!r}. Known: {', '.join(available_datasets())}; or give a path to a "
            f".jsonl/.json/.parquet file with string fields prompt, chosen and rejected; or add a "
            f"get_{name}(split, silent=False, cache_dir=None) function to preference_datasets.py."
        )
    loader = globals()[f"get_{name}"]
    if dataset_paths is None or name not in dataset_paths:
        return loader, None
    if "source" not in inspect.signature(loader).parameters:
        raise DatasetError(f"dataset_paths.{name} is set, but get_{name} takes no source; remove that entry.")
    return loader, str(dataset_paths[name])


def check_contract(name: str, data: dict[str, dict]) -> None:
    """Raise DatasetError naming the prompt and the problem if `data` breaks the contract."""
    if not isinstance(data, dict):
        raise DatasetError(f"Dataset {name!r}: the loader returned {type(data).__name__}, not a dict of prompt -> entry.")
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
    """Which end of an over-long prompt to keep: the end for HH dialogues (the last turns matter), else the start."""
    return "keep_end" if name == "hh" else "keep_start"


# ----- tokenization -----------------------------------------------------------------


@dataclass(frozen=True)
class _SpecialTokens:
    bos: int | None  # prepended to prompts when the tokenizer adds it by default (Llama), else None (GPT-2)
    eos: int  # appended to every response, so the model learns to stop


def _special_tokens(tokenizer) -> _SpecialTokens:
    if tokenizer.eos_token_id is None:
        raise DatasetError(
            f"The tokenizer {type(tokenizer).__name__} has no EOS token, so responses cannot be ended; set tokenizer.eos_token."
        )
    bos = tokenizer.bos_token_id
    with_defaults = tokenizer("x").input_ids
    adds_bos = bos is not None and with_defaults[:1] == [bos] and tokenizer("x", add_special_tokens=False).input_ids[:1] != [bos]
    return _SpecialTokens(bos=bos if adds_bos else None, eos=tokenizer.eos_token_id)


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} and max_length={max_length}: need 0 < max_prompt_length < max_length, "
            "so that every truncated example keeps some prompt and some response."
        )


# Which array each index array points into, in the cached arrays of a dataset (_tokenize_data) and in
# the storage of TokenizedExamples (_truncated): where both are validated and concatenated.
_POINTS_INTO = {
    "prompt_text_spans": "prompt_text",
    "prompt_token_spans": "prompt_tokens",
    "response_token_spans": "response_tokens",
    "example_prompt": "prompt_text_spans",
    "example_chosen": "response_token_spans",
    "example_rejected": "response_token_spans",
    "prompt_spans": "prompt_tokens",
    "chosen_spans": "response_tokens",
    "rejected_spans": "response_tokens",
}
_PER_EXAMPLE = ("example_prompt", "example_chosen", "example_rejected", "prompt_spans", "chosen_spans", "rejected_spans")


class TokenizedExamples(Sequence):
    """Tokenized examples, stored compactly; `examples[i]` is the dict the trainer consumes.

    examples[i] has: prompt (str), prompt_input_ids (the prompt after truncation, BOS first when
    the tokenizer adds one), chosen_input_ids (prompt + chosen response, EOS last unless
    truncated), chosen_labels (the same with IGNORE_INDEX on prompt positions), the rejected ones
    unless this is SFT data, and index (i, the position in this sequence), all lists of ints.

    `fingerprint` is a hex SHA-256 naming the content: the cache keys of the datasets (see
    tokenize_datasets) and, for a selection of them, the rows selected.

    Storage, shared by every selection: each distinct prompt once (UTF-8 text, and its token ids
    untruncated, without BOS), each distinct response once (token ids + EOS), and per stored
    example its prompt's number and int64 [start, stop) spans into those token arrays, which
    say what truncation keeps. A selection is the storage plus the stored rows it shows, in order.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], base_fingerprint: str, rows: np.ndarray | None = None) -> None:
        self._arrays = arrays
        self._base_fingerprint = base_fingerprint
        n_stored = len(arrays["example_prompt"])
        self._rows = np.arange(n_stored, dtype=np.int64) if rows is None else rows
        self._prompt_prefix = [] if arrays["bos"] < 0 else [int(arrays["bos"])]
        self._sides = ("chosen", "rejected") if "rejected_spans" in arrays else ("chosen",)
        if len(self._rows) == n_stored and np.array_equal(self._rows, np.arange(n_stored)):
            self.fingerprint = base_fingerprint
        else:  # selections showing the same rows have one fingerprint, however they were made
            self.fingerprint = hashlib.sha256(base_fingerprint.encode() + self._rows.astype("<i8").tobytes()).hexdigest()

    @property
    def has_rejected(self) -> bool:
        """False for SFT examples, which have a chosen response only."""
        return len(self._sides) == 2

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, position: int | slice) -> "dict | TokenizedExamples":
        if isinstance(position, slice):
            return self.select(range(len(self))[position])
        position = operator.index(position)
        if not -len(self) <= position < len(self):
            raise IndexError(f"example {position} of {len(self)}")
        position %= len(self)
        row, arrays = self._rows[position], self._arrays
        text_start, text_stop = arrays["prompt_text_spans"][arrays["example_prompt"][row]]
        start, stop = arrays["prompt_spans"][row]
        prompt_ids = self._prompt_prefix + arrays["prompt_tokens"][start:stop].tolist()
        example = {"prompt": arrays["prompt_text"][text_start:text_stop].tobytes().decode(), "prompt_input_ids": prompt_ids}
        for side in self._sides:
            start, stop = arrays[f"{side}_spans"][row]
            response = arrays["response_tokens"][start:stop].tolist()
            example[f"{side}_input_ids"] = prompt_ids + response
            example[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + response
        example["index"] = position
        return example

    def __iter__(self) -> Iterator[dict]:
        return (self[position] for position in range(len(self)))

    def __repr__(self) -> str:
        kind = "pairs" if self.has_rejected else "SFT examples"
        return f"TokenizedExamples({len(self)} {kind}, fingerprint={self.fingerprint[:12]}...)"

    def select(self, positions: Iterable[int]) -> "TokenizedExamples":
        """The examples at these positions (negative ones count from the end), in this order; a view of the same storage.

        Its `index` keys count from 0 in the new order. Its fingerprint is this one's when it
        selects all examples in order, else a hash of the stored rows it shows.
        """
        positions = np.fromiter(positions, dtype=np.int64)
        if positions.size and not (-len(self) <= positions.min() and positions.max() < len(self)):
            shown = f"{positions.min()}..{positions.max()}"
            raise IndexError(f"select: positions must lie in [-{len(self)}, {len(self)}), got {shown}.")
        positions[positions < 0] += len(self)
        return TokenizedExamples(self._arrays, self._base_fingerprint, self._rows[positions])

    @property
    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(chosen_lengths, rejected_lengths), each (len(self),) int64: the lengths of chosen_input_ids and rejected_input_ids.

        Rejected lengths are 0 for SFT examples, which have no rejected response.
        """
        prompt_spans = self._arrays["prompt_spans"][self._rows]
        prompt_lengths = prompt_spans[:, 1] - prompt_spans[:, 0] + len(self._prompt_prefix)
        lengths = {side: np.zeros(len(self), dtype=np.int64) for side in ("chosen", "rejected")}
        for side in self._sides:
            spans = self._arrays[f"{side}_spans"][self._rows]
            lengths[side] = prompt_lengths + spans[:, 1] - spans[:, 0]
        return lengths["chosen"], lengths["rejected"]

    @staticmethod
    def concatenate(parts: list[Mapping[str, np.ndarray]], fingerprint: str) -> "TokenizedExamples":
        """The examples of each part's storage (as _tokenize_data makes it), one part after the other."""
        if len({int(part["bos"]) for part in parts}) != 1 or len({"rejected_spans" in part for part in parts}) != 1:
            raise ValueError("Tokenized parts made with different tokenizers or modes cannot be concatenated.")
        if len(parts) == 1:
            return TokenizedExamples(parts[0], fingerprint)
        arrays = {"bos": parts[0]["bos"]}
        for name in parts[0].keys() - {"bos"}:
            target = _POINTS_INTO.get(name)
            if target is None:
                arrays[name] = np.concatenate([part[name] for part in parts])
                continue
            # indices into `target` move by the lengths of the earlier parts' `target`s
            shifts = np.cumsum([0] + [len(part[target]) for part in parts[:-1]])
            arrays[name] = np.concatenate([part[name] + shift for part, shift in zip(parts, shifts)])
        return TokenizedExamples(arrays, fingerprint)


def _tokenize_texts(tokenizer, texts: list[str], description: str, silent: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (no special tokens) of each text in batched calls: flat int32 (total,) and int64 offsets (len(texts) + 1,)."""
    lengths = np.zeros(len(texts), dtype=np.int64)
    pieces = [np.zeros(0, dtype=np.int32)]
    starts = range(0, len(texts), TOKENIZE_CHUNK)
    for start in tqdm.tqdm(starts, desc=description, unit="chunk", disable=silent or len(starts) < 2):
        chunk = texts[start : start + TOKENIZE_CHUNK]
        token_ids = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False).input_ids
        chunk_lengths = list(map(len, token_ids))
        lengths[start : start + len(token_ids)] = chunk_lengths
        pieces.append(np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int32, count=sum(chunk_lengths)))
    return np.concatenate(pieces), np.concatenate([[0], np.cumsum(lengths)])


def _with_eos(tokens: np.ndarray, offsets: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """The texts of (tokens, offsets) each followed by EOS, in the same flat layout."""
    n_texts = len(offsets) - 1
    new_offsets = offsets + np.arange(n_texts + 1)
    out = np.full(len(tokens) + n_texts, eos, dtype=np.int32)
    # token t of text k moves right by k, the EOS tokens inserted before it
    out[np.arange(len(tokens)) + np.repeat(np.arange(n_texts), np.diff(offsets))] = tokens
    return out, new_offsets


def _gather(tokens: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """The concatenation of tokens[start:stop] for each [start, stop) row of spans (n, 2)."""
    lengths = spans[:, 1] - spans[:, 0]
    # position p of the output, in row k, reads tokens[start_k + p - (output start of row k)]
    shift = np.repeat(spans[:, 0] - (np.cumsum(lengths) - lengths), lengths)
    return tokens[np.arange(lengths.sum()) + shift]


def _identical_pairs(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """(n,) bool: the pairs whose chosen and rejected token ids are equal after truncation."""
    chosen, rejected = arrays["chosen_spans"], arrays["rejected_spans"]
    lengths = chosen[:, 1] - chosen[:, 0]
    candidates = np.flatnonzero(lengths == rejected[:, 1] - rejected[:, 0])
    identical = np.zeros(len(chosen), dtype=bool)
    if candidates.size:
        tokens = arrays["response_tokens"]
        differs = _gather(tokens, chosen[candidates]) != _gather(tokens, rejected[candidates])
        # every kept response has at least one token, so no row of the reduction is empty
        row_starts = np.cumsum(lengths[candidates]) - lengths[candidates]
        identical[candidates] = np.add.reduceat(differs, row_starts) == 0
    return identical


def _number_examples(data: dict[str, dict], sft_mode: bool) -> tuple[list[str], dict[str, np.ndarray]]:
    """The distinct responses, and per example (a pair, or a prompt for SFT) the number of its prompt and responses.

    Returns (responses, {"example_prompt": (n,), "example_chosen": (n,), "example_rejected": (n,)}), without
    example_rejected for SFT.
    """
    response_number: dict[str, int] = {}
    example_prompt, chosen, rejected = [], [], []
    for prompt_number, entry in enumerate(data.values()):
        if sft_mode:
            chosen.append(response_number.setdefault(entry["sft_target"], len(response_number)))
            example_prompt.append(prompt_number)
            continue
        numbers = [response_number.setdefault(response, len(response_number)) for response in entry["responses"]]
        for preferred, dispreferred in entry["pairs"]:
            chosen.append(numbers[preferred])
            rejected.append(numbers[dispreferred])
        example_prompt += [prompt_number] * len(entry["pairs"])
    numbers = {"example_prompt": example_prompt, "example_chosen": chosen}
    if not sft_mode:
        numbers["example_rejected"] = rejected
    return list(response_number), {name: np.array(values, dtype=np.int64) for name, values in numbers.items()}


def _spans(offsets: np.ndarray) -> np.ndarray:
    """(len(offsets) - 1, 2) [start, stop) rows from (n + 1,) offsets."""
    return np.stack([offsets[:-1], offsets[1:]], axis=1)


def _tokenize_data(
    data: dict[str, dict],
    sft_mode: bool,
    tokenizer,
    special: _SpecialTokens,
    description: str = "tokenizing",
    silent: bool = True,
) -> dict[str, np.ndarray]:
    """What the cache holds for a dataset: each distinct text tokenized once, untruncated, and each example's text numbers.

    Arrays: bos (-1 for none); prompt_text (UTF-8) and prompt_text_spans; prompt_tokens (without
    BOS) and prompt_token_spans; response_tokens (each response + EOS) and response_token_spans;
    example_prompt, example_chosen and (not for SFT) example_rejected. Truncation is applied when
    loading (_truncated), so the cache serves every max_length.
    """
    responses, numbers = _number_examples(data, sft_mode)
    prompt_tokens, prompt_offsets = _tokenize_texts(tokenizer, list(data), f"{description} prompts", silent)
    response_tokens, response_offsets = _tokenize_texts(tokenizer, responses, f"{description} responses", silent)
    response_tokens, response_offsets = _with_eos(response_tokens, response_offsets, special.eos)
    prompt_text = [prompt.encode() for prompt in data]
    text_offsets = np.concatenate([[0], np.cumsum([len(text) for text in prompt_text], dtype=np.int64)])
    return {
        "bos": np.array(-1 if special.bos is None else special.bos, dtype=np.int64),
        "prompt_text": np.frombuffer(b"".join(prompt_text), dtype=np.uint8),
        "prompt_text_spans": _spans(text_offsets),
        "prompt_tokens": prompt_tokens,
        "prompt_token_spans": _spans(prompt_offsets),
        "response_tokens": response_tokens,
        "response_token_spans": _spans(response_offsets),
        **numbers,
    }


def _truncated(
    tokenized: Mapping[str, np.ndarray], truncation_mode: str, max_length: int, max_prompt_length: int
) -> dict[str, np.ndarray]:
    """The storage of TokenizedExamples: the tokenized texts (as _tokenize_data makes them) and each example's spans.

    prompt_spans, chosen_spans and rejected_spans, (n_examples, 2), are what truncation keeps,
    by the rules of the reference scripts: if prefix (BOS) + prompt + the longer response exceeds
    max_length, keep max_prompt_length tokens of prefix + prompt (the prompt's start, or with
    "keep_end" its end); if still too long, cut both responses to the room left.
    """
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode={truncation_mode!r}: expected 'keep_start' or 'keep_end'.")
    n_prefix = int(tokenized["bos"] >= 0)
    prompt_starts, prompt_stops = tokenized["prompt_token_spans"][tokenized["example_prompt"]].T
    prompt_lengths = prompt_stops - prompt_starts
    responses = {
        side: tokenized["response_token_spans"][tokenized[f"example_{side}"]]
        for side in ("chosen", "rejected") if f"example_{side}" in tokenized
    }
    response_lengths = {side: spans[:, 1] - spans[:, 0] for side, spans in responses.items()}
    longer_response = np.maximum.reduce(list(response_lengths.values()))
    too_long = n_prefix + prompt_lengths + longer_response > max_length
    kept = np.where(too_long, np.minimum(prompt_lengths, max_prompt_length - n_prefix), prompt_lengths)
    if truncation_mode == "keep_end":
        prompt_starts = prompt_stops - kept
    room = max_length - n_prefix - kept
    arrays = {name: tokenized[name] for name in ("bos", "prompt_text", "prompt_text_spans", "prompt_tokens", "response_tokens")}
    arrays["example_prompt"] = tokenized["example_prompt"]
    arrays["prompt_spans"] = np.stack([prompt_starts, prompt_starts + kept], axis=1)
    for side, spans in responses.items():
        arrays[f"{side}_spans"] = np.stack([spans[:, 0], spans[:, 0] + np.minimum(response_lengths[side], room)], axis=1)
    return arrays


def _without_identical_pairs(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """The arrays without the pairs that have nothing to train on, and how many those were."""
    if "rejected_spans" not in arrays:
        return arrays, 0
    identical = _identical_pairs(arrays)
    kept = {name: values[~identical] if name in _PER_EXAMPLE else values for name, values in arrays.items()}
    return kept, int(identical.sum())


def tokenize_element(
    prompt: str, chosen: str, rejected: str | None, truncation_mode: str, tokenizer, max_length: int, max_prompt_length: int
) -> dict:
    """One example as TokenizedExamples gives it (without its index): prompt (+BOS), then each response (+EOS), truncated.

    Returns prompt and lists of ints: prompt_input_ids, chosen_input_ids (prompt + chosen),
    chosen_labels (the same with IGNORE_INDEX on prompt positions), and the rejected ones
    when `rejected` is given.
    """
    _check_lengths(max_length, max_prompt_length)
    responses = [chosen] if rejected is None else [chosen, rejected]
    data = {prompt: {"responses": responses, "pairs": [(0, 1)] if rejected is not None else [], "sft_target": chosen}}
    tokenized = _tokenize_data(data, rejected is None, tokenizer, _special_tokens(tokenizer))
    element = TokenizedExamples(_truncated(tokenized, truncation_mode, max_length, max_prompt_length), base_fingerprint="")[0]
    del element["index"]
    return element


# ----- the tokenized cache -------------------------------------------------------------

_STORED_ARRAYS = {  # what a cache entry holds (see _tokenize_data): name -> (dtype, dimensions)
    "key": (np.uint8, 1),
    "bos": (np.int64, 0),
    "prompt_text": (np.uint8, 1),
    "prompt_text_spans": (np.int64, 2),
    "prompt_tokens": (np.int32, 1),
    "prompt_token_spans": (np.int64, 2),
    "response_tokens": (np.int32, 1),
    "response_token_spans": (np.int64, 2),
    "example_prompt": (np.int64, 1),
    "example_chosen": (np.int64, 1),
    "example_rejected": (np.int64, 1),  # absent for SFT data
}


def _data_identity(name: str, dataset_paths: Mapping[str, str] | None) -> dict:
    """What the raw data is, found without reading it: a file's path, size and mtime; a local copy's files; a Hub id.

    A Hub id stands for whatever the `datasets` cache holds for it; loaders without a source
    (numbers) are described completely by their code.
    """
    if _is_data_file(name):
        return {"file": os.path.abspath(name), **_file_stamp(name)}
    loader, source = _loader_and_source(name, dataset_paths)
    if source is None:
        parameter = inspect.signature(loader).parameters.get("source")
        source = None if parameter is None else parameter.default
    if source is None:
        return {"source": None}
    if not _looks_like_path(source):
        return {"hub_id": source}
    root = os.path.abspath(os.path.expanduser(source))
    files = []
    for folder, subfolders, file_names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # as `datasets`, skip .cache/ and the like
        for file_name in sorted(f for f in file_names if not f.startswith(".")):
            path = os.path.join(folder, file_name)
            files.append([os.path.relpath(path, root), *_file_stamp(path).values()])
    return {"directory": root, "files": files}


def _file_stamp(path: str) -> dict:
    try:
        status = os.stat(path)
    except OSError:
        return {"size": None, "mtime_ns": None}  # the loader reports the missing file
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}


@functools.cache
def _project_code_hash() -> str:
    """Hash of the code that turns raw data into examples: this module and embedded.py (the numbers task)."""
    sources = [inspect.getsource(sys.modules[__name__]), inspect.getsource(embedded)]
    return hashlib.sha256("\0".join(sources).encode()).hexdigest()


def _code_identity(name: str) -> str:
    """The project code's hash, plus a get_<name> loader's own code when it is defined outside this module."""
    loader = globals().get(f"get_{name}")
    if _is_data_file(name) or loader is None or loader.__module__ == __name__:
        return _project_code_hash()
    try:
        loader_code = inspect.getsource(loader).encode()
    except (OSError, TypeError):  # defined interactively: hash its compiled code instead
        loader_code = marshal.dumps(loader.__code__)
    return hashlib.sha256(_project_code_hash().encode() + loader_code).hexdigest()


def _tokenizer_identity(tokenizer, special: _SpecialTokens) -> str:
    """Hash of all that decides the token ids: the tokenizer's whole definition, its special tokens, the library versions."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str().encode()  # vocabulary, merges, normalizer, pre-tokenizer, post-processor
    else:
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
            definition = b"".join(path.name.encode() + path.read_bytes() for path in files)
    versions = f"transformers {transformers.__version__} tokenizers {tokenizers.__version__}"
    described = f"{type(tokenizer).__name__} bos={special.bos} eos={special.eos} {versions}"
    return hashlib.sha256(described.encode() + b"\0" + definition).hexdigest()


def _cache_key(name: str, split: str, sft_mode: bool, tokenizer_identity: str, dataset_paths: Mapping[str, str] | None) -> str:
    """Hex SHA-256 of all that one dataset's cached tokens depend on, found without loading the dataset.

    Not the length settings: truncation is applied after loading, so one entry serves them all.
    """
    description = {
        "dataset": name,
        "split": split,
        "sft_mode": sft_mode,
        "data": _data_identity(name, dataset_paths),
        "code": _code_identity(name),
        "tokenizer": tokenizer_identity,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _cache_path(tokenized_cache_dir: str, name: str, split: str, sft_mode: bool, key: str) -> Path:
    """<dir>/<dataset>-<split>-<pairs|sft>-<key prefix>.npz; the full key is stored inside and checked."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name)[:60]
    return Path(tokenized_cache_dir).expanduser() / f"{readable}-{split}-{'sft' if sft_mode else 'pairs'}-{key[:20]}.npz"


def _read_cache_entry(path: Path, key: str, label: str, silent: bool) -> dict[str, np.ndarray] | None:
    """The arrays of the entry at path, or None when there is none or it is unreadable (with a note)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        problem = _storage_problem(arrays, key)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        if not silent:
            print(f"{label}: the cache entry {path} is unreadable ({problem}); rebuilding it.", flush=True)
        return None
    if not silent:
        print(f"{label}: loaded from cache {path}", flush=True)
    del arrays["key"]
    return arrays


def _storage_problem(arrays: Mapping[str, np.ndarray], key: str) -> str | None:
    """What is wrong with arrays read from a cache entry, so that a damaged one is rebuilt instead of failing later."""
    required = set(_STORED_ARRAYS) - {"example_rejected"}
    if not required <= set(arrays) <= set(_STORED_ARRAYS):
        return f"it holds arrays {sorted(arrays)}, not {sorted(required)} (and example_rejected for pairs)"
    for name, values in arrays.items():
        dtype, n_dims = _STORED_ARRAYS[name]
        if values.dtype != dtype or values.ndim != n_dims or (n_dims == 2 and values.shape[1] != 2):
            return f"its array {name} has dtype {values.dtype} and shape {values.shape}"
    if arrays["key"].tobytes() != key.encode():
        return "it was written for another key"
    n_examples = len(arrays["example_prompt"])
    if any(len(arrays[name]) != n_examples for name in _PER_EXAMPLE if name in arrays):
        return f"its per-example arrays differ in length: {[len(arrays[name]) for name in _PER_EXAMPLE if name in arrays]}"
    if len(arrays["prompt_token_spans"]) != len(arrays["prompt_text_spans"]):
        return "it has token spans and text spans for different numbers of prompts"
    for name, target in _POINTS_INTO.items():
        values, size = arrays.get(name), len(arrays[target])
        if values is None or values.size == 0:
            continue
        if values.ndim == 1:  # indices
            within = values.min() >= 0 and values.max() < size
        else:  # [start, stop) spans
            within = values.min() >= 0 and values.max() <= size and bool((values[:, 0] <= values[:, 1]).all())
        if not within:
            return f"its array {name} points outside {target}"
    return None


def _write_cache_entry(path: Path, arrays: Mapping[str, np.ndarray], key: str) -> None:
    """Write the .npz under a temporary name, then rename it: readers see the whole entry or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **arrays, key=np.frombuffer(key.encode(), dtype=np.uint8))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def tokenize_datasets(
    names: list[str],
    split: str,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    sft_mode: bool,
    cache_dir: str | None = None,
    dataset_paths: Mapping[str, str] | None = None,
    silent: bool = False,
    tokenized_cache_dir: str | None = None,
) -> tuple[TokenizedExamples, int]:
    """Tokenized examples of all the datasets, in dataset then prompt order, and the number dropped.

    SFT: one example per prompt (its sft_target, no rejected). Otherwise one per pair; pairs
    whose chosen and rejected token ids are identical after truncation are dropped and counted.

    With tokenized_cache_dir, each dataset's tokens (untruncated) are stored there as one .npz,
    keyed by a hash of: the dataset and its source (a file's or a local copy's sizes and mtimes,
    or the Hub id), the split, sft_mode, the tokenizer, and the code of this module and
    embedded.py. A later call with the same key loads them without reading the raw data, for
    any max_length. The examples' fingerprint hashes these keys and the length settings.
    """
    if not names:
        raise DatasetError("No datasets given: name at least one, e.g. datasets=[hh].")
    _check_lengths(max_length, max_prompt_length)
    special = _special_tokens(tokenizer)
    tokenizer_identity = _tokenizer_identity(tokenizer, special)
    keys, parts, n_dropped = [], [], 0
    for name in names:
        key = _cache_key(name, split, sft_mode, tokenizer_identity, dataset_paths)
        label = f"tokenized {name} {split}"
        path = None if tokenized_cache_dir is None else _cache_path(tokenized_cache_dir, name, split, sft_mode, key)
        tokenized = None if path is None else _read_cache_entry(path, key, label, silent)
        if tokenized is None:
            tokenized = _tokenize_dataset(name, split, sft_mode, tokenizer, special, cache_dir, dataset_paths, silent)
            if path is not None:
                try:
                    _write_cache_entry(path, tokenized, key)
                    if not silent:
                        print(f"{label}: cached at {path}", flush=True)
                except OSError as error:  # the examples are still good; only later runs lose time
                    if not silent:
                        print(f"{label}: could not cache the tokens at {path} ({error}), so the next run tokenizes again.")
        truncated = _truncated(tokenized, truncation_mode_for(name), max_length, max_prompt_length)
        part, n_dropped_here = _without_identical_pairs(truncated)
        parts.append(part)
        n_dropped += n_dropped_here
        keys.append(key)
    settings = f"max_length={max_length} max_prompt_length={max_prompt_length}"
    fingerprint = hashlib.sha256("\n".join(keys + [settings]).encode()).hexdigest()
    return TokenizedExamples.concatenate(parts, fingerprint), n_dropped


def _tokenize_dataset(
    name: str,
    split: str,
    sft_mode: bool,
    tokenizer,
    special: _SpecialTokens,
    cache_dir: str | None,
    dataset_paths: Mapping[str, str] | None,
    silent: bool,
) -> dict[str, np.ndarray]:
    """Load, parse and tokenize one dataset (see _tokenize_data), saying how long it took."""
    start = time.perf_counter()
    data = get_dataset(name, split, silent=silent, cache_dir=cache_dir, dataset_paths=dataset_paths)
    tokenized = _tokenize_data(data, sft_mode, tokenizer, special, f"tokenizing {name} {split}", silent)
    if not silent:
        seconds = time.perf_counter() - start
        print(f"tokenized {name} {split}: {len(tokenized['example_prompt'])} examples in {seconds:.1f} s", flush=True)
    return tokenized


# ----- batching and padding -----------------------------------------------------------


def iterate_batches(
    examples: Sequence[dict],
    batch_size: int,
    shuffle: bool,
    seed: int,
    n_epochs: int | None = None,
    n_examples: int | None = None,
    drop_last: bool = True,
) -> Iterator[list[dict]]:
    """Batches (lists of examples) for n_epochs epochs or n_examples examples, whichever comes first.

    Neither given: one epoch. With shuffle, epoch e is ordered by random.Random(seed + e), so a
    seed fixes the whole order. With drop_last (training) every batch has exactly batch_size
    examples: each epoch's incomplete last batch is dropped, and so is the remainder when
    n_examples is not a multiple of batch_size. Without it (evaluation) the last batch may be short.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    if drop_last and len(examples) < batch_size:
        raise DatasetError(f"Only {len(examples)} examples, fewer than batch_size={batch_size}: not one full batch.")
    if not examples:
        return
    if n_epochs is None and n_examples is None:
        n_epochs = 1
    n_yielded = 0
    for epoch in range(n_epochs) if n_epochs is not None else itertools.count():
        order = list(range(len(examples)))
        if shuffle:
            random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start:start + batch_size]]
            if n_examples is not None:
                batch = batch[: n_examples - n_yielded]
            reached_limit = n_examples is not None and n_yielded + len(batch) >= n_examples
            if batch and (len(batch) == batch_size or not drop_last):
                yield batch
                n_yielded += len(batch)
            if reached_limit:
                return


def _pad(sequences: list[list[int]], length: int, value: int, left: bool = False) -> torch.Tensor:
    """(len(sequences), length) LongTensor of the sequences, padded with `value` on the right (or left)."""
    if value is None:
        raise ValueError("pad_token_id is None: the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token).")
    padded = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            values = torch.tensor(sequence, dtype=torch.long)
            if left:
                padded[row, length - len(sequence):] = values
            else:
                padded[row, : len(sequence)] = values
    return padded


def padded_batch(input_ids: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One sequence per row, right-padded to the longest: input_ids, attention_mask, labels, each (n, longest).

    Padding is labelled IGNORE_INDEX. A DPO batch passes its chosen then its rejected
    sequences, so both go through the model in one forward pass.
    """
    length = max(len(ids) for ids in input_ids)
    return {
        "input_ids": _pad(input_ids, length, pad_token_id),
        "attention_mask": _pad([[1] * len(ids) for ids in input_ids], length, 0),
        "labels": _pad(labels, length, IGNORE_INDEX),
    }


def packed_batch(input_ids: list[list[int]], labels: list[list[int]], pad_token_id: int, row_tokens: int) -> dict[str, torch.Tensor]:
    """Several sequences per row, so that almost no position is padding (padding-free batches).

    Sequences are placed first-fit, longest first, into rows of `row_tokens` tokens (or the
    longest sequence, if longer). Each sequence's position ids restart at 0; with no attention
    mask, transformers reads those restarts as sequence boundaries and keeps attention inside
    each sequence (a block-diagonal causal mask for sdpa/eager, varlen kernels for flash
    attention). The first label of every sequence is IGNORE_INDEX, so no token is ever
    predicted from the sequence before it: the log-probs equal the padded path's exactly.

    Returns input_ids, position_ids, labels and sequence_ids (index into the arguments,
    -1 on padding), each (rows, longest row).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i])):
        length = len(input_ids[index])
        row = next((r for r, free in enumerate(room) if length <= free), None)
        if row is None:
            rows.append([])
            room.append(max(row_tokens, length))
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= length
    width = max(sum(len(input_ids[i]) for i in row) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "sequence_ids": torch.full((len(rows), width), -1, dtype=torch.long),
    }
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            end = start + len(input_ids[index])
            batch["input_ids"][row, start:end] = torch.tensor(input_ids[index])
            batch["position_ids"][row, start:end] = torch.arange(end - start)
            batch["labels"][row, start + 1:end] = torch.tensor(labels[index][1:])
            batch["sequence_ids"][row, start:end] = index
            start = end
        # the padding tail is a sequence of its own (positions from 0) that nothing attends to
        batch["position_ids"][row, start:] = torch.arange(width - start)
    return batch


def collate_prompts(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: prompt_input_ids and prompt_attention_mask, (batch, longest prompt)."""
    prompts = [e["prompt_input_ids"] for e in examples]
    length = max(len(ids) for ids in prompts)
    return {
        "prompt_input_ids": _pad(prompts, length, pad_token_id, left=True),
        "prompt_attention_mask": _pad([[1] * len(ids) for ids in prompts], length, 0, left=True),
    }

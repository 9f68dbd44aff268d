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
"""

import hashlib
import inspect
import itertools
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import torch
import tqdm

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
    for row_number, row in enumerate(tqdm.tqdm(rows, desc=f"hh {split}", disable=silent)):
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
    for row in tqdm.tqdm(rows, desc=f"shp {split}", disable=silent):
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
    for row in tqdm.tqdm(rows, desc=f"se {split}", disable=silent):
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
    if name.endswith(DATA_FILE_SUFFIXES) or os.path.isfile(name):
        data = load_preference_file(name, split)
    else:
        if name not in available_datasets():
            raise DatasetError(
                f"Unknown dataset {name!r}. Known: {', '.join(available_datasets())}; or give a path to a "
                f".jsonl/.json/.parquet file with string fields prompt, chosen and rejected; or add a "
                f"get_{name}(split, silent=False, cache_dir=None) function to preference_datasets.py."
            )
        loader = globals()[f"get_{name}"]
        kwargs = {}
        if dataset_paths is not None and name in dataset_paths:
            if "source" not in inspect.signature(loader).parameters:
                raise DatasetError(f"dataset_paths.{name} is set, but get_{name} takes no source; remove that entry.")
            kwargs["source"] = str(dataset_paths[name])
        data = loader(split, silent=silent, cache_dir=cache_dir, **kwargs)
    check_contract(name, data)
    return data


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


def _build_element(
    prompt: str,
    chosen: str,
    rejected: str | None,
    token_ids: Mapping[str, list[int]],
    special: _SpecialTokens,
    truncation_mode: str,
    max_length: int,
    max_prompt_length: int,
) -> dict:
    """The tokenization rules, given each text's token ids without special tokens."""
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode={truncation_mode!r}: expected 'keep_start' or 'keep_end'.")
    prefix = [] if special.bos is None else [special.bos]
    prompt_ids = prefix + token_ids[prompt]
    responses = {"chosen": token_ids[chosen] + [special.eos]}
    if rejected is not None:
        responses["rejected"] = token_ids[rejected] + [special.eos]
    longer_response = max(len(ids) for ids in responses.values())
    # As the reference scripts: first shorten the prompt, then, if still too long, the responses.
    if len(prompt_ids) + longer_response > max_length:
        if truncation_mode == "keep_start":
            prompt_ids = prompt_ids[:max_prompt_length]
        else:  # the last tokens, behind the BOS if there is one
            body, keep = prompt_ids[len(prefix):], max_prompt_length - len(prefix)
            prompt_ids = prefix + body[max(len(body) - keep, 0):]
    if len(prompt_ids) + longer_response > max_length:
        responses = {side: ids[: max_length - len(prompt_ids)] for side, ids in responses.items()}

    element = {"prompt": prompt, "prompt_input_ids": prompt_ids}
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        if side in responses:
            element[f"{side}_text"] = text
            element[f"{side}_input_ids"] = prompt_ids + responses[side]
            element[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + responses[side]
    return element


def tokenize_element(
    prompt: str, chosen: str, rejected: str | None, truncation_mode: str, tokenizer, max_length: int, max_prompt_length: int
) -> dict:
    """Token ids of one example: prompt (+BOS) followed by each response (+EOS), truncated to max_length.

    Returns plain lists: prompt_input_ids, chosen_input_ids (prompt + chosen), chosen_labels
    (the same with IGNORE_INDEX on prompt positions), the rejected ones when `rejected` is
    given, and the strings prompt, chosen_text, rejected_text.
    """
    texts = [text for text in (prompt, chosen, rejected) if text is not None]
    token_ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False).input_ids))
    special = _special_tokens(tokenizer)
    return _build_element(prompt, chosen, rejected, token_ids, special, truncation_mode, max_length, max_prompt_length)


def _tokenize_texts(tokenizer, texts: Iterable[str]) -> dict[str, list[int]]:
    """Token ids (no special tokens) of each distinct text, in batched tokenizer calls."""
    unique = list(dict.fromkeys(texts))
    token_ids = {}
    for start in range(0, len(unique), TOKENIZE_CHUNK):
        chunk = unique[start:start + TOKENIZE_CHUNK]
        token_ids.update(zip(chunk, tokenizer(chunk, add_special_tokens=False).input_ids))
    return token_ids


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
) -> tuple[list[dict], int]:
    """Tokenized examples of all the datasets, in dataset then prompt order, and the number dropped.

    SFT: one example per prompt (its sft_target, no rejected). Otherwise one per pair; pairs
    whose chosen and rejected token ids are identical after truncation are dropped and counted.
    """
    special = _special_tokens(tokenizer)
    examples, n_dropped = [], 0
    for name in names:
        data = get_dataset(name, split, silent=silent, cache_dir=cache_dir, dataset_paths=dataset_paths)
        if sft_mode:
            triples = [(prompt, entry["sft_target"], None) for prompt, entry in data.items()]
        else:
            triples = [
                (prompt, entry["responses"][i], entry["responses"][j])
                for prompt, entry in data.items()
                for i, j in entry["pairs"]
            ]
        token_ids = _tokenize_texts(tokenizer, (text for triple in triples for text in triple if text is not None))
        mode = truncation_mode_for(name)
        for prompt, chosen, rejected in triples:
            element = _build_element(prompt, chosen, rejected, token_ids, special, mode, max_length, max_prompt_length)
            if rejected is not None and element["chosen_input_ids"] == element["rejected_input_ids"]:
                n_dropped += 1
                continue
            examples.append(element)
    return examples, n_dropped


# ----- batching and padding -----------------------------------------------------------


def iterate_batches(
    examples: list[dict],
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


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a batch, chosen and rejected padded to ONE length so they concatenate.

    Returns chosen_input_ids, chosen_attention_mask, chosen_labels (padding labelled
    IGNORE_INDEX), and the rejected_* ones when the examples have a rejected response;
    each of shape (batch, longest sequence).
    """
    has_rejected = "rejected_input_ids" in examples[0]
    if any(("rejected_input_ids" in e) != has_rejected for e in examples):
        raise ValueError("A batch mixes examples with and without a rejected response.")
    sides = ["chosen", "rejected"] if has_rejected else ["chosen"]
    length = max(len(e[f"{side}_input_ids"]) for e in examples for side in sides)
    batch = {}
    for side in sides:
        input_ids = [e[f"{side}_input_ids"] for e in examples]
        batch[f"{side}_input_ids"] = _pad(input_ids, length, pad_token_id)
        batch[f"{side}_attention_mask"] = _pad([[1] * len(ids) for ids in input_ids], length, 0)
        batch[f"{side}_labels"] = _pad([e[f"{side}_labels"] for e in examples], length, IGNORE_INDEX)
    return batch


def collate_prompts(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: prompt_input_ids and prompt_attention_mask, (batch, longest prompt)."""
    prompts = [e["prompt_input_ids"] for e in examples]
    length = max(len(ids) for ids in prompts)
    return {
        "prompt_input_ids": _pad(prompts, length, pad_token_id, left=True),
        "prompt_attention_mask": _pad([[1] * len(ids) for ids in prompts], length, 0, left=True),
    }

"""The tokenize cache: each dataset split's untruncated tokens stored once as an .npz, keyed by all that shapes them.

The key covers the raw data (a file's or a local copy's sizes and mtimes, or the Hub id), the
split, SFT or pairs, the tokenizer's whole definition, and the code that turns raw data into
tokens (CODE_MODULES). Truncation is applied after loading, so one entry serves every
max_length. Entries are written under a temporary name and renamed; a damaged entry is
rebuilt, never trusted.
"""

import functools
import hashlib
import importlib
import inspect
import json
import marshal
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tokenizers
import transformers

import console
import dataset_loading
from data_sources import looks_like_path
from dataset_files import is_data_file

# the modules whose code decides the tokens of a cached entry: editing one re-tokenizes
CODE_MODULES = (
    "preference_datasets",
    "preference_entry",
    "dataset_registry",
    "dataset_files",
    "dataset_loading",
    "conversations",
    "data_sources",
    "tokenization",
    "tokenized_examples",
    "token_cache",
    "embedded",
    "chat_templates",
)

# Which array each index array points into, in the cached arrays of a dataset (_tokenize_data) and in
# the storage of TokenizedExamples (_truncated): where both are validated and concatenated.
POINTS_INTO = {
    "prompt_text_spans": "prompt_text",
    "prompt_token_spans": "prompt_tokens",
    "prompt_messages_spans": "prompt_messages",
    "response_token_spans": "response_tokens",
    "example_prompt": "prompt_text_spans",
    "example_chosen": "response_token_spans",
    "example_rejected": "response_token_spans",
    "prompt_spans": "prompt_tokens",
    "chosen_spans": "response_tokens",
    "rejected_spans": "response_tokens",
}


PER_EXAMPLE = (
    "example_prompt",
    "example_chosen",
    "example_rejected",
    "example_label",
    "prompt_spans",
    "chosen_spans",
    "rejected_spans",
)


_STORED_ARRAYS = {  # what a cache entry holds (see _tokenize_data): name -> (dtype, dimensions)
    "key": (np.uint8, 1),
    "bos": (np.int64, 0),
    "prompt_text": (np.uint8, 1),
    "prompt_text_spans": (np.int64, 2),
    "prompt_tokens": (np.int32, 1),
    "prompt_token_spans": (np.int64, 2),
    "prompt_trained": (np.uint8, 1),  # 1 on prompt tokens SFT trains (earlier assistant turns), aligned with them
    "prompt_messages": (np.uint8, 1),  # UTF-8 JSON of each conversational prompt's messages
    "prompt_messages_spans": (np.int64, 2),  # empty for text prompts
    "prompt_has_pairs": (np.uint8, 1),  # 1 when the prompt's entry has a pair (or a tie), 0 for an SFT target only
    "response_tokens": (np.int32, 1),
    "response_token_spans": (np.int64, 2),
    "example_prompt": (np.int64, 1),
    "example_chosen": (np.int64, 1),
    "example_rejected": (np.int64, 1),  # absent for SFT data
    "example_label": (
        np.int64,
        1,
    ),  # KTO only: 1 desirable, 0 undesirable (the rejected side is a mismatched completion)
}


def _data_identity(name: str, dataset_paths: Mapping[str, str] | None) -> dict:
    """What the raw data is, found without reading it: a file's path, size and mtime; a local copy's files; a Hub id.

    A Hub id stands for whatever the `datasets` cache holds for it; loaders without a source
    (numbers) are described completely by their code.
    """
    if is_data_file(name):
        return {"file": os.path.abspath(name), **_file_stamp(name)}
    row = dataset_loading.dataset_row(name)
    source = dataset_loading.dataset_source(row, dataset_paths) or row.source
    if source is None:
        return {"source": None}
    if not looks_like_path(source):
        return {"hub_id": source}
    root = os.path.abspath(os.path.expanduser(source))
    files = []
    for folder, subfolders, file_names in os.walk(root):
        subfolders[:] = sorted(
            d for d in subfolders if not d.startswith(".")
        )  # as `datasets`, skip .cache/ and the like
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
    """Hash of the code that turns raw data into tokens: the CODE_MODULES (batching, say, is not among them)."""
    sources = [inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES]
    return hashlib.sha256("\0".join(sources).encode()).hexdigest()


def _code_identity(name: str) -> str:
    """The project code's hash, plus a registered loader's own code when it is defined outside CODE_MODULES."""
    if is_data_file(name):
        return _project_code_hash()
    loader = dataset_loading.dataset_row(name).loader
    if loader.__module__ in CODE_MODULES:
        return _project_code_hash()
    try:
        loader_code = inspect.getsource(loader).encode()
    except (OSError, TypeError):  # defined interactively: hash its compiled code instead
        loader_code = marshal.dumps(loader.__code__)
    return hashlib.sha256(_project_code_hash().encode() + loader_code).hexdigest()


def tokenizer_identity(tokenizer, special) -> str:
    """Hash of all that decides the token ids: the tokenizer's definition, its special tokens, the library versions."""
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
    # the chat template renders conversational data (and is not part of the backend's definition)
    template = json.dumps(tokenizer.chat_template, sort_keys=True)
    return hashlib.sha256(described.encode() + b"\0" + definition + b"\0" + template.encode()).hexdigest()


def cache_key(
    name: str,
    split: str,
    sft_mode: bool,
    tokenizer_identity: str,
    dataset_paths: Mapping[str, str] | None,
    settings: Mapping | None = None,
) -> str:
    """Hex SHA-256 of all that one dataset's cached tokens depend on, found without loading the dataset.

    `settings`: the other settings the tokens depend on (the dataset's options, SFT on every
    assistant turn), as plain JSON-serializable values. Not the length settings: truncation is applied after
    loading, so one entry serves them all.
    """
    description = {
        "dataset": name,
        "split": split,
        "sft_mode": sft_mode,
        "data": _data_identity(name, dataset_paths),
        "code": _code_identity(name),
        "tokenizer": tokenizer_identity,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def cache_path(tokenized_cache_dir: str, name: str, split: str, sft_mode: bool, key: str) -> Path:
    """<dir>/<dataset>-<split>-<pairs|sft>-<key prefix>.npz; the full key is stored inside and checked."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name)[:60]
    return (
        Path(tokenized_cache_dir).expanduser() / f"{readable}-{split}-{'sft' if sft_mode else 'pairs'}-{key[:20]}.npz"
    )


def read_cache_entry(path: Path, key: str, label: str) -> dict[str, np.ndarray] | None:
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
        console.say(f"{label}: the cache entry {path} is unreadable ({problem}); rebuilding it.")
        return None
    console.say(f"{label}: loaded from cache {path}")
    del arrays["key"]
    return arrays


def _storage_problem(arrays: Mapping[str, np.ndarray], key: str) -> str | None:
    """What is wrong with arrays read from a cache entry, so that a damaged one is rebuilt instead of failing later."""
    required = set(_STORED_ARRAYS) - {"example_rejected", "example_label"}
    if not required <= set(arrays) <= set(_STORED_ARRAYS):
        return f"it holds arrays {sorted(arrays)}, not {sorted(required)} (and example_rejected for pairs)"
    for name, values in arrays.items():
        dtype, n_dims = _STORED_ARRAYS[name]
        if values.dtype != dtype or values.ndim != n_dims or (n_dims == 2 and values.shape[1] != 2):
            return f"its array {name} has dtype {values.dtype} and shape {values.shape}"
    if arrays["key"].tobytes() != key.encode():
        return "it was written for another key"
    n_examples = len(arrays["example_prompt"])
    if any(len(arrays[name]) != n_examples for name in PER_EXAMPLE if name in arrays):
        return (
            f"its per-example arrays differ in length: {[len(arrays[name]) for name in PER_EXAMPLE if name in arrays]}"
        )
    prompt_arrays = ("prompt_token_spans", "prompt_text_spans", "prompt_messages_spans", "prompt_has_pairs")
    if len({len(arrays[name]) for name in prompt_arrays}) != 1:
        return f"its per-prompt arrays {', '.join(prompt_arrays)} differ in length"
    if len(arrays["prompt_trained"]) != len(arrays["prompt_tokens"]):
        return "its prompt_trained and prompt_tokens differ in length"
    for name, target in POINTS_INTO.items():
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


def write_cache_entry(path: Path, arrays: Mapping[str, np.ndarray], key: str) -> None:
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

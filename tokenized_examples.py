"""The tokenized examples the trainer reads: TokenizedExamples, a view over compact token storage, and its selections.

tokenization.py makes the storage: each distinct prompt and response tokenized once, and per
example the spans that truncation keeps. examples[i] builds the dict the trainer consumes from it.
"""

import hashlib
import json
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from logprobs import IGNORE_INDEX
from token_cache import POINTS_INTO


class TokenizedExamples(Sequence):
    """Tokenized examples, stored compactly; `examples[i]` is the dict the trainer consumes.

    examples[i] has: prompt (str), prompt_input_ids (the prompt after truncation, BOS first when
    the tokenizer adds one), chosen_input_ids (prompt + chosen response, EOS last unless
    truncated), chosen_labels (the same with IGNORE_INDEX on prompt positions), the rejected ones
    unless this is SFT data, desirable (bool) for KTO examples (whose rejected side is a mismatched
    completion: preference_entry.with_mismatched_completions), and index (i, the position in this
    sequence), all lists of ints.
    Conversational examples also have prompt_messages (the prompt's [{"role", "content"}, ...]);
    their prompt is the chat template's text, and each response ends with its end-of-turn token
    (chat_templates.py). SFT on every assistant turn also labels the prompt's assistant turns.

    `fingerprint` is a hex SHA-256 naming the content: the cache keys of the datasets (see
    tokenize_datasets) and, for a selection of them, the rows selected.

    Storage, shared by every selection: each distinct prompt once (UTF-8 text, its token ids
    untruncated, without BOS, which of them are trained, and its messages as UTF-8 JSON, empty for
    text prompts), each distinct response once (token ids + EOS or end-of-turn), and per stored
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
            self.fingerprint = hashlib.sha256(
                base_fingerprint.encode() + self._rows.astype("<i8").tobytes()
            ).hexdigest()

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
        prompt_number = arrays["example_prompt"][row]
        text_start, text_stop = arrays["prompt_text_spans"][prompt_number]
        start, stop = arrays["prompt_spans"][row]
        prompt_ids = self._prompt_prefix + arrays["prompt_tokens"][start:stop].tolist()
        # positions of earlier assistant turns that SFT on every assistant turn trains; none otherwise
        trained = arrays["prompt_trained"][start:stop].astype(bool)
        prompt_labels = [IGNORE_INDEX] * len(self._prompt_prefix)
        prompt_labels += np.where(trained, arrays["prompt_tokens"][start:stop], IGNORE_INDEX).tolist()
        example = {
            "prompt": arrays["prompt_text"][text_start:text_stop].tobytes().decode(),
            "prompt_input_ids": prompt_ids,
        }
        messages_start, messages_stop = arrays["prompt_messages_spans"][prompt_number]
        if messages_stop > messages_start:
            example["prompt_messages"] = json.loads(arrays["prompt_messages"][messages_start:messages_stop].tobytes())
        for side in self._sides:
            start, stop = arrays[f"{side}_spans"][row]
            response = arrays["response_tokens"][start:stop].tolist()
            example[f"{side}_input_ids"] = prompt_ids + response
            example[f"{side}_labels"] = prompt_labels + response
        if "example_label" in arrays:  # KTO: the rejected side is a mismatched completion, not a dispreferred one
            example["desirable"] = bool(arrays["example_label"][row])
        example["index"] = position
        return example

    def __iter__(self) -> Iterator[dict]:
        return (self[position] for position in range(len(self)))

    def __repr__(self) -> str:
        kind = "pairs" if self.has_rejected else "SFT examples"
        return f"TokenizedExamples({len(self)} {kind}, fingerprint={self.fingerprint[:12]}...)"

    def select(self, positions: Iterable[int]) -> "TokenizedExamples":
        """The examples at these positions (negative ones from the end), in this order; a view of the same storage.

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
    def desirable(self) -> np.ndarray | None:
        """(len(self),) bool: KTO examples' labels (True: desirable); None for pairs and SFT examples."""
        labels = self._arrays.get("example_label")
        return None if labels is None else labels[self._rows].astype(bool)

    @property
    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(chosen_lengths, rejected_lengths), each (len(self),) int64: lengths of chosen/rejected_input_ids.

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
        """The examples of each part's storage (tokenization._truncated makes it), one part after the other."""
        return TokenizedExamples(concatenate_arrays(parts), fingerprint)


def concatenate_arrays(parts: list[Mapping[str, np.ndarray]]) -> Mapping[str, np.ndarray]:
    """One storage (or cached dataset) holding each part's examples, one part after the other."""
    if len({int(part["bos"]) for part in parts}) != 1 or len({_has_pairs(part) for part in parts}) != 1:
        raise ValueError("Tokenized parts made with different tokenizers or modes cannot be concatenated.")
    if len(parts) == 1:
        return parts[0]
    arrays = {"bos": parts[0]["bos"]}
    for name in parts[0].keys() - {"bos"}:
        target = POINTS_INTO.get(name)
        if target is None:
            arrays[name] = np.concatenate([part[name] for part in parts])
            continue
        # indices into `target` move by the lengths of the earlier parts' `target`s
        shifts = np.cumsum([0] + [len(part[target]) for part in parts[:-1]])
        arrays[name] = np.concatenate([part[name] + shift for part, shift in zip(parts, shifts)])
    return arrays


def _has_pairs(arrays: Mapping[str, np.ndarray]) -> bool:
    return "example_rejected" in arrays or "rejected_spans" in arrays

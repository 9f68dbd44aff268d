"""Tokenizing preference data: tokenize_datasets with its TokenizeSettings, special tokens, truncation.

tokenize_datasets tokenizes every distinct text once, in batched calls to the tokenizer, into a
TokenizedExamples (tokenized_examples.py: flat token arrays; examples[i] is the dict the trainer
consumes). Given a tokenized_cache_dir it stores the untruncated tokens as one .npz per dataset
(token_cache.py), so later runs, with any max_length, load them in about a second without reading
the raw data.
"""

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tqdm
from omegaconf import DictConfig, OmegaConf

import chat_templates
import console
import dataset_loading
import preference_entry
import token_cache
from errors import DatasetError
from preference_entry import PreferenceEntry, Prompt
from token_cache import PER_EXAMPLE
from tokenized_examples import TokenizedExamples, concatenate_arrays

TOKENIZE_CHUNK = 1024  # texts per batched tokenizer call


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything besides the dataset names, the split and the tokenizer that decides the tokenized examples."""

    max_length: int  # tokens of prompt + response; longer examples are truncated (_truncated)
    max_prompt_length: int  # tokens a prompt keeps when prompt + response exceeds max_length
    sft_mode: bool  # one example per prompt (its sft_target), not one per pair
    every_assistant_turn: bool = False  # SFT also trains the assistant turns inside conversational prompts
    dataset_paths: Mapping[str, str | None] = field(default_factory=dict)  # dataset name -> local copy
    dataset_options: Mapping[str, Mapping] = field(default_factory=dict)  # dataset name -> its loader's options
    datasets_cache_dir: str | None = None  # where `datasets` keeps Hub downloads; None: its default
    tokenized_cache_dir: str | None = None  # where each dataset's tokens are cached (token_cache.py); None: nowhere
    unpaired: bool = False  # KTO: one example per labelled completion (preference_entry.with_mismatched_completions)
    pairs_as_unpaired: bool = False  # KTO on paired data: chosen desirable, rejected undesirable

    @classmethod
    def from_config(cls, config: DictConfig, sft_mode: bool, unpaired: bool = False) -> "TokenizeSettings":
        """The settings of a run's config (train.py); sft_mode and unpaired come from its loss."""
        cache_dir = config.cache_dir
        return cls(
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            sft_mode=sft_mode,
            unpaired=unpaired,
            pairs_as_unpaired=config.pairs_as_unpaired,
            every_assistant_turn=config.sft_every_assistant_turn,
            dataset_paths=_plain(config.dataset_paths),
            dataset_options=_plain(config.dataset_options),
            tokenized_cache_dir=None if cache_dir is None else str(Path(cache_dir) / "tokenized"),
        )


def _plain(node) -> dict:
    """A config node (DictConfig) as plain Python dicts."""
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else dict(node or {})


@dataclass(frozen=True)
class _SpecialTokens:
    bos: int | None  # prepended to prompts when the tokenizer adds it by default (Llama), else None (GPT-2)
    eos: int  # appended to every response, so the model learns to stop


def _special_tokens(tokenizer) -> _SpecialTokens:
    if tokenizer.eos_token_id is None:
        raise DatasetError(
            f"The tokenizer {type(tokenizer).__name__} has no EOS token, so responses cannot be ended; "
            "set tokenizer.eos_token."
        )
    bos = tokenizer.bos_token_id
    with_defaults = tokenizer("x").input_ids
    adds_bos = (
        bos is not None
        and with_defaults[:1] == [bos]
        and tokenizer("x", add_special_tokens=False).input_ids[:1] != [bos]
    )
    return _SpecialTokens(bos=bos if adds_bos else None, eos=tokenizer.eos_token_id)


def length_problem(max_length: int, max_prompt_length: int) -> str | None:
    """Why these length limits cannot truncate examples sensibly, or None (the config checks report it too)."""
    if 0 < max_prompt_length < max_length:
        return None
    return (
        f"max_prompt_length={max_prompt_length} and max_length={max_length}: need 0 < max_prompt_length < max_length, "
        "so that every truncated example keeps some prompt and some response."
    )


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    problem = length_problem(max_length, max_prompt_length)
    if problem:
        raise ValueError(problem)


def _tokenize_texts(tokenizer, texts: list[str], description: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (no special tokens) of each text, in batched calls.

    Returns flat int32 ids (total,) and int64 offsets (len(texts) + 1,).
    """
    lengths = np.zeros(len(texts), dtype=np.int64)
    pieces = [np.zeros(0, dtype=np.int32)]
    starts = range(0, len(texts), TOKENIZE_CHUNK)
    quiet = len(starts) < 2 or not console.is_main_process()
    for start in tqdm.tqdm(starts, desc=description, unit="chunk", disable=quiet):
        chunk = texts[start : start + TOKENIZE_CHUNK]
        token_ids = tokenizer(
            chunk, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
        ).input_ids
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


def _compared_responses(entry: PreferenceEntry) -> list[tuple[int, int]]:
    """The (chosen, rejected) response indices of an entry's examples: its pairs, then its ties (one index twice).

    A tie makes an example whose two sides are the same, so that it is dropped and counted with the
    pairs that truncation makes identical (_without_identical_pairs).
    """
    return list(entry.pairs) + [(index, index) for index in entry.tied]


def _number_examples(data: dict[str, PreferenceEntry], sft_mode: bool) -> tuple[list[str], dict[str, np.ndarray]]:
    """The distinct responses, and per example (a pair, or a prompt for SFT) the number of its prompt and responses.

    Returns (responses, {"example_prompt": (n,), "example_chosen": (n,), "example_rejected": (n,)}), without
    example_rejected for SFT.
    """
    response_number: dict[str, int] = {}
    example_prompt, chosen, rejected, labels = [], [], [], []
    for prompt_number, entry in enumerate(data.values()):
        if sft_mode:
            chosen.append(response_number.setdefault(entry.sft_target, len(response_number)))
            example_prompt.append(prompt_number)
            continue
        numbers = [response_number.setdefault(response, len(response_number)) for response in entry.responses]
        compared = _compared_responses(entry)
        for preferred, dispreferred in compared:
            chosen.append(numbers[preferred])
            rejected.append(numbers[dispreferred])
        example_prompt += [prompt_number] * len(compared)
        labels += entry.labels
    numbers = {"example_prompt": example_prompt, "example_chosen": chosen}
    if not sft_mode:
        numbers["example_rejected"] = rejected
    if _is_unpaired(data):
        numbers["example_label"] = labels
    return list(response_number), {name: np.array(values, dtype=np.int64) for name, values in numbers.items()}


def _is_unpaired(data: Mapping[Prompt, PreferenceEntry]) -> bool:
    """Whether the entries hold KTO examples (with_mismatched_completions): pairs with a label each, no ties."""
    return any(entry.labels for entry in data.values())


def _spans(offsets: np.ndarray) -> np.ndarray:
    """(len(offsets) - 1, 2) [start, stop) rows from (n + 1,) offsets."""
    return np.stack([offsets[:-1], offsets[1:]], axis=1)


def _tokenize_data(
    data: dict[Prompt, PreferenceEntry],
    sft_mode: bool,
    tokenizer,
    special: _SpecialTokens,
    description: str = "tokenizing",
    every_assistant_turn: bool = False,
) -> dict[str, np.ndarray]:
    """What the cache holds for a dataset: each distinct text tokenized once, untruncated, and each example's texts.

    Arrays: bos (-1 for none); prompt_text (UTF-8) and prompt_text_spans; prompt_tokens (without
    BOS), prompt_token_spans and prompt_trained (1 on the prompt tokens SFT trains); prompt_messages
    (UTF-8 JSON) and prompt_messages_spans (empty for text prompts); prompt_has_pairs (1 when the
    prompt's entry has a pair or a tie, 0 when it has only an SFT target); response_tokens (each response
    + EOS, or up to its end-of-turn token) and response_token_spans; example_prompt, example_chosen
    and (not for SFT) example_rejected; example_label (1: desirable) for KTO examples. Text prompts
    come first, then conversational ones (_tokenize_conversations). Truncation is applied when
    loading (_truncated), so the cache serves every max_length.
    """
    texts = {prompt: entry for prompt, entry in data.items() if isinstance(prompt, str)}
    conversations = {prompt: entry for prompt, entry in data.items() if not isinstance(prompt, str)}
    parts = []
    if texts or not conversations:
        parts.append(_tokenize_text_data(texts, sft_mode, tokenizer, special, description))
    if conversations:
        parts.append(
            _tokenize_conversations(conversations, sft_mode, tokenizer, special, every_assistant_turn, description)
        )
    return concatenate_arrays(parts)


def _tokenize_text_data(
    data: dict[str, PreferenceEntry], sft_mode: bool, tokenizer, special: _SpecialTokens, description: str
) -> dict[str, np.ndarray]:
    """_tokenize_data for text prompts: prompts and responses tokenized apart, EOS after each response."""
    responses, numbers = _number_examples(data, sft_mode)
    prompt_tokens, prompt_offsets = _tokenize_texts(tokenizer, list(data), f"{description} prompts")
    response_tokens, response_offsets = _tokenize_texts(tokenizer, responses, f"{description} responses")
    response_tokens, response_offsets = _with_eos(response_tokens, response_offsets, special.eos)
    return _TokenizedTexts(
        prompt_texts=list(data),
        prompt_messages=[b""] * len(data),
        prompt_has_pairs=[_has_pairs_to_compare(entry) for entry in data.values()],
        prompt_tokens=prompt_tokens,
        prompt_offsets=prompt_offsets,
        prompt_trained=np.zeros(len(prompt_tokens), dtype=np.uint8),
        response_tokens=response_tokens,
        response_offsets=response_offsets,
        examples=numbers,
    ).stored_arrays(special)


def _has_pairs_to_compare(entry: PreferenceEntry) -> bool:
    return bool(entry.pairs or entry.tied)


@dataclass(frozen=True)
class _TokenizedTexts:
    """One dataset's texts as flat token arrays with (n + 1,) offsets into them: what _tokenize_data stores."""

    prompt_texts: list[str]  # what TokenizedExamples shows as each prompt (a conversation's rendered template)
    prompt_messages: list[bytes]  # UTF-8 JSON of each conversational prompt's messages, b"" for text prompts
    prompt_has_pairs: list[bool]  # per prompt: its entry has a pair or a tie (else only an SFT target)
    prompt_tokens: np.ndarray  # (total,) int32, each prompt's tokens without BOS
    prompt_offsets: np.ndarray  # (n_prompts + 1,) int64
    prompt_trained: np.ndarray  # (total,) uint8, aligned with prompt_tokens: 1 where SFT trains a prompt token
    response_tokens: np.ndarray  # (total,) int32, each distinct response's tokens, EOS or end-of-turn last
    response_offsets: np.ndarray  # (n_responses + 1,) int64
    examples: dict[str, np.ndarray]  # example_prompt, example_chosen and (not for SFT) example_rejected

    def stored_arrays(self, special: _SpecialTokens) -> dict[str, np.ndarray]:
        """The arrays of _tokenize_data (and of a cache entry)."""

        def packed(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
            offsets = np.concatenate([[0], np.cumsum([len(item) for item in items], dtype=np.int64)])
            return np.frombuffer(b"".join(items), dtype=np.uint8), _spans(offsets)

        prompt_text, prompt_text_spans = packed([text.encode() for text in self.prompt_texts])
        messages, messages_spans = packed(self.prompt_messages)
        return {
            "bos": np.array(-1 if special.bos is None else special.bos, dtype=np.int64),
            "prompt_text": prompt_text,
            "prompt_text_spans": prompt_text_spans,
            "prompt_tokens": self.prompt_tokens,
            "prompt_token_spans": _spans(self.prompt_offsets),
            "prompt_trained": self.prompt_trained,
            "prompt_messages": messages,
            "prompt_messages_spans": messages_spans,
            "prompt_has_pairs": np.array(self.prompt_has_pairs, dtype=np.uint8),
            "response_tokens": self.response_tokens,
            "response_token_spans": _spans(self.response_offsets),
            **self.examples,
        }


def _token_lists(tokenizer, texts: list[str | None], description: str) -> list[np.ndarray | None]:
    """Token ids (no special tokens added; those written in the text are kept) of each text; None stays None."""
    tokens, offsets = _tokenize_texts(tokenizer, [text or "" for text in texts], description)
    return [None if text is None else tokens[offsets[i] : offsets[i + 1]] for i, text in enumerate(texts)]


def _answer_tokens(
    prompt: np.ndarray, whole: np.ndarray, end_of_turn: int | None, eos: int | None
) -> np.ndarray | None:
    """What `whole` adds after `prompt`, up to and including the first end-of-turn token (+ eos without one).

    None when `prompt` is not a prefix of `whole`, or the answer has no end-of-turn token.
    """
    n_prompt = len(prompt)
    if len(whole) <= n_prompt or not np.array_equal(whole[:n_prompt], prompt):
        return None
    answer = whole[n_prompt:]
    if end_of_turn is None:
        return answer if eos is None else np.append(answer, np.int32(eos))
    ends = np.flatnonzero(answer == end_of_turn)
    return answer[: ends[0] + 1] if ends.size else None


def _tokenize_conversations(
    data: dict[tuple, PreferenceEntry],
    sft_mode: bool,
    tokenizer,
    special: _SpecialTokens,
    every_assistant_turn: bool,
    description: str,
) -> dict[str, np.ndarray]:
    """_tokenize_data for conversational prompts, rendered with the chat template (chat_templates.py).

    Prompt tokens: the template applied to the prompt's messages with the generation prompt (a
    leading BOS is left to the stored prefix, so it is never doubled). Response tokens: what the
    whole conversation adds after them, up to its end-of-turn token. Examples whose prompt tokens
    are not a prefix of the whole conversation's (or that the template refuses) are left out, and
    their number and one of them reported.
    """
    prompts = [chat_templates.as_dicts(prompt) for prompt in data]
    wanted = [[entry.sft_target] if sft_mode else entry.responses for entry in data.values()]
    combinations = [(number, response) for number, responses in enumerate(wanted) for response in responses]
    whole = [prompts[number] + [{"role": "assistant", "content": response}] for number, response in combinations]
    prompt_texts = chat_templates.render(tokenizer, prompts, True)
    prompt_ids = _token_lists(tokenizer, prompt_texts, f"{description} prompts")
    whole_ids = _token_lists(tokenizer, chat_templates.render(tokenizer, whole, False), f"{description} conversations")
    end_of_turn = chat_templates.end_of_turn_id(tokenizer)
    trained = [None if ids is None else np.zeros(len(ids), dtype=np.uint8) for ids in prompt_ids]
    if sft_mode and every_assistant_turn:
        trained = _trained_assistant_turns(tokenizer, prompts, prompt_ids, end_of_turn, description)
    answers = {}
    for (number, response), ids in zip(combinations, whole_ids):
        aligned = trained[number] is not None and ids is not None
        answers[number, response] = (
            _answer_tokens(prompt_ids[number], ids, end_of_turn, special.eos) if aligned else None
        )
    misaligned = [(prompts[number], response) for (number, response), tokens in answers.items() if tokens is None]
    if misaligned:
        prompt, response = misaligned[0]
        console.say(
            f"{description}: left out {len(misaligned)} of {len(answers)} prompt-response combinations whose chat "
            "template does not extend the prompt's tokens with the answer (it re-renders earlier turns, refuses "
            f"the roles, or ends the answer without an end-of-turn token), e.g. {prompt!r} -> {response!r}"
        )
    numbers, response_tokens, response_offsets = _number_conversation_examples(data, sft_mode, answers)
    stored_ids, stored_trained = [], []
    for ids, mask in zip(prompt_ids, trained):
        if ids is None or mask is None:  # no example uses this prompt
            ids, mask = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.uint8)
        if special.bos is not None and ids[:1].tolist() == [special.bos]:
            ids, mask = ids[1:], mask[1:]  # TokenizedExamples puts the BOS back in front
        stored_ids.append(ids)
        stored_trained.append(mask)
    prompt_offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in stored_ids], dtype=np.int64)])
    return _TokenizedTexts(
        prompt_texts=[text or "" for text in prompt_texts],
        prompt_messages=[json.dumps(prompt).encode() for prompt in prompts],
        prompt_has_pairs=[_has_pairs_to_compare(entry) for entry in data.values()],
        prompt_tokens=np.concatenate(stored_ids).astype(np.int32),
        prompt_offsets=prompt_offsets,
        prompt_trained=np.concatenate(stored_trained).astype(np.uint8),
        response_tokens=response_tokens,
        response_offsets=response_offsets,
        examples=numbers,
    ).stored_arrays(special)


def _trained_assistant_turns(
    tokenizer, prompts: list[list[dict]], prompt_ids: list, end_of_turn: int | None, description: str
) -> list[np.ndarray | None]:
    """Per prompt, 1 on the tokens of its assistant turns (content and end-of-turn): what SFT on every turn trains.

    Each turn is found as the final answer is: rendering the conversation before it with the
    generation prompt, and through it. None for a prompt whose turns do not line up with its tokens.
    """
    jobs = [
        (number, turn)
        for number, prompt in enumerate(prompts)
        for turn, message in enumerate(prompt)
        if prompt_ids[number] is not None and turn > 0 and message["role"] == "assistant"
    ]
    befores = chat_templates.render(tokenizer, [prompts[number][:turn] for number, turn in jobs], True)
    throughs = chat_templates.render(tokenizer, [prompts[number][: turn + 1] for number, turn in jobs], False)
    befores = _token_lists(tokenizer, befores, f"{description} earlier turns")
    throughs = _token_lists(tokenizer, throughs, f"{description} earlier turns")
    masks = [None if ids is None else np.zeros(len(ids), dtype=np.uint8) for ids in prompt_ids]
    for (number, _), before, through in zip(jobs, befores, throughs):
        if masks[number] is None:
            continue
        answer = None if before is None or through is None else _answer_tokens(before, through, end_of_turn, None)
        ids, start = prompt_ids[number], 0 if before is None else len(before)
        if answer is None or not np.array_equal(ids[: start + len(answer)], np.concatenate([before, answer])):
            masks[number] = None
            continue
        masks[number][start : start + len(answer)] = 1
    return masks


def _number_conversation_examples(
    data: dict[tuple, PreferenceEntry], sft_mode: bool, answers: Mapping[tuple[int, str], np.ndarray | None]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per example its prompt's and responses' numbers, and the distinct response tokens (flat, and (n + 1,) offsets).

    Responses are numbered by their tokens, which under a template may depend on the prompt.
    Examples with a misaligned response (None in `answers`) are left out.
    """
    number_of: dict[bytes, int] = {}
    pieces: list[np.ndarray] = []

    def number(tokens: np.ndarray) -> int:
        key = tokens.tobytes()
        if key not in number_of:
            number_of[key] = len(pieces)
            pieces.append(tokens)
        return number_of[key]

    example_prompt, chosen, rejected, labels = [], [], [], []
    for prompt_number, entry in enumerate(data.values()):
        responses = entry.responses
        compared = [] if sft_mode else _compared_responses(entry)
        sides = [(entry.sft_target,)] if sft_mode else [(responses[a], responses[b]) for a, b in compared]
        for example_number, texts in enumerate(sides):
            tokens = [answers[prompt_number, text] for text in texts]
            if any(side is None for side in tokens):
                continue
            example_prompt.append(prompt_number)
            chosen.append(number(tokens[0]))
            if not sft_mode:
                rejected.append(number(tokens[1]))
            if entry.labels:
                labels.append(entry.labels[example_number])
    numbers = {"example_prompt": example_prompt, "example_chosen": chosen}
    if not sft_mode:
        numbers["example_rejected"] = rejected
    if _is_unpaired(data):
        numbers["example_label"] = labels
    offsets = np.concatenate([[0], np.cumsum([len(piece) for piece in pieces], dtype=np.int64)])
    flat = np.concatenate([np.zeros(0, dtype=np.int32)] + pieces).astype(np.int32)
    return {name: np.array(values, dtype=np.int64) for name, values in numbers.items()}, flat, offsets


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
        for side in ("chosen", "rejected")
        if f"example_{side}" in tokenized
    }
    response_lengths = {side: spans[:, 1] - spans[:, 0] for side, spans in responses.items()}
    longer_response = np.maximum.reduce(list(response_lengths.values()))
    too_long = n_prefix + prompt_lengths + longer_response > max_length
    kept = np.where(too_long, np.minimum(prompt_lengths, max_prompt_length - n_prefix), prompt_lengths)
    if truncation_mode == "keep_end":
        prompt_starts = prompt_stops - kept
    room = max_length - n_prefix - kept
    arrays = {
        name: tokenized[name]
        for name in (
            "bos",
            "prompt_text",
            "prompt_text_spans",
            "prompt_tokens",
            "prompt_token_spans",
            "prompt_trained",
            "prompt_messages",
            "prompt_messages_spans",
            "response_tokens",
        )
    }
    arrays["example_prompt"] = tokenized["example_prompt"]
    if "example_label" in tokenized:
        arrays["example_label"] = tokenized["example_label"]
    arrays["prompt_spans"] = np.stack([prompt_starts, prompt_starts + kept], axis=1)
    for side, spans in responses.items():
        arrays[f"{side}_spans"] = np.stack(
            [spans[:, 0], spans[:, 0] + np.minimum(response_lengths[side], room)], axis=1
        )
    return arrays


def _without_cut_conversations(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """The arrays without the conversational examples whose prompt truncation cut, and how many those were.

    Cutting a rendered conversation would cut through the template's special tokens (or drop the
    generation prompt), so such examples are dropped instead, and counted.
    """
    prompt_numbers = arrays["example_prompt"]
    messages = arrays["prompt_messages_spans"][prompt_numbers]
    stored = arrays["prompt_token_spans"][prompt_numbers]
    kept = arrays["prompt_spans"]
    cut = (messages[:, 1] > messages[:, 0]) & (kept[:, 1] - kept[:, 0] < stored[:, 1] - stored[:, 0])
    if not cut.any():
        return arrays, 0
    return {name: values[~cut] if name in PER_EXAMPLE else values for name, values in arrays.items()}, int(cut.sum())


def _without_identical_pairs(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """The arrays without the pairs that have nothing to train on, and how many those were."""
    if "rejected_spans" not in arrays:
        return arrays, 0
    identical = _identical_pairs(arrays)
    kept = {name: values[~identical] if name in PER_EXAMPLE else values for name, values in arrays.items()}
    return kept, int(identical.sum())


def tokenize_element(
    prompt: str,
    chosen: str,
    rejected: str | None,
    truncation_mode: str,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
) -> dict:
    """One example as TokenizedExamples gives it (without its index): prompt (+BOS), each response (+EOS), truncated.

    Returns prompt and lists of ints: prompt_input_ids, chosen_input_ids (prompt + chosen),
    chosen_labels (the same with IGNORE_INDEX on prompt positions), and the rejected ones
    when `rejected` is given.
    """
    _check_lengths(max_length, max_prompt_length)
    responses = [chosen] if rejected is None else [chosen, rejected]
    data = {prompt: PreferenceEntry(responses, [(0, 1)] if rejected is not None else [], chosen)}
    tokenized = _tokenize_data(data, rejected is None, tokenizer, _special_tokens(tokenizer))
    element = TokenizedExamples(
        _truncated(tokenized, truncation_mode, max_length, max_prompt_length), base_fingerprint=""
    )[0]
    del element["index"]
    return element


def tokenize_datasets(
    names: list[str], split: str, tokenizer, settings: TokenizeSettings
) -> tuple[TokenizedExamples, int]:
    """Tokenized examples of all the datasets, in dataset then prompt order, and the number dropped.

    SFT: one example per prompt (its sft_target, no rejected). Otherwise one per pair; pairs
    whose chosen and rejected token ids are identical after truncation (or the same text in the
    data: an entry's ties) are dropped and counted. Conversational prompts are rendered with
    tokenizer.chat_template (chat_templates.py); those that truncation would cut are dropped and
    counted too. settings.every_assistant_turn: SFT trains on every assistant turn of a
    conversation, not only the last. settings.dataset_options: each loader's options
    (dataset_loading.get_dataset).

    With settings.tokenized_cache_dir, each dataset's tokens (untruncated) are stored there as one
    .npz, keyed by a hash of: the dataset and its source (a file's or a local copy's sizes and
    mtimes, or the Hub id), the split, sft_mode, the tokenizer and its chat template, the dataset's
    options, every_assistant_turn, and the code (token_cache.CODE_MODULES). A later call with the
    same key loads them without reading the raw data, for any max_length. The examples'
    fingerprint hashes these keys and the length settings.
    """
    if not names:
        raise DatasetError("No datasets given: name at least one, e.g. datasets=[hh].")
    _check_lengths(settings.max_length, settings.max_prompt_length)
    special = _special_tokens(tokenizer)
    tokenizer_identity = token_cache.tokenizer_identity(tokenizer, special)
    keys, parts, n_dropped = [], [], 0
    for name in names:
        key = token_cache.cache_key(
            name, split, settings.sft_mode, tokenizer_identity, settings.dataset_paths, _cache_settings(name, settings)
        )
        label = f"tokenized {name} {split}"
        path = None
        if settings.tokenized_cache_dir is not None:
            path = token_cache.cache_path(settings.tokenized_cache_dir, name, split, settings.sft_mode, key)

        def tokenize(name: str = name) -> dict[str, np.ndarray]:
            return _tokenize_dataset(name, split, tokenizer, special, settings)

        tokenized = _cached_or_tokenized(path, key, label, tokenize)
        part, n_dropped_here = _trained_examples(tokenized, name, settings, label)
        parts.append(part)
        n_dropped += n_dropped_here
        keys.append(key)
    lengths = f"max_length={settings.max_length} max_prompt_length={settings.max_prompt_length}"
    fingerprint = hashlib.sha256("\n".join(keys + [lengths]).encode()).hexdigest()
    return TokenizedExamples.concatenate(parts, fingerprint), n_dropped


def _cache_settings(name: str, settings: TokenizeSettings) -> dict:
    """The settings besides the data, split, mode and tokenizer that one dataset's cached tokens depend on."""
    return {
        "dataset_options": settings.dataset_options.get(name),
        "every_assistant_turn": settings.every_assistant_turn and settings.sft_mode,
        "unpaired": settings.unpaired,
        "pairs_as_unpaired": settings.pairs_as_unpaired and settings.unpaired,
    }


def _cached_or_tokenized(
    path: Path | None, key: str, label: str, tokenize: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """A dataset's untruncated tokens: the cache entry at path when it is good, else tokenize() (then cached)."""
    tokenized = None if path is None else token_cache.read_cache_entry(path, key, label)
    if tokenized is not None:
        return tokenized
    tokenized = tokenize()
    if path is not None:
        try:
            token_cache.write_cache_entry(path, tokenized, key)
            console.say(f"{label}: cached at {path}")
        except OSError as error:  # the examples are still good; only later runs lose time
            console.say(f"{label}: could not cache the tokens at {path} ({error}), so the next run tokenizes again.")
    return tokenized


def _trained_examples(
    tokenized: dict[str, np.ndarray], name: str, settings: TokenizeSettings, label: str
) -> tuple[dict[str, np.ndarray], int]:
    """The storage of a dataset's examples after truncation, and how many examples were dropped.

    Dropped: conversational examples whose prompt truncation would cut (inside the template's
    turns), and pairs whose chosen and rejected tokens end up identical (ties in the data among them).
    """
    _note_unpaired_prompts(tokenized, label)
    truncation_mode = dataset_loading.truncation_mode_for(name)
    truncated = _truncated(tokenized, truncation_mode, settings.max_length, settings.max_prompt_length)
    truncated, n_cut = _without_cut_conversations(truncated)
    if n_cut:
        console.say(
            f"{label}: dropped {n_cut} conversational examples whose prompt is longer than max_prompt_length="
            f"{settings.max_prompt_length} (cutting it would cut the chat template's turns); raise max_prompt_length "
            "and max_length to keep them."
        )
    part, n_identical = _without_identical_pairs(truncated)
    return part, n_identical + n_cut


def _note_unpaired_prompts(tokenized: Mapping[str, np.ndarray], label: str) -> None:
    """For preference data, say how many pairs are ties (dropped) and how many prompts have only an SFT target."""
    if "example_rejected" not in tokenized:
        return
    n_ties = int((tokenized["example_chosen"] == tokenized["example_rejected"]).sum())
    if n_ties:
        console.say(
            f"{label}: {n_ties} pairs have the same response as chosen and as rejected; they teach nothing, "
            "so they are dropped (counted with the dropped pairs)."
        )
    n_unpaired = int((tokenized["prompt_has_pairs"] == 0).sum())
    if n_unpaired:
        console.say(
            f"{label}: {n_unpaired} of {len(tokenized['prompt_has_pairs'])} prompts have no preference pair, only an "
            "SFT target (`messages` rows): those rows are SFT-only, so a preference loss leaves them out; train "
            "them with loss=sft, or give them chosen and rejected responses."
        )


def _shaped_for_the_loss(
    data: dict[Prompt, PreferenceEntry], name: str, settings: TokenizeSettings
) -> dict[Prompt, PreferenceEntry]:
    """The entries as the loss trains on them: KTO's examples from feedback (or converted pairs); pairs unchanged.

    Unpaired feedback with a pair loss, and pairs with KTO unless pairs_as_unpaired, are one
    DatasetError naming the dataset and the fix.
    """
    has_feedback = any(entry.feedback for entry in data.values())
    if not settings.unpaired:
        if has_feedback:
            loss = "an SFT loss" if settings.sft_mode else "a pair loss"
            raise DatasetError(
                f"Dataset {name!r} holds unpaired feedback (prompt, completion, label rows), which {loss} cannot "
                "train on: use loss=kto."
            )
        return data
    if settings.pairs_as_unpaired:
        data = preference_entry.pairs_as_feedback(data)
    elif any(entry.pairs for entry in data.values()):  # mixed with feedback too: never left out silently
        raise DatasetError(
            f"Dataset {name!r} holds preference pairs; loss=kto trains on unpaired feedback. Set "
            "pairs_as_unpaired=true to use each pair's chosen response as desirable and its rejected one as "
            "undesirable, or give a file of prompt, completion, label rows."
        )
    return preference_entry.with_mismatched_completions(data)


def _tokenize_dataset(
    name: str, split: str, tokenizer, special: _SpecialTokens, settings: TokenizeSettings
) -> dict[str, np.ndarray]:
    """Load, parse and tokenize one dataset (see _tokenize_data), saying how long it took."""
    start = time.perf_counter()
    data = dataset_loading.get_dataset(
        name,
        split,
        cache_dir=settings.datasets_cache_dir,
        dataset_paths=settings.dataset_paths,
        sft_mode=settings.sft_mode,
        dataset_options=settings.dataset_options,
    )
    data = _shaped_for_the_loss(data, name, settings)
    description = f"tokenizing {name} {split}"
    tokenized = _tokenize_data(data, settings.sft_mode, tokenizer, special, description, settings.every_assistant_turn)
    seconds = time.perf_counter() - start
    console.say(f"tokenized {name} {split}: {len(tokenized['example_prompt'])} examples in {seconds:.1f} s")
    return tokenized

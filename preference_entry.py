"""What a dataset loader returns: prompt -> PreferenceEntry, built with add_pair, and the check of that contract.

A prompt is a string or a Conversation (conversations.py). Loaders may still return the plain
dicts of the contract ({"responses", "pairs", "sft_target"}); checked_entries turns them into
PreferenceEntry, and a PreferenceEntry reads as that dict too (entry["pairs"], equality with one).
Unpaired feedback (KTO: one completion labelled desirable or not) is held in `feedback`, built with
add_feedback; with_mismatched_completions turns it into the examples KTO trains on.
"""

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from conversations import Conversation, conversation_problem
from errors import DatasetError

Prompt = str | Conversation

_FIELDS = ("responses", "pairs", "sft_target")  # the contract's keys, as the documented dict has them


@dataclass(eq=False)
class PreferenceEntry(Mapping):
    """One prompt's data: each distinct response once, preference pairs indexing them, and the SFT target.

    `tied` holds responses given as both chosen and rejected of a row: they make no pair, and
    tokenization counts them with the dropped pairs (a preference loss learns nothing from them).
    """

    responses: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (preferred index, dispreferred index)
    sft_target: str = ""
    tied: list[int] = field(default_factory=list)  # indices into responses
    feedback: list[tuple[int, bool]] = field(default_factory=list)  # unpaired: (response index, desirable)
    labels: list[bool] = field(default_factory=list)  # KTO examples: per pair (completion, mismatched), desirable

    def response_index(self, response: str) -> int:
        """The index of the response, added if new."""
        if response not in self.responses:
            self.responses.append(response)
        return self.responses.index(response)

    def add_pair(self, chosen: str, rejected: str) -> None:
        """Chosen over rejected, each text stored once; the same text on both sides is counted in `tied`."""
        preferred, dispreferred = self.response_index(chosen), self.response_index(rejected)
        if preferred == dispreferred:
            self.tied.append(preferred)
        else:
            self.pairs.append((preferred, dispreferred))

    def __getitem__(self, key: str):
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELDS)

    def __len__(self) -> int:
        return len(_FIELDS)


def add_pair(data: dict[Prompt, PreferenceEntry], prompt: Prompt, chosen: str, rejected: str) -> None:
    """Add chosen over rejected to the prompt's entry, made with chosen as its SFT target when new."""
    entry = data.get(prompt)
    if entry is None:
        entry = data[prompt] = PreferenceEntry(sft_target=chosen)
    entry.add_pair(chosen, rejected)


def add_feedback(data: dict[Prompt, PreferenceEntry], prompt: Prompt, completion: str, desirable: bool) -> None:
    """Add one completion of the prompt labelled desirable (thumbs up) or not; an exact repeat is kept once."""
    entry = data.get(prompt)
    if entry is None:
        entry = data[prompt] = PreferenceEntry(sft_target=completion)
    item = (entry.response_index(completion), desirable)
    if item not in entry.feedback:
        entry.feedback.append(item)


def pairs_as_feedback(data: dict[Prompt, PreferenceEntry]) -> dict[Prompt, PreferenceEntry]:
    """Paired data as unpaired feedback: each pair's chosen response desirable, its rejected one undesirable.

    A response in several pairs gives one desirable and/or one undesirable example per prompt; ties and
    SFT targets give none. Feedback the entries already hold is kept.
    """
    converted = {}
    for prompt, entry in data.items():
        feedback = list(entry.feedback)
        for preferred, dispreferred in entry.pairs:
            for item in ((preferred, True), (dispreferred, False)):
                if item not in feedback:
                    feedback.append(item)
        converted[prompt] = PreferenceEntry(
            responses=list(entry.responses), sft_target=entry.sft_target, feedback=feedback
        )
    return converted


MISMATCH_SEED = 0  # fixed: the mismatched completions never change between runs, so cached reference tables stay valid


def with_mismatched_completions(data: dict[Prompt, PreferenceEntry]) -> dict[Prompt, PreferenceEntry]:
    """KTO's examples: each feedback item as a pair (its completion, a mismatched completion) with its label.

    KTO's reference point z0 needs log pi(y'|x) for completions y' that belong to OTHER examples
    (Ethayarajh et al., 2024, section 4.1). They are fixed here, once per dataset split: the
    feedback items, in dataset order, are shuffled by a Random(MISMATCH_SEED) permutation, and each
    item takes the completion of the next item in that order (cyclically), skipping items whose
    completion has the same text. The example is then tokenized like a pair, the mismatched
    completion on the rejected side (under this prompt's chat template), so its reference
    log-probs are the rejected column of the (n, 2) reference tables; `labels` holds each example's
    label. Entries without feedback (SFT targets only) are left out.
    """
    items = [
        (prompt, entry.responses[index], desirable)
        for prompt, entry in data.items()
        for index, desirable in entry.feedback
    ]
    if len({completion for _, completion, _ in items}) < 2:
        raise DatasetError(
            f"KTO needs at least two different completions to estimate its KL term from mismatched ones; "
            f"this split has {len(items)} feedback item(s). Add data, or use another loss."
        )
    order = random.Random(MISMATCH_SEED).sample(range(len(items)), len(items))
    converted: dict[Prompt, PreferenceEntry] = {}
    for position, item in enumerate(order):
        prompt, completion, desirable = items[item]
        following = (items[order[(position + step) % len(order)]][1] for step in range(1, len(order)))
        mismatched = next(text for text in following if text != completion)
        entry = converted.get(prompt)
        if entry is None:
            entry = converted[prompt] = PreferenceEntry(sft_target=data[prompt].sft_target)
        entry.pairs.append((entry.response_index(completion), entry.response_index(mismatched)))
        entry.labels.append(desirable)
    return {prompt: converted[prompt] for prompt in data if prompt in converted}  # dataset order


def add_sft_target(data: dict[Prompt, PreferenceEntry], prompt: Prompt, target: str) -> None:
    """Give a new prompt an entry with this SFT target and no pairs; a prompt seen before keeps its entry."""
    if prompt not in data:
        data[prompt] = PreferenceEntry(responses=[target], sft_target=target)


def checked_entries(name: str, data) -> dict[Prompt, PreferenceEntry]:
    """A loader's result as prompt -> PreferenceEntry, or DatasetError naming the dataset, prompt and problem."""
    if not isinstance(data, Mapping):
        raise DatasetError(
            f"Dataset {name!r}: the loader returned {type(data).__name__}, not a dict of prompt -> entry."
        )
    checked = {}
    for prompt, entry in data.items():
        problem = _contract_problem(prompt, entry)
        if problem:
            shown = repr(prompt)[:80] + ("..." if len(repr(prompt)) > 80 else "")
            raise DatasetError(f"Dataset {name!r}, prompt {shown}: {problem}")
        if not isinstance(entry, PreferenceEntry):
            entry = PreferenceEntry(responses=entry["responses"], pairs=entry["pairs"], sft_target=entry["sft_target"])
        checked[prompt] = entry
    return checked


def _contract_problem(prompt, entry) -> str | None:
    if isinstance(prompt, tuple):
        problem = conversation_problem(prompt)
        if problem:
            return problem
    elif not isinstance(prompt, str):
        return f"prompts must be strings or Conversations (tuples of Message), not {type(prompt).__name__}."
    if not isinstance(entry, Mapping):
        return f"the entry must be a PreferenceEntry or a dict with {', '.join(_FIELDS)}, not {type(entry).__name__}."
    missing = [key for key in _FIELDS if key not in entry]
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
    tied = entry.tied if isinstance(entry, PreferenceEntry) else []
    if not all(type(i) is int and 0 <= i < len(responses) for i in tied):
        return f"tied {tied!r} must be indices into its {len(responses)} responses."
    feedback = entry.feedback if isinstance(entry, PreferenceEntry) else []
    if not all(0 <= index < len(responses) and isinstance(desirable, bool) for index, desirable in feedback):
        return f"feedback {feedback!r} must be (index into its {len(responses)} responses, true or false) items."
    return None

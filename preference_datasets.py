"""Preference datasets: the loaders behind `datasets=[...]`, each registered by name with its settings.

Every loader returns, for each prompt, a PreferenceEntry (preference_entry.py):

    {prompt: PreferenceEntry(responses=[str, ...],
                             pairs=[(preferred_index, dispreferred_index), ...],
                             sft_target=str)}

`responses` holds each distinct response to the prompt once; `pairs` index into it; `sft_target`
is the response supervised fine-tuning imitates. add_pair(data, prompt, chosen, rejected) builds
entries (a pair whose two sides are the same text is counted as dropped, never trained). The plain
dicts of the DPO reference scripts, {"responses": [...], "pairs": [...], "sft_target": ...}, are
accepted too. Prompts of the built-in datasets use the Anthropic-HH dialogue format
("\\n\\nHuman: ...\\n\\nAssistant:") and responses start with a space, as in the paper.

Conversational data uses the same structure with a conversation as the prompt: a tuple of
Message(role, content), an optional "system" message first, the last the user's; responses are
then the text of the assistant's answer (no leading space). tokenization.py renders them with the
model's chat template (chat_templates.py), so a chat model sees its own format:

    {(Message("user", "Capital of France?"),): PreferenceEntry(["Paris.", "Lyon."], [(0, 1)], "Paris.")}

To add a dataset, register its loader here; `datasets=[mydata]` then works, and
`dataset_paths.mydata=DIR` points it at a local copy (no other file changes):

    @register_dataset("mydata", source="my-org/mydata", keep_prompt_end=False, options={"min_score": 0})
    def get_mydata(split: str, source: str, cache_dir: str | None, min_score: int = 0) -> dict:
        data = {}
        for line in open(f"{source}/{split}.jsonl"):
            row = json.loads(line)
            prompt = "\\n\\nHuman: " + row["question"] + "\\n\\nAssistant:"
            if row["score"] >= min_score:
                add_pair(data, prompt, " " + row["good"], " " + row["bad"])
        return data

The loader gets `split`, then what its registration declares (dataset_registry.register_dataset):
with a `source` (the Hub id, or a default folder), `source` (dataset_paths.<name> when set) and
`cache_dir` (where `datasets` keeps downloads; see get_hh and data_sources.load_hub_rows); with
reads_sft_splits, `sft_mode` (see get_ultrafeedback); each declared option, set on the command line
as `dataset_options.<name>.<option>=...` (see get_hh's as_messages). keep_prompt_end: an over-long
prompt keeps its end (the last turns of a dialogue) instead of its start. Or skip code entirely: a
.jsonl/.json/.parquet file of prompt/chosen/rejected rows, as text or as messages, is a dataset too
(dataset_files.load_preference_file).

What happens next (checking, tokenizing, truncating, caching, batching) lives in dataset_loading.py,
tokenization.py and batching.py and needs no change for a new dataset.
"""

import itertools
import re
from collections.abc import Iterable

import tqdm

import console
import embedded
from conversations import Conversation, Message, RowProblem, as_conversation, split_conversation_pair, split_last_answer
from data_sources import html_to_text, iterate_rows, load_hub_rows
from dataset_files import EVAL_FRACTION
from dataset_registry import register_dataset
from errors import DatasetError
from preference_entry import PreferenceEntry, Prompt, add_pair, add_sft_target

ASSISTANT_TURN = "\n\nAssistant:"


HH_HUB_ID = "Anthropic/hh-rlhf"


# keep_prompt_end: the last turns of a dialogue matter most
@register_dataset("hh", source=HH_HUB_ID, keep_prompt_end=True, options={"as_messages": False})
def get_hh(split: str, source: str, cache_dir: str | None, as_messages: bool = False) -> dict[Prompt, PreferenceEntry]:
    """Anthropic Helpful-Harmless dialogues (Bai et al., 2022); splits "train" and "test".

    Each row holds a whole chosen and a whole rejected conversation. The prompt is the
    conversation up to and including its last "\\n\\nAssistant:"; the responses are what follows.
    as_messages (`dataset_options.hh.as_messages=true`): prompts are Conversations of user and
    assistant turns and responses lose their leading space, so a chat model sees its own template.
    """
    splits, fields = ("train", "test"), ("chosen", "rejected")
    rows = load_hub_rows("hh", source, split, hub_id=HH_HUB_ID, splits=splits, fields=fields, cache_dir=cache_dir)
    data: dict[Prompt, PreferenceEntry] = {}
    skipped: dict[str, list[int]] = {}
    for row_number, row in enumerate(_progress(iterate_rows(rows), len(rows), f"hh {split}")):
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
        add_pair(data, prompt, *responses)
        data[prompt].sft_target = responses[0]  # the last row's chosen response, as the reference scripts
    _report_skipped("hh", split, skipped)
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


@register_dataset("ultrafeedback", source=ULTRAFEEDBACK_HUB_ID, reads_sft_splits=True)
def get_ultrafeedback(split: str, source: str, cache_dir: str | None, sft_mode: bool) -> dict[Prompt, PreferenceEntry]:
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
    )
    data: dict[Prompt, PreferenceEntry] = {}
    skipped: dict[str, list[int]] = {}
    for row_number, row in enumerate(_progress(iterate_rows(rows), len(rows), f"ultrafeedback {hub_split}")):
        try:
            if sft_mode:
                add_sft_target(data, *split_last_answer(as_conversation(row["messages"], "messages"), "messages"))
            else:
                chosen, rejected = (as_conversation(row[side], side) for side in ("chosen", "rejected"))
                add_pair(data, *split_conversation_pair(chosen, rejected))
        except RowProblem as problem:
            skipped.setdefault(str(problem).rstrip("."), []).append(row_number)
    _report_skipped("ultrafeedback", hub_split, skipped)
    return data


SHP_HUB_ID = "stanfordnlp/SHP"
SHP_MIN_SCORE_RATIO = 2.0  # pairs whose scores differ by less than this factor are too noisy (SHP paper)


@register_dataset("shp", source=SHP_HUB_ID)
def get_shp(split: str, source: str, cache_dir: str | None) -> dict[Prompt, PreferenceEntry]:
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
    )
    rankings: dict[str, _Rankings] = {}
    for row in _progress(iterate_rows(rows), len(rows), f"shp {split}"):
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


@register_dataset("se", source=SE_HUB_ID)
def get_se(split: str, source: str, cache_dir: str | None) -> dict[Prompt, PreferenceEntry]:
    """Stack Exchange questions with scored answers (Askell et al., 2021; H4 release).

    The Hub has only a train split: as in the reference scripts it is shuffled with seed 42,
    the first 1% is "test" and the rest "train". Every two answers with different scores
    make a pair; the SFT target is the best-scored answer. HTML is reduced to plain text.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"Dataset 'se' has splits 'train' and 'test', not {split!r}.")
    fields = ("question", "answers")
    rows = load_hub_rows("se", source, "train", hub_id=SE_HUB_ID, splits=("train",), fields=fields, cache_dir=cache_dir)
    # the same permutation as the reference scripts' `dataset.shuffle(seed=42)`
    rows = rows.shuffle(seed=SE_SHUFFLE_SEED, keep_in_memory=True)
    n_test = int(len(rows) * SE_TEST_FRACTION)
    rows = rows.select(range(n_test) if split == "test" else range(n_test, len(rows)))
    rankings: dict[str, _Rankings] = {}
    for row in _progress(iterate_rows(rows), len(rows), f"se {split}"):
        prompt = "\n\nHuman: " + html_to_text(row["question"]) + ASSISTANT_TURN
        ranking = rankings.setdefault(prompt, _Rankings())
        answers = [(ranking.add(" " + html_to_text(a["text"]), a["pm_score"]), a["pm_score"]) for a in row["answers"]]
        for (index_i, score_i), (index_j, score_j) in itertools.combinations(answers, 2):
            if score_i != score_j:
                ranking.add_pair((index_i, index_j) if score_i > score_j else (index_j, index_i))
    return {prompt: ranking.entry() for prompt, ranking in rankings.items() if ranking.pairs}


@register_dataset("numbers")
def get_numbers(split: str) -> dict[str, PreferenceEntry]:
    """The embedded synthetic task; see embedded.py."""
    return embedded.number_preferences(split, EVAL_FRACTION)


class _Rankings:
    """Scored responses to one prompt, each distinct text once, and the pairs between them."""

    def __init__(self) -> None:
        self.responses: list[str] = []
        self.scores: list[float] = []
        self.index_of: dict[str, int] = {}
        self.pairs: list[tuple[int, int]] = []
        self.tied: list[int] = []

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
        if pair[0] == pair[1]:  # the same text on both sides teaches nothing: counted as dropped
            self.tied.append(pair[0])
        else:
            self.pairs.append(pair)

    def entry(self) -> PreferenceEntry:
        best = max(range(len(self.responses)), key=self.scores.__getitem__)
        return PreferenceEntry(self.responses, self.pairs, self.responses[best], self.tied)


def _progress(rows: Iterable[dict], total: int, description: str) -> Iterable[dict]:
    """The rows, with a progress bar on the main process."""
    return tqdm.tqdm(rows, total=total, desc=description, disable=not console.is_main_process())


def _report_skipped(name: str, split: str, skipped: dict[str, list[int]]) -> None:
    for reason, row_numbers in skipped.items():
        shown = ", ".join(str(n) for n in row_numbers[:5]) + (", ..." if len(row_numbers) > 5 else "")
        console.say(f"{name} {split}: skipped {len(row_numbers)} row(s) because {reason} (row indices {shown}).")

"""The embedded default: a synthetic preference task and a tokenizer made by this project.

With them `python train.py` runs offline, with nothing downloaded, and the effect of
DPO can be measured, because every prompt has one correct answer.

The task: "Which is the largest (or smallest) of 4, 9, 2?". The SFT demonstrations
come from a sloppy demonstrator with a position bias: when the first number is not
the answer it still names the first number 60% of the time. Supervised fine-tuning
imitates that bias, so its greedy answers are often wrong; the preference pairs
(correct answer over the first number, and over another wrong one) are what DPO
learns from to remove it.
"""

import hashlib
import itertools
import random
import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from preference_entry import PreferenceEntry

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_VOCAB_SIZE = 512
SLOPPY_RATE = 0.6  # how often the demonstrator names the first number when it is wrong

_ANSWER = re.compile(r"The (largest|smallest) is (\d)")


def _question(numbers: tuple[int, ...], kind: str) -> str:
    listed = ", ".join(str(n) for n in numbers)
    return f"\n\nHuman: Which is the {kind} of {listed}?\n\nAssistant:"


def _answer(number: int, kind: str) -> str:
    return f" The {kind} is {number}."


def _correct(numbers: tuple[int, ...], kind: str) -> int:
    return max(numbers) if kind == "largest" else min(numbers)


def _all_problems() -> list[tuple[tuple[int, ...], str]]:
    """Every list of 3 or 4 distinct digits, asked for its largest and its smallest."""
    problems = []
    for length in (3, 4):
        for numbers in itertools.permutations(range(10), length):
            for kind in ("largest", "smallest"):
                problems.append((numbers, kind))
    return problems


def _is_held_out(prompt: str, eval_fraction: float) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < eval_fraction


def number_preferences(split: str, eval_fraction: float) -> dict[str, PreferenceEntry]:
    """The task in the preference-data contract of preference_datasets.py: prompt -> PreferenceEntry.

    "train" and "test" hold disjoint prompts (about eval_fraction of them are "test"); the
    content is the same on every call.
    """
    if split not in ("train", "test"):
        raise ValueError(f"The embedded 'numbers' dataset has splits 'train' and 'test', not {split!r}.")
    rng = random.Random(0)  # fixed: the data must not change with the training seed
    data = {}
    for numbers, kind in _all_problems():
        prompt = _question(numbers, kind)
        # draw for every problem, so one split's content never depends on the other's
        sloppy = rng.random() < SLOPPY_RATE
        other_choices = [n for n in numbers if n not in (_correct(numbers, kind), numbers[0])]
        other_wrong = rng.choice(other_choices)
        if _is_held_out(prompt, eval_fraction) != (split == "test"):
            continue
        correct = _correct(numbers, kind)
        wrong = [numbers[0], other_wrong] if numbers[0] != correct else [other_wrong]
        responses = [_answer(correct, kind)] + [_answer(n, kind) for n in wrong]
        demonstrated = numbers[0] if sloppy else correct
        pairs = [(0, i) for i in range(1, len(responses))]
        data[prompt] = PreferenceEntry(responses=responses, pairs=pairs, sft_target=_answer(demonstrated, kind))
    return data


def score_completion(prompt: str, completion: str) -> bool:
    """Whether a generated completion names the correct answer to a task prompt."""
    match = re.search(r"of ([\d, ]+)\?", prompt)
    kind = "largest" if "largest" in prompt else "smallest"
    if match is None:
        raise ValueError(f"Not a prompt of the embedded task: {prompt!r}")
    numbers = tuple(int(n) for n in match.group(1).split(", "))
    answer = _ANSWER.search(completion)
    return answer is not None and answer.group(1) == kind and int(answer.group(2)) == _correct(numbers, kind)


def _tokenizer_corpus() -> list[str]:
    """Task text plus the dialogue markers and common English, so other text tokenizes sensibly."""
    rng = random.Random(0)
    problems = rng.sample(_all_problems(), 2000)
    corpus = [_question(n, k) + _answer(_correct(n, k), k) for n, k in problems]
    corpus += [
        "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
        "the of and to in is that it for on with as was he be at by this have from or one had",
        "not but what all were we when your can said there use an each which she do how their if",
        "will up other about out many then them these so some her would make like him into time",
    ] * 50
    return corpus


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the task text; the same on every call.

    Digits stay single tokens so that numbers are spelled digit by digit. Byte-level
    coverage means any text (e.g. Anthropic-HH) can still be tokenized.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)

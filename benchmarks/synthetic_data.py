"""Deterministic synthetic preference pairs for the benchmarks, with no download.

Two kinds, both as {"prompt", "chosen", "rejected"} strings so that this project and TRL
tokenize the same text:

- `hh_like_pairs`: Anthropic-HH's format ("\\n\\nHuman: ...\\n\\nAssistant:" prompts, responses
  starting with a space) and an HH-like length mix: by default prompts of 20-300 tokens and
  responses of a few to a few hundred tokens, both log-uniform (the ranges are arguments). Every
  pair fits in max_length, so no truncation rule (ours or TRL's) changes a token and both sides
  train on identical ids.
- `fixed_length_pairs` with `word_level_tokenizer`: one word per token id of a large vocabulary
  ("t17 t90321 ..."), every sequence exactly max_length tokens: a pure memory workload.

`word_level_tokenizer(vocab_size, HH_VOCABULARY)` is a stand-in for a real model's tokenizer
where none is at hand (no download): its vocabulary has the real one's size, and
`hh_like_pairs` text tokenizes into one id per word.
"""

import math
import random

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# common English words, so the project's small byte-level BPE splits them into few tokens
WORDS = """
the of and to in is that it for on with as was he be at by this have from or one had not but what
all were we when your can said there use an each which she do how their if will up other about out
many then them these so some her would make like him into time has look two more write go see number
way could people my than first water been call who oil its now find long down day did get come made
may part help please thank you question answer capital country city river because could should think
""".split()

HUMAN_TURN = "\n\nHuman:"
ASSISTANT_TURN = "\n\nAssistant:"
PROMPT_TOKENS = (20, 300)  # log-uniform range of a prompt's length in tokens
RESPONSE_TOKENS = (3, 400)  # log-uniform range of a response's length in tokens
EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"
# every whitespace-separated piece of hh_like_pairs text: the words and the turn markers
HH_VOCABULARY = tuple(dict.fromkeys(WORDS)) + (HUMAN_TURN.strip(), ASSISTANT_TURN.strip())


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def _words(rng: random.Random, n_tokens: int, word_tokens: dict[str, int]) -> list[str]:
    """Random words whose token counts (each with its leading space) add up to about n_tokens."""
    words, total = [], 0
    while total < n_tokens:
        word = rng.choice(WORDS)
        words.append(word)
        total += word_tokens[word]
    return words


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def hh_like_pairs(
    tokenizer,
    n_pairs: int,
    max_length: int,
    seed: int = 0,
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
    response_tokens: tuple[int, int] = RESPONSE_TOKENS,
) -> list[dict[str, str]]:
    """n_pairs HH-format pairs with an HH-like length mix; prompt + longer response + EOS fits max_length.

    Prompt and response lengths are drawn log-uniformly from the (low, high) token ranges;
    a response is cut short where the prompt leaves it less room.
    """
    if prompt_tokens[1] + 16 > max_length:  # the turn markers and a response need room beside the prompt
        raise ValueError(f"prompts of up to {prompt_tokens[1]} tokens leave no room for a response in {max_length}.")
    rng = random.Random(seed)
    word_tokens = {word: _n_tokens(tokenizer, " " + word) for word in WORDS}
    pairs = []
    for _ in range(n_pairs):
        prompt_words = _words(rng, _log_uniform(rng, *prompt_tokens), word_tokens)
        prompt = HUMAN_TURN + " " + " ".join(prompt_words) + ASSISTANT_TURN
        budget = max_length - 1 - _n_tokens(tokenizer, prompt)  # room left for a response and its EOS
        responses = []
        for _ in ("chosen", "rejected"):
            words = _words(rng, min(_log_uniform(rng, *response_tokens), budget), word_tokens)
            while _n_tokens(tokenizer, " " + " ".join(words)) > budget:
                words.pop()
            responses.append(" " + " ".join(words))
        pairs.append({"prompt": prompt, "chosen": responses[0], "rejected": responses[1]})
    return pairs


def word_level_tokenizer(vocab_size: int, words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A tokenizer with one whitespace-separated word per id: `words`, then "t0" ... to fill vocab_size,
    then EOS and PAD as the last two ids (unknown words read as PAD)."""
    if len(words) + 2 > vocab_size:
        raise ValueError(f"{len(words)} words and EOS and PAD do not fit in a vocabulary of {vocab_size}.")
    vocab = {word: i for i, word in enumerate(words)}
    vocab |= {f"t{i}": len(words) + i for i in range(vocab_size - 2 - len(words))}
    vocab[EOS_TOKEN], vocab[PAD_TOKEN] = vocab_size - 2, vocab_size - 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def fixed_length_pairs(
    vocab_size: int, n_pairs: int, prompt_tokens: int, response_tokens: int, seed: int = 0
) -> list[dict[str, str]]:
    """Pairs of random word-level tokens: every prompt and response has exactly the given length."""
    rng = random.Random(seed)

    def text(n_tokens: int) -> str:
        return " ".join(f"t{rng.randrange(vocab_size - 2)}" for _ in range(n_tokens))

    return [
        {"prompt": text(prompt_tokens), "chosen": " " + text(response_tokens), "rejected": " " + text(response_tokens)}
        for _ in range(n_pairs)
    ]


# ----- a local copy of Anthropic/hh-rlhf ---------------------------------------------------

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def hh_dialogue(history: list[tuple[str, str]], last_human: str) -> str:
    """An HH prompt: earlier (human, assistant) turns, then the last human turn and the open assistant turn."""
    earlier = "".join(f"{HUMAN_TURN} {human}{ASSISTANT_TURN} {assistant}" for human, assistant in history)
    return earlier + f"{HUMAN_TURN} {last_human}{ASSISTANT_TURN}"


def write_hh_copy(root, rows: dict[tuple[str, str], list[dict]]) -> None:
    """Files as `hf download --repo-type dataset Anthropic/hh-rlhf` leaves them: <subset>/<split>.jsonl.gz.

    `rows` maps (subset, split) to rows {"chosen": prompt + chosen, "rejected": prompt + rejected};
    every subset file exists, maybe empty, so the `datasets` library infers the same splits.
    """
    import gzip
    import json
    from pathlib import Path

    for subset in HH_SUBSETS:
        for split in ("train", "test"):
            path = Path(root) / subset / f"{split}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt", encoding="utf-8") as file:
                file.writelines(json.dumps(row) + "\n" for row in rows.get((subset, split), []))

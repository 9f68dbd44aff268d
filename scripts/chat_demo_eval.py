"""Score chat models on the held-out demo-chat prompts (chat_task.py) and print a before/after table.

    .venv/bin/python scripts/chat_demo_eval.py --data .cache/dpo/data/chat_numbers/test.jsonl \\
        before=.cache/dpo/models/SmolLM2-135M-Instruct after=<dpo run>/LATEST

Every measure goes through the project's own pipeline, as training sees the data: the file is
rendered with each model's chat template (tokenization.tokenize_datasets), and greedy completions
stop at the template's end-of-turn token (chat_templates.stop_token_ids). Per held-out prompt:
- content: the greedy answer gives the right number as its answer, wording aside
  (chat_task.score_content: "The largest of 24, 14, 78 is 78." counts; a restated question does not);
- strict: the greedy answer is the right number alone (chat_task.score_answer);
- preference accuracy (per held-out pair): the chosen answer has the higher summed log-prob.
Each share comes with a 95% bootstrap interval over prompts (pairs), as evaluate.py gives its win rates.
"""

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import console  # noqa: E402
from batching import collate_prompts  # noqa: E402
from chat_task import score_answer, score_content  # noqa: E402
from chat_templates import stop_token_ids  # noqa: E402
from evaluation.metrics import bootstrap_interval  # noqa: E402
from logprobs import IGNORE_INDEX  # noqa: E402
from tokenization import TokenizeSettings, tokenize_datasets  # noqa: E402

BATCH = 16
MAX_LENGTH = 128
INTERVAL_SEED = 0  # seed of the bootstrap resampling


@dataclass
class ModelScores:
    """One model's per-item results on the held-out file: 1/0 per prompt (content, strict) and per pair."""

    questions: list[str]
    answers: list[str]  # greedy answer to each question
    content: list[int]
    strict: list[int]
    preference: list[int]  # 1 where the chosen answer's log-prob is the higher
    seconds: float


def held_out_examples(data: Path, tokenizer) -> tuple[list[dict], list[dict]]:
    """(pairs, prompts) of every row of the file: both of the file loader's splits; one prompt per question."""
    kinds = []
    for sft_mode in (False, True):
        examples = []
        for split in ("train", "test"):
            settings = TokenizeSettings(MAX_LENGTH, MAX_LENGTH - 16, sft_mode=sft_mode)
            with console.silenced():
                split_examples, _ = tokenize_datasets([str(data)], split, tokenizer, settings)
            examples += list(split_examples)
        kinds.append(examples)
    return kinds[0], kinds[1]


@torch.no_grad()
def preference_wins(model, pairs: list[dict], pad_token_id: int) -> list[int]:
    """1 per pair whose chosen response has the higher summed log-prob under the model, else 0.

    Each distinct prompt runs once (a prompt's three pairs share it and their chosen answer, and
    the prompt is most of each sequence's tokens): its distinct responses continue from its cached
    keys and values, BATCH prompts of one length at a time.
    """
    responses: dict[tuple[int, ...], dict[tuple[int, ...], float | None]] = {}  # prompt -> response -> log-prob
    for pair in pairs:
        prompt = tuple(pair["prompt_input_ids"])
        for side in ("chosen", "rejected"):
            responses.setdefault(prompt, {})[_response_labels(pair, side, len(prompt))] = None
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for prompt in responses:
        by_length.setdefault(len(prompt), []).append(prompt)
    for prompts in by_length.values():
        for start in range(0, len(prompts), BATCH):
            batch = {prompt: list(responses[prompt]) for prompt in prompts[start : start + BATCH]}
            for prompt, logps in zip(batch, responses_after_prompts(model, batch, pad_token_id)):
                responses[prompt] = dict(zip(batch[prompt], logps))
    wins = []
    for pair in pairs:
        prompt = tuple(pair["prompt_input_ids"])
        chosen = responses[prompt][_response_labels(pair, "chosen", len(prompt))]
        rejected = responses[prompt][_response_labels(pair, "rejected", len(prompt))]
        wins.append(int(chosen > rejected))
    return wins


def _response_labels(pair: dict, side: str, prompt_length: int) -> tuple[int, ...]:
    """The labelled tokens of one side of a pair, after its prompt (the response and its end-of-turn token)."""
    return tuple(label for label in pair[f"{side}_labels"][prompt_length:] if label != IGNORE_INDEX)


def responses_after_prompts(model, batch: dict[tuple, list[tuple]], pad_token_id: int) -> list[list[float]]:
    """Summed log-prob of each prompt's responses: the prompts (all one length) run once, the responses from
    their cache. Every prompt gets as many responses as the one with the most (its last one repeated)."""
    width = max(len(listed) for listed in batch.values())
    rows = [listed + listed[-1:] * (width - len(listed)) for listed in batch.values()]
    flat = [response for row in rows for response in row]
    # logits: (n_prompts, 1, vocab), the last position's only
    first = model(input_ids=torch.tensor(list(batch)), use_cache=True, logits_to_keep=1)
    cache = first.cache
    cache.batch_repeat_interleave(width)
    longest = max(len(response) for response in flat)
    ids = torch.tensor([list(r) + [pad_token_id] * (longest - len(r)) for r in flat])  # (n_prompts * width, longest)
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in flat])
    prompt_length = len(next(iter(batch)))
    attention = torch.cat([torch.ones(len(flat), prompt_length, dtype=mask.dtype), mask], dim=1)
    rest = model(input_ids=ids, attention_mask=attention, cache=cache)
    # response token t is predicted by the prompt's last logits (t = 0) or by the response's token t - 1
    last = first.logits[:, -1:].repeat_interleave(width, dim=0)
    logits = torch.cat([last, rest.logits[:, :-1]], dim=1)
    logps = torch.log_softmax(logits.float(), dim=-1).gather(2, ids.unsqueeze(2)).squeeze(2)  # like ids
    sums = (logps * mask).sum(dim=1).view(len(rows), width).tolist()
    return [row_sums[: len(listed)] for row_sums, listed in zip(sums, batch.values())]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[dict], max_new_tokens: int) -> list[str]:
    answers = []
    for start in range(0, len(prompts), BATCH):
        batch = collate_prompts(prompts[start : start + BATCH], tokenizer.pad_token_id)
        sequences = model.generate(
            input_ids=batch["prompt_input_ids"],
            attention_mask=batch["prompt_attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_token_ids(tokenizer),
        )
        new_tokens = sequences[:, batch["prompt_input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def score_model(folder: Path, data: Path, max_new_tokens: int) -> ModelScores:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pairs, prompts = held_out_examples(data, tokenizer)
    start = time.perf_counter()
    wins = preference_wins(model, pairs, tokenizer.pad_token_id)
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens)
    messages = [e["prompt_messages"] for e in prompts]
    return ModelScores(
        questions=[m[-1]["content"] for m in messages],
        answers=answers,
        content=[int(score_content(m, answer)) for m, answer in zip(messages, answers)],
        strict=[int(score_answer(m, answer)) for m, answer in zip(messages, answers)],
        preference=wins,
        seconds=time.perf_counter() - start,
    )


def share(values: list[int]) -> str:
    """'k/n = p% [low%, high%]': the count, the share and its 95% bootstrap interval."""
    low, high = bootstrap_interval(values, INTERVAL_SEED)
    return f"{sum(values)}/{len(values)} = {sum(values) / len(values):.1%} [{low:.1%}, {high:.1%}]"


def print_table(data: Path, scores: dict[str, ModelScores]) -> None:
    print(f"\n{len(next(iter(scores.values())).questions)} held-out prompts of {data}; greedy answers; "
          f"95% bootstrap intervals; {torch.get_num_threads()} torch threads")  # fmt: skip
    print("| model | content correct (right number as the answer) | strict (the right number alone) "
          "| preference accuracy (chosen log-prob higher) |")  # fmt: skip
    print("|---|---|---|---|")
    for label, score in scores.items():
        print(f"| {label} | {share(score.content)} | {share(score.strict)} | {share(score.preference)} |")
    (first_label, first), (last_label, last) = list(scores.items())[0], list(scores.items())[-1]
    if first_label != last_label:
        gained = sum(a < b for a, b in zip(first.content, last.content))
        lost = sum(a > b for a, b in zip(first.content, last.content))
        print(f"content, {first_label} -> {last_label}: {gained} prompts right only {last_label}, "
              f"{lost} right only {first_label}")  # fmt: skip


def print_samples(scores: dict[str, ModelScores], count: int, seed: int) -> None:
    """`count` prompts drawn with `seed` (not picked by hand), each model's answer, marked content/strict."""
    questions = next(iter(scores.values())).questions
    picks = sorted(random.Random(seed).sample(range(len(questions)), min(count, len(questions))))
    print(f"\nsamples (prompts drawn with seed {seed}; [content, strict] marks, + right, - wrong):")
    for index in picks:
        print(f"- {questions[index]}")
        for label, score in scores.items():
            marks = "".join("+" if value[index] else "-" for value in (score.content, score.strict))
            print(f"    {label} [{marks}]: {score.answers[index]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="held-out preference rows (chat_task.py test.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length limit")
    parser.add_argument("--samples", type=int, default=6, help="held-out prompts whose answers are printed")
    parser.add_argument("--seed", type=int, default=0, help="which prompts' answers are printed")
    parser.add_argument("--out", type=Path, default=None, help="a .json file for every model's per-prompt results")
    parser.add_argument("models", nargs="+", help="LABEL=FOLDER, each a Hugging Face model folder")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scores = {}
    for item in args.models:
        label, _, folder = item.partition("=")
        scores[label] = score_model(Path(folder), args.data, args.max_new_tokens)
        print(f"{label}: scored in {scores[label].seconds:.0f} s", flush=True)
    print_table(args.data, scores)
    print_samples(scores, args.samples, args.seed)
    if args.out is not None:
        args.out.write_text(json.dumps({label: asdict(score) for label, score in scores.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()

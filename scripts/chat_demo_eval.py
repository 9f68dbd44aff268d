"""Score chat models on the held-out demo-chat prompts (chat_task.py) and print a before/after table.

    .venv/bin/python scripts/chat_demo_eval.py --data .cache/dpo/data/chat_numbers/test.jsonl \\
        before=.cache/dpo/models/SmolLM2-135M-Instruct after=<dpo run>/LATEST

Both measures go through the project's own pipeline, as training sees the data: the file is
rendered with each model's chat template (tokenization.tokenize_datasets), and greedy completions
stop at the template's end-of-turn token (chat_templates.stop_token_ids).
- preference accuracy: share of held-out pairs whose chosen answer has the higher summed log-prob;
- greedy accuracy: share of held-out prompts whose greedy answer is the right number alone
  (chat_task.score_answer: a well-formed, correct answer).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import console  # noqa: E402
from batching import collate_prompts, padded_batch  # noqa: E402
from chat_task import score_answer  # noqa: E402
from chat_templates import stop_token_ids  # noqa: E402
from logprobs import sequence_logps  # noqa: E402
from tokenization import TokenizeSettings, tokenize_datasets  # noqa: E402

BATCH = 16


def held_out_examples(data: Path, tokenizer, max_length: int) -> tuple[list[dict], list[dict]]:
    """(pairs, SFT examples) of every row of the file: both of the file loader's splits."""
    kinds = []
    for sft_mode in (False, True):
        examples = []
        for split in ("train", "test"):
            settings = TokenizeSettings(max_length, max_length - 16, sft_mode=sft_mode)
            with console.silenced():
                split_examples, _ = tokenize_datasets([str(data)], split, tokenizer, settings)
            examples += list(split_examples)
        kinds.append(examples)
    return kinds[0], kinds[1]


@torch.no_grad()
def preference_accuracy(model, pairs: list[dict], pad_token_id: int) -> tuple[int, int]:
    wins = 0
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        sides = [(e["chosen_input_ids"], e["chosen_labels"]) for e in chunk]
        sides += [(e["rejected_input_ids"], e["rejected_labels"]) for e in chunk]
        batch = padded_batch([ids for ids, _ in sides], [labels for _, labels in sides], pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, _ = sequence_logps(logits, batch["labels"])
        chosen, rejected = logps.chunk(2)
        wins += int((chosen > rejected).sum())
    return wins, len(pairs)


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


def score_model(folder: Path, data: Path, max_new_tokens: int) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pairs, prompts = held_out_examples(data, tokenizer, max_length=128)
    start = time.perf_counter()
    wins, n_pairs = preference_accuracy(model, pairs, tokenizer.pad_token_id)
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens)
    correct = [score_answer(e["prompt_messages"], answer) for e, answer in zip(prompts, answers)]
    return {
        "preference": (wins, n_pairs),
        "greedy": (sum(correct), len(correct)),
        "examples": list(zip((e["prompt_messages"][-1]["content"] for e in prompts), answers))[:3],
        "seconds": time.perf_counter() - start,
    }


def share(counts: tuple[int, int]) -> str:
    return f"{counts[0]}/{counts[1]} = {counts[0] / counts[1]:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="held-out preference rows (chat_task.py test.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length limit")
    parser.add_argument("models", nargs="+", help="LABEL=FOLDER, each a Hugging Face model folder")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scores = {}
    for item in args.models:
        label, _, folder = item.partition("=")
        scores[label] = score_model(Path(folder), args.data, args.max_new_tokens)
    print(f"\nheld-out prompts of {args.data}; {torch.get_num_threads()} torch threads")
    print("| model | preference accuracy (chosen log-prob higher) | greedy answers correct and well-formed |")
    print("|---|---|---|")
    for label, score in scores.items():
        print(f"| {label} | {share(score['preference'])} | {share(score['greedy'])} |")
    for label, score in scores.items():
        shown = "; ".join(f"{question!r} -> {answer!r}" for question, answer in score["examples"])
        print(f"{label} ({score['seconds']:.0f} s to score): {shown}")


if __name__ == "__main__":
    main()

"""The demo-chat task (chat_task.py) before training: what a pretrained chat model scores, and one DPO step's cost.

    .venv/bin/python scripts/build_chat_model.py        # once: the model folder this reads
    .venv/bin/python benchmarks/chat_task_baseline.py [--model .cache/dpo/models/SmolLM2-135M-Instruct]

On the first --prompts held-out prompts, everything under the model's chat template:
- greedy accuracy: share of prompts whose greedy completion chat_task.score_answer accepts (the right
  number alone), and, for comparison, the share whose last number is right whatever surrounds it;
- preference accuracy: share of held-out pairs whose chosen response has the higher summed
  log-probability, over all pairs (three per prompt) and per kind of rejected answer;
- one DPO step's model work on --batch-pairs pairs: the reference forward (no gradients) and the
  policy forward + backward (concatenated chosen and rejected rows, padded), with --threads torch
  threads, fastest and median of --rounds (other processes on a shared machine only slow it down).
"""

import argparse
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from chat_task import KINDS, make_problems, preference_rows, rejected_answers, score_answer  # noqa: E402
from logprobs import IGNORE_INDEX, sequence_logps  # noqa: E402
from losses import preference_loss  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / ".cache/dpo/models/SmolLM2-135M-Instruct"


def chat_tokens(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], response: list[dict]) -> tuple[list, int]:
    """Token ids of prompt + response under the chat template, and how many of them are the prompt's."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(prompt + response, return_dict=True)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"The chat template does not extend the prompt's tokens with the response: {prompt!r}")
    return full_ids, len(prompt_ids)


def padded_pairs(tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded: input_ids, attention_mask, labels (batch, seq_len).

    labels hold IGNORE_INDEX on the prompt and on padding, so only response tokens are scored.
    """
    sequences = [chat_tokens(tokenizer, row["prompt"], row[side]) for side in ("chosen", "rejected") for row in rows]
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), tokenizer.pad_token_id)
    labels = torch.full((len(sequences), length), IGNORE_INDEX)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for index, (ids, n_prompt) in enumerate(sequences):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        labels[index, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        attention_mask[index, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pair_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (n_pairs,) of the chosen and the rejected halves of a padded_pairs batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, _ = sequence_logps(logits, batch["labels"])
    return logps.chunk(2)


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: Sequence[list[dict]], batch_size: int, max_new_tokens: int) -> list:
    """Greedy completions of chat prompts, decoded without special tokens."""
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    completions = []
    for start in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            for prompt in prompts[start : start + batch_size]
        ]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        completions += tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return completions


def last_number_is_right(prompt: list[dict], completion: str) -> bool:
    """The lenient reading: the completion's last number is the answer, whatever text surrounds it."""
    numbers = re.findall(r"\d+", completion)
    return bool(numbers) and score_answer(prompt, numbers[-1])


def time_dpo_step(model, batch: dict[str, torch.Tensor], rounds: int) -> dict[str, list[float]]:
    """Seconds of the reference forward and of the policy forward + backward, per round."""
    seconds = {"reference forward": [], "policy forward+backward": []}
    for _ in range(rounds):
        start = time.perf_counter()
        with torch.no_grad():
            reference_chosen, reference_rejected = pair_logps(model, batch)
        middle = time.perf_counter()
        policy_chosen, policy_rejected = pair_logps(model, batch)
        losses, _, _ = preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1)
        losses.mean().backward()
        end = time.perf_counter()
        model.zero_grad(set_to_none=True)
        seconds["reference forward"].append(middle - start)
        seconds["policy forward+backward"].append(end - middle)
    return seconds


def share(flags: Sequence[bool]) -> str:
    return f"{sum(flags)}/{len(flags)} = {sum(flags) / len(flags):.1%}"


def print_accuracy_table(problems: Sequence, strict: list[bool], lenient: list[bool], wins: list[bool]) -> None:
    """Greedy accuracies by kind of question, then preference accuracies by kind of rejected answer.

    wins: one flag per row of preference_rows(problems), in its order.
    """
    print("\n| measure | all | largest | smallest |\n|---|---|---|---|")
    for name, scores in (("greedy accuracy (number only)", strict), ("greedy, last number right", lenient)):
        by_kind = [[score for score, problem in zip(scores, problems) if problem.kind == kind] for kind in KINDS]
        print(f"| {name} | {share(scores)} | " + " | ".join(share(cell) for cell in by_kind) + " |")
    # preference_rows: the restatement first, then the wrong numbers, problem by problem
    rejected_kinds = [
        "restatement" if index == 0 else "wrong number"
        for problem in problems
        for index in range(len(rejected_answers(problem)))
    ]
    for rejected_kind in ("restatement", "wrong number"):
        subset = [win for win, kind in zip(wins, rejected_kinds) if kind == rejected_kind]
        print(f"| preference accuracy, rejected = {rejected_kind} | {share(subset)} | | |")
    print(f"| preference accuracy, all pairs | {share(wins)} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Hugging Face model folder")
    parser.add_argument("--prompts", type=int, default=40, help="held-out prompts to score")
    parser.add_argument("--seed", type=int, default=0, help="chat_task seed of the held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy completion length")
    parser.add_argument("--batch-pairs", type=int, default=8, help="pairs in the timed DPO batch")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the DPO batch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    problems = make_problems("test", args.prompts, args.seed)
    rows = preference_rows(problems)
    prompts = [[{"role": "user", "content": problem.question}] for problem in problems]

    start = time.perf_counter()
    completions = greedy_completions(model, tokenizer, prompts, batch_size=8, max_new_tokens=args.max_new_tokens)
    generation_seconds = time.perf_counter() - start
    strict = [score_answer(prompt, completion) for prompt, completion in zip(prompts, completions)]
    lenient = [last_number_is_right(prompt, completion) for prompt, completion in zip(prompts, completions)]
    with torch.no_grad():
        chosen, rejected = pair_logps(model, padded_pairs(tokenizer, rows))
    step_batch = padded_pairs(tokenizer, rows[: args.batch_pairs])
    step_seconds = time_dpo_step(model, step_batch, args.rounds)

    print(f"model {args.model.name}; {args.prompts} held-out prompts (seed {args.seed}); {platform.machine()}")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, float32")
    print(f"1-minute load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes count)")
    print("command: " + " ".join([Path(sys.executable).name] + sys.argv))
    print_accuracy_table(problems, strict, lenient, (chosen > rejected).tolist())
    print(f"\ngreedy generation of {len(prompts)} prompts: {generation_seconds:.1f} s")
    shape = tuple(step_batch["input_ids"].shape)
    print(f"DPO batch: {args.batch_pairs} pairs = {shape} padded tokens (chosen rows, then rejected rows)")
    for name, values in step_seconds.items():
        print(f"  {name}: fastest {min(values):.2f} s, median {statistics.median(values):.2f} s of {args.rounds}")
    print("\nfirst completions:")
    for prompt, completion in list(zip(prompts, completions))[:5]:
        print(f"  {prompt[0]['content']!r} -> {completion!r}")


if __name__ == "__main__":
    main()

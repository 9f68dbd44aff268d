"""Compare an SFT run and the DPO run trained from it on held-out data, as a table.

    python scripts/compare_runs.py <sft run folder> <dpo run folder>

Both models are loaded from their LATEST checkpoints with plain transformers. Columns:
- preference accuracy: share of held-out pairs whose chosen response the model gives a
  higher log-probability than the rejected one;
- reward accuracy: the DPO run's last eval `rewards_eval/accuracies` (its implicit reward,
  beta * log(pi / pi_ref), ranks chosen above rejected);
- answers correct: for the embedded `numbers` task only, the share of held-out prompts
  whose greedy completion names the right number.
"""

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import console  # noqa: E402
import embedded  # noqa: E402
from batching import collate_prompts, padded_batch  # noqa: E402
from logprobs import sequence_logps  # noqa: E402
from tokenization import TokenizeSettings, tokenize_datasets  # noqa: E402

BATCH_SIZE = 64


def last_eval(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.endswith("_eval/chosen") or k == "loss/eval" for k in r)]
    return evals[-1] if evals else {}


@torch.no_grad()
def preference_accuracy(model, examples: Sequence[dict], pad_token_id: int) -> float:
    wins = 0
    for start in range(0, len(examples), BATCH_SIZE):
        window = examples[start : start + BATCH_SIZE]
        logps = {}
        for side in ("chosen", "rejected"):
            batch = padded_batch(
                [e[f"{side}_input_ids"] for e in window], [e[f"{side}_labels"] for e in window], pad_token_id
            )
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps[side], _ = sequence_logps(logits, batch["labels"])
        wins += (logps["chosen"] > logps["rejected"]).sum().item()
    return wins / len(examples)


@torch.no_grad()
def answers_correct(model, tokenizer, examples: Sequence[dict]) -> float:
    prompts = list({e["prompt"]: e for e in examples}.values())
    correct = 0
    for start in range(0, len(prompts), BATCH_SIZE):
        chunk = prompts[start : start + BATCH_SIZE]
        batch = collate_prompts(chunk, tokenizer.pad_token_id)
        out = model.generate(
            input_ids=batch["prompt_input_ids"],
            attention_mask=batch["prompt_attention_mask"],
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, batch["prompt_input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(embedded.score_completion(e["prompt"], t) for e, t in zip(chunk, texts))
    return correct / len(prompts)


def main(sft_dir: Path, dpo_dir: Path) -> None:
    config = OmegaConf.load(dpo_dir / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(dpo_dir / "LATEST")
    settings = TokenizeSettings(
        config.max_length, config.max_prompt_length, sft_mode=False, dataset_paths=dict(config.dataset_paths)
    )
    with console.silenced():
        examples, _ = tokenize_datasets(list(config.datasets), "test", tokenizer, settings)
    task_is_numbers = list(config.datasets) == ["numbers"]
    rows = []
    for label, run_dir in (("SFT", sft_dir), ("DPO", dpo_dir)):
        model = AutoModelForCausalLM.from_pretrained(run_dir / "LATEST", dtype=torch.float32).eval()
        reward_accuracy = last_eval(run_dir).get("rewards_eval/accuracies")
        rows.append(
            (
                label,
                f"{preference_accuracy(model, examples, tokenizer.pad_token_id):.3f}",
                "-" if reward_accuracy is None else f"{reward_accuracy:.3f}",
                f"{answers_correct(model, tokenizer, examples):.3f}" if task_is_numbers else "n/a",
            )
        )
    header = ("model", "preference accuracy", "reward accuracy", "answers correct")
    print(f"\nheld-out: {len(examples)} pairs of {list(config.datasets)}")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))

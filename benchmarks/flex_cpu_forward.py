"""FlexAttention against sdpa's boolean mask on the CPU: one forward pass over packed prefix-shared rows.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/flex_cpu_forward.py            # SmolLM2-135M, real shape
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/flex_cpu_forward.py --rounds 5 --pairs 8

The trainer's choice on the CPU rests on this. FlexAttention has no backward pass on the CPU in
torch 2.13 (flex_attention refuses inputs that require grad), so a policy cannot train with it
here and config_checks refuses model.attn_implementation=flex_attention on the CPU; what is
left to measure is a forward pass without gradients, the reference's share of a step. Both rows
run the same model weights (dpo_throughput's `real` scenario: SmolLM2-135M-Instruct, or its
architecture with random weights where the folder is missing) on the same batches of the
scenario's HH-like pairs in the trainer's packed prefix-shared layout
(shared_prompt.shared_prompt_batch with rows of max_length tokens): sdpa with the batch's
(rows, 1, width, width) boolean mask, and flex_attention (compiled by transformers with
inductor) with the BlockMask built from each position's pair and part (shared_prompt.flex_block_mask).
The rows alternate batch by batch, and each batch counts with its fastest round. The first
flex call compiles; its time is printed apart. Log-probs of both are compared.
"""

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def first_error_line(error: Exception) -> str:
    """The line of an error's message that names the failure (dynamo wraps it in pages of context)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "error:" in line or "Error" in line or "not support" in line]
    return (named or lines or [""])[0][:300]


def use_uncompiled_flex_attention() -> None:
    """Make transformers call flex_attention eagerly (it materializes the scores: correct, not fused)."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as integration

    def plain(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    integration.compile_friendly_flex_attention = plain


def models_and_batches(pairs: int, n_batches: int):
    """(model description, sdpa model, flex model with the same weights, batches, row width): the real scenario's."""
    import dpo_throughput
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared_prompt import shared_prompt_batch
    from tokenization import TokenizeSettings, tokenize_datasets

    scenario = dpo_throughput.SCENARIOS["real"]
    with tempfile.TemporaryDirectory() as scratch:
        folder, described = dpo_throughput.model_folder(scenario, Path(scratch) / "model")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        data = Path(scratch) / "pairs.jsonl"
        n_pairs = 2 * pairs * n_batches + 16  # tokenize_datasets keeps some for the test split
        dpo_throughput.write_pairs(scenario, tokenizer, n_pairs, data)
        settings = TokenizeSettings(scenario.max_length, scenario.max_prompt_length, sft_mode=False)
        examples, _ = tokenize_datasets([str(data)], "train", tokenizer, settings)
        sdpa = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        flex = copy.deepcopy(sdpa)
        flex.config._attn_implementation = "flex_attention"
    batches = [
        shared_prompt_batch(
            [examples[i] for i in range(start, start + pairs)], tokenizer.pad_token_id, scenario.max_length
        )
        for start in range(0, pairs * n_batches, pairs)
    ]
    return described, sdpa, flex, batches, scenario.max_length


def backward_on_the_cpu(flex, batch: dict) -> str:
    """What happens when the flex model's log-probs of a batch get a backward pass (torch 2.13: it is refused)."""
    from shared_prompt import shared_prompt_logps

    try:
        flex.train()
        shared_prompt_logps(flex, dict(batch), chunk_tokens=1024)[0].sum().backward()
        return "ran"
    except Exception as error:  # noqa: BLE001  (raised through dynamo, whose wrapper types vary)
        return f"refused: {type(error).__name__}: {first_error_line(error)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="pairs per batch (the real scenario's batch)")
    parser.add_argument("--batches", type=int, default=4, help="batches timed")
    parser.add_argument("--rounds", type=int, default=3, help="times each batch runs on each row")
    args = parser.parse_args()

    import torch

    from shared_prompt import flex_block_mask, shared_prompt_logps

    described, sdpa, flex, batches, row_tokens = models_and_batches(args.pairs, args.batches)

    def run_sdpa(batch):
        return shared_prompt_logps(sdpa, batch, chunk_tokens=1024)[0]

    def run_flex(batch):
        flex_batch = dict(batch, block_mask=flex_block_mask(batch["pair_ids"], batch["parts"]))
        return shared_prompt_logps(flex, flex_batch, chunk_tokens=1024)[0]

    # one static kernel per batch shape: inductor's dynamic-shape build of the CPU flex kernel failed
    # here (torch 2.13: "'cur_kvSplitSize8' was not declared in this scope")
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = 64
    with torch.no_grad():
        start = time.perf_counter()
        try:
            firsts = [run_flex(batch) for batch in batches]  # each shape compiled once, before timing
            kernel = "compiled by inductor, one static kernel per batch shape"
        except Exception as error:  # noqa: BLE001  (an inductor build failure, raised through dynamo)
            print(f"compiled flex_attention failed: {type(error).__name__}: {first_error_line(error)}")
            use_uncompiled_flex_attention()
            firsts = [run_flex(batch) for batch in batches]
            kernel = "uncompiled (the compiled kernel failed to build; see above)"
        compile_seconds = time.perf_counter() - start
        worst = max((first - run_sdpa(batch)).abs().max().item() for first, batch in zip(firsts, batches))
        best = {"sdpa": [float("inf")] * len(batches), "flex": [float("inf")] * len(batches)}
        for _ in range(args.rounds):
            for index, batch in enumerate(batches):
                for name, run in (("sdpa", run_sdpa), ("flex", run_flex)):
                    start = time.perf_counter()
                    run(batch)
                    best[name][index] = min(best[name][index], time.perf_counter() - start)
    backward = backward_on_the_cpu(flex, batches[0])
    tokens = sum(int((batch["pair_ids"] >= 0).sum()) for batch in batches)
    print(f"model: {described}")
    threads = os.environ.get("OMP_NUM_THREADS")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_NUM_THREADS={threads})")
    print(f"{len(batches)} batches of {args.pairs} pairs, packed prefix-shared rows of {row_tokens} tokens, "
          f"{tokens} row tokens; best of {args.rounds} alternating rounds; float32, no gradients")  # fmt: skip
    print(f"flex_attention kernel: {kernel}")
    print(f"flex first calls (compilation included): {compile_seconds:.1f} s; largest log-prob difference {worst:.2e}")
    print("| attention | s per forward | row tokens/s |")
    print("|---|---:|---:|")
    for name in ("sdpa", "flex"):
        seconds = sum(best[name])
        print(f"| {name} | {seconds / len(batches):.3f} | {tokens / seconds:,.0f} |")
    print(f"flex backward on the CPU: {backward}")


if __name__ == "__main__":
    main()

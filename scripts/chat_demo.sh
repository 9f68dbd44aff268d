#!/usr/bin/env bash
# DPO on a real pretrained chat model, offline on CPU: SmolLM2-135M-Instruct on the demo-chat task
# (chat_task.py), its data rendered with the model's own chat template, in two rounds; then a
# before/after table of content (the right number as the answer), strict form (the number alone)
# and preference accuracy on 200 held-out prompts (scripts/chat_demo_eval.py).
#
#   scripts/chat_demo.sh                        # what `make demo-chat` runs
#   ROUND1_EXAMPLES=512 scripts/chat_demo.sh    # a longer first round
#
# Round 1 starts from the instruct model (its SFT stage is its own) on the task's written pairs:
# a bare right number against the model's restatement of the question, and against each wrong listed
# number. Its own samples could not start the loop: at temperature 1 the instruct model gives the
# right number as its answer in about 4% of them. Round 2 is on-policy: make_pairs.py samples four
# answers per prompt from the round-1 model and the task's rule judge grades them (chat_numbers_graded:
# 1 the right number alone, 0.5 right but wordy, 0 wrong); every two answers whose grades differ by at
# least 0.5 make a pair, so right beats wrong and well-formed beats wordy. Both rounds train RPO (DPO
# plus the chosen answer's NLL, loss.sft_weight=1; Pang et al., 2024) with LoRA (rank 16 on every
# linear layer of the blocks; the reference is the adapter switched off, so round 2's reference is
# the round-1 model), share_prompt and packing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-.cache/dpo/models/SmolLM2-135M-Instruct}
DATA=${DATA:-.cache/dpo/data/chat_numbers}
OUT=${OUT:-.cache/dpo/chat_demo}
ROUND1_EXAMPLES=${ROUND1_EXAMPLES:-256}  # written pairs trained on in round 1 (8 per step)
ROUND2_PROMPTS=${ROUND2_PROMPTS:-256}    # prompts sampled for round 2 (4 answers each)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

train() {  # train LABEL DATASET [train.py settings...]: one round, its output in $OUT/LABEL.log; prints its LATEST
    local label=$1 dataset=$2 log=$OUT/$1.log
    shift 2
    mkdir -p "$OUT"
    echo "training (output: $log)" >&2
    "$PYTHON" -u train.py model=smollm2-135m model.name_or_path="$MODEL" datasets="[$dataset]" \
        exp_name="chat_$label" "local_dirs=[$OUT/$label]" loss=dpo loss.beta=0.1 loss.sft_weight=1.0 \
        lora.enabled=true share_prompt=true packing=true optimizer=AdamW lr=2e-4 warmup_steps=2 batch_size=8 \
        max_length=128 max_prompt_length=112 do_first_eval=false eval_every=100000 n_eval_examples=16 \
        sample_during_eval=false "$@" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    grep -E '^(policy|forward passes|eval after)' "$log" >&2
    echo "$(sed -n 's/^run folder: //p' "$log" | head -n 1)/LATEST"
}

start=$(date +%s)
"$PYTHON" scripts/build_chat_model.py --out "$MODEL"
"$PYTHON" chat_task.py --out "$DATA" --train-prompts 2000 --test-prompts 200

echo "== round 1: $ROUND1_EXAMPLES of the task's written pairs"
round1=$(train round-1 "$DATA/train.jsonl" n_examples="$ROUND1_EXAMPLES")
round1_done=$(date +%s)
echo "round 1: $round1 ($((round1_done - start)) s)"

echo "== round 2: on-policy pairs from the round-1 model"
pairs=$(dirname "$round1")/pairs  # beside the round-1 run, so that a rerun samples its own model afresh
"$PYTHON" make_pairs.py policy="$round1" datasets="[$DATA/train.jsonl]" out_dir="$pairs" seed=2 \
    judge=rule judge.scorer=chat_numbers_graded n_prompts="$ROUND2_PROMPTS" samples_per_prompt=4 temperature=1.0 \
    pairing=all_above_gap min_gap=0.5 keep_logps=false generation.max_new_tokens=16 generation.batch_size=64 \
    2>&1 | grep -v -e '^Loading' -e 'it/s]$'
round2=$(train round-2 "$pairs/pairs.jsonl" model.archive="$round1" n_epochs=1)
round2_done=$(date +%s)
echo "round 2: $round2 ($((round2_done - round1_done)) s)"

"$PYTHON" scripts/chat_demo_eval.py --data "$DATA/test.jsonl" --out "$OUT/eval.json" \
    before="$MODEL" "after round 1"="$round1" "after round 2"="$round2"
echo "total: $(($(date +%s) - start)) s on $(getconf _NPROCESSORS_ONLN) CPU(s), OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"

#!/usr/bin/env bash
# DPO on a real pretrained chat model, offline on CPU: SmolLM2-135M-Instruct on the demo-chat task
# (chat_task.py), its data rendered with the model's own chat template; then a before/after table.
#
#   scripts/chat_demo.sh                   # what `make demo-chat` runs
#   scripts/chat_demo.sh n_examples=512    # extra arguments go to train.py (and win over the ones below)
#
# DPO starts directly from the instruct model (its SFT stage is its own): the task's chosen answers
# are bare numbers, and each prompt's three pairs reject the model's own failure modes (a restatement
# of the question with the right number, and each wrong listed number, the last-listed first), so no
# SFT stage is needed to reach them. LoRA (lora.py: rank 16 on every linear layer of the blocks; the
# reference is the adapter switched off) and share_prompt (each pair's prompt run once) keep it to a
# few minutes on two CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-.cache/dpo/models/SmolLM2-135M-Instruct}
DATA=${DATA:-.cache/dpo/data/chat_numbers}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

start=$(date +%s)
"$PYTHON" scripts/build_chat_model.py --out "$MODEL"
"$PYTHON" chat_task.py --out "$DATA" --train-prompts 600 --test-prompts 40
log=$(mktemp)
"$PYTHON" -u train.py model=smollm2-135m model.name_or_path="$MODEL" \
    loss=dpo loss.beta=0.1 datasets="[$DATA/train.jsonl]" exp_name=chat_dpo lora.enabled=true share_prompt=true \
    optimizer=AdamW lr=2e-4 warmup_steps=2 batch_size=8 n_examples=128 max_length=128 max_prompt_length=112 \
    do_first_eval=false eval_every=100000 n_eval_examples=16 sample_during_eval=false "$@" 2>&1 | tee "$log"
run_dir=$(sed -n 's/^run folder: //p' "$log" | head -n 1)
trained=$(date +%s)
echo
echo "DPO run: $run_dir ($((trained - start)) s including the model build and data)"
"$PYTHON" scripts/chat_demo_eval.py --data "$DATA/test.jsonl" before="$MODEL" after="$run_dir/LATEST"
# win rates of the DPO model against the instruct model, judged by the task's answer check (evaluate.py,
# judge=rule) on 16 prompts of the test file (its own "train" split: every prompt in the file is held out)
"$PYTHON" evaluate.py policy="$run_dir/LATEST" baseline="$MODEL" judge=rule judge.scorer=chat_numbers \
    datasets="[$DATA/test.jsonl]" split=train n_prompts=16 "temperatures=[0.0,0.7]" generation.max_new_tokens=12
echo "total: $(($(date +%s) - start)) s on $(nproc) CPU(s), OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"

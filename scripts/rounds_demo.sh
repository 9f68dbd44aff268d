#!/usr/bin/env bash
# The research loop on the embedded task, offline on CPU: an SFT model, a reward model trained on
# the task's preference pairs (from the SFT model, as InstructGPT does), then rounds of on-policy
# DPO whose pairs the reward model labels (make_pairs.py), each round evaluated against the SFT
# model with the task's answer check (judge=rule judge.scorer=numbers, exact and free).
#
#   scripts/rounds_demo.sh              # 2 rounds under .cache/dpo/rounds_demo
#   ROUNDS=3 scripts/rounds_demo.sh
#
# Every stage continues what a killed run left (resume_from=auto, kept samples), so rerunning
# after an interruption picks up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-.cache/dpo/rounds_demo}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

finished() {  # finished RUNS_FOLDER: the LATEST of the newest run under it that finished, else nothing
    { ls -d "$1"/*/LATEST 2>/dev/null || true; } | sort | tail -n 1
}

start=$(date +%s)
sft=$(finished "$OUT/sft")
if [[ -z "$sft" ]]; then
    "$PYTHON" -u train.py loss=sft exp_name=sft "local_dirs=[$OUT/sft]" resume_from=auto
    sft=$(finished "$OUT/sft")
fi
sft_done=$(date +%s)
reward=$(finished "$OUT/reward")
if [[ -z "$reward" ]]; then
    "$PYTHON" -u train.py loss=reward exp_name=reward "local_dirs=[$OUT/reward]" model.archive="$sft" resume_from=auto
    reward=$(finished "$OUT/reward")
fi
reward_done=$(date +%s)
accuracy=$("$PYTHON" -c "import json, sys; lines = [json.loads(l) for l in open(sys.argv[1])]; \
print(round([l for l in lines if 'rewards_eval/accuracies' in l][-1]['rewards_eval/accuracies'], 3))" \
    "$(dirname "$reward")/metrics.jsonl")

"$PYTHON" scripts/iterative_dpo.py --sft "$sft" --out "$OUT/rounds" --rounds "$ROUNDS" \
    --pairs judge=reward_model judge.path="$reward" n_prompts=1024 samples_per_prompt=4 temperature=1.0 \
        generation.max_new_tokens=16 generation.batch_size=128 \
    --train model=tiny n_examples=null n_epochs=2 sample_during_eval=false \
    --evaluate judge=rule judge.scorer=numbers n_prompts=200 "temperatures=[0.0,1.0]" \
        generation.max_new_tokens=16 generation.batch_size=100
echo
echo "SFT: $sft ($((sft_done - start)) s)"
echo "reward model: $reward ($((reward_done - sft_done)) s), held-out pair accuracy $accuracy"
echo "rounds: $OUT/rounds ($(($(date +%s) - reward_done)) s on $(nproc) CPU(s)); rounds.json and rounds.png there"

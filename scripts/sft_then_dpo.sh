#!/usr/bin/env bash
# The paper's two-stage pipeline: SFT, then DPO starting from (and referenced to) the SFT
# checkpoint, then a before/after table of both models on held-out data and their training curves overlaid.
#
#   scripts/sft_then_dpo.sh                      # the embedded tiny demo, offline on CPU
#   scripts/sft_then_dpo.sh model=pythia28 datasets=[hh] trainer=FSDPTrainer batch_size=64 gradient_accumulation_steps=2
#
# Extra arguments are passed to both stages (and win over the ones below).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1

run_stage() {  # run_stage LOG_FILE OVERRIDES...; prints the run folder of the finished stage
    local log_file=$1
    shift
    "$PYTHON" -u train.py "$@" 2>&1 | tee "$log_file" >&2 || return 1
    sed -n 's/^run folder: //p' "$log_file" | head -n 1
}

logs=$(mktemp -d)
start=$(date +%s)
sft_dir=$(run_stage "$logs/sft.log" loss=sft exp_name=sft "$@")
sft_done=$(date +%s)
dpo_dir=$(run_stage "$logs/dpo.log" loss=dpo model.archive="$sft_dir/LATEST" exp_name=dpo "$@")
dpo_done=$(date +%s)
echo
echo "SFT run: $sft_dir ($((sft_done - start)) s)"
echo "DPO run: $dpo_dir ($((dpo_done - sft_done)) s)"
"$PYTHON" scripts/compare_runs.py "$sft_dir" "$dpo_dir"
echo
# both stages' curves on one picture per metric, in $sft_dir/compare-plots/ (the script prints where)
"$PYTHON" scripts/plot_runs.py "$sft_dir" "$dpo_dir"

echo "Next: make demo-eval (win rates of DPO against SFT and of SFT against the chosen answers, judged by the task's answer check, with intervals and the KL)"

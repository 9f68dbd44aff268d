#!/usr/bin/env bash
# evaluate.py on the demo's two runs (make demo first), judged by the embedded task's answer check
# (judge=rule judge.scorer=numbers, exact and free): the DPO model against the SFT model it started
# from (with the KL to it), then the SFT model against the dataset's chosen answers, each at
# temperatures 0 and 1 on 200 held-out prompts, with 95% bootstrap intervals.
#
#   scripts/eval_demo.sh                        # the newest .cache/dpo_* run and the SFT run it was trained from
#   scripts/eval_demo.sh <dpo run folder>       # another DPO run
#   scripts/eval_demo.sh "" n_prompts=500       # extra arguments go to both evaluations (and win)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

dpo_dir=${1:-}
shift || true
if [[ -z "$dpo_dir" ]]; then
    dpo_dir=$(ls -d .cache/dpo_*/LATEST 2>/dev/null | sort | tail -n 1 | xargs -r dirname)
fi
if [[ -z "$dpo_dir" || ! -d "$dpo_dir/LATEST" ]]; then
    echo "error: no DPO run folder with a LATEST checkpoint (looked in .cache/dpo_*): run \`make demo\` first." >&2
    exit 2
fi
sft=$("$PYTHON" -c "import sys; from omegaconf import OmegaConf; print(OmegaConf.load(sys.argv[1]).model.archive)" \
    "$dpo_dir/config.yaml")
common=(judge=rule judge.scorer=numbers n_prompts=200 "temperatures=[0.0,1.0]" generation.max_new_tokens=16
    generation.batch_size=100)

start=$(date +%s)
dpo_log=$(mktemp)
"$PYTHON" evaluate.py policy="$dpo_dir/LATEST" baseline="$sft" reference="$sft" "${common[@]}" "$@" | tee "$dpo_log"
"$PYTHON" evaluate.py policy="$sft" baseline=chosen "${common[@]}" "$@" | tee "$dpo_log.sft"
echo
"$PYTHON" scripts/plot_evaluations.py "$(sed -n 's/^evaluation folder: //p' "$dpo_log")" \
    "$(sed -n 's/^evaluation folder: //p' "$dpo_log.sft")" --out "$dpo_dir/evaluations/compare" | tail -n 1
echo "evaluations: $(($(date +%s) - start)) s on $(nproc) CPU(s); both runs' report.html show them"

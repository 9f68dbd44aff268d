#!/usr/bin/env bash
# The GPU check of this project, prepared for one machine with a single NVIDIA GPU (H100/H200
# class) and no network, in under 8 minutes: install what the machine lacks from wheels carried in
# .whl/, run the tests that exercise CUDA, then benchmarks/gpu_benchmark.py (a 0.73B Llama-style
# model built from config, bfloat16: the default, padded, packed, prefix-shared, FSDPTrainer on one
# rank, flash_attention_2 packed, TRL, then compiled with inductor: FlexAttention packed,
# prefix-shared and both, and sdpa packed prefix-shared), printing tokens/s, peak GPU memory and
# model FLOP utilisation. The FlexAttention rows against the sdpa ones decide the GPU's attention.
#
# IT HAS NOT RUN ON A GPU YET: no GPU was available to this project when it was written. Only its
# CPU smoke mode (--cpu-smoke) has run. The first GPU run is its test: fix what breaks.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine, from anywhere; output under $OUT if set,
#                                              # else .cache/gpu_check
#   bash benchmarks/gpu_check.sh --cpu-smoke   # the same steps on the CPU: tiny model, no compiled row
#
# Wheels (exactly benchmarks/gpu_wheels.txt; the GPU image has torch, transformers, accelerate, peft,
# safetensors, tokenizers, tqdm, pyarrow, pandas, pytest and the rest): hydra-core 1.3.8,
# omegaconf 2.3.1, antlr4-python3-runtime 4.9.3, datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19,
# xxhash 4.1.0, trl 1.16.0 (optional). Download them on a machine that reaches PyPI, from the
# repository root (.whl/ must then travel with the repository: keep it out of git, e.g.
# `echo /.whl/ >> .git/info/exclude`):
#
#   grep -v -e '^#' -e antlr4 benchmarks/gpu_wheels.txt | xargs -n1 python3 -m pip download --no-deps \
#     --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # source only on PyPI; pure Python
#
# Tests: tests/test_fast_paths.py runs whole trainings on config.device=auto, so on the GPU they
# check packing, chunked log-probs, prefix sharing (full logits, chunked, packed, precomputed, and
# as FlexAttention BlockMasks: gradients, which the CPU cannot check),
# precomputed reference log-probs, compiled blocks and bfloat16 autocast on CUDA, each against the
# plain path on the same device. Its two-process FSDP / tensor-parallel test needs two GPUs and is
# left out. tests/test_shared_prompt.py and tests/test_chunked_logps.py build their tensors on the
# CPU (they take no device): they run here too, in seconds, to check the image's torch and
# transformers versions.
set -uo pipefail
cd "$(dirname "$0")/.."

cpu_smoke=false
[[ "${1:-}" == "--cpu-smoke" ]] && cpu_smoke=true
out="${OUT:-.cache/gpu_check}"
mkdir -p "$out"
python="${PYTHON:-python3}"
site=/tmp/gpu_check_site  # where the carried wheels are installed (--target), put on PYTHONPATH
time_limit_s=450          # everything, leaving half a minute of the 8 for starting and copying back
tests_limit_s=150
# no network there; and output as it comes, so that the log holds it even if a step is killed
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1

install_missing_wheels() {
  # Install each package of gpu_wheels.txt that the machine lacks, from .whl/; keep the ones it has.
  local requirement name wanted have wheel lacking=() wheels=()
  shopt -s nocaseglob
  while read -r requirement; do
    [[ -z "$requirement" || "$requirement" == \#* ]] && continue
    name="${requirement%%==*}"
    wanted="${requirement##*==}"
    have=$("$python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null)
    if [[ -n "$have" ]]; then
      echo "have $name $have (carried: $wanted)"
      continue
    fi
    wheel=$(compgen -G ".whl/${name//[-.]/_}-${wanted}-*.whl" | head -n 1)
    if [[ -n "$wheel" ]]; then
      wheels+=("$wheel")
    else
      lacking+=("$requirement")
    fi
  done < benchmarks/gpu_wheels.txt
  shopt -u nocaseglob
  if ((${#wheels[@]})); then
    echo "installing ${wheels[*]} into $site"
    rm -rf "$site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
      || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ((${#lacking[@]})); then
    echo "not installed and no wheel in .whl/: ${lacking[*]} (see this script's header)"
    [[ "${lacking[*]}" == "trl==1.16.0" ]] || return 1  # trl alone is optional: the benchmark leaves its row out
  fi
}

environment() {
  # What the check ran on: the GPU, the driver, Python and the packages that matter.
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$python" - <<'EOF'
import importlib.metadata as metadata
import platform

import torch

print(f"Python {platform.python_version()}; torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
for package in ("transformers", "accelerate", "peft", "datasets", "hydra-core", "omegaconf", "trl", "pyarrow"):
    try:
        print(f"{package} {metadata.version(package)}")
    except metadata.PackageNotFoundError:
        print(f"{package} not installed")
EOF
}

main() {
  echo "gpu_check: $(date '+%Y-%m-%d %H:%M:%S'), output in $out"
  install_missing_wheels || { echo "gpu_check: wheels missing; nothing run"; return 1; }
  environment | tee "$out/env.txt"
  "$python" -c 'import datasets, hydra, omegaconf, torch, transformers' || {
    echo "gpu_check: an import failed (above); nothing run"
    return 1
  }
  local device=cuda benchmark_args=()
  if $cpu_smoke; then
    device=cpu
    benchmark_args=(--tiny --rows padded shared fsdp-packed-shared trl)
  elif ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: torch sees no CUDA device (use --cpu-smoke on a machine without one)"
    return 1
  fi

  echo "== tests ($device; at most $tests_limit_s s)"
  local parallel=()
  "$python" -c 'import xdist' 2>/dev/null && parallel=(-n 4)  # pytest-xdist: four workers share the GPU
  timeout "$tests_limit_s" "$python" -m pytest -q -p no:cacheprovider "${parallel[@]}" --durations=5 \
    --junitxml="$out/pytest.xml" tests/test_fast_paths.py tests/test_shared_prompt.py tests/test_chunked_logps.py \
    -k "not under_fsdp_and_tensor_parallel"
  local tests_status=$?

  local budget=$((time_limit_s - SECONDS))
  echo "== benchmark ($device; rows get the $budget s left)"
  "$python" benchmarks/gpu_benchmark.py --device "$device" --out "$out" --time-budget "$budget" --row-timeout 240 \
    "${benchmark_args[@]}"
  local benchmark_status=$?
  echo "gpu_check: tests exit $tests_status, benchmark exit $benchmark_status, $SECONDS s in all"
  ((tests_status == 0 && benchmark_status == 0))
}

main 2>&1 | tee "$out/gpu_check.log"

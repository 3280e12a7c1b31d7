#!/usr/bin/env bash
# The full GPU run split into parts, each under its own time limit, for a machine without
# ComfyUI or the backends installed: they travel in .device/ (see bench/README.md).
#   bash bench/device_run.sh OUT_DIR [PARTS...]   (default parts: denoisers encoders pipelines lowvram)
# Time limits per part (seconds) come from BENCH_LIMIT_<PART>, e.g. BENCH_LIMIT_DENOISERS=270;
# extra flags from BENCH_FLAGS_<PART>, e.g. BENCH_FLAGS_DENOISERS="--compile --profile".
set -u
out=${1:?output folder}; shift
parts=${*:-denoisers encoders pipelines lowvram}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 COMFYUI_PATH=${COMFYUI_PATH:-$root/.device/comfyui}
[ -d "$root/.device/site" ] && export PYTHONPATH=$root/.device/site${PYTHONPATH:+:$PYTHONPATH}
FORMATS=${BENCH_FORMATS:-bf16,fp16,comfy:fp8_e4m3fn,torchao:int8wo,torchao:int8dq,torchao:fp8wo,torchao:fp8dq,torchao:int4wo,bnb:nf4,bnb:int8,quanto:int8,quanto:fp8,quanto:int4,gguf:Q8_0,gguf:Q6_K,gguf:Q5_K,gguf:Q4_0,gguf:Q4_K,gguf:Q3_K}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$out/log.txt"
for part in $parts; do
  var=BENCH_LIMIT_${part^^}
  limit=${!var:-300}
  models_var=BENCH_MODELS_${part^^}
  models=${!models_var:-}
  echo "=== $part (limit ${limit}s) $(date +%T)" | tee -a "$out/log.txt"
  fmts_var=BENCH_FORMATS_${part^^}
  fmts=(); case $part in denoisers|encoders) fmts=(--formats "$FORMATS");; esac
  [ -n "${!fmts_var:-}" ] && fmts=(--formats "${!fmts_var}")
  flags_var=BENCH_FLAGS_${part^^}
  read -r -a flags <<< "${!flags_var:-}"
  timeout -k 10 "$limit" python3 "$root/bench/run.py" --gpu-full --parts "$part" \
    ${models:+--models "$models"} "${fmts[@]}" "${flags[@]}" --budget-s $((limit - 25)) \
    --out "$out/$part.json" >> "$out/log.txt" 2>&1
  echo "=== $part rc=$? $(date +%T)" | tee -a "$out/log.txt"
done

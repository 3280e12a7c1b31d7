#!/usr/bin/env bash
# On the GPU machine (after `source .ci/device_env.sh` has what it needs in .device/): the
# GPU tests and the bundled workflows through a real ComfyUI server, per configuration:
#   0.3.75        ComfyUI 0.3.75 (classic patcher)
#   0.33-dynamic  ComfyUI 0.33.0 with its defaults: Dynamic VRAM on
#   0.33-classic  ComfyUI 0.33.0 with --disable-dynamic-vram
# Usage: bash .ci/gpu_matrix.sh OUT_DIR [CONFIG...]; extra pytest arguments in QK_PYTEST_ARGS.
# Prints a table of pass counts last (from the JUnit files in OUT_DIR).
set -u
out=${1:?output folder}; shift
configs=${*:-0.33-dynamic 0.33-classic 0.3.75}
cd "$(dirname "$0")/.."
source .ci/device_env.sh
export QUANTKIT_TEST_DEVICE=gpu QUANTKIT_STANDINS=${QUANTKIT_STANDINS:-/tmp/quantkit-standins}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
if [ -n "${QK_STANDIN_FAMILIES:-}" ]; then
  use_comfyui 0.3.75
  python3 -m bench.standins.build --families "$QK_STANDIN_FAMILIES" > "$out/standins.log" 2>&1 \
    || { echo "stand-in build failed"; tail -20 "$out/standins.log"; }
fi
for config in $configs; do
  case $config in
    0.3.75) use_comfyui 0.3.75; export QUANTKIT_SERVER_ARGS="" ;;
    0.33-dynamic) use_comfyui 0.33.0; export QUANTKIT_SERVER_ARGS="" ;;
    0.33-classic) use_comfyui 0.33.0; export QUANTKIT_SERVER_ARGS="--disable-dynamic-vram" ;;
    *) echo "unknown configuration $config"; continue ;;
  esac
  echo "=== $config $(date +%T)"
  timeout -k 10 "${QK_CONFIG_LIMIT:-400}" python3 -m pytest tests ${QK_PYTEST_ARGS:--m "gpu or server"} \
    --ignore=tests/test_frontend.py -p no:cacheprovider -q -rfE \
    --junitxml="$out/$config.xml" > "$out/$config.log" 2>&1
  echo "=== $config rc=$? $(date +%T)"
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/$config.log" | tail -15
done
python3 .ci/junit_table.py "$out"/*.xml

#!/usr/bin/env bash
# On the GPU machine: unpacks .device/bundle.tar.xz (see .ci/device_bundle.sh) once and
# points the tests at it. Source it; then `use_comfyui 0.33.0` or `use_comfyui 0.3.75`.
_qk_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QK_DEVICE_DIR="${QK_DEVICE_DIR:-/tmp/quantkit-device}"
if [ ! -f "$QK_DEVICE_DIR/.complete" ]; then
  mkdir -p "$QK_DEVICE_DIR"
  xz -dc "$_qk_root/.device/bundle.tar.xz" | tar -C "$QK_DEVICE_DIR" -xf - && touch "$QK_DEVICE_DIR/.complete"
fi
# comfy-kitchen's CUDA kernels (21 MB compressed) travel apart, when a run needs them
if [ -f "$_qk_root/.device/kitchen_cuda_C.so.xz" ] && [ ! -f "$QK_DEVICE_DIR/site/comfy_kitchen/backends/cuda/_C.abi3.so" ]; then
  xz -dc "$_qk_root/.device/kitchen_cuda_C.so.xz" > "$QK_DEVICE_DIR/site/comfy_kitchen/backends/cuda/_C.abi3.so"
fi
export PYTHONPATH="$QK_DEVICE_DIR/site:$QK_DEVICE_DIR/frontend-stub${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 QUANTKIT_NO_ENV=1
use_comfyui() {
  export COMFYUI_PATH="$QK_DEVICE_DIR/comfyui-$1"
  local link="$COMFYUI_PATH/custom_nodes/quantkit"
  [ -e "$link" ] || ln -s "$_qk_root" "$link"
}

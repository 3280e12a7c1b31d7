"""Regenerate workflows/*.json from tests/harness/workflow_builder.py (starts a server to
read ComfyUI's node definitions).  python tests/harness/build_workflows.py"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.comfy_server import ComfyServer  # noqa: E402
from harness.workflow_builder import write_all  # noqa: E402

if __name__ == "__main__":
    with ComfyServer(Path(tempfile.mkdtemp(prefix="quantkit-wf-"))) as server:
        for path in write_all(server.object_info()):
            print(f"wrote {path}")

"""ComfyUI's main.py, run with the media stand-ins of bench/media_stubs.py in place (for a
package that is missing here, such as torchaudio, which ComfyUI 0.33 imports at start).
Started by comfy_server.py in ComfyUI's folder, with main.py's own arguments."""
import os
import runpy
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository, for `bench`
from bench.media_stubs import stub_media_modules_if_missing  # noqa: E402

stub_media_modules_if_missing()
sys.path[0] = os.getcwd()  # as if `python main.py` had been run in ComfyUI's folder
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")

"""A real ComfyUI server (main.py --cpu) on a free loopback port, driven over HTTP."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

from .comfy_inprocess import make_base_dir
from .locations import comfyui_path, standins_path

SERVER_MAIN = Path(__file__).resolve().parent / "server_main.py"
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "clip", "vae", "loras", "unet")


def device_args() -> list:
    """--cpu, unless QUANTKIT_TEST_DEVICE=gpu; then QUANTKIT_SERVER_ARGS (e.g.
    --disable-dynamic-vram) picks the GPU mode, ComfyUI's defaults without it."""
    if os.environ.get("QUANTKIT_TEST_DEVICE") != "gpu":
        return ["--cpu"]
    return os.environ.get("QUANTKIT_SERVER_ARGS", "").split()


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model_paths(path: Path, models_root: Path) -> Path:
    lines = ["quantkit_standins:", f"  base_path: {models_root}"]
    for folder in MODEL_FOLDERS:
        sub = "text_encoders" if folder == "clip" else ("diffusion_models" if folder == "unet" else folder)
        lines.append(f"  {folder}: {sub}")
    path.write_text("\n".join(lines) + "\n")
    return path


class ComfyServer:
    def __init__(self, base_dir: Path, models_root: Optional[Path] = None, extra_args=(),
                 python: Optional[str] = None, extra_env: Optional[dict] = None):
        self.base_dir = make_base_dir(Path(base_dir))
        self.models_root = Path(models_root) if models_root else standins_path()
        self.extra_args = list(extra_args)
        self.extra_env = dict(extra_env or {})
        self.python = python or sys.executable
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / f"comfyui-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle ----------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> "ComfyServer":
        paths = write_model_paths(self.base_dir / "extra_model_paths.yaml", self.models_root)
        cmd = [self.python, str(SERVER_MAIN), *device_args(), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--extra-model-paths-config", str(paths),
               "--disable-auto-launch", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self._log.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP ---------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def post(self, path: str, payload: dict, timeout: float = 30.0):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def interrupt(self) -> None:
        """POST /interrupt, what the frontend's Cancel button sends (the answer is no JSON)."""
        req = urllib.request.Request(self.url + "/interrupt", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def queue(self, prompt: dict) -> str:
        answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise ServerError(f"prompt rejected: {json.dumps(answer['node_errors'], indent=1)}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900.0) -> dict:
        """The /history entry once the prompt ran; ServerError with ComfyUI's message if it failed."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            try:
                hist = self.get(f"/history/{prompt_id}")
            except (ConnectionError, urllib.error.URLError) as exc:
                time.sleep(1)
                if self.proc is not None and self.proc.poll() is not None:
                    raise ServerError(f"ComfyUI died while running the prompt (exit code "
                                      f"{self.proc.returncode}; -9 is usually the out-of-memory "
                                      f"killer):\n{self.log_tail()}") from exc
                raise
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    raise ServerError("prompt failed: " + _execution_error(status) + "\n" + self.log_tail(30))
                return entry
            time.sleep(0.5)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 900.0) -> dict:
        return self.wait(self.queue(prompt), timeout)


def _execution_error(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"{data.get('node_type')} (node {data.get('node_id')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}")
    return json.dumps(status)[:2000]

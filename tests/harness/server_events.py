"""ComfyUI's websocket messages (what its frontend listens to: executing, progress,
execution_interrupted, ...) for tests that must act while a prompt runs."""
from __future__ import annotations

import json
import time

import websocket  # websocket-client, installed with selenium (.ci/requirements-dev.txt)


class ServerEvents:
    def __init__(self, server):
        host = server.url.split("://", 1)[1]
        self.ws = websocket.create_connection(f"ws://{host}/ws?clientId={server.client_id}", timeout=5)

    def wait_for(self, predicate, timeout: float) -> dict:
        """The first JSON message {type, data} for which predicate(type, data) holds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(raw, bytes):  # preview images
                continue
            message = json.loads(raw)
            if predicate(message.get("type"), message.get("data") or {}):
                return message
        raise TimeoutError(f"no matching server message within {timeout:.0f} s")

    def close(self) -> None:
        self.ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Headless Chromium (Debian's `chromium` + `chromedriver`) driven by Selenium, pointed at
a real ComfyUI server: the real frontend (pip `comfyui-frontend-package`) with the pack's
web extension. Loopback only; nothing is downloaded."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = ("install them with: apt-get install -y chromium chromium-driver   (Debian, as root) "
                "and: python -m pip install selenium")

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--no-default-browser-check",
    "--hide-scrollbars", "--mute-audio",
)

# User settings written before the page opens: no first-run template browser, no
# update notices, the classic LiteGraph canvas (the default node mode here; see
# NODE_MODES), no minimap over the canvas.
QUIET_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Notification.ShowVersionUpdates": False,
    "Comfy.VueNodes.Enabled": False,
    "Comfy.Minimap.Visible": False,
}
# Browser-side (localStorage) flags: the "Introducing Nodes 2.0" banner stays closed.
QUIET_LOCAL_STORAGE = {"vueNodesBannerDismissed": "true"}

# How the frontend draws nodes: "classic" (LiteGraph canvas; widgets are canvas drawings
# or DOM elements positioned over it) or "vue" ("Nodes 2.0": each node is a Vue component,
# widgets are Vue components; experimental in frontend 1.2x-1.3x, the default for new
# installs since 1.41). The setting that picks it, per mode:
NODE_MODE_SETTING = "Comfy.VueNodes.Enabled"
NODE_MODES = {"classic": False, "vue": True}


class BrowserError(RuntimeError):
    pass


class MissingBrowser(BrowserError):
    pass


def check_installed() -> None:
    """MissingBrowser naming the install command when selenium, Chromium or chromedriver
    is absent."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the Python package selenium")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            missing.append(path)
    if missing:
        raise MissingBrowser(f"the frontend tests need {', '.join(missing)}: {INSTALL_HINT}")


class Browser:
    """One headless Chromium with a fresh profile. `quit()` always; it is idempotent."""

    def __init__(self, width: int = 1600, height: int = 1200, log_dir: Optional[Path] = None):
        check_installed()
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = Path(tempfile.mkdtemp(prefix="quantkit-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        log_path = (Path(log_dir) if log_dir else self.profile) / "chromedriver.log"
        self.service = Service(CHROMEDRIVER, log_output=str(log_path))
        self.driver = None
        try:
            self.driver = webdriver.Chrome(service=self.service, options=options)
        except Exception as e:  # noqa: BLE001
            self.quit()
            raise BrowserError(f"chromedriver could not start Chromium: {e}\n({INSTALL_HINT})") from e
        self.driver.set_script_timeout(120)
        self.driver.set_page_load_timeout(120)
        self.console: list[dict] = []

    # -- lifecycle ----------------------------------------------------------------
    def quit(self) -> None:
        if self.driver is not None:
            try:
                self.driver.quit()
            finally:
                self.driver = None
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.quit()

    # -- page ---------------------------------------------------------------------
    def js(self, script: str, *args):
        """Run `script` (a function body; `return` gives the value) in the page."""
        return self.driver.execute_script(script, *args)

    def js_await(self, expression: str, *args, timeout: float = 120.0):
        """Evaluate an async expression (may use `await` and `arguments`) and return its
        value; a JS exception becomes BrowserError with its message and stack."""
        self.driver.set_script_timeout(timeout)
        script = ("const done = arguments[arguments.length - 1];"
                  f"(async () => {{ {expression} }})().then("
                  "v => done({ok: true, value: v}),"
                  "e => done({ok: false, error: String(e && e.stack || e)}));")
        answer = self.driver.execute_async_script(script, *args)
        if not answer.get("ok"):
            raise BrowserError(answer.get("error"))
        return answer.get("value")

    def wait_for(self, condition_js: str, timeout: float = 60.0, what: str = "condition"):
        """Poll the JS expression `condition_js` until it is truthy; returns its value."""
        deadline = time.time() + timeout
        last_error = None
        while time.time() < deadline:
            try:
                value = self.js(f"try {{ return ({condition_js}); }} catch (e) {{ return null; }}")
                if value:
                    return value
            except Exception as e:  # noqa: BLE001  (page navigating)
                last_error = e
            time.sleep(0.25)
        raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what} ({condition_js})"
                           + (f": {last_error}" if last_error else "")
                           + "\nbrowser console:\n" + self.console_text())

    def open_comfyui(self, url: str, timeout: float = 120.0, node_mode: Optional[str] = None) -> None:
        """Load ComfyUI's page and wait until the app, its graph, the node definitions and
        the extensions are ready; with `node_mode` ("classic" or "vue", see NODE_MODES;
        write it first with set_node_mode), also until the page draws nodes that way."""
        # Keep every resource timing (the page loads ~250 files; Chrome keeps 250 by
        # default), so requested_urls() sees the extension scripts.
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                    {"source": "performance.setResourceTimingBufferSize(10000);"})
        self.driver.get(url.rstrip("/") + "/api/system_stats")  # same origin: set localStorage
        for key, value in QUIET_LOCAL_STORAGE.items():
            self.js("localStorage.setItem(arguments[0], arguments[1]);", key, value)
        self.driver.get(url)
        # !!: the page's objects are circular and cannot travel back to the test as values
        self.wait_for("!!(window.app && window.app.graph && window.app.canvas && window.LiteGraph && "
                      "Object.keys(window.LiteGraph.registered_node_types).length > 0 && "
                      "window.app.extensions && window.app.extensions.length > 0 && "
                      "window.comfyAPI && window.comfyAPI.api)",
                      timeout=timeout, what="ComfyUI's app object")
        if node_mode is not None:
            self.wait_for_node_mode(node_mode, timeout=timeout)
        time.sleep(1.0)  # extensions finish their setup; the default graph settles

    def node_mode(self) -> str:
        """"vue" when the page draws nodes as Vue components, else "classic"."""
        return "vue" if self.js("return !!window.LiteGraph?.vueNodesMode") else "classic"

    def wait_for_node_mode(self, mode: str, timeout: float = 60.0) -> None:
        """Wait until the page is in node mode `mode`; in Vue mode also until every node of
        the graph has its Vue element ([data-node-id])."""
        if mode not in NODE_MODES:
            raise ValueError(f"node mode {mode!r}: one of {sorted(NODE_MODES)}")
        want = "true" if NODE_MODES[mode] else "false"
        self.wait_for(f"!!window.LiteGraph.vueNodesMode === {want}", timeout=timeout,
                      what=f"{mode} node mode ({NODE_MODE_SETTING} = {want})")
        if mode == "vue":
            self.wait_vue_nodes(timeout=timeout)

    def wait_vue_nodes(self, timeout: float = 60.0) -> None:
        """In Vue mode: wait until each node of the graph has its Vue element."""
        self.wait_for("app.graph.nodes.every(n => document.querySelector("
                      "`[data-node-id=\"${n.id}\"]`))", timeout=timeout,
                      what="a Vue element per node ([data-node-id])")

    def console_log(self) -> list[dict]:
        """Every browser console entry so far (entries are consumed from the driver and kept)."""
        try:
            self.console.extend(self.driver.get_log("browser"))
        except Exception:  # noqa: BLE001
            pass
        return self.console

    def console_text(self) -> str:
        return "\n".join(f"[{e.get('level')}] {e.get('message')}" for e in self.console_log()[-80:])

    def requested_urls(self) -> list[str]:
        return self.js("return performance.getEntriesByType('resource').map(e => e.name)")

    # -- ComfyUI ------------------------------------------------------------------
    def load_workflow(self, workflow: dict) -> None:
        self.js_await("await app.loadGraphData(arguments[0]); return true;", workflow)
        self.js("app.canvas.setDirty(true, true);")
        if self.node_mode() == "vue":
            self.wait_vue_nodes()

    def frontend_version(self) -> str:
        """The frontend's version as the page reports it (e.g. "1.32.9")."""
        return self.js("return window.__COMFYUI_FRONTEND_VERSION__ ?? ''") or ""

    def queue_from_ui(self) -> dict:
        """Press Run the way the UI does (app.queuePrompt(0, 1)) and return the server's
        answer to POST /prompt ({prompt_id, number, node_errors})."""
        answer = self.js_await("""
            const api = window.comfyAPI.api.api;
            const original = api.queuePrompt;
            let answer = null;
            api.queuePrompt = async function (...args) {
              answer = await original.apply(this, args);
              return answer;
            };
            try { await app.queuePrompt(0, 1); } finally { api.queuePrompt = original; }
            return answer;""")
        if not answer or not answer.get("prompt_id"):
            raise BrowserError(f"the UI did not queue the prompt (answer {answer!r});"
                               f" browser console:\n{self.console_text()}")
        return answer

    def frame_nodes(self, node_ids=None, margins=(70, 110, 30, 30), max_scale: float = 1.0) -> float:
        """Pan and zoom the canvas so these nodes (all when None) fill the view, clear of the
        side bar and the tab bar (margins: left, top, right, bottom in CSS pixels); returns
        the scale. Waits for frames so DOM widgets (text boxes) follow the canvas."""
        scale = self.js_await("""
            const ids = arguments[0], [ml, mt, mr, mb] = arguments[1], maxScale = arguments[2];
            const nodes = app.graph.nodes.filter(n => !ids || ids.includes(n.id));
            let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
            for (const n of nodes) {
              const [x, y, w, h] = n.boundingRect;
              x0 = Math.min(x0, x); y0 = Math.min(y0, y);
              x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
            }
            const el = app.canvas.canvas, ds = app.canvas.ds;
            const rect = el.getBoundingClientRect();
            const W = rect.width, H = rect.height;
            const vw = W - ml - mr, vh = H - mt - mb;
            const s = Math.min(maxScale, vw / (x1 - x0), vh / (y1 - y0));
            ds.scale = s;
            ds.offset[0] = (ml + (vw - s * (x1 - x0)) / 2) / s - x0;
            ds.offset[1] = (mt + (vh - s * (y1 - y0)) / 2) / s - y0;
            app.canvas.setDirty(true, true);
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
            app.canvas.draw(true, true);
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
            await new Promise(r => setTimeout(r, 300));
            return s;""", node_ids, list(margins), max_scale)
        return scale

    def window_size(self) -> tuple[int, int]:
        size = self.driver.get_window_size()
        return size["width"], size["height"]

    def resize(self, width: int, height: int) -> None:
        """Resize the window (the page lays itself out again) and wait for two frames."""
        self.driver.set_window_size(width, height)
        self.js_await("await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));"
                      "await new Promise(r => setTimeout(r, 300)); return true;")

    def screenshot(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            raise BrowserError(f"screenshot to {path} failed")
        return path


def quiet_settings(server) -> None:
    """Write QUIET_SETTINGS for the default user through the server (before the page opens)."""
    for key, value in QUIET_SETTINGS.items():
        try:
            _post_raw(server.url + f"/settings/{key}", json.dumps(value).encode())
        except Exception:  # noqa: BLE001  (a setting the frontend does not know is harmless)
            pass


def set_node_mode(server, mode: str) -> None:
    """Write the node mode ("classic" or "vue", NODE_MODES) for the default user; the page
    reads it when it (re)opens: Browser.open_comfyui(url, node_mode=mode)."""
    if mode not in NODE_MODES:
        raise ValueError(f"node mode {mode!r}: one of {sorted(NODE_MODES)}")
    _post_raw(server.url + f"/settings/{NODE_MODE_SETTING}", json.dumps(NODE_MODES[mode]).encode())


def _post_raw(url: str, data: bytes) -> None:
    import urllib.request
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()

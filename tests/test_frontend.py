"""The pack in ComfyUI's real frontend (pip `comfyui-frontend-package`), in headless
Chromium driven by Selenium against a real ComfyUI server: our web extension loads, the
bundled workflows open with our nodes and their saved widget values, and a run started
from the UI shows each node's report in a read-only text box that is never saved, in both
node modes: the classic LiteGraph canvas and Vue nodes ("Nodes 2.0").

Needs Debian's chromium + chromedriver and the Python package selenium; without them the
tests fail (they never skip) with the command that installs them."""
from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from harness.browser import (NODE_MODES, Browser, MissingBrowser, check_installed, quiet_settings,
                             set_node_mode)
from harness.comfy_inprocess import PACK_LINK_NAME, PACK_NODES
from harness.comfy_server import ComfyServer
from harness.locations import REPO_ROOT

pytestmark = pytest.mark.server

OUR_NODES = PACK_NODES
EXTENSION_NAME = "QuantKit.ShowText"
EXTENSION_URL = f"/extensions/{PACK_LINK_NAME}/show_text.js"
REPORT_WIDGET = "quantkit_report"
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
SCREENSHOT_COPY = "/tmp/quantkit_frontend_{mode}.png"
MIN_VISIBLE_LINES = 10  # a report box shows at least this many lines (or all of a shorter text)


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser_tools():
    try:
        check_installed()
        problem = None
    except MissingBrowser as e:
        problem = str(e)
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="module")
def server(browser_tools, tmp_path_factory):
    srv = ComfyServer(tmp_path_factory.mktemp("frontend-server-base"))
    srv.start()
    try:
        quiet_settings(srv)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    b = Browser(width=1600, height=1300, log_dir=tmp_path_factory.mktemp("chromedriver"))
    try:
        b.open_comfyui(server.url)
        yield b
    finally:
        b.quit()


@pytest.fixture(params=list(NODE_MODES))
def mode_browser(request, browser, server):
    """The module's browser, its page reopened in node mode request.param ("classic" or
    "vue") in a taller window (Vue nodes are taller than their classic boxes: at 1300 px
    the whole SD1.5 graph fits only at 0.65 zoom, text under 8 px); the classic canvas and
    the window as they were afterwards, for the tests that follow."""
    mode = request.param
    # each mode's run executes our nodes (a node served from the cache has no ui.text in
    # the history): empty the server's cache; its worker does so as soon as it is woken
    request_free = urllib.request.Request(server.url + "/free", data=b'{"free_memory": true}',
                                          headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request_free, timeout=30) as r:  # answers no JSON
        r.read()
    time.sleep(1.0)
    size = browser.window_size()
    browser.resize(1600, 1500)
    set_node_mode(server, mode)
    browser.open_comfyui(server.url, node_mode=mode)
    try:
        yield browser
    finally:
        browser.resize(*size)
        if mode != "classic":
            set_node_mode(server, "classic")
            browser.open_comfyui(server.url, node_mode="classic")


# -- helpers ----------------------------------------------------------------------------
def our_console_errors(browser: Browser) -> list[str]:
    """Console errors that come from our extension (file, URL or extension name)."""
    marks = (EXTENSION_URL, "show_text.js", EXTENSION_NAME, REPORT_WIDGET)
    return [e["message"] for e in browser.console_log()
            if e.get("level") == "SEVERE" and any(m in e.get("message", "") for m in marks)]


def graph_nodes(browser: Browser) -> list[dict]:
    return browser.js("""
        return app.graph.nodes.map(n => ({
          id: Number(n.id), type: n.type, title: n.title,  // ids are strings in frontend 1.4x
          registered: !!LiteGraph.registered_node_types[n.type],
          widgets: (n.widgets ?? []).map(w => ({name: w.name, value: w.value,
                                                 saved: w.serialize !== false})),
        }));""")


def overlapping_nodes(browser: Browser) -> list[dict]:
    """Pairs of nodes whose boxes (title included) overlap on the canvas."""
    return browser.js("""
        const boxes = app.graph.nodes.map(n => ({id: n.id, title: n.title,
                                                 box: Array.from(n.boundingRect)}));
        const hits = [];
        for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
          const a = boxes[i], b = boxes[j];
          const [ax, ay, aw, ah] = a.box, [bx, by, bw, bh] = b.box;
          if (ax < bx + bw && bx < ax + aw && ay < by + bh && by < ay + ah) hits.push({a, b});
        }
        return hits;""")


def report_box(browser: Browser, node_id: int):
    """The report widget of a node and the text box the page shows for it (None if absent):
    the widget's DOM element in the classic canvas; in Vue mode the <textarea> of the Vue
    widget in the node's element ([data-node-id]), found by its label (aria-label in
    frontend 1.3x, a <label for> in 1.4x) or as the node's only text box."""
    return browser.js("""
        const node = app.graph.getNodeById(arguments[0]);
        const w = node?.widgets?.find(w => w.name === arguments[1]);
        if (!w) return null;
        const vue = !!LiteGraph.vueNodesMode;
        let el = null;
        if (vue) {
          const root = document.querySelector(`[data-node-id="${node.id}"]`);
          const names = [w.label, w.name].filter(Boolean);
          const areas = Array.from(root?.querySelectorAll("textarea") ?? []);
          el = areas.find(a => names.includes(a.getAttribute("aria-label")))
            ?? Array.from(root?.querySelectorAll("label[for]") ?? [])
                 .filter(l => names.includes(l.textContent.trim()))
                 .map(l => document.getElementById(l.htmlFor)).find(e => e?.tagName === "TEXTAREA")
            ?? (areas.length === 1 ? areas[0] : null);
        } else {
          el = w.inputEl ?? w.element;
        }
        const out = {value: w.value, serialize: w.serialize, options_serialize: w.options?.serialize,
                     has_element: !!el, mode: vue ? "vue" : "classic"};
        if (el) {
          if (!el.id) el.id = `quantkit-report-${node.id}`;  // for the test to find it again
          const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
          const cx = r.left + r.width / 2, cy = r.top + Math.min(r.height / 2, 12);
          const font = parseFloat(cs.fontSize);
          const line = parseFloat(cs.lineHeight) || 1.2 * font;  // "normal" is about 1.2em
          const pad = parseFloat(cs.paddingTop) + parseFloat(cs.paddingBottom);
          Object.assign(out, {
            element_id: el.id,
            text: el.value, read_only: el.readOnly || el.disabled, tag: el.tagName,
            rect: [r.left, r.top, r.width, r.height],
            viewport: [window.innerWidth, window.innerHeight],
            shown: cs.display !== "none" && cs.visibility !== "hidden" && el.offsetParent !== null
                   && Number(cs.opacity) > 0.5,
            on_top: document.elementFromPoint(cx, cy) === el,
            font_px: font * r.height / Math.max(el.offsetHeight, 1),  // on screen, zoom included
            // lines the box shows (CSS pixels, before the canvas zoom) and lines it holds
            visible_lines: (el.clientHeight - pad) / line,
            scroll_lines: (el.scrollHeight - pad) / line,
            client_height: el.clientHeight, scroll_height: el.scrollHeight, line_px: line,
          });
        }
        return out;""", node_id, REPORT_WIDGET)


def type_into(browser: Browser, element_id: str, keys: str) -> None:
    """A user's click into the element, then keys typed on the keyboard (WebDriver key
    events, not a script setting the value)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    el = browser.driver.find_element(By.ID, element_id)
    ActionChains(browser.driver).move_to_element(el).click().pause(0.2).send_keys(keys).perform()
    browser.js("return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));")


# -- 1. the page ------------------------------------------------------------------------
def test_page_loads_with_our_extension(browser, server):
    """Shown able to fail (reasoned, browser test): without WEB_DIRECTORY in the
    pack's __init__.py -> EXTENSION_URL is not in /extensions."""
    assert EXTENSION_URL in server.get("/extensions"), "the server lists our web extension"
    assert EXTENSION_NAME in browser.js("return app.extensions.map(e => e.name)"), \
        "show_text.js registered its extension"
    statuses = browser.js("""
        return performance.getEntriesByType("resource")
          .filter(e => new URL(e.name).pathname === arguments[0])
          .map(e => e.responseStatus ?? 200);""", EXTENSION_URL)
    assert statuses and all(s == 200 for s in statuses), f"{EXTENSION_URL} fetched: {statuses}"
    registered = browser.js("return Object.keys(LiteGraph.registered_node_types)")
    assert set(OUR_NODES) <= set(registered), "our nodes are registered in the page"
    assert our_console_errors(browser) == [], browser.console_text()


# -- 2. the bundled workflows -----------------------------------------------------------
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_bundled_workflow_loads(browser, path):
    """Shown able to fail (reasoned, browser test): "format" moved after
    "recipe" in nodes/quantize_model.INPUT_TYPES -> the saved values fill the widgets in the
    new order and the format widget holds "auto", not the saved format."""
    saved = json.loads(path.read_text())
    browser.load_workflow(saved)
    nodes = {n["id"]: n for n in graph_nodes(browser)}
    assert sorted(nodes) == sorted(n["id"] for n in saved["nodes"]), "every node was created"
    missing = sorted({n["type"] for n in nodes.values() if not n["registered"]})
    assert missing == [], f"missing node types: {missing}"
    for s in saved["nodes"]:
        node = nodes[s["id"]]
        assert node["type"] == s["type"]
        expected_title = s.get("title") or OUR_NODES.get(s["type"])
        if expected_title:
            assert node["title"] == expected_title, f"node {s['id']} ({s['type']})"
        # saved values fill the widgets in order (a widget added to a node since the
        # workflow was saved comes after them, with its default)
        saved_values = s.get("widgets_values", [])
        values = [w["value"] for w in node["widgets"] if w["saved"]]
        assert values[:len(saved_values)] == saved_values, \
            f"node {s['id']} ({s['type']}) widgets {[w['name'] for w in node['widgets']]}"
    assert any(n["type"] in OUR_NODES for n in saved["nodes"]), "the workflow uses the pack"
    for s in [n for n in saved["nodes"] if n["type"] == "QuantKitQuantizeModel"]:
        fmt = next(w for w in nodes[s["id"]]["widgets"] if w["name"] == "format")
        assert fmt["value"] == s["widgets_values"][0]
    reserialized = {int(n["id"]): n for n in browser.js("return app.graph.serialize().nodes")}
    for s in saved["nodes"]:
        saved_values = s.get("widgets_values", [])
        assert reserialized[s["id"]].get("widgets_values", [])[:len(saved_values)] == saved_values
    assert overlapping_nodes(browser) == [], "the saved layout has no overlapping nodes"
    assert our_console_errors(browser) == [], browser.console_text()


# -- 3. a run from the UI ---------------------------------------------------------------
def test_sd15_run_from_ui_shows_reports(mode_browser, server, tmp_path):
    """In each node mode (classic canvas, Vue nodes): a run from the UI shows each of our
    nodes' ui.text in a read-only text box on the node, tall enough to read (at least
    MIN_VISIBLE_LINES lines, or all of a shorter text; scrollable beyond), that typing does
    not change and that is never saved nor sent with the next prompt.

    Shown able to fail (reasoned, browser test): without
    `widget.serialize = false` in nodes/web/show_text.js the report lands in widgets_values
    ("widgets_values unchanged" fails); without `widget.options.serialize = false` it is
    sent as an input ("leaked") and the second Run re-runs our nodes.
    Shown able to fail: the original show_text.js (before Vue support) -> [vue] on 1.32.9
    "a read-only text box" (read_only False: the Vue <textarea> takes no inputEl.readOnly);
    `widget.options.rows = ...` removed -> [vue] "shows 2.2 of 3.0 lines" (1.32.9, node 2)
    and "2.4 of 3.0 lines" (1.49.6, node 3); `widget.options.read_only = true` removed ->
    [vue] 1.49.6 "a read-only text box", and with that attribute assertion also dropped,
    "typing changed node 3's report box" (the text got "zzz " typed into it)."""
    browser = mode_browser
    node_mode = browser.node_mode()
    saved = json.loads((REPO_ROOT / "workflows" / "sd15_quantized.json").read_text())
    by_type = {}
    for n in saved["nodes"]:
        by_type.setdefault(n["type"], []).append(n["id"])
    quantize_id = by_type["QuantKitQuantizeModel"][0]
    report_id = by_type["QuantKitMemoryReport"][0]
    shown_ids = [n["id"] for n in saved["nodes"] if n["type"] in OUR_NODES]

    browser.load_workflow(saved)
    browser.js("""  // small and short: CPU. Through the widgets, as a user would.
        const set = (type, name, v) => {
          for (const n of app.graph.nodes.filter(n => n.type === type)) {
            const w = n.widgets.find(w => w.name === name);
            w.value = v;
            w.callback?.(v, app.canvas, n);
          }
        };
        set("EmptyLatentImage", "width", 64);
        set("EmptyLatentImage", "height", 64);
        set("KSampler", "steps", 1);
        app.canvas.setDirty(true, true);""")
    before_values = {int(n["id"]): n.get("widgets_values") for n in browser.js("return app.graph.serialize().nodes")}

    answer = browser.queue_from_ui()
    assert not answer.get("node_errors"), answer
    entry = server.wait(answer["prompt_id"], timeout=600)
    prompt = entry["prompt"][2]
    latent = next(v for v in prompt.values() if v["class_type"] == "EmptyLatentImage")
    assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (64, 64), "the UI sent our edits"
    reports = {int(k): "\n".join(v["text"]) for k, v in entry["outputs"].items() if v.get("text")}
    assert quantize_id in reports and report_id in reports, f"ui.text of our nodes: {sorted(reports)}"
    assert "torchao:int8wo" in reports[quantize_id]

    # the frontend gets `executed` over the websocket; show_text.js adds the text box
    browser.wait_for(f"[{','.join(map(str, reports))}].every(id => app.graph.getNodeById(id)"
                     f"?.widgets?.some(w => w.name === '{REPORT_WIDGET}' && w.value))",
                     timeout=60, what="the report text boxes")
    scale = browser.frame_nodes()  # the whole graph in view
    shot = browser.screenshot(tmp_path / f"quantkit_frontend_{node_mode}.png")
    shutil.copyfile(shot, SCREENSHOT_COPY.format(mode=node_mode))

    for node_id, text in reports.items():
        box = report_box(browser, node_id)
        assert box is not None, f"node {node_id} has no {REPORT_WIDGET} widget"
        assert box["value"] == text, f"node {node_id} shows its ui.text"
        assert box["has_element"] and box["tag"] == "TEXTAREA", f"{node_mode}: {box}"
        assert box["text"] == text and box["read_only"], f"node {node_id}: a read-only text box {box}"
        # tall enough to read: MIN_VISIBLE_LINES lines, or the whole text (as wrapped) when
        # shorter; the rest scrolls
        want = min(MIN_VISIBLE_LINES, box["scroll_lines"])
        assert box["visible_lines"] >= want - 0.25, \
            f"{node_mode}: node {node_id} shows {box['visible_lines']:.1f} of {box['scroll_lines']:.1f} lines {box}"
        left, top, width, height = box["rect"]
        vw, vh = box["viewport"]
        assert box["shown"] and width > 150 and height > 20, f"node {node_id}: text box shown {box}"
        assert 0 <= left and left + width <= vw and 0 <= top and top + height <= vh, \
            f"node {node_id}: text box inside the window {box}"
        assert box["on_top"], f"node {node_id}: nothing covers the text box {box}"
        assert box["font_px"] >= 8, f"node {node_id}: readable at scale {scale:.2f} {box}"

    # read-only for a user: a click into the box and keys typed leave the text as it was
    # (with Backspace or Delete the canvas would delete the selected node instead)
    for node_id, text in reports.items():
        box = report_box(browser, node_id)
        type_into(browser, box["element_id"], "zzz ")
        after_typing = report_box(browser, node_id)
        assert (after_typing["text"], after_typing["value"]) == (text, text), \
            f"{node_mode}: typing changed node {node_id}'s report box"
    browser.js("document.activeElement?.blur?.();")

    # never saved: not in the workflow (widgets_values) ...
    after = {n["id"]: n for n in browser.js("return app.graph.serialize().nodes")}
    serialized = json.dumps(list(after.values()))
    for node_id, text in reports.items():
        assert after[node_id].get("widgets_values") == before_values[node_id], \
            f"node {node_id}: widgets_values unchanged by the report"
        assert text.splitlines()[0] not in serialized, f"node {node_id}: report text saved in the workflow"
    # ... nor in the prompt the next Run sends (an extra input changes ComfyUI's cache key,
    # so the Quantize node would run again on every Run)
    next_prompt = browser.js_await("return (await app.graphToPrompt()).output;")
    leaked = {k: sorted(v["inputs"]) for k, v in next_prompt.items()
              if REPORT_WIDGET in v["inputs"]}
    assert leaked == {}, f"the report widget is sent as a node input in the next prompt: {leaked}"

    # showing the report must not push our nodes over their neighbours (the text would hide)
    hits = [h for h in overlapping_nodes(browser)
            if h["a"]["id"] in shown_ids or h["b"]["id"] in shown_ids]
    assert hits == [], f"after the run our nodes overlap others: {hits}"

    # so a second Run, nothing changed, reuses every cached result (nothing re-quantized)
    again = server.wait(browser.queue_from_ui()["prompt_id"], timeout=600)
    cached = {str(n) for kind, data in again["status"]["messages"] if kind == "execution_cached"
              for n in data.get("nodes", [])}
    assert {str(i) for i in reports} <= cached, f"second Run re-ran our nodes; cached: {sorted(cached)}"
    assert our_console_errors(browser) == [], browser.console_text()

"""The pack inside a real ComfyUI server (main.py; --cpu unless QUANTKIT_TEST_DEVICE=gpu): registration, import log, and
bundled workflows run end to end through POST /prompt."""
from __future__ import annotations

import json
import os

import pytest

from harness.comfy_inprocess import PACK_LINK_NAME, PACK_NODES
from harness.comfy_server import ComfyServer, ServerError
from harness.locations import REPO_ROOT, comfyui_version
from harness.workflow_api import to_api
from harness import workflow_builder

pytestmark = pytest.mark.server

OUR_NODES = PACK_NODES


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ComfyServer(tmp_path_factory.mktemp("server-base"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def test_pack_imports_cleanly(server):
    """Shown able to fail (reasoned, server test): an unguarded top-level import of a missing
    module in nodes/__init__.py -> ComfyUI logs "IMPORT FAILED" for the pack."""
    log = server.log_text()
    assert PACK_LINK_NAME in log, "ComfyUI's import-time table lists the pack"
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not [line for line in failed if PACK_LINK_NAME in line], failed


def test_server_runs_in_the_mode_under_test(server):
    """On a GPU, ComfyUI 0.16+ turns Dynamic VRAM on unless told not to; its log says so.
    Shown able to fail (reasoned, server test): tests/harness/comfy_server.py passing
    --disable-dynamic-vram on a GPU run that should have it -> the log line is absent."""
    major, minor = (int(x) for x in comfyui_version().split(".")[:2])
    expected = (os.environ.get("QUANTKIT_TEST_DEVICE") == "gpu" and (major, minor) >= (0, 16)
                and "--disable-dynamic-vram" not in os.environ.get("QUANTKIT_SERVER_ARGS", ""))
    log = server.log_path.read_text()
    assert ("DynamicVRAM support detected and enabled" in log) == expected, server.log_tail()


def test_nodes_registered_with_plain_names_and_tooltips(object_info):
    """Shown able to fail (reasoned, server test): a node left out of
    NODE_DISPLAY_NAME_MAPPINGS in nodes/__init__.py -> its display_name is its id; an
    input without "tooltip" in INPUT_TYPES -> "has no tooltip"."""
    for node_id, display in OUR_NODES.items():
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info = object_info[node_id]
        assert info["display_name"] == display
        assert info["category"] == "QuantKit"
        assert info["description"]
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_quantize_model_format_list_covers_every_backend(object_info):
    """Shown able to fail (reasoned, server test): a backend whose
    adapter is not imported by backends/engine/registry.py (e.g. bitsandbytes) -> its
    formats (bnb:nf4) are missing from the menu."""
    formats = object_info["QuantKitQuantizeModel"]["input"]["required"]["format"][0]
    for fmt in ("torchao:int8wo", "bnb:nf4", "quanto:int8", "gguf:Q4_K", "gguf:Q8_0"):
        assert fmt in formats


def test_invalid_input_is_rejected_before_running(server):
    """Shown able to fail (reasoned, server test): Quantize Model's
    format given as a free STRING in nodes/quantize_model.INPUT_TYPES and its VALIDATE_INPUTS
    returning True -> "nosuch:fmt" passes validation and is not named in node_errors (the
    missing UNET alone is rejected, which the former "format|value_not_in_list" regex also
    accepted). tests/test_nodes/test_format_check.py runs the same validation in-process,
    mutations shown."""
    prompt = {"1": {"class_type": "QuantKitQuantizeModel",
                    "inputs": {"model": ["2", 0], "format": "nosuch:fmt", "recipe": "auto"}},
              "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "missing.safetensors",
                                                            "weight_dtype": "default"}},
              "3": {"class_type": "QuantKitMemoryReport",
                    "inputs": {"model": ["1", 0], "label": "", "reset_peak": False}}}
    with pytest.raises(ServerError, match="nosuch:fmt"):
        server.queue(prompt)


def without_unlinked_outputs(workflow: dict) -> dict:
    """Output slots nothing is wired to carry no information; ComfyUI versions differ in
    them (0.33's SaveImage has an IMAGE output), so they are left out of the comparison."""
    nodes = [dict(n, outputs=[o for o in n.get("outputs", []) if o.get("links")]) for n in workflow["nodes"]]
    return dict(workflow, nodes=nodes)


def test_bundled_workflows_are_current_and_convert(object_info):
    """Shown able to fail (reasoned, server test): a widget input added to
    a node's INPUT_TYPES (nodes/*.py) without regenerating workflows/ -> "is stale"."""
    for name in workflow_builder.GRAPHS:
        path = REPO_ROOT / "workflows" / name
        assert path.exists(), f"{name} is missing: regenerate with python tests/harness/build_workflows.py"
        saved = json.loads(path.read_text())
        rebuilt = workflow_builder.workflow(name, object_info)
        assert without_unlinked_outputs(saved) == without_unlinked_outputs(rebuilt), f"{name} is stale: regenerate it"
        prompt = to_api(saved, object_info)
        kinds = {n["class_type"] for n in prompt.values()}
        if name.endswith("_quantized.json"):
            assert {"QuantKitQuantizeModel", "QuantKitQuantizeTextEncoder", "QuantKitMemoryReport"} <= kinds
        assert any(k.startswith("QuantKit") for k in kinds), name


def _small(prompt):
    for node in prompt.values():  # small and short: CPU
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=128, height=128)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    return prompt


def test_gguf_workflows_save_then_load_and_sample(server):
    """sd15_save_gguf.json writes the quantized model and text encoder as .gguf files;
    sd15_gguf.json loads them with Load GGUF Model and Load GGUF CLIP and samples; saving
    again without 'overwrite' is refused.
    Shown able to fail (reasoned, server test): output_path in nodes/save_quantized_model.py
    without its existing-file check (shown in-process by test_save_refuses_names_...) ->
    the last run does not raise "exists"."""
    load = lambda name: json.loads((REPO_ROOT / "workflows" / name).read_text())  # noqa: E731
    entry = server.run(to_api(load("sd15_save_gguf.json"), server.object_info()), timeout=1200)
    texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
    path = server.base_dir / "models" / "diffusion_models" / (workflow_builder.GGUF_SD15 + ".gguf")
    assert path.is_file() and any("architecture sd1" in t and "Q8_0" in t for t in texts), texts
    assert (path.parent.parent.parent / "text_encoders" / (workflow_builder.GGUF_SD15 + "_clip_l.gguf")).is_file()
    entry = server.run(_small(to_api(load("sd15_gguf.json"), server.object_info())), timeout=1200)
    texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
    assert any("diffusion model (GGUF file)" in t and "Q8_0" in t for t in texts), texts
    assert any("text encoders (GGUF file)" in t for t in texts), texts
    images = [i for out in entry["outputs"].values() for i in out.get("images", []) if "_memory" not in i["filename"]]
    from PIL import Image
    assert Image.open(server.base_dir / "output" / images[0]["filename"]).size == (128, 128)
    again = to_api(load("sd15_save_gguf.json"), server.object_info())
    for node in again.values():  # another format, same file name (an unchanged graph is cached)
        if node["class_type"] == "QuantKitQuantizeModel":
            node["inputs"]["format"] = "gguf:Q4_0"
    with pytest.raises(ServerError, match="exists"):
        server.run(again, timeout=600)


def test_sd15_workflow_produces_an_image(server):
    """Shown able to fail (reasoned, server test): MemoryReport.report returning no
    chart image -> SaveImage of the chart fails or fewer than 2 images; Quantize Model's
    report not naming the format -> the last assertion."""
    workflow = json.loads((REPO_ROOT / "workflows" / "sd15_quantized.json").read_text())
    prompt = to_api(workflow, server.object_info())
    for node in prompt.values():  # small and short: CPU
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=128, height=128)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    entry = server.run(prompt, timeout=1200)
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(images) >= 2, "the picture and the memory chart are saved"
    for img in images:
        path = server.base_dir / "output" / img.get("subfolder", "") / img["filename"]
        assert path.stat().st_size > 1000
    from PIL import Image
    picture = next(i for i in images if "_memory" not in i["filename"])  # not the chart
    assert Image.open(server.base_dir / "output" / picture["filename"]).size == (128, 128)
    texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
    assert any("torchao:int8wo" in t for t in texts), "the report names the format used"


def test_bundled_workflows_are_templates_with_thumbnails(server):
    """ComfyUI's Templates browser lists a pack's workflows/ and shows <name>.jpg beside
    each (app/custom_node_manager.py; the frontend asks for `.jpg`).
    Shown able to fail (reasoned, server test): a workflow JSON added to workflows/ without its
    .jpg -> the thumbnail GET answers 404 (ServerError)."""
    names = sorted(p.stem for p in (REPO_ROOT / "workflows").glob("*.json"))
    listed = server.get("/workflow_templates")
    assert sorted(listed.get(PACK_LINK_NAME, [])) == names, listed
    for name in names:
        picture = server.get_bytes(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.jpg")
        assert picture[:3] == b"\xff\xd8\xff" and 2_000 < len(picture) < 200_000, name
        saved = server.get_bytes(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.json")
        assert json.loads(saved)["nodes"], name


def test_bundled_templates_carry_a_title_and_description(server):
    """The Templates browser of frontends 1.32.9 and 1.49.6 titles a custom node's template
    with its file name and reads no metadata for it (workflowTemplatesStore.ts), so each
    workflow carries its title and description as a note, shown when the template opens.
    Shown able to fail: sd15_gguf.json's note removed (workflows/ edited by hand) ->
    "sd15_gguf has no title note"."""
    listed = server.get("/workflow_templates")[PACK_LINK_NAME]
    titles = {}
    for name in sorted(listed):
        served = json.loads(server.get_bytes(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.json"))
        notes = [n["widgets_values"][0] for n in served["nodes"] if n["type"] == workflow_builder.NOTE_TYPE]
        assert len(notes) == 1 and notes[0].startswith("## "), f"{name} has no title note"
        heading, _, description = notes[0].partition("\n\n")
        titles[name] = heading.removeprefix("## ")
        assert 3 <= len(titles[name]) <= 40 and len(description.split()) >= 12, (name, notes[0])
    assert len(set(titles.values())) == len(titles), titles


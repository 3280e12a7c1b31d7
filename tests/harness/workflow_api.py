"""Convert a graph-editor workflow (the JSON users share) to the API prompt that
POST /prompt takes, using the server's /object_info to map widget values to inputs."""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SKIPPED_NODE_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    pass


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in SKIPPED_NODE_TYPES or node.get("mode") in (MUTED, BYPASSED):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"node {node['id']}: type '{kind}' is not installed on this server")
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                linked[inp["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values") or [])
        inputs = {}
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in info.get("input_order", {}).get("required", []) + \
                info.get("input_order", {}).get("optional", []) or list(specs):
            spec = specs[name]
            if name in linked:
                inputs[name] = linked[name]
                if _is_widget(spec) and values:
                    values.pop(0)  # a widget turned into an input keeps its slot
                    if len(spec) > 1 and spec[1].get("control_after_generate"):
                        values.pop(0)
                continue
            if not _is_widget(spec):
                continue
            if not values:
                if name in info["input"].get("required", {}):
                    raise WorkflowError(f"node {node['id']} ({kind}): no value for '{name}'")
                continue
            inputs[name] = values.pop(0)
            if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                values.pop(0)
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt

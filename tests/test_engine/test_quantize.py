"""Walking a module tree (engine/quantize.py): which layers are quantized, fall back or are
kept, with one format or a per-layer plan, and what the report counts. Pure torch, no ComfyUI (every format's round trip is in
test_adapters/test_contract.py; the nodes that call this are tested in test_nodes/)."""
from __future__ import annotations

import torch.nn as nn

from conftest import pack_module

modules = pack_module("backends.engine.modules")
quantize = pack_module("backends.engine.quantize")
recipes = pack_module("backends.engine.recipes")
clone = pack_module("backends.engine.clone")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 256)
        self.norm = nn.LayerNorm(256)
        self.body = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
        self.narrow = nn.Linear(256, 96)  # 96 rows, 256 wide
        self.odd = nn.Linear(320, 320)  # 320 is not a multiple of 256 (K-quants)
        self.tiny = nn.Linear(8, 8)
        self.final_layer = nn.Linear(256, 256)


def test_quantize_tree_counts_kept_and_unsupported_layers():
    """Shown able to fail: the min_params check in engine/quantize.py's plan_layer replaced by
    `if False:` -> "tiny" is kept for its shape, without "tiny" in the reason (assert fails)."""
    model = Toy()
    copy = clone.clone_tree(model)
    report = quantize.quantize_tree(copy, "gguf:Q4_K", recipes.get_recipe("generic"), target="toy")
    actions = {r.name: (r.action, r.format_id, r.reason) for r in report.layers}
    assert actions["body.0"][:2] == ("quantized", "gguf:Q4_K")
    assert actions["odd"][0] == "fallback" and actions["odd"][1] == "gguf:Q4_1"
    assert actions["tiny"][0] == "kept" and "tiny" in actions["tiny"][2]
    assert actions["final_layer"][0] == "kept" and "final projection" in actions["final_layer"][2]
    emb_norm = sum(p.numel() * p.element_size() for p in (*model.embed.parameters(), *model.norm.parameters()))
    assert report.other_bytes == emb_norm, "embeddings and norms are counted, in high precision"
    assert report.bytes_after < report.bytes_before
    assert isinstance(copy.body[0], modules.QuantizedLayer)
    assert not isinstance(model.body[0], modules.QuantizedLayer), "the source tree is untouched"


def test_quantize_tree_applies_a_per_layer_plan():
    """Shown able to fail: _planned_layer ignoring the plan's reasons -> layer '1' reads
    'the per-layer plan keeps it'."""
    net = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 256))
    plan = quantize.LayerPlan({"0": "gguf:Q8_0", "1": None}, {"1": "kept by the plan"}, notes=("why",))
    report = quantize.quantize_tree(net, "mixed", recipes.Recipe("test", min_params=0), target="t", plan=plan)
    actions = {r.name: (r.action, r.format_id, r.reason) for r in report.layers}
    assert actions["0"][:2] == ("quantized", "gguf:Q8_0")
    assert actions["1"] == ("kept", None, "kept by the plan")
    assert actions["2"][0] == "kept" and "not in the per-layer plan" in actions["2"][2]
    assert report.format_id == "mixed" and report.notes == ("why",)

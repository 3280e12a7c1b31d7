"""Decode groups (backends/kernels/decode_groups.py, kernel in backends/kernels/triton_grouped.py): neighbouring
weight-only layers decode their weights in one launch and take their slices of one buffer.

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, in a subprocess; the
group's "runs here" gate is opened for CPU tensors there); the GPU machine runs it compiled
(test_gpu_decode_groups.py). Expected weights come from gguf-py's numpy decoders and a float
computation of q * scale, not from the per-layer decoder the layers use otherwise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from conftest import pack_module

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import importlib, json, sys
import numpy as np, torch, torch.nn as nn
import gguf
from gguf.quants import dequantize as gguf_py_decode
sys.path.insert(0, sys.argv[1] + "/tests")
from harness.comfy_inprocess import import_pack
from harness.tolerances import rounding_bound
import_pack("qk_pack")
dg = importlib.import_module("qk_pack.backends.kernels.decode_groups")
quantize = importlib.import_module("qk_pack.backends.engine.quantize")
Recipe = importlib.import_module("qk_pack.backends.engine.recipes").Recipe
dg._runs_here = lambda x: True  # the interpreter runs the kernel on CPU tensors
report = {}

def tree():
    torch.manual_seed(0)
    # width 288 is no whole 256-block: K-quants fall back (Q4_K -> Q4_1) inside one group
    return nn.Sequential(nn.Linear(256, 128), nn.Conv2d(256, 64, 1), nn.Linear(288, 64),
                         nn.Linear(256, 96), nn.Linear(512, 64))

def expected(m):
    raw = m.weight.detach()
    if m.spec.backend == "torchao":  # q * per-row scale, in float32
        w = raw.float().reshape(raw.shape[0], -1) * m.weight_scale.float()[:, None]
        return w.reshape(m.weight_shape)
    qtype = gguf.GGMLQuantizationType[m.spec.name]
    return torch.from_numpy(gguf_py_decode(raw.numpy(), qtype)).reshape(m.weight_shape)

def inputs(m):
    return torch.randn(3, m.weight_shape[1]) if len(m.weight_shape) == 2 else torch.randn(1, 256, 5, 5)

def quantized(root, fmt, first_pass=True):
    quantize.quantize_tree(root, fmt, Recipe("t", min_params=0), target="t",
                           run_device=torch.device("cpu"), work_device=torch.device("cpu"))
    if first_pass:  # groups form after the first pass, in call order
        for m in root:
            m(inputs(m))
    return root

for fmt in ["torchao:int8wo", "gguf:Q8_0", "gguf:Q4_0", "gguf:Q4_1", "gguf:Q5_0", "gguf:Q5_1",
            "gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K", "gguf:Q3_K", "gguf:Q2_K"]:
    root = quantized(tree(), fmt)
    kinds = sorted({m.spec.name for m in root})
    result = {"kinds": kinds, "weights": [], "forward": []}
    for m in root:
        x = inputs(m)
        g = m._grouped_weight(x)
        result["weights"].append(None if g is None else bool(torch.equal(g, expected(m).to(g.dtype))))
        grouped = m(x)
        dg.ENABLED = False
        alone = m(x)
        dg.ENABLED = True
        result["forward"].append(bool(torch.equal(grouped, alone)))
    result["groups"] = len({id(m.decode_group) for m in root if m.decode_group is not None})
    report[fmt] = result

# two groups called in turns: each member still gets its own weight; both stop grouping
a, b = quantized(tree(), "gguf:Q8_0"), quantized(tree(), "gguf:Q8_0")
turns = []
for _ in range(dg.STRIKES_TO_STOP + 2):
    for root in (a, b):
        g = root[0]._grouped_weight(torch.randn(2, 256))
        turns.append(None if g is None else bool(torch.equal(g, expected(root[0]))))
report["turns"] = turns
report["turns_stopped"] = [a[0].decode_group.stopped, b[0].decode_group.stopped]

# groups follow the call order and respect their size; non-plannable formats have none
big = quantized(nn.Sequential(*[nn.Linear(256, 256) for _ in range(10)]), "torchao:int8wo", False)
dg.link_decode_groups(big, max_weights=3 * 256 * 256)
x = torch.randn(2, 256)
for i in [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 9]:  # called last to first; 9 again ends the first pass
    big[i](x)
groups = [m.decode_group for m in big]
report["sizes_total"] = sorted({g.total for g in groups if g is not None})
report["order"] = [[i for i, g2 in enumerate(groups) if g2 is g] for g in dict.fromkeys(groups) if g is not None]
report["lone"] = [i for i, g in enumerate(groups) if g is None]
report["int8dq_candidates"] = dg.link_decode_groups(quantized(tree(), "torchao:int8dq", False))

# a member with weight hooks (LoRA) takes its own path: hook applied, buffer untouched
root = quantized(tree(), "gguf:Q8_0")
x = torch.randn(3, 256)
plain = root[0](x)
root[0].weight_hooks = lambda: [lambda w: w * 2]
hooked = root[0](x)
del root[0].weight_hooks
again = root[0](x)
bound = rounding_bound(torch.float32, x.shape[1])  # doubling is exact: only the sums round
report["hooks"] = [bool(torch.allclose(hooked - root[0].bias, 2 * (plain - root[0].bias), rtol=bound, atol=bound)),
                   bool(torch.equal(again, plain))]
# one group, two compute dtypes: a buffer each, and each call gets its own dtype's weights
root = quantized(tree(), "gguf:Q8_0")
x32 = torch.randn(3, 256)
w = [root[0]._grouped_weight(x) for x in (x32, x32.to(torch.bfloat16), x32)]
report["dtypes"] = [str(t.dtype) for t in w] + [bool(torch.equal(w[2], expected(root[0])))]
print(json.dumps(report))
"""


def _run():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(REPO)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_grouped_decoding_in_triton_interpreter():
    """Shown able to fail: DecodeGroup.weight without its owner check (`buf.owner is not
    self`) -> the script crashes: a member of one group gets a slice of another's buffer
    (RuntimeError: expanded size 128 vs 256); the script's LoRA hook doubling by 2.00001
    (5e-6, within the old rtol 1e-5, beyond rounding_bound's 1.9e-6) -> "hooks" [False, True].
    Reasoned, not run: forming groups in module
    order fails the "order" check; ignoring max_weights fails "sizes_total"."""
    report = _run()
    for fmt, result in ((k, v) for k, v in report.items() if ":" in k):
        assert result["groups"] == 1, (fmt, result)
        assert result["weights"] == [True] * 5, (fmt, result)  # every member's slice exact
        assert result["forward"] == [True] * 5, (fmt, result)  # same output as decoding alone
    assert report["gguf:Q4_K"]["kinds"] == ["Q4_1", "Q4_K"]  # two kinds in one launch
    # a and b displace each other: correct weights while grouped; a stops after its third
    # strike, then b owns the buffer undisturbed and keeps grouping
    strikes = pack_module("backends.kernels.decode_groups").STRIKES_TO_STOP
    assert report["turns"] == [True] * (2 * strikes) + [None, True, None, True]
    assert report["turns_stopped"] == [True, False]
    assert report["sizes_total"] == [3 * 65536]  # 3 + 3 + 3 and a lone one, in call order
    # module order would give 0-2, 3-5, 6-8 and a lone 9
    assert report["order"] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]] and report["lone"] == [0]
    assert report["int8dq_candidates"] == 0
    assert report["hooks"] == [True, True]
    assert report["dtypes"] == ["torch.float32", "torch.bfloat16", "torch.float32", True]


def test_no_grouping_on_the_cpu_path():
    """Outside the interpreter the gate is closed on CPU tensors: layers decode alone, also
    after the first pass, when groups form.
    Shown able to fail: _runs_here returning True -> the group tries its Triton launch on
    CPU tensors, which fails and switches Triton off (fast._TRITON False)."""
    dg = pack_module("backends.kernels.decode_groups")
    quantize = pack_module("backends.engine.quantize")
    Recipe = pack_module("backends.engine.recipes").Recipe
    root = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    quantize.quantize_tree(root, "gguf:Q8_0", Recipe("t", min_params=0), target="t",
                           run_device=torch.device("cpu"), work_device=torch.device("cpu"))
    assert root[0].decode_group is not None  # a candidate, waiting for a pass on the GPU
    fast = pack_module("backends.kernels.fast_linear")
    triton_on = fast._TRITON
    for _ in range(2):
        root(torch.randn(2, 256))
        assert root[0]._grouped_weight(torch.randn(2, 256)) is None
        assert root[1]._grouped_weight(torch.randn(2, 256)) is None
    assert fast._TRITON == triton_on, "no launch was tried (and failed) on CPU tensors"

"""clone_tree (engine/clone.py): a new module tree over the same weight storage, sharing no
module or Parameter object with the source. Pure torch, no ComfyUI (the copies Quantize
Model makes inside ComfyUI are tested in test_nodes/)."""
from __future__ import annotations

import torch
import torch.nn as nn

from conftest import pack_module

clone = pack_module("backends.engine.clone")


class Net(nn.Module):
    """Tied weights (head and embedding), one module reachable twice, a buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.again = self.body[0]
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("positions", torch.arange(16.0))
        self.host_state = "loaded on cuda:0"


def test_clone_shares_storage_but_not_objects():
    """Shown able to fail: new_params[id(param)] = param in engine/clone.py's clone_tree (the
    source Parameter reused) -> `is not` fails."""
    model = Net()
    copy = clone.clone_tree(model)
    assert copy.body[0].weight is not model.body[0].weight
    assert copy.body[0].weight.data_ptr() == model.body[0].weight.data_ptr()
    copy.body[0].weight.data = torch.zeros_like(copy.body[0].weight)
    assert model.body[0].weight.abs().sum() > 0


def test_the_copy_keeps_the_trees_shape_and_its_own_containers():
    """Tied weights stay tied and a module reachable twice stays one module in the copy; its
    buffers are the source's tensors, but a hook or buffer added to the copy is the copy's
    alone; `drop` leaves a host's attribute out; `weight_source` supplies the start tensor.
    Shown able to fail: the `state[k] = type(state[k])(state[k])` line of clone_tree removed
    (containers shared) -> the source's forward hook dict gains the copy's hook
    (assert not model.body._forward_hooks)."""
    model = Net()
    backup = torch.ones(32, 16)
    copy = clone.clone_tree(model, weight_source=lambda name, t: backup if name == "body.0.weight" else t,
                            drop=lambda name: name == "host_state")
    assert copy.head.weight is copy.embed.weight and copy.head.weight is not model.head.weight
    assert copy.again is copy.body[0] and copy.again is not model.again
    assert len(list(copy.parameters())) == len(list(model.parameters()))
    assert copy.positions is model.positions
    assert copy.body[0].weight.data_ptr() == backup.data_ptr()
    assert model.body[0].weight.data_ptr() != backup.data_ptr()
    assert not hasattr(copy, "host_state") and model.host_state == "loaded on cuda:0"

    copy.body.register_forward_hook(lambda module, args, out: out * 0)
    copy.body.register_buffer("extra", torch.zeros(1))
    assert not model.body._forward_hooks
    assert "extra" not in model.body._buffers
    x = torch.randn(3, 16)
    assert model.body(x).abs().sum() > 0 and copy.body(x).abs().sum() == 0

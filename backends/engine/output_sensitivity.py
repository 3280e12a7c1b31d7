"""How much of an error in a layer reaches the model's output, from a few backward passes
of random output directions v (one per probe, through replays of recorded calls).

- weight errors: a weight error dW moves the model's output by about J dW, and
  E_v[<grad_W (v . y), dW>^2] = ||J dW||^2. Rounding errors of different weights are
  independent, so this is about sum(F * dW^2) with F = E_v[grad_W^2], the Fisher diagonal.
  F keeps what a layer-level measure misses: an error shared by every token (a weight
  error seen by correlated inputs) adds up where attention or a sum mixes tokens, noise
  does not. F is kept averaged over blocks of input columns (a quantization block's weights
  share a scale and err alike), a small fraction of the weight's size.
- per-token noise (activation quantization): independent across tokens and channels, so
  ||J e||^2 ~ ||J||_F^2 * mean(e^2), with ||J||_F^2 = E_v||grad_y (v . y)||^2 (Hutchinson).

Weights may be inference tensors (ComfyUI runs nodes in torch.inference_mode), which
autograd refuses to save. During the replay each Linear/Conv runs through a function that
keeps its weight by reference and computes its own gradients; the tree's other parameters
and buffers (norms, embeddings: small) are swapped for normal copies and put back after.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import QuantizedLayer

Replay = Callable[[], torch.Tensor]
FISHER_BLOCK = 32  # input columns pooled per Fisher entry (GGUF blocks are 32 or 256 wide)


@dataclass
class Sensitivity:
    gain: float = 0.0  # E_v ||grad_y||^2, summed over replays
    fisher: Optional[torch.Tensor] = None  # [out, in / block]: E_v grad_W^2 averaged over each block
    block: int = 1

    def weight_error(self, delta: torch.Tensor) -> float:
        """Estimated squared output error of a weight error `delta` (the weight's shape)."""
        if self.fisher is None:
            return 0.0
        sq = delta.reshape(delta.shape[0], -1, self.block).float().square().sum(-1)
        return float((sq.double() * self.fisher.to(sq.device, torch.float64)).sum())


def fisher_block(width: int) -> int:
    for b in (FISHER_BLOCK, 16, 8, 4, 2):
        if width % b == 0:
            return b
    return 1


class _Recorded(torch.autograd.Function):
    """y = layer(x); backward adds the layer's output-gradient energy and pooled weight
    Fisher to its record."""

    @staticmethod
    def forward(ctx, x, anchor, layer, record):
        ctx.layer, ctx.record = layer, record
        ctx.x = x.detach()
        with torch.no_grad():
            return _plain_forward(layer, x)

    @staticmethod
    def backward(ctx, grad):
        layer, record, x = ctx.layer, ctx.record, ctx.x
        record.gain += float(grad.double().square().sum())
        g = _weight_grad(layer, x, grad).reshape(layer.weight.shape[0], -1)
        pooled = g.square().reshape(g.shape[0], -1, record.block).mean(-1).cpu()
        record.fisher = pooled if record.fisher is None else record.fisher + pooled
        del ctx.x
        return _input_grad(layer, x.shape, grad).to(x.dtype), None, None, None


def _weight(layer, like: torch.Tensor):
    w = layer.weight.to(like.device, like.dtype)
    b = None if layer.bias is None else layer.bias.to(like.device, like.dtype)
    return w, b


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
                    3: torch.nn.grad.conv3d_input}
_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                     3: torch.nn.grad.conv3d_weight}


def _conv_padding(layer) -> tuple:
    dims = len(layer.kernel_size)
    if layer.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size))
    if layer.padding == "valid":
        return (0,) * dims
    return tuple(layer.padding)


def _padded_input(layer, x):
    """(input, padding) as the convolution sees them (non-zero padding modes padded here)."""
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0
    return x, _conv_padding(layer)


def _plain_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w, b = _weight(layer, x)
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    x, padding = _padded_input(layer, x)
    return _CONV[w.dim() - 2](x, w, b, layer.stride, padding, layer.dilation, layer.groups)


def _input_grad(layer: nn.Module, x_shape, grad: torch.Tensor) -> torch.Tensor:
    w, _ = _weight(layer, grad)
    if isinstance(layer, nn.Linear):
        return grad @ w
    if layer.padding_mode != "zeros":
        raise NotImplementedError("output sensitivity of a convolution with a non-zero padding mode")
    return _CONV_INPUT_GRAD[w.dim() - 2](x_shape, w, grad, layer.stride, _conv_padding(layer),
                                         layer.dilation, layer.groups)


def _weight_grad(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x, grad = x.float(), grad.float()
    if isinstance(layer, nn.Linear):
        return grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    x, padding = _padded_input(layer, x)
    return _CONV_WEIGHT_GRAD[layer.weight.dim() - 2](x, layer.weight.shape, grad, layer.stride,
                                                     padding, layer.dilation, layer.groups)


def _swap_small_tensors(root: nn.Module, layers: Iterable[nn.Module]) -> List[tuple]:
    """Normal (not inference) copies of every parameter and buffer outside `layers`' weights
    and biases and outside layers already quantized (their parts are decoded, never saved);
    returns what to put back."""
    skip = {id(t) for m in layers for t in (m.weight, m.bias) if t is not None}
    undo = []
    for module in root.modules():
        if isinstance(module, QuantizedLayer):
            continue
        for table in (module._parameters, module._buffers):
            for key, t in list(table.items()):
                if t is None or id(t) in skip:
                    continue
                copy = t.detach().clone()
                table[key] = nn.Parameter(copy, requires_grad=False) if table is module._parameters else copy
                undo.append((table, key, t))
    return undo


def layer_sensitivity(root: nn.Module, layers: Dict[str, nn.Module], replays: List[Replay],
                      probes: int = 2, seed: int = 0) -> Dict[str, Sensitivity]:
    """Per layer name, summed over `replays` (each runs `root` once and returns its output)
    and averaged over `probes` random output directions. Layers the replays never call get
    a zero Sensitivity. `root` is changed during the call and restored before it returns."""
    records = {name: Sensitivity(block=fisher_block(layer.weight[0].numel())) for name, layer in layers.items()}
    saved_forwards = {}
    undo = []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            anchor = torch.zeros((), requires_grad=True)  # makes every layer's output need a gradient
            undo = _swap_small_tensors(root, layers.values())
            for name, layer in layers.items():
                saved_forwards[name] = layer.__dict__.get("forward")
                layer.forward = _recording_forward(layer, anchor, records[name])
            gen = torch.Generator().manual_seed(seed)
            for replay in replays:
                for _ in range(probes):  # a fresh graph per probe: each backward frees its own
                    out = replay()
                    v = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device, out.dtype)
                    torch.autograd.backward(out, v)
                    del out
    finally:
        for name, layer in layers.items():
            if name in saved_forwards:
                if saved_forwards[name] is None:
                    del layer.forward
                else:
                    layer.forward = saved_forwards[name]
        for table, key, t in undo:
            table[key] = t
    for record in records.values():
        record.gain /= probes
        if record.fisher is not None:
            record.fisher /= probes
    return records


def _recording_forward(layer, anchor, record):
    def forward(x, *args, **kwargs):
        return _Recorded.apply(x, anchor, layer, record)
    return forward

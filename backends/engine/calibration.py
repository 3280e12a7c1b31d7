"""What a calibration pass records: a bounded sample of each quantizable layer's inputs,
and the first calls of the root module (to replay them later with gradients).

The caller runs the pass (a sampler, a test's forward); hooks only watch. A layer's
sample is a matrix of rows whose product with the flattened weight is the layer's output
at those rows: a Linear's input tokens, or for a convolution the input patch under
sampled output positions. Rows are picked at a fixed stride, so the same pass records the
same rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantize import QUANTIZABLE

MAX_ROWS = 256  # per layer, over the whole pass
MAX_LAYER_BYTES = 2 << 20  # per layer: wide convolutions keep fewer rows


def _padding(conv: nn.modules.conv._ConvNd) -> tuple:
    """Zero padding per spatial dim, as torch applies it ("same", "valid" or numbers)."""
    if conv.padding_mode != "zeros":
        return (0,) * len(conv.kernel_size)  # padded by F.pad in conv_patches
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    return tuple(conv.padding)


def _padded(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    pad = _padding(conv)
    return F.pad(x, [p for p in reversed(pad) for _ in range(2)]) if any(pad) else x


def _out_grid(conv: nn.modules.conv._ConvNd, padded_spatial) -> list:
    return [(padded_spatial[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
            for i in range(len(conv.kernel_size))]


def conv_positions(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> int:
    """How many output positions (batch x output grid) a batched call produces."""
    pad = _padding(conv) if conv.padding_mode == "zeros" else \
        tuple(conv._reversed_padding_repeated_twice[::-2])
    n = x.shape[0]
    for size in _out_grid(conv, [x.shape[2 + i] + 2 * p for i, p in enumerate(pad)]):
        n *= size
    return n


def conv_patches(conv: nn.modules.conv._ConvNd, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), in_channels * prod(kernel)]: the input under each output position
    (flat indices into batch x output grid), so that rows @ W.reshape(out, -1).T is the
    convolution's output there (bias aside). Batched input, groups == 1."""
    dims = len(conv.kernel_size)
    x = _padded(conv, x)
    index, coords = positions, []
    for size in reversed(_out_grid(conv, x.shape[2:])):
        coords.append(index % size)
        index = index // size
    batch, coords = index, coords[::-1]
    kernel = torch.cartesian_prod(*[torch.arange(k) for k in conv.kernel_size]).reshape(-1, dims)
    gathered = [x[(batch, slice(None), *[coords[i] * conv.stride[i] + int(off[i]) * conv.dilation[i]
                                         for i in range(dims)])]
                for off in kernel]  # weight order: channel-major, then kernel positions
    return torch.stack(gathered, dim=-1).reshape(len(positions), -1)


def strided(count: int, want: int, device) -> torch.Tensor:
    """`want` indices spread evenly over range(count) (all of them when count <= want)."""
    if count <= want:
        return torch.arange(count, device=device)
    return torch.div(torch.arange(want, device=device) * count, want, rounding_mode="floor")


def layer_width(module: nn.Module) -> int:
    return module.weight[0].numel()


@dataclass
class LayerSample:
    rows: List[torch.Tensor] = field(default_factory=list)  # float32, on the sample device
    count: int = 0  # rows kept
    calls: int = 0  # how often the layer ran during the pass

    def matrix(self) -> Optional[torch.Tensor]:
        return torch.cat(self.rows) if self.rows else None


class LayerInputs:
    """Context manager: while open, each quantizable layer of `layers` keeps up to
    `rows_per_call` rows of every call's input, `max_rows` in all (fewer for wide layers:
    at most `max_layer_bytes` each), on `store_device`."""

    def __init__(self, layers: Dict[str, nn.Module], rows_per_call: int = 64,
                 max_rows: int = MAX_ROWS, max_layer_bytes: int = MAX_LAYER_BYTES,
                 store_device="cpu"):
        self.layers = {n: m for n, m in layers.items() if isinstance(m, QUANTIZABLE)}
        self.rows_per_call = rows_per_call
        self.max_rows = max_rows
        self.max_layer_bytes = max_layer_bytes
        self.store_device = torch.device(store_device)
        self.samples: Dict[str, LayerSample] = {n: LayerSample() for n in self.layers}
        self._handles = []

    def limit(self, module: nn.Module) -> int:
        return max(1, min(self.max_rows, self.max_layer_bytes // (4 * layer_width(module))))

    def __enter__(self):
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def _hook(self, name):
        def hook(module, args):
            self.record(name, module, args[0])
        return hook

    @torch.no_grad()
    def record(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        sample = self.samples[name]
        sample.calls += 1
        room = self.limit(module) - sample.count
        if room <= 0:
            return
        want = min(self.rows_per_call, room)
        x = x.detach()
        if isinstance(module, nn.Linear):
            flat = x.reshape(-1, x.shape[-1])
            rows = flat[strided(flat.shape[0], want, flat.device)]
        else:
            if module.groups != 1:
                return  # no row form (rows serve activation errors, which convolutions lack)
            if x.dim() == module.weight.dim() - 1:  # unbatched call
                x = x.unsqueeze(0)
            positions = strided(conv_positions(module, x), want, x.device)
            rows = conv_patches(module, x, positions)
        sample.rows.append(rows.to(self.store_device, torch.float32))
        sample.count += rows.shape[0]


Call = Tuple[tuple, dict]


class RootCalls:
    """Context manager: while open, keeps the positional and keyword arguments of the first
    `keep` calls of `root` (references, not copies: the caller's tensors are new each call)."""

    def __init__(self, root: nn.Module, keep: int = 2, every: int = 1):
        self.root = root
        self.keep = keep
        self.every = max(1, every)  # keep every n-th call (spread over a sampling run)
        self.calls: List[Call] = []
        self._seen = 0
        self._handle = None

    def __enter__(self):
        self._handle = self.root.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False

    @property
    def seen(self) -> int:
        """Calls of the root while open."""
        return self._seen

    def _hook(self, module, args, kwargs):
        if self._seen % self.every == 0 and len(self.calls) < self.keep:
            self.calls.append((tuple(args), dict(kwargs)))
        self._seen += 1

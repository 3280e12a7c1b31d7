"""What a calibration pass records (engine/calibration.py): rows whose product with the
flattened weight is the layer's output, bounded, the same on every run, and no hook left
behind. The reference is torch's own layer output at the same positions."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import pack_module
from harness.tolerances import rounding_bound

calibration = pack_module("backends.engine.calibration")

CONVS = {
    "stride2-pad1": lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1),
    "dilated": lambda: nn.Conv2d(6, 5, 3, padding=2, dilation=2),
    "same": lambda: nn.Conv2d(6, 5, (3, 5), padding="same"),
    "reflect": lambda: nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect"),
    "1d": lambda: nn.Conv1d(6, 5, 4, stride=3),
}


@pytest.mark.parametrize("kind", CONVS, ids=list(CONVS))
def test_conv_rows_reproduce_the_convolution_at_their_positions(kind):
    """Shown able to fail: _padded without its zero padding (`if any(pad)` -> `if False`) ->
    stride2-pad1 fails (IndexError: a patch reaches past the unpadded input); kernel offsets
    in reversed order (.flip(0)) -> stride2-pad1 fails, every element mismatched."""
    torch.manual_seed(0)
    conv = CONVS[kind]()
    x = torch.randn(2, 6, 11, 13) if conv.weight.dim() == 4 else torch.randn(2, 6, 29)
    out = conv(x) - conv.bias.view(1, -1, *([1] * (x.dim() - 2)))
    flat = out.movedim(1, -1).reshape(-1, out.shape[1])  # (batch, grid...) order
    positions = torch.tensor([0, 3, flat.shape[0] // 2, flat.shape[0] - 1])
    assert calibration.conv_positions(conv, x) == flat.shape[0]
    rows = calibration.conv_patches(conv, x, positions)
    got = rows @ conv.weight.reshape(conv.weight.shape[0], -1).T
    bound = rounding_bound(torch.float32, conv.weight[0].numel())  # sums of one patch's terms
    torch.testing.assert_close(got, flat[positions], rtol=bound, atol=bound)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(2048, 8)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x, img):
        return self.wide(x).sum() + self.conv(img).sum()


def test_rows_are_bounded_repeatable_and_hooks_removed():
    """Shown able to fail: LayerInputs.limit ignoring max_layer_bytes -> the 2048-wide layer
    keeps 40 rows, not 16; strided() with torch.randperm -> the two passes' rows differ;
    __exit__ not removing its handles -> the first recorder keeps counting during the
    second pass (calls 10, not 5)."""
    torch.manual_seed(0)
    net = Net()
    x, img = torch.randn(10, 2048), torch.randn(1, 4, 8, 8)
    layers = dict(net.named_children())

    def record():
        with calibration.LayerInputs(layers, rows_per_call=10, max_rows=40,
                                     max_layer_bytes=16 * 2048 * 4) as rec:
            for _ in range(5):
                net(x, img)
        return {n: s.matrix() for n, s in rec.samples.items()}, rec.samples

    first, samples = record()
    second, _ = record()
    assert first["wide"].shape == (16, 2048), "capped by bytes"
    assert first["conv"].shape == (40, 4 * 9), "capped by rows"
    assert samples["wide"].calls == 5
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not net.wide._forward_pre_hooks and not net.conv._forward_pre_hooks
    # rows are inputs the layer saw: strided over the 10 tokens of the first call
    assert torch.equal(first["wide"][:10], x)


def test_root_calls_keep_every_nth_call_by_reference():
    """Shown able to fail: RootCalls keeping the first `keep` calls whatever `every` ->
    the second kept call is call 1, not 2."""
    net = nn.Linear(3, 3)
    inputs = [torch.full((1, 3), float(i)) for i in range(5)]
    with calibration.RootCalls(net, keep=2, every=2) as calls:
        for t in inputs:
            net(t)
    assert [c[0][0] is inputs[i] for c, i in zip(calls.calls, (0, 2))] == [True, True]
    assert not net._forward_pre_hooks

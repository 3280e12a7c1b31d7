"""Decode groups on the GPU: a group of weight-only layers decodes in one launch, and the
layers compute exactly what they compute decoding alone (same float weights, same matrix
products). Run on the GPU machine (bash .ci/gpu_matrix.sh)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import pack_module

dg = pack_module("backends.kernels.decode_groups")
fast = pack_module("backends.kernels.fast_linear")
quantize = pack_module("backends.engine.quantize")
recipes = pack_module("backends.engine.recipes")

pytestmark = pytest.mark.gpu
FORMATS = ["torchao:int8wo", "gguf:Q8_0", "gguf:Q4_K", "gguf:Q6_K"]
ROWS = 1024  # above the int8 weight-only kernel's row limit: ungrouped int8wo decodes + cuBLAS


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU: run it on the GPU machine (bash .ci/gpu_matrix.sh)")
    yield
    dg.ENABLED = True


class Block(nn.Module):
    """A UNet-like block: a 3x3 convolution, attention projections, a feed-forward pair."""

    def __init__(self, c=640):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.ff_in, self.ff_out = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, img):
        h = self.conv(img)
        x = h.flatten(2).transpose(1, 2).contiguous()
        x = self.o(self.q(x) + self.k(x) * self.v(x))
        return self.ff_out(torch.nn.functional.gelu(self.ff_in(x)))


def _block(fmt):
    torch.manual_seed(0)
    model = Block().to("cuda", torch.bfloat16)
    quantize.quantize_tree(model, fmt, recipes.Recipe("test", min_params=0), target="test",
                           run_device="cuda", work_device="cuda")
    return model


def _img():
    return torch.randn(1, 640, 32, 32, device="cuda", dtype=torch.bfloat16)  # 1024 rows


def _grouped_block(fmt):
    """The block after the pass that decode groups watch (they form from the next call on)."""
    model, img = _block(fmt), _img()
    with torch.inference_mode():
        model(img)
    return model, img


@pytest.mark.parametrize("fmt", FORMATS)
def test_grouped_layers_compute_what_they_compute_alone(fmt):
    """Shown able to fail (reasoned, GPU only): DecodeGroup.weight returning
    buf.views[(index + 1) % len(buf.views)] (another member's view) -> shapes or values
    differ from the layers decoding alone."""
    model, img = _grouped_block(fmt)
    with torch.inference_mode():
        fast.KERNELS.clear()
        grouped = model(img)
        assert dict(fast.KERNELS) == {"triton:group-decode": 7}  # every layer took its slice
        assert isinstance(model.q.decode_group, dg.DecodeGroup)
        assert model.q.decode_group is model.ff_out.decode_group
        dg.ENABLED = False
        alone = model(img)
    assert torch.equal(grouped, alone)


def _kernel_launches(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("fmt", ["torchao:int8wo", "gguf:Q8_0"])
def test_a_group_decodes_in_one_launch(fmt):
    """Shown able to fail (reasoned, GPU only): triton_grouped.decode_group launching once per
    member -> alone - displaced is 0, not 6."""
    model, img = _grouped_block(fmt)
    other = _grouped_block("gguf:Q4_K")[0]
    with torch.inference_mode():
        model(img)  # warm: the group formed, its kernels built, its table made
        owning = _kernel_launches(lambda: model(img))  # it still owns the buffer: no decode
        other(img)  # another group takes the buffer
        displaced = _kernel_launches(lambda: model(img))
        dg.ENABLED = False
        model(img)
        alone = _kernel_launches(lambda: model(img))
    # seven layers: seven decode launches become one, or none while the group owns the buffer
    assert (alone - displaced, alone - owning) == (6, 7), (alone, displaced, owning)


def test_a_member_off_the_gpu_sends_the_group_its_own_way():
    """Partial loading: ComfyUI leaves some layers in RAM and streams them per call.
    Shown able to fail (reasoned, GPU only): DecodeGroup._sources not checking each source's
    device -> the group decodes anyway (triton:group-decode > 0) from a CPU pointer."""
    model, img = _grouped_block("gguf:Q8_0")
    other = _grouped_block("gguf:Q4_K")[0]
    with torch.inference_mode():
        want = model(img)
        model.v.to("cpu")  # its parts stream to the GPU for each call
        other(img)  # the buffer no longer holds model's weights: its group would decode
        fast.KERNELS.clear()
        got = model(img)
    assert fast.KERNELS["triton:group-decode"] == 0
    assert torch.equal(got, want)


def test_two_models_share_the_buffer_and_keep_their_own_weights():
    """Shown able to fail (reasoned, GPU only): DecodeGroup.weight without its owner check ->
    b gets a's decoded weights from the shared buffer (the CPU twin of this mutation fails
    test_decode_groups.py's interpreter test)."""
    a, b, img = _block("gguf:Q8_0"), _block("gguf:Q4_K"), _img()
    with torch.inference_mode():
        want_a, want_b = a(img), b(img)  # the watched first pass: each layer alone
        for _ in range(3):
            assert torch.equal(a(img), want_a) and torch.equal(b(img), want_b)

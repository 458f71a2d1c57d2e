"""The fusion head's kernels (kernels/fusion): pack (flows up, both warps, the packed input) and mix.

Same rules as tests/test_kernels.py: the Triton interpreter on the CPU (small shapes), compiled kernels on
a GPU (plus the 720p shape); errors against an fp32 oracle at most 2x plain PyTorch's at the same precision.
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton and of the kernels

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'bbf-rt[kernels]')")

from bbf_rt import ops  # noqa: E402
from bbf_rt.kernels.fusion import reference as ref  # noqa: E402
from bbf_rt.kernels.fusion import triton as tt  # noqa: E402
from bbf_rt.model.fusion import BoundaryFusion  # noqa: E402
from models import within_2x  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
SIZES = [(1, 8, 12), (2, 12, 20), (1, 16, 8)] + ([(4, 720, 1280)] if CUDA else [])  # (N, H, W)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _t(shape, dtype, seed, scale=1.0, layout="nhwc"):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t


def _frames(n, h, w, dtype, layout, seed=0):
    return [_t((n, 3, h, w), dtype, seed + i, 0.5, layout) for i in range(3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_pack_matches_oracle(size, layout, dtype):
    n, h, w = size
    x, f0, f1 = _frames(n, h, w, dtype, layout)
    # flows of a few 1/4-resolution pixels: sub-pixel positions everywhere, many clamped at the borders
    fq = _t((n, 4, h // 4, w // 4), dtype, 9, 1.5, layout)
    out = tt.pack(fq, x, f0, f1)
    assert out.shape == (n, 16, h, w) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    low = ref.pack(fq, x, f0, f1)
    oracle = ref.pack(fq.float(), x.float(), f0.float(), f1.float())
    within_2x(out, low, oracle, "fusion_pack")
    # the copies are exact and the last plane is zero
    for lo, t in ((0, x), (9, f0), (12, f1)):
        assert torch.equal(out[:, lo:lo + 3], t)
    assert not out[:, 15].any()


def test_pack_zero_flow_copies_and_integer_flow_shifts():
    x, f0, f1 = _frames(1, 8, 12, torch.float32, "nhwc")
    fq = torch.zeros(1, 4, 2, 3, device=DEV)
    out = tt.pack(fq, x, f0, f1)
    torch.testing.assert_close(out[:, 3:6], f0, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 6:9], f1, atol=1e-6, rtol=0)
    fq[:, 0] = 0.5  # 2 full-resolution pixels right in frame0: out[.., x] = frame0[.., x + 2] away from the border
    out = tt.pack(fq, x, f0, f1)
    torch.testing.assert_close(out[:, 3:6, :, :-2], f0[..., 2:], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 3:6, :, -2:], f0[..., -1:].expand(-1, -1, -1, 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_mix_matches_oracle(size, dtype):
    n, h, w = size
    packed = _t((n, 16, h, w), dtype, 1, 0.5)
    logits = _t((n, 6, h, w), dtype, 2, 3.0)
    out = tt.mix(logits, packed)
    assert out.shape == (n, 3, h, w) and out.dtype == dtype
    within_2x(out, ref.mix(logits, packed), ref.mix(logits.float(), packed.float()), "fusion_mix")


def test_rejects_bad_shapes():
    x, f0, f1 = _frames(1, 8, 12, torch.float32, "nhwc")
    with pytest.raises(ValueError, match="flow_q"):
        tt.pack(torch.zeros(1, 4, 4, 3, device=DEV), x, f0, f1)
    with pytest.raises(ValueError, match="frame1"):
        tt.pack(torch.zeros(1, 4, 2, 3, device=DEV), x, f0, f1[:, :, :4])
    packed = tt.pack(torch.zeros(1, 4, 2, 3, device=DEV), x, f0, f1)
    with pytest.raises(ValueError, match="logits"):
        tt.mix(packed[:, :5], packed)
    with pytest.raises(ValueError, match="channels-last"):
        tt.mix(packed[:, :6], packed.contiguous())


def test_opcheck():
    x, f0, f1 = _frames(2, 8, 12, torch.bfloat16, "nhwc")
    fq = _t((2, 4, 2, 3), torch.bfloat16, 3)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.bbf_rt.fusion_pack, (fq, x, f0, f1), test_utils=utils)
    packed = tt.pack(fq, x, f0, f1)
    torch.library.opcheck(torch.ops.bbf_rt.fusion_mix, (_t((2, 6, 8, 12), torch.bfloat16, 4), packed), test_utils=utils)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_head_with_kernels_matches_references(dtype):
    """The trained-looking head (non-zero flows and mixing) through every kernel vs its references."""
    torch.manual_seed(0)
    head = BoundaryFusion(width=16)
    for p in head.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    n, h, w = (4, 720, 1280) if CUDA else (2, 16, 24)
    x, f0, f1 = _frames(n, h, w, torch.float32, "nhwc", 5)
    tau = torch.rand(n, device=DEV)
    with ops.implementation("reference"):
        oracle = head.to(DEV)(x, f0, f1, tau)  # fp32 references
    low_head = head.to(dtype).to(memory_format=torch.channels_last)
    args = [t.to(dtype) for t in (x, f0, f1)]
    with ops.implementation("reference"):
        low = low_head(*args, tau)
    with ops.implementation("triton"):
        out = low_head(*args, tau)
    within_2x(out, low, oracle, "fusion head")

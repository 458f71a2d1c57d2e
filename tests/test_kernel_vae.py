"""The VAE's convolution kernels: kernels/conv_epilogue (bias + residual, nearest 2x) and kernels/thin_conv.

Same rules as tests/test_kernels.py: the Triton interpreter on the CPU (small shapes), compiled kernels on
a GPU; errors against an fp32 oracle at most 2x plain PyTorch's at the same precision.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton and of the kernels

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'bbf-rt[kernels]')")

from bbf_rt import ops  # noqa: E402
from bbf_rt.kernels.conv_epilogue import reference as ce_ref  # noqa: E402
from bbf_rt.kernels.conv_epilogue import triton as ce_tt  # noqa: E402
from models import within_2x  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
CASES = [(2, 32, 5, 7), (1, 3, 9, 4), (3, 16, 1, 1), (1, 128, 4, 6), (2, 12, 3, 5)]  # (N, C, H, W)
LAYOUTS = ["nchw", "nhwc"]


def _t(shape, layout, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("with_bias,with_res", [(True, True), (True, False), (False, True)], ids=["b+r", "b", "r"])
def test_conv_epilogue_matches_oracle(case, layout, dtype, with_bias, with_res):
    y = _t(case, layout, dtype, 0, 4.0)
    b = _t((case[1],), "nchw", dtype, 1) if with_bias else None
    r = _t(case, layout, dtype, 2, 4.0) if with_res else None
    out = ce_tt.conv_epilogue(y, b, r)
    assert out.dtype == dtype and out.shape == y.shape and out.stride() == y.stride()  # layout kept
    low = y if b is None else y + b.view(1, -1, 1, 1)  # what torch ran: bias add, then `residual + h`
    low = low if r is None else r + low
    up = lambda t: None if t is None else t.float()  # noqa: E731
    within_2x(out, low, ce_ref.conv_epilogue(y.float(), up(b), up(r)), "conv_epilogue")


def test_conv_epilogue_takes_a_residual_in_the_other_layout():
    y = _t((2, 8, 5, 6), "nhwc", torch.bfloat16, 0)
    r = _t((2, 8, 5, 6), "nchw", torch.bfloat16, 1)
    b = _t((8,), "nchw", torch.bfloat16, 2)
    torch.testing.assert_close(ce_tt.conv_epilogue(y, b, r), ce_ref.conv_epilogue(y, b, r), atol=0, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_upsample_nearest2x_is_torchs_exactly(case, layout):
    x = _t(case, layout, torch.bfloat16, 3)
    out = ce_tt.upsample_nearest2x(x)
    ref = F.interpolate(x, scale_factor=2.0, mode="nearest")
    assert torch.equal(out, ref)
    # channels-last stays channels-last (a 1x1 input is both: answered NCHW)
    fmt = torch.channels_last if ce_tt.layout(x) == "nhwc" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert (ce_tt.layout(x) == "nhwc") == (layout == "nhwc" and x[0, 0].numel() > 1)


def test_rejects_bad_shapes():
    y = _t((1, 4, 3, 3), "nchw", torch.float32, 0)
    with pytest.raises(ValueError, match="bias"):
        ce_tt.conv_epilogue(y, y[0, 0, 0], None)
    with pytest.raises(ValueError, match="residual"):
        ce_tt.conv_epilogue(y, None, y[:, :2])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ce_tt.upsample_nearest2x(y[0])


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 2), (1, 4, 4)])
def test_ops_conv2d_equals_the_module_plus_residual(stride, padding, dilation):
    """ops.conv2d through the kernel vs nn.Conv2d then `residual + h`, the VAE's code before the kernel
    (dilated: the fusion head's coarse blocks)."""
    conv = torch.nn.Conv2d(8, 16, 3 if padding else 1, stride=stride, padding=padding, dilation=dilation)
    conv = conv.to(DEV, torch.bfloat16)
    x = _t((2, 8, 9, 10), "nhwc", torch.bfloat16, 4)
    conv = conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = conv(x)
        res = _t(tuple(ref.shape), "nhwc", torch.bfloat16, 5)
        oracle = res.float() + F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), stride, padding, dilation)
        with ops.implementation("triton"):
            out = ops.conv2d(x, conv.weight, conv.bias, stride, padding, residual=res, dilation=dilation)
        with ops.implementation("reference"):
            low = ops.conv2d(x, conv.weight, conv.bias, stride, padding, residual=res, dilation=dilation)
    torch.testing.assert_close(low, res + ref, atol=0, rtol=0)  # the reference is the old code, exactly
    assert out.is_contiguous(memory_format=torch.channels_last)
    within_2x(out, low, oracle, "ops.conv2d")


def test_opcheck_and_compile():
    y = _t((2, 8, 5, 6), "nhwc", torch.bfloat16, 0)
    b = _t((8,), "nchw", torch.bfloat16, 1)
    epi, up = torch.ops.bbf_rt.conv_epilogue, torch.ops.bbf_rt.upsample_nearest2x
    for op, args in ((epi, (y, b, y)), (epi, (y, None, None)), (up, (y,)), (up, (y.contiguous(),))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    fn = torch.compile(lambda t: ops.upsample_nearest2x(ops.conv2d(t, w, b, 1, 1, residual=t)) * 2, fullgraph=True,
                       backend="inductor" if CUDA else "aot_eager")
    w = _t((8, 8, 3, 3), "nhwc", torch.bfloat16, 2)
    with ops.implementation("triton"):
        got, eager = fn(y), ops.upsample_nearest2x(ops.conv2d(y, w, b, 1, 1, residual=y)) * 2
    torch.testing.assert_close(got, eager, atol=0, rtol=0)


# ---------------------------------------------------------------- thin_conv (the VAE's RGB ends)

from bbf_rt.kernels.thin_conv import reference as tc_ref  # noqa: E402
from bbf_rt.kernels.thin_conv import triton as tc_tt  # noqa: E402

THIN = [(2, 3, 32, 9, 13), (1, 32, 3, 6, 7), (1, 4, 16, 1, 5), (2, 64, 4, 5, 3), (1, 2, 8, 17, 3)]  # N Cin Cout H W


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", THIN, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("kernel", ["default", "im2col", "taps"])
def test_thin_conv_matches_oracle(case, layout, dtype, kernel):
    N, cin, cout, H, W = case
    x = _t((N, cin, H, W), layout, dtype, 0)
    w = _t((cout, cin, 3, 3), "nchw", dtype, 1, 0.3)
    b = _t((cout,), "nchw", dtype, 2)
    assert tc_tt.applies(x, w, 1, 1)
    if kernel == "default":
        out = tc_tt.thin_conv3x3(x, w, b)
    else:  # both kernels at every shape, a block narrower than the row (edges inside a row of programs)
        out = tc_tt.launch(x, w, b, bp=16, taps=kernel == "taps")
    assert out.dtype == dtype and out.shape == (N, cout, H, W)
    fmt = torch.channels_last if layout == "nhwc" and H * W > 1 else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)  # channels-last in, channels-last out
    low = tc_ref.thin_conv3x3(x, w, b)  # cuDNN / the CPU's conv at the same precision
    # the oracle in fp64: on CUDA an fp32 conv may run in TF32 (cuDNN's default), so fp32 is no oracle there
    oracle = tc_ref.thin_conv3x3(x.double(), w.double(), b.double()).float()
    within_2x(out, low, oracle, "thin_conv3x3")


def test_thin_conv_takes_only_its_shapes():
    x = _t((1, 32, 4, 4), "nhwc", torch.bfloat16, 0)
    wide = _t((32, 32, 3, 3), "nchw", torch.bfloat16, 1)
    assert not tc_tt.applies(x, wide, 1, 1)  # cuDNN's case
    assert not tc_tt.applies(x, wide[:3], 2, 1) and not tc_tt.applies(x, wide[:3], 1, 0)
    assert not tc_tt.applies(x, wide[:3, :, :1, :1], 1, 1)
    with pytest.raises(ValueError, match="3x3"):
        tc_tt.thin_conv3x3(x, wide, None)
    with pytest.raises(ValueError, match="bias"):
        tc_tt.thin_conv3x3(x, wide[:3], wide[0, 0, 0, :2])


def test_opcheck_thin_conv():
    x = _t((2, 3, 5, 6), "nhwc", torch.bfloat16, 0)
    w = _t((16, 3, 3, 3), "nchw", torch.bfloat16, 1)
    for args in ((x, w, w[:, 0, 0, 0]), (x.contiguous(), w, None)):
        torch.library.opcheck(torch.ops.bbf_rt.thin_conv3x3, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@torch.no_grad()
def test_vae_with_every_conv_kernel_matches_references():
    """The default-config VAE's convolutions through ops.conv2d (thin_conv at both RGB ends, the epilogue
    elsewhere) and the upsample kernel vs the references, channels-last bf16, fp32 oracle."""
    from bbf_rt.model.vae import CompactVAE, VAEConfig

    torch.manual_seed(0)
    vae = CompactVAE(VAEConfig(latent_channels=4, base_channels=8, channel_mult=(1, 2))).to(DEV).eval()
    frames = (torch.rand(2, 3, 16, 24) * 2 - 1).to(DEV)
    with ops.implementation("reference"):
        oracle = vae.decode_frames(vae.encode_frames(frames))
    low = vae.to(torch.bfloat16).use_channels_last()
    x = frames.to(torch.bfloat16)
    with ops.implementation("reference"):
        ref = low.decode_frames(low.encode_frames(x))
    for subpixel in (False, True):
        low.decoder.subpixel = subpixel
        with ops.implementation("triton"):
            out = low.decode_frames(low.encode_frames(x))
        assert out.is_contiguous(memory_format=torch.channels_last)
        within_2x(out, ref, oracle, f"VAE with the conv kernels (subpixel={subpixel})")


# ---------------------------------------------------------------- pixels (decoded frames -> uint8)

from bbf_rt.kernels.pixels import reference as px_ref  # noqa: E402
from bbf_rt.kernels.pixels import triton as px_tt  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("crop", [(16, 24), (13, 21), (1, 1)])
def test_to_uint8_is_the_engines_conversion_exactly(layout, dtype, crop):
    x = _t((2, 3, 16, 24), layout, dtype, 0, 0.7)
    # every rounding case: out of range both ways, 0 (-> 127.5, a tie), and values a bf16 step off ties
    flat = torch.tensor([-3.0, -1.0, 1.0, 2.5, 0.0, 1 / 255, -1 / 255, 0.5, -0.5], dtype=dtype)
    x[0, 0, 0, : flat.numel()] = flat.to(DEV)
    out = px_tt.to_uint8_nhwc(x, *crop)
    assert out.dtype == torch.uint8 and out.shape == (2, *crop, 3) and out.is_contiguous()
    assert torch.equal(out, px_ref.to_uint8_nhwc(x, *crop))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hw", [(16, 24), (37, 29)], ids=lambda c: "x".join(map(str, c)))  # 1073 px: a partial block
def test_boundary_similarity_matches_oracle(layout, dtype, hw):
    """The start-end difference the DiT embeds: pairs as the engine passes them (consecutive frames of one
    batch, views), with black pixels (the eps clamp) and one identical pair (similarity exactly 1)."""
    g = torch.Generator().manual_seed(3)
    frames = torch.rand(4, 3, *hw, generator=g)
    frames[1, :, :5] = 0.0  # black rows: |a| |b| = 0 -> eps
    frames[3] = frames[2]
    pix = frames.to(DEV, dtype)
    pix = pix.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else pix
    a, b = pix[:-1], pix[1:]
    out = px_tt.boundary_similarity(a, b)
    oracle = px_ref.boundary_similarity(a.double(), b.double()).float()
    assert out.dtype == torch.float32 and out.shape == (3,)
    within_2x(out, px_ref.boundary_similarity(a, b), oracle, "boundary_similarity")
    assert abs(out[2].item() - 1.0) < 1e-6 and torch.equal(out, px_tt.boundary_similarity(a, b))  # deterministic
    with pytest.raises(ValueError, match="one shape"):
        px_tt.boundary_similarity(a, b[:, :, 1:])
    torch.library.opcheck(torch.ops.bbf_rt.boundary_similarity, (a, b, 1e-8),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_to_uint8_rejects_bad_input():
    x = _t((1, 3, 4, 4), "nchw", torch.float32, 0)
    with pytest.raises(ValueError, match="crop"):
        px_tt.to_uint8_nhwc(x, 5, 4)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        px_tt.to_uint8_nhwc(x[:, :2], 4, 4)
    torch.library.opcheck(torch.ops.bbf_rt.to_uint8_nhwc, (x, 3, 2),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [(2, 8, 16, 5, 7), (1, 16, 8, 1, 1), (1, 4, 12, 3, 9)], ids=lambda c: "x".join(map(str, c)))
def test_upsample_conv_subpixel_equals_upsample_then_conv(case, dtype):
    """The decoder's up stage as one low-res conv + pixel shuffle (ops.upsample_conv2d) vs the upsample
    and conv it replaces: fp32 to rounding, bf16 under the 2x rule against the fp64 oracle."""
    N, cin, cout, H, W = case
    x = _t((N, cin, H, W), "nhwc", dtype, 0)
    w = _t((cout, cin, 3, 3), "nchw", dtype, 1, 0.3).contiguous(memory_format=torch.channels_last)
    b = _t((cout,), "nchw", dtype, 2)
    # TF32 off: on CUDA cuDNN runs fp32 convs in TF32 by default (3.9e-3 off here), which is not the
    # rewrite's error; the fp32 check is about the folded weights being the same maths
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        with ops.implementation("triton"):
            out = ops.upsample_conv2d(x, w, b)
        with ops.implementation("reference"):
            low = ops.upsample_conv2d(x, w, b)
    oracle = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), w.double(), b.double(), 1, 1)
    assert out.shape == (N, cout, 2 * H, 2 * W) and out.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), oracle, atol=1e-4, rtol=1e-4)
    within_2x(out, low, oracle.float(), "upsample_conv2d")
    with pytest.raises(ValueError, match="4C"):
        ce_tt.shuffle_epilogue(x[:, :3], None)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CUDA graph capture)")
def test_vae_conv_ops_capture_in_a_cuda_graph():
    """The engine replays the VAE as CUDA graphs: nothing in these ops may copy from the host."""
    x = _t((2, 16, 6, 10), "nhwc", torch.bfloat16, 0)
    w = _t((8, 16, 3, 3), "nchw", torch.bfloat16, 1, 0.3)
    b = _t((8,), "nchw", torch.bfloat16, 2)
    fn = lambda: ops.to_uint8_nhwc(ops.conv2d(ops.upsample_conv2d(x, w, b), w[:3, :8], b[:3], 1, 1), 12, 20)  # noqa: E731
    eager = fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)

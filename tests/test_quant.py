"""FP8 linear layers and 8-bit attention (kernels/fp8_linear, kernels/int8_attention, bbf_rt.runtime.quant).

Quality bounds come from the formats, not from tuning: e4m3 keeps 3 mantissa bits, so rounding to nearest
errs by at most 2^-4 of a value (half an ulp; subnormals, below 2^-6 of the scale, by 2^-10 of it) and,
for values spread over the binade, ~2.6% RMS per operand, ~3.7% for a product of two quantised operands.
A correct e4m3 linear lands near that; one that truncates instead of rounding doubles it, one that skips
quantisation sits 10x below it. The int8 attention is held to SageAttention's accuracy claim (cosine
similarity to full precision > 0.999) and to its own oracle (the reference), which the kernel must
reproduce, not merely match in error size.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (int8 and fp8 tl.dot are exact there; its
truncating fp32 -> fp8 cast is corrected inside the kernels) and the FP8 GEMM is torch._scaled_mm on the
CPU; the GPU-only tests (cuBLAS FP8, compiled kernels at preset shapes) skip.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton and of the kernels

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'bbf-rt[kernels]')")

from bbf_rt import ops  # noqa: E402
from bbf_rt.cli import build_parser  # noqa: E402
from bbf_rt.config import RuntimeConfig, get_preset  # noqa: E402
from bbf_rt.errors import BBFInputError  # noqa: E402
from bbf_rt.kernels.attention import reference as attn_ref  # noqa: E402
from bbf_rt.kernels.fp8_linear import reference as fp8_ref  # noqa: E402
from bbf_rt.kernels.fp8_linear import triton as fp8_tt  # noqa: E402
from bbf_rt.kernels.int8_attention import reference as i8_ref  # noqa: E402
from bbf_rt.kernels.int8_attention import triton as i8_tt  # noqa: E402
from bbf_rt.model.dit import build_dit  # noqa: E402
from bbf_rt.runtime.quant import FP8Linear, quantize_model, wrap_denoiser  # noqa: E402
from models import trained_gates  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (cuBLAS FP8 GEMM, compiled Triton, preset shapes)")
FP8_GPU = CUDA and torch.cuda.get_device_capability() >= (8, 9)
U = 2.0**-4  # e4m3 unit roundoff (3 mantissa bits, round to nearest)


def rnd(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def activations(M, K, dtype=torch.float32, seed=0):
    """Gaussian rows with a few outlier channels (x20) and one all-zero row, as transformer activations."""
    x = rnd(M, K, seed=seed)
    x[:, :: max(1, K // 4)] *= 20
    x[1] = 0
    return x.to(dtype)


# ---------------------------------------------------------------- e4m3 quantisation

def test_e4m3_row_roundtrip_within_half_ulp():
    x = activations(67, 200)
    q, s = fp8_ref.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (67,)
    back = q.float() * s[:, None]
    bound = U * x.abs() + 2.0**-10 * s[:, None] + 1e-30
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert (back[1] == 0).all() and torch.isfinite(s).all()  # a zero row stays zero, no 0/0
    assert torch.allclose(q.float().abs().amax(1)[2:], torch.full((65,), 448.0, device=q.device))  # each row spans the range
    # values already on the grid (times the scale) come back exactly
    grid = q.float()[2:] * 0.37
    q2, s2 = fp8_ref.quantize_rows(grid)
    torch.testing.assert_close(q2.float() * s2[:, None], grid, rtol=1e-6, atol=0)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_weight_quantisation_granularity(granularity):
    w = rnd(48, 96) * torch.logspace(-4, 1, 48, device=DEV)[:, None]  # channels over 5 decades
    w8, s = fp8_ref.quantize_weight(w, granularity)
    assert w8.shape == w.shape and s.shape == (48,) and s.dtype == torch.float32
    err = (w8.float() * s[:, None] - w).abs()
    if granularity == "channel":
        assert (err <= U * w.abs() + 2.0**-10 * s[:, None] + 1e-30).all()
    else:
        assert (s == s[0]).all()
        # one scale: the small channels fall into the subnormals and lose most of their bits
        assert rel(w8.float()[:4] * s[:4, None], w[:4]) > 4 * rel(w8.float()[-4:] * s[-4:, None], w[-4:])
    with pytest.raises(ValueError, match="granularity"):
        fp8_ref.quantize_weight(w, "block")


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("MK", [(67, 200), (5, 64)], ids=lambda s: "x".join(map(str, s)))
def test_triton_quantize_rows_matches_reference(MK, dtype, gelu):
    x = activations(*MK, dtype=dtype)
    q, s = fp8_tt.quantize_rows(x, gelu)
    qr, sr = fp8_ref.quantize_rows(x, gelu)
    torch.testing.assert_close(s, sr, rtol=2e-6, atol=0)
    # codes: equal, up to one e4m3 step where a value sits on a rounding tie and the kernel's GELU or
    # division differs from torch's in the last fp32 bit
    diff = (q.float() - qr.float()).abs()
    assert (diff <= qr.float().abs() * 2 * U + 2.0**-9).all()
    assert (diff > 0).float().mean().item() <= 1e-3


@pytest.mark.parametrize("rms", [False, True])
def test_triton_norm_modulate_fp8_matches_reference(rms):
    B, Fr, S, C = 2, 3, 7, 96
    x = rnd(B, Fr * S, C, dtype=torch.bfloat16, scale=3)
    shift, scale = rnd(B, Fr, C, dtype=torch.bfloat16, seed=1), rnd(B, Fr, C, dtype=torch.bfloat16, seed=2)
    q, s = fp8_tt.norm_modulate_fp8(x, shift, scale, 1e-6, rms)
    qr, sr = fp8_ref.norm_modulate_quantize(x, shift, scale, 1e-6, rms)
    assert q.shape == (B * Fr * S, C) and s.shape == (B * Fr * S,)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    diff = (q.float() - qr.float()).abs()
    assert (diff <= qr.float().abs() * 2 * U + 2.0**-9).all() and (diff > 0).float().mean().item() <= 1e-2
    # against the unfused pair: norm_modulate in fp32, then quantise (same maths, two passes)
    from bbf_rt.kernels.norm_modulate import reference as nm_ref

    q2, s2 = fp8_ref.quantize_rows(nm_ref.norm_modulate(x.float(), shift, scale, 1e-6, rms))
    torch.testing.assert_close(s2, sr, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("frames", [(3, 1), (1, 3)], ids=["gate3-mod1", "gate1-mod3"])
def test_triton_residual_norm_modulate_fp8_matches_reference(frames, rms):
    """The fused residual + norm + e4m3 quantisation: the residual stream bit-equal to the bf16 fused op's
    (and the reference), the codes and row scales as norm_modulate_fp8's on that stream."""
    from bbf_rt.kernels.norm_modulate import triton as nm_tt

    Fg, Fm = frames
    B, S, C = 2, 7, 96
    x, y = rnd(B, 3 * S, C, dtype=torch.bfloat16, scale=3), rnd(B, 3 * S, C, dtype=torch.bfloat16, seed=3)
    gate = rnd(B, Fg, C, dtype=torch.bfloat16, seed=4)
    shift, scale = rnd(1, Fm, C, seed=1).expand(B, Fm, C), rnd(1, Fm, C, seed=2).expand(B, Fm, C)  # stride-0 fp32
    r, q, s = fp8_tt.residual_norm_modulate_fp8(x, y, gate, shift, scale, 1e-6, rms)
    rr, qr, sr = fp8_ref.residual_norm_modulate_quantize(x, y, gate, shift, scale, 1e-6, rms)
    assert torch.equal(r, rr) and torch.equal(r, nm_tt.residual_norm_modulate(x, y, gate, shift, scale, 1e-6, rms)[0])
    assert q.dtype == torch.float8_e4m3fn and q.shape == (B * 3 * S, C) and s.shape == (B * 3 * S,)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    diff = (q.float() - qr.float()).abs()
    assert (diff <= qr.float().abs() * 2 * U + 2.0**-9).all() and (diff > 0).float().mean().item() <= 1e-2
    q2, s2 = fp8_tt.norm_modulate_fp8(r, shift, scale, 1e-6, rms)
    assert torch.equal(s, s2) and torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
    with pytest.raises(ValueError, match="gate"):
        fp8_tt.residual_norm_modulate_fp8(x, y, gate[:, :1].expand(B, 2, C), shift, scale, 1e-6)


# ---------------------------------------------------------------- FP8 linear

def _linear_case(M=130, K=192, N=80, dtype=torch.float32, seed=0):
    x = activations(M, K, dtype=dtype, seed=seed)
    lin = torch.nn.Linear(K, N).to(DEV)
    with torch.no_grad():
        lin.weight.copy_(rnd(N, K, seed=seed + 1) / K**0.5)
        lin.bias.copy_(rnd(N, seed=seed + 2))
    return x, lin


@pytest.mark.parametrize("gelu", [False, True])
def test_fp8_linear_reference_error_bound(gelu):
    x, lin = _linear_case()
    w8, ws = fp8_ref.quantize_weight(lin.weight)
    xin = torch.nn.functional.gelu(x, approximate="tanh") if gelu else x
    exact = (xin.double() @ lin.weight.double().t() + lin.bias.double()).float()
    y = fp8_ref.fp8_linear(x, w8, ws, lin.bias, gelu=gelu)
    # worst case per output: each product errs by at most (1+u)^2 - 1 of |x_i w_i|, plus subnormal terms
    xs = fp8_ref.quantize_rows(x, gelu)[1]
    worst = (2 * U + U * U) * (xin.abs() @ lin.weight.abs().t()) + 2.0**-10 * (
        xs[:, None] * lin.weight.abs().sum(1)[None] + ws[None] * xin.abs().sum(1)[:, None]) + 1e-5
    assert ((y - exact).abs() <= worst).all()
    # typical: ~3.7% RMS relative for round-to-nearest of both operands (not 0: it did quantise; not
    # 7%: it did not truncate)
    e = rel(y - lin.bias, exact - lin.bias)
    assert 0.02 < e < 0.05, e


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fp8_linear_triton_path_matches_reference(dtype, gelu):
    """The GPU path (Triton quantiser + torch._scaled_mm, here on the CPU) against the reference."""
    if DEV.type == "cuda" and not FP8_GPU:
        pytest.skip("FP8 GEMM needs compute capability >= 8.9")
    x, lin = _linear_case(M=70, dtype=dtype)
    w8, ws = fp8_ref.quantize_weight(lin.weight)
    y = fp8_tt.fp8_linear(x, w8, ws, lin.bias, gelu=gelu, fast_accum=False)
    yr = fp8_ref.fp8_linear(x, w8, ws, lin.bias, gelu=gelu)
    xin = torch.nn.functional.gelu(x.float(), approximate="tanh") if gelu else x.float()
    exact = xin @ lin.weight.float().t() + lin.bias
    assert y.dtype == dtype and y.shape == (70, 80)
    # the 2x rule against the exact product, and close to the reference itself (output rounding only)
    assert rel(y, exact) <= 1.05 * rel(yr, exact) + 1e-4
    assert rel(y, yr) <= 0.25 * rel(yr, exact)


def test_fp8_linear_module_survives_dtype_casts():
    x, lin = _linear_case()
    m = FP8Linear.from_linear(lin)
    # the same op on the same codes: bit-equal (on the GPU that is cuBLAS, not the reference's fp32 matmul)
    ref = ops.fp8_linear(x, *fp8_ref.quantize_weight(lin.weight), lin.bias)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    m16 = copy.deepcopy(m).to(torch.bfloat16)  # .to(dtype) must not touch the e4m3 bytes or fp32 scales
    assert m16.weight.dtype == torch.float8_e4m3fn and m16.weight_scale.dtype == torch.float32
    assert torch.equal(m16.weight_scale, m.weight_scale) and m16.bias.dtype == torch.bfloat16
    assert rel(m16(x.bfloat16()), ref) < 0.01
    torch.testing.assert_close(m.dequantized_weight(), lin.weight, rtol=U, atol=1e-3)
    with pytest.raises(BBFInputError, match="float8_e4m3fn"):
        FP8Linear(4, 4, torch.zeros(4, 4), torch.ones(4), None)


def test_ops_fp8_linear_takes_rows_the_norm_quantised():
    """FP8Rows (codes + row scales from a norm kernel) into fp8_linear: the same product as quantising
    the tensor inside the op, exactly on the reference path; with gelu it is refused."""
    x, lin = _linear_case(M=24, K=64, N=32)
    w8, ws = fp8_ref.quantize_weight(lin.weight)
    x3 = x.view(2, 12, 64)
    rows = ops.FP8Rows(*fp8_ref.quantize_rows(x3), x3.shape, x3.dtype)
    with ops.implementation("reference"):
        got = ops.fp8_linear(rows, w8, ws, lin.bias)
        torch.testing.assert_close(got, ops.fp8_linear(x3, w8, ws, lin.bias), rtol=0, atol=0)
    assert got.shape == (2, 12, 32) and got.dtype == x.dtype
    with pytest.raises(BBFInputError, match="gelu"):
        ops.fp8_linear(rows, w8, ws, lin.bias, gelu=True)


@torch.no_grad()
def test_quantised_block_quantises_in_the_norms(monkeypatch):
    """In a quantised model the qkv, branch-q and FFN-up linears get FP8Rows from the norm before them
    (no separate quantisation pass); the o, kv and FFN-down linears quantise their input themselves."""
    dit = quantize_model(_tiny())
    seen = []
    real = ops.fp8_linear

    def spy(x, *a, **k):
        seen.append(isinstance(x, ops.FP8Rows))
        return real(x, *a, **k)

    monkeypatch.setattr(ops, "fp8_linear", spy)
    dit(**_model_inputs(dit.cfg, torch.float32))
    blocks, branches = len(dit.blocks), 2  # text and context present in _model_inputs
    assert sum(seen) == blocks * (2 + branches)  # qkv + FFN up + each present branch's q
    assert len(seen) - sum(seen) == blocks * (2 + 2 * branches)  # o + FFN down + each branch's kv and o


def test_ops_fp8_linear_and_norm_modulate_fp8_dispatch():
    x, lin = _linear_case(M=20)
    w8, ws = fp8_ref.quantize_weight(lin.weight)
    with ops.implementation("reference"):
        yr = ops.fp8_linear(x, w8, ws, lin.bias)
        nq, ns = ops.norm_modulate_fp8(x[None], x[None, :1], x[None, :1], 1e-6)
    torch.testing.assert_close(yr, fp8_ref.fp8_linear(x, w8, ws, lin.bias), rtol=0, atol=0)
    assert nq.dtype == torch.float8_e4m3fn and ns.shape == (20,)
    if DEV.type == "cuda" and not FP8_GPU:
        return
    with ops.implementation("triton"):
        yt = ops.fp8_linear(x, w8, ws, lin.bias)
        tq, ts = ops.norm_modulate_fp8(x[None], x[None, :1], x[None, :1], 1e-6)
    assert rel(yt, yr) < 0.01
    torch.testing.assert_close(ts, ns, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- int8 attention

ATTN_CASES = [  # (B, Lq, Lk, H, D, masked)
    (2, 77, 77, 2, 64, False),  # self-attention, L not a multiple of any tile
    (1, 130, 300, 2, 128, True),  # several key tiles plus a partial one, padding
    (2, 40, 13, 2, 32, True),  # a short masked condition at the tiny preset's head dim
]


def _qkv(B, Lq, Lk, H, D, dtype=torch.bfloat16, seed=0):
    """q sharpened (x2), K with a per-channel offset shared by all keys (as K projections carry): the
    case K smoothing exists for."""
    q = rnd(B, Lq, H, D, seed=seed, scale=2.0)
    k = rnd(B, Lk, H, D, seed=seed + 1) + 3 * rnd(1, 1, H, D, seed=seed + 2)
    v = rnd(B, Lk, H, D, seed=seed + 3)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask(B, Lk, seed=4):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, Lk, generator=g) > 0.4
    m[:, 0] = True
    return m.to(DEV)


@pytest.mark.parametrize("pv", ["bf16", "fp8"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c)))
def test_int8_attention_reference_quality(case, pv):
    B, Lq, Lk, H, D, masked = case
    q, k, v = _qkv(B, Lq, Lk, H, D)
    m = _mask(B, Lk) if masked else None
    oracle = attn_ref.attention(q.float(), k.float(), v.float(), m)
    out = i8_ref.int8_attention(q, k, v, m, pv=pv)
    assert out.dtype == q.dtype and out.shape == q.shape
    # SageAttention's accuracy: cosine similarity > 0.999 to full precision; ours, measured: int8 QK with
    # bf16 PV ~1-2% relative error (bf16 attention alone: 0.2%), FP8 PV ~3%
    assert cosine(out, oracle) > (0.9995 if pv == "bf16" else 0.999)
    assert rel(out, oracle) < (0.025 if pv == "bf16" else 0.045)
    assert rel(out, oracle) > rel(attn_ref.attention(q, k, v, m), oracle)  # it did quantise
    # the smoothing is what keeps the K offset from eating the int8 range (seen where QK dominates the
    # error: with FP8 PV the P rounding hides part of it)
    plain = i8_ref.int8_attention(q, k, v, m, pv=pv, smooth=False)
    assert rel(plain, oracle) > (1.8 if pv == "bf16" else 1.1) * rel(out, oracle)


@pytest.mark.parametrize("pv", ["bf16", "fp8"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c)))
def test_int8_attention_kernel_matches_reference(case, pv):
    if CUDA and i8_tt.unsupported(torch.empty(1, 1, 1, 64, device=DEV, dtype=torch.bfloat16), pv):
        pytest.skip("this GPU lacks int8 or FP8 tensor cores")
    B, Lq, Lk, H, D, masked = case
    q, k, v = _qkv(B, Lq, Lk, H, D)
    m = _mask(B, Lk) if masked else None
    oracle = attn_ref.attention(q.float(), k.float(), v.float(), m)
    out = i8_tt.attention(q, k, v, m, pv=pv)
    ref = i8_ref.int8_attention(q, k, v, m, pv=pv)
    assert torch.isfinite(out).all() and out.dtype == q.dtype and out.is_contiguous()
    assert rel(out, oracle) <= 1.1 * rel(ref, oracle) + 1e-3
    # the same quantisation, not just the same error size: the kernel is much closer to the reference
    # than either is to the oracle (left: online softmax order, P rounded after a running max)
    assert rel(out, ref) <= 0.5 * rel(ref, oracle)


def test_int8_attention_strided_views_fp16():
    qkv = rnd(2, 100, 3, 2, 64, dtype=torch.float16)
    q, k, v = qkv.unbind(2)  # views of one fused projection, as the model passes them
    out = i8_tt.attention(q, k, v)
    ref = i8_ref.int8_attention(q, k, v)
    assert rel(out, ref) < 5e-3


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("pv", ["bf16", "fp8"])
def test_int8_attention_ignores_masked_keys(impl, pv):
    """Padding (any finite values in masked K and V rows) changes nothing, not even the quantisation of
    the valid keys; a sample without valid keys averages V uniformly, as exact attention does."""
    if impl == "triton" and CUDA and i8_tt.unsupported(torch.empty(1, 1, 1, 64, device=DEV, dtype=torch.bfloat16), pv):
        pytest.skip("this GPU lacks int8 or FP8 tensor cores")
    fn = i8_tt.attention if impl == "triton" else i8_ref.int8_attention
    q, k, v = _qkv(3, 40, 300, 2, 64)
    m = torch.arange(300, device=DEV)[None] < torch.tensor([[77], [200], [0]], device=DEV)  # sample 2: none
    out = fn(q, k, v, m, pv=pv)
    k2, v2 = k.clone(), v.clone()
    k2[~m] = 1000.0
    v2[~m] = -1000.0
    k2[2], v2[2] = k[2], v[2]  # sample 2 has no valid key: its keys are all used
    out2 = fn(q, k2, v2, m, pv=pv)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    uniform = v[2].float().mean(0, keepdim=True).expand(40, 2, 64)
    torch.testing.assert_close(out[2].float(), uniform, atol=3e-2 if pv == "fp8" else 1e-2, rtol=0)
    exact = attn_ref.attention(q.float(), k.float(), v.float(), m)
    assert cosine(out[:2], exact[:2]) > 0.999


def test_ops_attention_mode_switches_and_falls_back(caplog):
    q, k, v = _qkv(1, 50, 50, 2, 64)
    exact = ops.attention(q, k, v)
    with ops.attention_mode("int8"):
        assert ops.current_attention_mode() == "int8"
        got = ops.attention(q, k, v)
    assert ops.current_attention_mode() == "exact"
    assert 0 < rel(got, exact) < 0.03
    torch.testing.assert_close(ops.attention(q, k, v), exact, rtol=0, atol=0)  # off again
    with pytest.raises(BBFInputError, match="attention mode 'int4'"):
        with ops.attention_mode("int4"):
            pass
    q24, k24, v24 = _qkv(1, 20, 20, 2, 24)  # head dim outside the kernel's: reference, one warning
    with ops.implementation("triton"), ops.attention_mode("int8"), caplog.at_level("WARNING"):
        out = ops.attention(q24, k24, v24)
    assert "head dim 24" in caplog.text
    assert rel(out, i8_ref.int8_attention(q24, k24, v24)) < 1e-6


@pytest.mark.parametrize("name", ["int8_attention", "quantize_rows_fp8", "norm_modulate_fp8", "residual_norm_modulate_fp8"])
def test_opcheck(name):
    q, k, v = _qkv(1, 20, 17, 2, 32)
    x = rnd(2, 6, 64, dtype=torch.bfloat16)
    f = rnd(2, 3, 64, dtype=torch.bfloat16, seed=1)
    samples = {
        "int8_attention": (torch.ops.bbf_rt.int8_attention, (q, k, v, _mask(1, 17), 0.2, False)),
        "quantize_rows_fp8": (torch.ops.bbf_rt.quantize_rows_fp8, (x.view(12, 64), True)),
        "norm_modulate_fp8": (torch.ops.bbf_rt.norm_modulate_fp8, (x, f, f, 1e-6, False)),
        "residual_norm_modulate_fp8": (torch.ops.bbf_rt.residual_norm_modulate_fp8, (x, x, f[:, :1], f, f, 1e-6, True)),
    }
    op, args = samples[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# ---------------------------------------------------------------- the model, the engine, the CLI

def _model_inputs(cfg, dtype, B=2, Fr=2, H=8, W=12):
    g = torch.Generator().manual_seed(0)
    C = cfg.latent_channels
    r = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    return dict(
        x=r(B, Fr, C, H, W), sigma=torch.rand(B, generator=g).to(DEV), tau=torch.tensor([[0.3, 0.6]] * B, device=DEV),
        z0=r(B, C, H, W), z1=r(B, C, H, W), valid=torch.ones(B, 1, H, W, device=DEV, dtype=dtype), diff=r(B),
        text=r(B, 5, cfg.text_dim), text_mask=torch.tensor([[True, True, True, False, False], [False] * 5], device=DEV),
        context=r(B, 2, C, H, W), context_tau=torch.tensor([[-1.0, 2.0]] * B, device=DEV),
        context_mask=torch.ones(B, 2, dtype=torch.bool, device=DEV),
    )


def _tiny():
    torch.manual_seed(0)
    return trained_gates(build_dit(get_preset("tiny")).to(DEV).eval(), seed=5)


def test_quantize_model_swaps_block_linears_only():
    dit = _tiny()
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in dit.blocks.modules())
    quantize_model(dit)
    assert sum(isinstance(m, FP8Linear) for m in dit.blocks.modules()) == n_lin
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.GELU)) for m in dit.blocks.modules())
    assert isinstance(dit.head, torch.nn.Linear) and isinstance(dit.patch_in, torch.nn.Linear)
    assert all(blk.ffn[2].gelu_input and not blk.ffn[0].gelu_input for blk in dit.blocks)
    before = copy.deepcopy(dit.state_dict())
    quantize_model(dit)  # idempotent
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())
    with pytest.raises(BBFInputError, match="granularity"):
        quantize_model(dit, granularity="row")


@torch.no_grad()
def test_tiny_model_quantised_close_to_unquantised():
    dit = _tiny()
    inputs = _model_inputs(dit.cfg, torch.float32)
    ref = dit(**inputs)
    q = quantize_model(copy.deepcopy(dit))
    out = q(**inputs)
    with ops.attention_mode("int8"):
        both = q(**inputs)
        att = dit(**inputs)
    # measured: fp8 linears ~1.2%, int8 attention ~0.05% relative error of the velocity (random weights)
    assert 1e-3 < rel(out, ref) < 0.03
    assert 0 < rel(att, ref) < 0.01
    assert rel(both, ref) < 0.03 and cosine(both, ref) > 0.999


@torch.no_grad()
def test_tiny_model_kernels_match_references_quantised():
    """bf16 model with FP8 linears and int8 attention: Triton kernels (interpreter on CPU) vs references."""
    if CUDA and not FP8_GPU:
        pytest.skip("FP8 GEMM needs compute capability >= 8.9")
    dit = _tiny()
    oracle = dit(**_model_inputs(dit.cfg, torch.float32))
    q = quantize_model(copy.deepcopy(dit)).to(torch.bfloat16)
    inputs = _model_inputs(dit.cfg, torch.bfloat16)
    with ops.attention_mode("int8"):
        with ops.implementation("reference"):
            ref = q(**inputs)
        with ops.implementation("triton"):
            out = q(**inputs)
    assert torch.isfinite(out).all()
    assert rel(out, oracle) <= 1.1 * rel(ref, oracle) + 1e-3


def test_runtime_options_default_off_and_validated(monkeypatch):
    rt = RuntimeConfig()
    assert rt.fp8_linear is False and rt.attention == "exact"
    dit = _tiny()

    class Model:  # what wrap_denoiser reads of a BBFModel
        pass

    m = Model()
    m.dit = dit
    assert wrap_denoiser(m, dit, False, "exact") is dit  # off: nothing wrapped, nothing swapped
    assert isinstance(dit.blocks[0].ffn[0], torch.nn.Linear)
    with pytest.raises(BBFInputError, match="attention='fast'"):
        wrap_denoiser(m, dit, False, "fast")
    fn = wrap_denoiser(m, dit, True, "int8")
    assert isinstance(dit.blocks[0].ffn[0], FP8Linear)
    seen = []
    orig = ops.int8_attention
    monkeypatch.setattr(ops, "int8_attention", lambda *a, **k: (seen.append(1), orig(*a, **k))[1])  # a spy
    with torch.no_grad():
        fn(**_model_inputs(dit.cfg, torch.float32))
    assert seen and ops.current_attention_mode() == "exact"

    from bbf_rt.runtime.backends import OnnxBackend

    art = OnnxBackend.__new__(OnnxBackend)
    with pytest.raises(BBFInputError, match="eager or compile backend"):
        wrap_denoiser(m, art, True, "exact")


def test_engine_applies_the_options():
    from bbf_rt.model import BBFModel
    from bbf_rt.runtime.engine import Engine

    torch.manual_seed(0)
    model = BBFModel(get_preset("tiny")).eval()
    eng = Engine(model, RuntimeConfig(), torch.device("cpu"), torch.float32)
    assert eng.denoiser is model.dit and isinstance(model.dit.blocks[0].self_attn.qkv, torch.nn.Linear)
    eng = Engine(model, RuntimeConfig(fp8_linear=True, attention="int8-fp8"), torch.device("cpu"), torch.float32)
    assert isinstance(model.dit.blocks[0].self_attn.qkv, FP8Linear)
    assert eng.denoiser.attention == "int8-fp8" and eng.denoiser.fn is model.dit
    with pytest.raises(BBFInputError, match="attention='sage'"):
        Engine(model, RuntimeConfig(attention="sage"), torch.device("cpu"), torch.float32)


def test_cli_flags():
    a = build_parser().parse_args(["interpolate", "in.mp4", "-o", "out.mp4", "--factor", "2", "--fp8", "--attention", "int8"])
    assert a.fp8 is True and a.attention == "int8"
    a = build_parser().parse_args(["interpolate", "in.mp4", "-o", "out.mp4", "--factor", "2"])
    assert a.fp8 is False and a.attention == "exact"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["interpolate", "in.mp4", "-o", "o.mp4", "--factor", "2", "--attention", "int4"])


# ---------------------------------------------------------------- GPU only

@gpu
@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_linear_cublas_at_wan_shapes(fast_accum):
    cfg = get_preset("wan-1.3b")
    for K, N in ((cfg.dim, 3 * cfg.dim), (cfg.dim, cfg.ffn_dim), (cfg.ffn_dim, cfg.dim)):
        x, lin = _linear_case(M=4095, K=K, N=N, dtype=torch.bfloat16)
        w8, ws = fp8_ref.quantize_weight(lin.weight)
        y = fp8_tt.fp8_linear(x, w8, ws, lin.bias.bfloat16(), fast_accum=fast_accum)
        yr = fp8_ref.fp8_linear(x, w8, ws, lin.bias)
        exact = x.float() @ lin.weight.float().t() + lin.bias
        assert rel(y, exact) <= 1.1 * rel(yr, exact) + 1e-3, (K, N)


@gpu
@pytest.mark.parametrize("pv", ["bf16", "fp8"])
@pytest.mark.parametrize("preset,L", [("bbf-s", 3600), ("wan-1.3b", 4095)])
def test_int8_attention_preset_shapes(preset, L, pv):
    cfg = get_preset(preset)
    q, k, v = _qkv(1, L, L, cfg.heads, cfg.head_dim)
    if i8_tt.unsupported(q, pv):
        pytest.skip(i8_tt.unsupported(q, pv))
    oracle = attn_ref.attention(q.float(), k.float(), v.float())
    out = i8_tt.attention(q, k, v, pv=pv)
    ref = i8_ref.int8_attention(q, k, v, pv=pv)
    assert rel(out, oracle) <= 1.1 * rel(ref, oracle) + 1e-3
    assert cosine(out, oracle) > 0.999


def test_compile_fullgraph_through_quantised_ops():
    """FP8Linear and int8 attention in one graph: Inductor on the GPU, aot_eager under the interpreter
    (whose kernels stay opaque custom ops)."""
    if CUDA and not FP8_GPU:
        pytest.skip("FP8 GEMM needs compute capability >= 8.9")
    x, lin = _linear_case(M=64, dtype=torch.bfloat16)
    m = FP8Linear.from_linear(lin).to(torch.bfloat16)
    q, k, v = _qkv(1, 64, 64, 2, 64)

    def f(x, q, k, v):
        return m(x), ops.attention(q, k, v)

    fn = torch.compile(f, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    with ops.implementation("triton"), ops.attention_mode("int8"):  # read (and guarded on) at trace time
        got = fn(x, q, k, v)
        eager = f(x, q, k, v)
    assert rel(eager[1], attn_ref.attention(q, k, v)) > 0  # the int8 kernel ran
    torch.testing.assert_close(got[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], eager[1], rtol=0, atol=0)

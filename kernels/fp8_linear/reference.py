"""FP8 (e4m3) linear layers, eager PyTorch: the oracle for the Triton quantisers and the path on CPU.

Numerics (the Triton/cuBLAS path follows them; tests/test_quant.py checks it):
- weights: float8_e4m3fn (N, K) with a float32 scale per output channel (granularity "channel") or one
  for the whole tensor ("tensor", stored expanded to (N,)): scale = amax / 448, w ~= w8 * scale.
- activations: one float32 scale per row (token), computed on the fly from the row's amax, so an
  outlier token costs only its own row's precision. q = x * (448 / amax), rounded to nearest e4m3.
- the product: dequantised operands multiplied in fp32 (the GPU: FP8 tensor cores, fp32 accumulation,
  the scales applied in the epilogue), plus the bias, cast to the input's dtype.
Per element the rounding error is at most half an e4m3 ulp: 2^-4 relative for normals, 2^-10 * scale
absolute for subnormals (|q| < 2^-6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from bbf_rt.kernels.norm_modulate.reference import norm_modulate_fp32

E4M3_MAX = 448.0
#: amax floor: an all-zero row gets a tiny scale (its codes are 0) instead of 0 / 0
AMAX_MIN = 1e-12
GRANULARITIES = ("channel", "tensor")


def _to_e4m3(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x (fp32) * (448 / amax) rounded to nearest e4m3; amax broadcasts against x. The factor is a true
    division (`scalar / tensor` in torch multiplies by a reciprocal, one ulp off the kernels' division)."""
    inv = torch.full_like(amax, E4M3_MAX) / amax
    return (x * inv).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_weight(w: torch.Tensor, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) any float dtype -> (w8 (N, K) float8_e4m3fn, scale (N,) float32), w ~= w8 * scale[:, None]."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"quantize_weight: granularity {granularity!r}; allowed: {GRANULARITIES}")
    wf = w.detach().float()
    if granularity == "channel":
        amax = wf.abs().amax(dim=1, keepdim=True).clamp_min(AMAX_MIN)  # (N, 1)
    else:
        amax = wf.abs().amax().clamp_min(AMAX_MIN).expand(wf.shape[0], 1)
    return _to_e4m3(wf, amax).contiguous(), (amax[:, 0] / E4M3_MAX).contiguous()


def quantize_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation of the last dim: x (..., K) -> (q (M, K) float8_e4m3fn, scale (M,) fp32)
    with M = x.numel() // K. gelu: apply tanh-GELU (in fp32) first, as the FFN's second linear wants."""
    xf = x.reshape(-1, x.shape[-1]).float()
    if gelu:
        xf = F.gelu(xf, approximate="tanh")
    amax = xf.abs().amax(dim=1, keepdim=True).clamp_min(AMAX_MIN)
    return _to_e4m3(xf, amax), amax[:, 0] / E4M3_MAX


def norm_modulate_quantize(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """norm(x) * (1 + scale) + shift (as kernels/norm_modulate) quantised per row without a bf16 round
    trip: x (B, L, C), shift/scale (B, F, C) -> (q (B*L, C) float8_e4m3fn, row scale (B*L,) fp32)."""
    return quantize_rows(norm_modulate_fp32(x, shift, scale, eps, rms).reshape(-1, x.shape[-1]))


def residual_norm_modulate_quantize(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gated residual r = x + gate * y (rounded to x's dtype, the residual stream) and its
    norm_modulate quantised per row without a bf16 round trip: x, y (B, L, C); gate (B, Fg, C);
    shift/scale (B, Fm, C) -> (r (B, L, C), q (B*L, C) float8_e4m3fn, row scale (B*L,) fp32)."""
    B, L, C = x.shape
    Fg = gate.shape[1]
    r = x.float().view(B, Fg, L // Fg, C) + gate.float()[:, :, None, :] * y.float().view(B, Fg, L // Fg, C)
    r = r.view(B, L, C).to(x.dtype)
    return (r, *norm_modulate_quantize(r, shift, scale, eps, rms))


def scaled_matmul(
    a8: torch.Tensor, a_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """(a8 * a_scale[:, None]) @ (w8 * w_scale[:, None])^T + bias in fp32 -> (M, N) out_dtype.
    a8 (M, K), w8 (N, K) float8_e4m3fn; a_scale (M,), w_scale (N,) fp32; bias (N,) or None."""
    out = (a8.float() * a_scale[:, None]) @ (w8.float() * w_scale[:, None]).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """y = quantise(gelu?(x)) @ dequantise(weight)^T + bias. x (..., K) any float dtype; weight (N, K)
    float8_e4m3fn; weight_scale (N,) fp32; bias (N,). Returns (..., N) in x's dtype."""
    q, s = quantize_rows(x, gelu)
    out = scaled_matmul(q, s, weight, weight_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])

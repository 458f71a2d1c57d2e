"""SageAttention-style 8-bit attention, eager PyTorch: the oracle for the Triton kernel and the CPU path.

The quantisation (the Triton kernel does the same; tests/test_quant.py compares them):
- K is smoothed: its mean over the keys (per sample and head) is subtracted. Each query's scores then
  shift by one constant (q . mean), which the softmax ignores, and the int8 grid no longer spends its
  range on the channel offsets that K projections carry (SageAttention's observation).
- Q is quantised to int8 per token (per head), K per block of `block_n` keys (the kernel's key tile, so
  one scale per tile): scale = amax / 127, codes = round-half-away(x * 127 / amax). The softmax scale is
  folded into Q's scale.
- S = Q8 K8^T is exact integer arithmetic (int32 on the GPU; here fp32, exact below 2^24: D * 127^2 is at
  most 4.1e6 for D <= 256), times the product of the two scales.
- softmax in fp32; P V with P rounded to V's dtype (pv="bf16", V as given), or (pv="fp8") P * 448 and V
  in float8 e4m3, V scaled per channel (amax over the keys / 448), products summed in fp32.
Masked keys get a large finite negative score, so a query with no valid key averages V uniformly; they
are also left out of the quantisation statistics (zeroed), so padding cannot change the valid keys' codes.
"""
from __future__ import annotations

import math

import torch

QK_MAX = 127.0
E4M3_MAX = 448.0
AMAX_MIN = 1e-12
PV_MODES = ("bf16", "fp8")
MASKED = -1.0e6


def default_block_n(head_dim: int) -> int:
    """Keys per K scale: the Triton kernel's key tile for this head dim."""
    return 128 if head_dim > 64 else 64


def round_int8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x (fp32) * (127 / amax) rounded half away from zero, as int8 (amax broadcasts against x)."""
    v = x * (torch.full_like(amax, QK_MAX) / amax)  # a true division, as the kernel's
    return torch.where(v >= 0, v + 0.5, v - 0.5).trunc().clamp(-QK_MAX, QK_MAX).to(torch.int8)


def quantize_q(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, L, H, D) -> (q8 (B, H, L, D) int8, dequant scale (B, H, L) fp32, softmax scale included)."""
    qf = q.float().transpose(1, 2)
    amax = qf.abs().amax(-1, keepdim=True).clamp_min(AMAX_MIN)
    return round_int8(qf, amax), (amax[..., 0] / QK_MAX) * scale


def quant_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The keys that enter the quantisation statistics (mean, amax): the valid ones, or all keys of a
    sample that has none (whose output is then the uniform average of V, as exact attention's)."""
    if key_mask is None:
        return None
    return key_mask | ~key_mask.any(1, keepdim=True)


def quantize_k(k: torch.Tensor, block_n: int, smooth: bool = True,
               keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k (B, L, H, D) -> (k8 (B, H, L, D) int8 of K - mean_L(K), scale (B, H, ceil(L / block_n)) fp32).
    keys: (B, L) bool from `quant_mask`, or None: other keys are zeroed (code 0) and stay out of the
    mean and the block amax, so padding cannot coarsen the valid keys' grid."""
    kf = k.float().transpose(1, 2)  # (B, H, L, D)
    if keys is not None:  # where, not a product: padding may hold inf
        kf = kf.masked_fill(~keys[:, None, :, None], 0.0)
    if smooth:
        n = kf.shape[2] if keys is None else keys.sum(1)[:, None, None, None]
        kf = kf - kf.sum(2, keepdim=True) / n
    if keys is not None:
        kf = kf.masked_fill(~keys[:, None, :, None], 0.0)
    B, H, L, D = kf.shape
    nb = -(-L // block_n)
    padded = torch.nn.functional.pad(kf, (0, 0, 0, nb * block_n - L))
    amax = padded.view(B, H, nb, block_n * D).abs().amax(-1).clamp_min(AMAX_MIN)  # (B, H, nb)
    k8 = round_int8(kf, amax.repeat_interleave(block_n, dim=2)[:, :, :L, None])
    return k8, amax / QK_MAX


def quantize_v_fp8(v: torch.Tensor, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v (B, L, H, D) -> (v8 (B, H, L, D) float8_e4m3fn, per-channel scale (B, H, D) fp32 = amax_L / 448);
    keys as in `quantize_k` (other rows zeroed, out of the amax)."""
    vf = v.float().transpose(1, 2)
    if keys is not None:
        vf = vf.masked_fill(~keys[:, None, :, None], 0.0)
    amax = vf.abs().amax(2).clamp_min(AMAX_MIN)  # (B, H, D)
    inv = torch.full_like(amax, E4M3_MAX) / amax
    return (vf * inv[:, :, None, :]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), amax / E4M3_MAX


def int8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    scale: float | None = None, pv: str = "bf16", block_n: int | None = None, smooth: bool = True,
    chunk: int = 1024,
) -> torch.Tensor:
    """softmax(dequant(Q8 K8^T)) V with the quantisation described in the module docstring.

    q: (B, Lq, H, D); k, v: (B, Lk, H, D); key_mask: (B, Lk) bool, True = attend. Returns (B, Lq, H, D)
    in q's dtype. pv: "bf16" (P rounded to V's dtype; fp32 V stays fp32) or "fp8". block_n: keys per K
    scale (default: the kernel's tile). smooth=False skips the K mean subtraction (for tests). Queries
    are processed `chunk` at a time, so memory is B * H * chunk * Lk fp32 scores, not Lq * Lk.
    """
    if pv not in PV_MODES:
        raise ValueError(f"int8_attention: pv {pv!r}; allowed: {PV_MODES}")
    B, Lq, H, D = q.shape
    sm = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q8, qs = quantize_q(q, sm)
    keys = quant_mask(key_mask)
    k8, ks = quantize_k(k, block_n or default_block_n(D), smooth, keys)
    ks_keys = ks.repeat_interleave(block_n or default_block_n(D), dim=2)[:, :, : k.shape[1]]  # (B, H, Lk)
    kf = k8.float()
    if pv == "fp8":
        v8, vs = quantize_v_fp8(v, keys)
        vf = v8.float()  # (B, H, Lk, D), in units of vs
    else:
        vf = v.transpose(1, 2).float()
    keep = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Lk)
    outs = []
    for s0 in range(0, Lq, chunk):
        s = (q8[:, :, s0 : s0 + chunk].float() @ kf.transpose(-1, -2)) * qs[:, :, s0 : s0 + chunk, None] * ks_keys[:, :, None, :]
        if keep is not None:
            s = s.masked_fill(~keep, MASKED)
        p = torch.exp(s - s.amax(-1, keepdim=True))  # (B, H, c, Lk) fp32, max 1
        l = p.sum(-1, keepdim=True)
        if pv == "fp8":
            p8 = (p * E4M3_MAX).to(torch.float8_e4m3fn).float()
            o = (p8 @ vf) * (vs[:, :, None, :] / E4M3_MAX) / l
        else:
            o = (p.to(v.dtype).float() @ vf) / l
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)

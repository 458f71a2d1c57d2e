"""FP8 (e4m3) linear layers on the GPU: Triton quantisers registered as torch ops, cuBLAS FP8 GEMM.

- `bbf_rt::quantize_rows_fp8(x, gelu)`: per-row e4m3 quantisation of (M, K), optionally after tanh-GELU
  (the FFN's second linear takes GELU(h): the activation and its quantisation are one pass). A program
  holds ROWS whole rows in registers: read x once (2 bytes/elt), write q (1 byte/elt) + one fp32 scale
  per row.
- `bbf_rt::norm_modulate_fp8(x, shift, scale, eps, rms)`: norm_modulate (kernels/norm_modulate) whose
  rows, already in registers for the statistics, are quantised in the same pass: it writes 1 byte/elt
  instead of 2, and the linear after it skips its own quantisation pass. (Wiring it into the model needs
  the block to hand the fp8 rows to the linear; see docs/quant.md.)
- the GEMM: torch._scaled_mm with row-wise scales (scale_a (M, 1), scale_b (1, N) fp32), bias and output
  in bf16 (row-wise scaling supports only bf16 output; other dtypes are cast after), FP8 tensor cores with
  fp32 accumulation; use_fast_accum skips cuBLAS's periodic promotion of the partial sums (faster, a
  little less accurate: measured in bench/bench_quant.py). Needs compute capability >= 8.9.
Numerics as kernels/fp8_linear/reference.py: scale = amax / 448, q = x * (448 / amax) rounded to nearest.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.norm_modulate.triton import check_residual_norm_args, residual_norm_rows
from bbf_rt.kernels.triton_common import INTERPRET, register_op, rne_e4m3

# kernels spell these values as literals: compiled Triton reads no non-constexpr globals, and the
# interpreter cannot index expressions built from tl.constexpr globals
E4M3_MAX = 448.0
AMAX_MIN = 1e-12
SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _gelu_tanh(x):
    """0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), in fp32; exp of -2|u| only,
    so it never overflows."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = tl.exp(-2.0 * tl.abs(u))
    return x * tl.where(u >= 0, 1.0, t) / (1.0 + t)


@triton.jit
def _store_e4m3_rows(y, Q, S, rows, cols, rmask, mask, sqm, RNE: tl.constexpr):
    """Quantise fp32 rows y (ROWS, BLOCK_K) (masked columns hold 0) and store codes and row scales."""
    amax = tl.maximum(tl.max(tl.abs(y), 1), 1e-12)
    q = y * (448.0 / amax)[:, None]
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if RNE:
        q = rne_e4m3(q)
    tl.store(Q + rows.to(tl.int64)[:, None] * sqm + cols[None, :], q.to(tl.float8e4nv), mask=mask)
    tl.store(S + rows, amax / 448.0, mask=rmask)


@triton.jit
def _quantize_rows_kernel(X, Q, S, M, K, sxm, sxk, sqm,
                          ROWS: tl.constexpr, BLOCK_K: tl.constexpr, GELU: tl.constexpr, RNE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < M
    mask = rmask[:, None] & (cols < K)[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * sxm + cols[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        x = _gelu_tanh(x)  # GELU(0) = 0: masked columns stay out of the amax
    _store_e4m3_rows(x, Q, S, rows, cols, rmask, mask, sqm, RNE)


@triton.jit
def _norm_modulate_fp8_kernel(X, SHIFT, SCALE, Q, S, L, Sf, C, F, eps,
                              sxb, sxl, sxc, shb, shf, shc, scb, scf, scc, sqm,
                              ROWS: tl.constexpr, BLOCK_C: tl.constexpr, RMS: tl.constexpr, RNE: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32
    pid_s = tl.program_id(0)  # row tile within the frame
    pid_bf = tl.program_id(1)  # b * F + f
    b = (pid_bf // F).to(tl.int64)
    f = pid_bf % F
    r = pid_s * ROWS + tl.arange(0, ROWS)
    l = f * Sf + r  # token index in the sample
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    rmask = r < Sf
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + b * sxb + l[:, None] * sxl + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        y = x * tl.rsqrt(tl.sum(x * x, 1) / C + eps)[:, None]
    else:
        mean = tl.sum(x, 1) / C
        xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
        y = xc * tl.rsqrt(tl.sum(xc * xc, 1) / C + eps)[:, None]
    shift = tl.load(SHIFT + b * shb + f * shf + cols * shc, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * scb + f * scf + cols * scc, mask=cmask, other=0.0).to(tl.float32)
    y = y * (1.0 + scale[None, :]) + shift[None, :]
    y = tl.where(mask, y, 0.0)  # padded columns and rows must not enter the amax
    _store_e4m3_rows(y, Q, S, b * L + l, cols, rmask, mask, sqm, RNE)


@triton.jit
def _residual_norm_modulate_fp8_kernel(X, Y, G, SHIFT, SCALE, R, Q, S, L, C, SG, SM, eps,
                                       sxb, sxl, sxc, syb, syl, syc, sgb, sgf, sgc, shb, shf, shc, scb, scf, scc,
                                       srb, srl, sqm,
                                       ROWS: tl.constexpr, BLOCK_C: tl.constexpr, RMS: tl.constexpr,
                                       RNE: tl.constexpr, RNE_R: tl.constexpr):
    """kernels/norm_modulate's residual_norm_modulate with the normalised rows stored as e4m3 codes and
    row scales instead of bf16: r = x + gate * y written once, the FP8 linear's input written once."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    h = residual_norm_rows(X, Y, G, SHIFT, SCALE, R, b, rows, cols, L, C, SG, SM, eps,
                           sxb, sxl, sxc, syb, syl, syc, sgb, sgf, sgc, shb, shf, shc, scb, scf, scc, srb, srl,
                           RMS, RNE_R)  # padded columns and rows come back 0: they stay out of the amax
    rmask = rows < L
    _store_e4m3_rows(h, Q, S, b * L + rows, cols, rmask, rmask[:, None] & (cols < C)[None, :], sqm, RNE)


def _row_params(K: int) -> tuple[int, int, int]:
    """(BLOCK_K, ROWS, num_warps): whole rows in registers, ~4k-element tiles (as norm_modulate)."""
    block_k = triton.next_power_of_2(K)
    return block_k, max(1, min(16, 4096 // block_k)), 4 if block_k <= 4096 else 8


def launch_quantize_rows(x2: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, K) any float dtype and strides -> (q (M, K) float8_e4m3fn, scale (M,) fp32)."""
    M, K = x2.shape
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x2.device)
    s = torch.empty((M,), dtype=torch.float32, device=x2.device)
    if M == 0:
        return q, s
    block_k, rows, warps = _row_params(K)
    wrap_triton(_quantize_rows_kernel)[(triton.cdiv(M, rows),)](
        x2, q, s, M, K, x2.stride(0), x2.stride(1), q.stride(0),
        ROWS=rows, BLOCK_K=block_k, GELU=gelu, RNE=INTERPRET, num_warps=warps)
    return q, s


def launch_norm_modulate_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                             rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, C = x.shape
    F = shift.shape[1]
    q = torch.empty((B * L, C), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((B * L,), dtype=torch.float32, device=x.device)
    if q.numel() == 0:
        return q, s
    block_c, rows, warps = _row_params(C)
    rows = max(2, rows)
    grid = (triton.cdiv(L // F, rows), B * F)
    wrap_triton(_norm_modulate_fp8_kernel)[grid](
        x, shift, scale, q, s, L, L // F, C, F, eps, *x.stride(), *shift.stride(), *scale.stride(), q.stride(0),
        ROWS=rows, BLOCK_C=block_c, RMS=rms, RNE=INTERPRET, num_warps=warps)
    return q, s


def launch_residual_norm_modulate_fp8(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                      scale: torch.Tensor, eps: float,
                                      rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, C = x.shape
    r = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    q = torch.empty((B * L, C), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((B * L,), dtype=torch.float32, device=x.device)
    if q.numel() == 0:
        return r, q, s
    block_c, rows, warps = _row_params(C)
    rows = max(2, rows)
    wrap_triton(_residual_norm_modulate_fp8_kernel)[(triton.cdiv(L, rows), B)](
        x, y, gate, shift, scale, r, q, s, L, C, L // gate.shape[1], L // shift.shape[1], eps,
        *x.stride(), *y.stride(), *gate.stride(), *shift.stride(), *scale.stride(), r.stride(0), r.stride(1),
        q.stride(0), ROWS=rows, BLOCK_C=block_c, RMS=rms, RNE=INTERPRET,
        RNE_R=INTERPRET and x.dtype == torch.bfloat16, num_warps=warps)
    return r, q, s


def _rnm_fp8_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_residual_norm_modulate_fp8(x, y, gate, shift, scale, eps, rms)


def _rnm_fp8_fake(x, y, gate, shift, scale, eps, rms):
    B, L, C = x.shape
    return (x.new_empty(x.shape), x.new_empty((B * L, C), dtype=torch.float8_e4m3fn),
            x.new_empty((B * L,), dtype=torch.float32))


def _quantize_rows_op(x2: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_quantize_rows(x2, gelu)


def _quantize_rows_fake(x2, gelu):
    return (x2.new_empty(x2.shape, dtype=torch.float8_e4m3fn), x2.new_empty(x2.shape[:1], dtype=torch.float32))


def _nm_fp8_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
               rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_norm_modulate_fp8(x, shift, scale, eps, rms)


def _nm_fp8_fake(x, shift, scale, eps, rms):
    B, L, C = x.shape
    return x.new_empty((B * L, C), dtype=torch.float8_e4m3fn), x.new_empty((B * L,), dtype=torch.float32)


_quant_op = register_op("quantize_rows_fp8", _quantize_rows_op, _quantize_rows_fake)
_nm_op = register_op("norm_modulate_fp8", _nm_fp8_op, _nm_fp8_fake)
_rnm_op = register_op("residual_norm_modulate_fp8", _rnm_fp8_op, _rnm_fp8_fake)


def supported(device: torch.device) -> str | None:
    """None if the FP8 GEMM runs on `device`, else the reason it does not."""
    if device.type != "cuda":
        return None if INTERPRET else f"device {device}; the FP8 GEMM needs CUDA"
    props = torch.cuda.get_device_properties(device)  # constant-folded by torch.compile (the capability call is not)
    cap = (props.major, props.minor)
    if cap < (8, 9):
        return f"compute capability {cap[0]}.{cap[1]}; FP8 tensor cores need >= 8.9 (Ada, Hopper)"
    return None


def quantize_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (M, K) float8_e4m3fn, scale (M,) fp32), M = x.numel() // K; as the reference."""
    return _quant_op(x.reshape(-1, x.shape[-1]), bool(gelu))


def norm_modulate_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                      rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_modulate quantised per row: x (B, L, C), shift/scale (B, F, C) -> (q (B*L, C) e4m3, (B*L,) fp32)."""
    if x.dim() != 3 or shift.dim() != 3 or shift.shape != scale.shape:
        raise ValueError(f"norm_modulate_fp8: x {tuple(x.shape)} must be (B, L, C), shift {tuple(shift.shape)} "
                         f"and scale {tuple(scale.shape)} (B, F, C)")
    B, L, C = x.shape
    if shift.shape[0] != B or shift.shape[2] != C or shift.shape[1] < 1 or L % shift.shape[1]:
        raise ValueError(f"norm_modulate_fp8: shift/scale {tuple(shift.shape)} must be (B={B}, F, C={C}), F dividing L={L}")
    return _nm_op(x, shift, scale, float(eps), bool(rms))


def residual_norm_modulate_fp8(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor, eps: float,
                               rms: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """r = x + gate * y and norm_modulate(r) quantised per row, one pass: x, y (B, L, C); gate (B, Fg, C);
    shift/scale (B, Fm, C) -> (r (B, L, C) in x's dtype, q (B*L, C) e4m3, row scale (B*L,) fp32)."""
    check_residual_norm_args("residual_norm_modulate_fp8", x, y, gate, shift, scale)
    return _rnm_op(x, y, gate, shift, scale, float(eps), bool(rms))


def scaled_mm(a8: torch.Tensor, a_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool = True) -> torch.Tensor:
    """(a8 * a_scale[:, None]) @ (w8 * w_scale[:, None])^T + bias -> (M, N) out_dtype.
    a8 (M, K) row-major and w8 (N, K) float8_e4m3fn (K, N multiples of 16); scales fp32; bias (N,)."""
    out = torch._scaled_mm(
        a8, w8.t(), scale_a=a_scale[:, None], scale_b=w_scale[None, :],
        bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               gelu: bool = False, fast_accum: bool = True) -> torch.Tensor:
    """quantise(gelu?(x)) @ dequantise(weight)^T + bias: x (..., K); weight (N, K) float8_e4m3fn;
    weight_scale (N,) fp32; bias (N,). Returns (..., N) in x's dtype (GEMM output bf16, then cast)."""
    K, N = x.shape[-1], weight.shape[0]
    if weight.dtype != torch.float8_e4m3fn or weight.shape[1] != K or K % 16 or N % 16:
        raise ValueError(f"fp8_linear: weight {weight.dtype} {tuple(weight.shape)} for x (..., {K}); allowed: "
                         "float8_e4m3fn (N, K) with N and K multiples of 16")
    q, s = quantize_rows(x, gelu)
    return scaled_mm(q, s, weight, weight_scale, bias, x.dtype, fast_accum).reshape(*x.shape[:-1], N)

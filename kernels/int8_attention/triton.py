"""SageAttention-style 8-bit attention in Triton, registered as the torch op `bbf_rt::int8_attention`.

Four launches, numerics as kernels/int8_attention/reference.py:
1. Q -> int8 per token and head (`_quant_int8_kernel`, PER_TOKEN): the softmax scale and log2(e) are
   folded into the scale, so the scores come out in exp2 units. A per-token scale costs nothing in the
   attention loop: with one K scale per key tile, the factor q_scale * k_scale is one value per query row.
2. K - mean_L(K) -> int8 per key tile (the same kernel, one program per BLOCK_N keys of one head); the
   mean (one read of K) comes from torch.
3. pv="fp8" only: V -> float8 e4m3 with a per-channel scale (amax over keys / 448, from torch), stored
   transposed, (B, H, D, Lk), so the P V product gets its reduction dim contiguous (as Hopper's FP8
   tensor cores need it).
4. the flash loop: one program owns BLOCK_M queries of one (b, h) and streams BLOCK_N-key tiles:
   S = Q8 K8^T on the int8 tensor cores (int32 accumulation, exact), converted to fp32 and scaled with
   one FMA inside exp2 (the row factor is positive, so the row max commutes with it); online softmax in
   fp32; then either O += P V with P rounded to V's dtype (bf16/fp16 tensor cores) or, pv="fp8",
   P * 448 in e4m3 times V8, summed per tile in a fresh fp32 accumulator and added to O (the two-level
   accumulation of SageAttention2: FP8 MMAs accumulate with fewer bits than fp32 over long K).
Masks as the bf16 kernel: masked keys score -1e6 (log2 units), keys past Lk -inf, and a program stops at
its sample's last valid key. Bytes: Q, K read twice (quantise, attend) as 1 + 2 bytes each; FLOPs as
exact attention, 4 * B * H * Lq * Lk * D (half of them int8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.triton_common import INTERPRET, register_op, rne_bf16, rne_e4m3

# kernels spell these values as literals: compiled Triton reads no non-constexpr globals, and the
# interpreter cannot index expressions built from tl.constexpr globals
LOG2E = 1.4426950408889634
QK_MAX = 127.0
E4M3_MAX = 448.0
AMAX_MIN = 1e-12
HEAD_DIMS = (32, 64, 128)
PV_MODES = ("bf16", "fp8")


@triton.jit
def _quant_int8_kernel(X, MEAN, KM, OUT, SCALE, L, H, NBLK, mult, sxb, sxl, sxh, sxd, smb, sml,
                       D: tl.constexpr, BLOCK: tl.constexpr, PER_TOKEN: tl.constexpr, SMOOTH: tl.constexpr,
                       HAS_MASK: tl.constexpr):
    """X (B, L, H, D) any strides -> OUT (B, H, L, D) int8; SCALE (B, H, L) per token or (B, H, NBLK).
    HAS_MASK: rows where KM (B, L) is False are zeroed (code 0, out of the amax)."""
    mult = tl.cast(mult, tl.float32)  # Inductor passes Python floats as fp64
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_l * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    rmask = rows < L
    x = tl.load(X + b * sxb + h * sxh + rows.to(tl.int64)[:, None] * sxl + d[None, :] * sxd,
                mask=rmask[:, None], other=0.0).to(tl.float32)
    if SMOOTH:
        mu = tl.load(MEAN + pid_bh.to(tl.int64) * D + d)
        x = x - mu[None, :]
    if HAS_MASK:
        rmask = rmask & (tl.load(KM + b * smb + rows * sml, mask=rmask, other=0) != 0)
    x = tl.where(rmask[:, None], x, 0.0)
    if PER_TOKEN:
        amax = tl.maximum(tl.max(tl.abs(x), 1), 1e-12)
        v = x * (127.0 / amax)[:, None]
        tl.store(SCALE + pid_bh.to(tl.int64) * L + rows, amax / 127.0 * mult, mask=rows < L)
    else:
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-12)
        v = x * (127.0 / amax)
        tl.store(SCALE + pid_bh.to(tl.int64) * NBLK + pid_l, amax / 127.0 * mult)
    v = tl.where(v >= 0, v + 0.5, v - 0.5)  # the int cast truncates: round half away from zero
    tl.store(OUT + (pid_bh.to(tl.int64) * L + rows.to(tl.int64))[:, None] * D + d[None, :], v.to(tl.int8),
             mask=(rows < L)[:, None])


@triton.jit
def _quant_v_fp8_kernel(V, VMAX, KM, OUT, L, Lp, H, svb, svl, svh, svd, smb, sml,
                        D: tl.constexpr, BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, RNE: tl.constexpr):
    """V (B, L, H, D) -> OUT (B, H, D, Lp) e4m3 = V * 448 / amax_channel, transposed; masked rows 0."""
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_l * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    rmask = rows < L
    x = tl.load(V + b * svb + h * svh + rows.to(tl.int64)[:, None] * svl + d[None, :] * svd,
                mask=rmask[:, None], other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(KM + b * smb + rows * sml, mask=rmask, other=0) != 0
        x = tl.where(keep[:, None], x, 0.0)
    vmax = tl.load(VMAX + pid_bh.to(tl.int64) * D + d)
    x = x * (448.0 / vmax)[None, :]
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if RNE:
        x = rne_e4m3(x)
    # transposed in registers (through shared memory) so that the stores run along the keys, coalesced
    tl.store(OUT + (pid_bh.to(tl.int64) * D + d[:, None]) * Lp + rows[None, :], tl.trans(x).to(tl.float8e4nv),
             mask=rmask[None, :])


@triton.jit
def _key_end(KM, b, smb, sml, Lk, BLOCK_N: tl.constexpr):
    """End of the keys worth visiting for sample b (after its last valid key every weight is 0); a sample
    with no valid key keeps all Lk keys, whose uniform average the reference returns."""
    offs = tl.arange(0, BLOCK_N)
    last = tl.full([], -1, tl.int32)
    for s0 in range(0, Lk, BLOCK_N):
        idx = s0 + offs
        valid = tl.load(KM + b * smb + idx * sml, mask=idx < Lk, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(valid, idx, -1), 0))
    return tl.where(last >= 0, tl.minimum(Lk, (last // BLOCK_N + 1) * BLOCK_N), Lk)


@triton.jit
def _tile(acc, m_i, l_i, q, qs, Kb, KSb, Vb, KMb, start, Lk, Lp, offs_n, d, svl, svd, sml,
          D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, CHECK_N: tl.constexpr,
          PV_FP8: tl.constexpr, DOT_F32: tl.constexpr, RNE: tl.constexpr):
    """One key tile at `start`: acc (BM, D) fp32, m_i / l_i (BM,) running max (log2 units) and row sum.
    Kb, KSb, Vb, KMb point at this (b, h)'s keys, key scales, values (V^T for FP8) and mask row."""
    n = start + offs_n
    inb = n < Lk
    kptr = Kb + n[:, None] * D + d[None, :]
    if CHECK_N:
        k = tl.load(kptr, mask=inb[:, None], other=0)
    else:
        k = tl.load(kptr)
    f = qs * tl.load(KSb + start // BLOCK_N)  # (BM,) > 0
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)  # exact integer scores
    if HAS_MASK:
        keep = tl.load(KMb + n * sml, mask=inb, other=0) != 0
        s = tl.where(keep[None, :], s * f[:, None], -1.0e6)
        if CHECK_N:
            s = tl.where(inb[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        if CHECK_N:
            s = tl.where(inb[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * f)  # f > 0 per row: max(s * f) = max(s) * f
        p = tl.math.exp2(s * f[:, None] - m_new[:, None])  # one FMA per score
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:
        vptr = Vb + d[:, None] * Lp + n[None, :]  # (D, BLOCK_N) of V^T
        if CHECK_N:
            vt = tl.load(vptr, mask=inb[None, :], other=0.0)
        else:
            vt = tl.load(vptr)
        p8 = p * 448.0
        if RNE:
            p8 = rne_e4m3(p8)
        acc = acc * alpha[:, None] + tl.dot(p8.to(tl.float8e4nv), tl.trans(vt))
    else:
        vptr = Vb + n[:, None] * svl + d[None, :] * svd
        if CHECK_N:
            v = tl.load(vptr, mask=inb[:, None], other=0.0)
        else:
            v = tl.load(vptr)
        if DOT_F32:
            acc = tl.dot(rne_bf16(p), v.to(tl.float32), acc * alpha[:, None])
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _int8_attn_kernel(Q8, QS, K8, KS, V, VS, O, KM, Lq, Lk, Lp, H,
                      svb, svl, svh, svd, sob, sol, soh, smb, sml,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                      PV_FP8: tl.constexpr, DOT_F32: tl.constexpr, RNE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    mrow = offs_m < Lq
    q = tl.load(Q8 + (pid_bh.to(tl.int64) * Lq + offs_m.to(tl.int64))[:, None] * D + d[None, :], mask=mrow[:, None], other=0)
    qs = tl.load(QS + pid_bh.to(tl.int64) * Lq + offs_m, mask=mrow, other=1.0)  # 1: no 0 * -inf rows
    bh = pid_bh.to(tl.int64)
    Kb = K8 + bh * Lk * D  # per-(b, h) bases in int64; offsets inside a head stay int32
    KSb = KS + bh * tl.cdiv(Lk, BLOCK_N)
    KMb = KM + b * smb
    if PV_FP8:
        Vb = V + bh * D * Lp
    else:
        Vb = V + b * svb + h * svh  # the (b, h) slice of V as given
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_end = Lk
    if HAS_MASK:
        n_end = _key_end(KM, b, smb, sml, Lk, BLOCK_N)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, qs, Kb, KSb, Vb, KMb, start, Lk, Lp, offs_n, d, svl, svd, sml,
                              D, BLOCK_N, HAS_MASK, False, PV_FP8, DOT_F32, RNE)
    if n_full < n_end:  # the partial last tile (n_end = Lk here)
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, qs, Kb, KSb, Vb, KMb, n_full, Lk, Lp, offs_n, d, svl, svd, sml,
                              D, BLOCK_N, HAS_MASK, True, PV_FP8, DOT_F32, RNE)
    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * (tl.load(VS + pid_bh.to(tl.int64) * D + d) / 448.0)[None, :]
    if DOT_F32:
        out = rne_bf16(out)
    tl.store(O + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * sol + d[None, :],
             out.to(O.dtype.element_ty), mask=mrow[:, None])


def default_config(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): the bf16 kernel's best tiles (docs/kernels.md); not yet
    swept for int8 (bench/bench_quant.py times them)."""
    if head_dim <= 64:
        return 128, 64, 8, 3
    return 128, 128, 8, 3


def block_n_for(head_dim: int, lk: int) -> int:
    """Keys per K scale and per tile: the default tile, shrunk (to >= 32) for short key sequences."""
    return min(default_config(head_dim)[1], max(32, triton.next_power_of_2(lk)))


@dataclass
class Quantized:
    """The 8-bit operands: q8 (B, H, Lq, D) int8 with per-token scales qs (B, H, Lq) (softmax scale and
    log2(e) folded in); k8 (B, H, Lk, D) int8 of the smoothed K with per-tile scales ks (B, H, Lk/bn);
    v: V as given (bf16 PV) or V^T in e4m3 (B, H, D, lp) with per-channel dequant scales vs (B, H, D)."""

    q8: torch.Tensor
    qs: torch.Tensor
    k8: torch.Tensor
    ks: torch.Tensor
    v: torch.Tensor
    vs: torch.Tensor
    v_strides: tuple[int, int, int, int]
    lp: int
    block_n: int


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
             pv_fp8: bool, block_n: int) -> Quantized:
    """Launches 1-3 of the module docstring (plus the K mean and V amax from torch)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dev = q.device
    q8 = torch.empty((B, H, Lq, D), dtype=torch.int8, device=dev)
    qs = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    qb = 64
    wrap_triton(_quant_int8_kernel)[(triton.cdiv(Lq, qb), B * H)](
        q, qs, qs, q8, qs, Lq, H, 1, scale * LOG2E, *q.stride(), 0, 0,
        D=D, BLOCK=qb, PER_TOKEN=True, SMOOTH=False, HAS_MASK=False, num_warps=4)
    has_mask = key_mask is not None
    # the keys in the quantisation statistics: the valid ones (all, for a sample without any)
    qm = key_mask | ~key_mask.any(1, keepdim=True) if has_mask else None
    nblk = triton.cdiv(Lk, block_n)
    k8 = torch.empty((B, H, Lk, D), dtype=torch.int8, device=dev)
    ks = torch.empty((B, H, nblk), dtype=torch.float32, device=dev)
    if has_mask:  # mean over the kept keys; `where`, not a product: padding may hold inf
        kmean = torch.where(qm[:, :, None, None], k, 0).sum(1, dtype=torch.float32) / qm.sum(1)[:, None, None]
    else:
        kmean = k.mean(dim=1, dtype=torch.float32)  # (B, H, D): one read of K
    km = qm if has_mask else qs  # dummy pointer when unmasked, never read
    smb, sml = (qm.stride(0), qm.stride(1)) if has_mask else (0, 0)
    wrap_triton(_quant_int8_kernel)[(nblk, B * H)](
        k, kmean, km, k8, ks, Lk, H, nblk, 1.0, *k.stride(), smb, sml,
        D=D, BLOCK=block_n, PER_TOKEN=False, SMOOTH=True, HAS_MASK=has_mask,
        num_warps=4 if block_n * D <= 8192 else 8)
    if not pv_fp8:
        return Quantized(q8, qs, k8, ks, v, qs, tuple(v.stride()), Lk, block_n)
    lp = triton.cdiv(Lk, 16) * 16  # 16-byte aligned rows of V^T
    va = v.abs() if not has_mask else torch.where(qm[:, :, None, None], v, 0).abs()
    vmax = va.amax(dim=1).float().clamp_min(AMAX_MIN)  # (B, H, D)
    vt8 = torch.empty((B, H, D, lp), dtype=torch.float8_e4m3fn, device=dev)
    wrap_triton(_quant_v_fp8_kernel)[(triton.cdiv(Lk, 64), B * H)](
        v, vmax, km, vt8, Lk, lp, H, *v.stride(), smb, sml, D=D, BLOCK=64, HAS_MASK=has_mask, RNE=INTERPRET,
        num_warps=4)
    return Quantized(q8, qs, k8, ks, vt8, vmax / E4M3_MAX, (0, 0, 0, 0), lp, block_n)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
           pv_fp8: bool, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Quantise and attend; shapes as `attention`. config: (BLOCK_M, BLOCK_N, warps, stages) overrides."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    bm, bn, warps, stages = config or default_config(D)
    bn = min(bn, max(32, triton.next_power_of_2(Lk)))
    t = quantize(q, k, v, key_mask, scale, pv_fp8, bn)
    has_mask = key_mask is not None
    km = key_mask if has_mask else t.q8  # dummy pointer, never read
    smb, sml = (key_mask.stride(0), key_mask.stride(1)) if has_mask else (0, 0)
    wrap_triton(_int8_attn_kernel)[(triton.cdiv(Lq, bm), B * H)](
        t.q8, t.qs, t.k8, t.ks, t.v, t.vs, out, km, Lq, Lk, t.lp, H, *t.v_strides,
        out.stride(0), out.stride(1), out.stride(2), smb, sml,
        D=D, BLOCK_M=bm, BLOCK_N=bn, HAS_MASK=has_mask, PV_FP8=pv_fp8,
        DOT_F32=INTERPRET and not pv_fp8 and v.dtype == torch.bfloat16, RNE=INTERPRET,
        num_warps=warps, num_stages=stages)
    return out


def _int8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                       scale: float, pv_fp8: bool) -> torch.Tensor:
    return launch(q, k, v, key_mask, scale, pv_fp8)


def _int8_attention_fake(q, k, v, key_mask, scale, pv_fp8):
    return q.new_empty(q.shape)


_op = register_op("int8_attention", _int8_attention_op, _int8_attention_fake)


def unsupported(q: torch.Tensor, pv: str) -> str | None:
    """Why the kernel cannot take q (the caller falls back), or None."""
    D = q.shape[-1]
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}; the kernel takes bfloat16 or float16"
    if D not in HEAD_DIMS:
        return f"head dim {D}; the kernel takes {HEAD_DIMS}"
    if q.is_cuda:
        props = torch.cuda.get_device_properties(q.device)  # constant-folded by torch.compile
        cap = (props.major, props.minor)
        if cap < (8, 0) or (pv == "fp8" and cap < (8, 9)):
            return f"compute capability {cap[0]}.{cap[1]}; int8 QK needs >= 8.0 and FP8 PV >= 8.9"
    return None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, pv: str) -> None:
    """Raise ValueError naming the argument if the kernel cannot take these inputs."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"int8_attention: q, k, v must be (B, L, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, _, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"int8_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, Lk, H={H}, D={D})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"int8_attention: dtypes {q.dtype}, {k.dtype}, {v.dtype} must match")
    if k.shape[1] < 1:
        raise ValueError("int8_attention: Lk must be at least 1")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, k.shape[1])):
        raise ValueError(f"int8_attention: key_mask {key_mask.dtype} {tuple(key_mask.shape)}; allowed: bool (B={B}, Lk={k.shape[1]})")
    if pv not in PV_MODES:
        raise ValueError(f"int8_attention: pv {pv!r}; allowed: {PV_MODES}")
    why = unsupported(q, pv)
    if why:
        raise ValueError(f"int8_attention: {why}")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    scale: float | None = None, pv: str = "bf16",
) -> torch.Tensor:
    """8-bit softmax(q k^T * scale) v as kernels/int8_attention/reference.py (block_n = `block_n_for`).

    q: (B, Lq, H, D); k, v: (B, Lk, H, D), bf16 or fp16, any strides, D in HEAD_DIMS; key_mask: (B, Lk)
    bool, True = attend. pv: "bf16" (P V on the 16-bit tensor cores) or "fp8" (e4m3). Returns
    (B, Lq, H, D) contiguous in q's dtype.
    """
    check_inputs(q, k, v, key_mask, pv)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _op(q, k, v, key_mask, s, pv == "fp8")

"""Flash-attention forward in Triton, registered as the torch op `bbf_rt::attention`.

One program owns BLOCK_M queries of one (batch, head) and streams the keys in BLOCK_N tiles:
S = Q K^T on the tensor cores (bf16/fp16 operands, fp32 accumulation), an online softmax in fp32 in the
exp2 domain (the 1/sqrt(D) scale and log2(e) folded into one FMA), then O += P V with P rounded to the
input dtype (as every flash kernel does). Keys of the last, partial tile get -inf; keys masked by
`key_mask` get a finite score of -1e6 (log2 units) instead, so a query whose keys are all masked averages
V uniformly, which is what the reference returns (finite, never NaN). With a mask, each program first
finds its sample's last valid key and stops there: padded conditions cost only their valid prefix.

Inputs are (B, L, H, D) with any strides (the model passes views of a fused qkv projection). Loaders:
Hopper's tensor-memory accelerator through descriptors built in the kernel (traceable by torch.compile,
export and AOTInductor) when the strides allow it (16-byte aligned, last dim contiguous, power-of-two D),
plain pointer loads otherwise (any head dim that is a multiple of 8, any GPU). Bytes: Q, O once; K, V
once per query tile (re-reads mostly hit L2). FLOPs: 4 * B * H * Lq * Lk * D.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.triton_common import INTERPRET, register_op, rne_bf16

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: pointer loads only
    TensorDescriptor = None

# Under TRITON_INTERPRET=1, torch's wrap_triton hands back the raw interpreted kernel, which cannot run on
# fake tensors; the op is then an opaque custom op with its own fake impl (bottom of this file).


LOG2E = 1.4426950408889634
LOADERS = ("tma", "tma_host", "pointer")


@dataclass(frozen=True)
class AttnConfig:
    """Launch parameters of the forward kernel."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    # "tma": tensor descriptors made in the kernel (traceable by torch.compile / export / AOTInductor);
    # "tma_host": descriptors made on the host (eager only: under tracing "tma" is used); "pointer": plain
    # loads (any strides and head dims, any GPU). The TMA loaders need 16-byte aligned strides, a
    # power-of-two head dim and Hopper or newer, else "pointer" runs.
    loader: str = "tma"
    warp_specialize: bool = False  # tl.range(warp_specialize=...) on the key loop
    pipeline: bool = False  # TMA loaders: issue the next tile's Q K^T before this tile's softmax


@triton.jit
def _scores(q, k, DOT_F32: tl.constexpr):
    """S = Q K^T, (BM, BN) fp32 from the tensor cores."""
    # DOT_F32 only under the interpreter with bf16: its bf16 dot multiplies the raw bits, and its bf16 cast
    # truncates, so the same bf16 values are multiplied in fp32 and P is rounded as the GPU rounds it
    if DOT_F32:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    return tl.dot(q, tl.trans(k))


@triton.jit
def _tile(acc, m_i, l_i, q, k, v, qk_scale, keep, inb,
          HAS_MASK: tl.constexpr, CHECK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """One key tile: acc (BM, D) fp32, m_i/l_i (BM,) fp32 running max (log2 domain) and row sum."""
    return _softmax_pv(acc, m_i, l_i, _scores(q, k, DOT_F32), v, qk_scale, keep, inb, HAS_MASK, CHECK_N, DOT_F32)


@triton.jit
def _softmax_pv(acc, m_i, l_i, qk, v, qk_scale, keep, inb,
                HAS_MASK: tl.constexpr, CHECK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """Online-softmax update with the scores qk of one key tile, then acc += P V."""
    if HAS_MASK:
        # masked keys score -1e6 (log2 units, after scaling): weight 2^-1e6 = 0 next to any real score, and
        # a row with every key masked has equal scores, hence uniform weights. The value must stay small
        # enough that the FMA in exp2(s - m) cannot turn rounding error into Inf (as -1e30 did).
        s = tl.where(keep[None, :], qk * qk_scale, -1.0e6)
        if CHECK_N:
            s = tl.where(inb[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        if CHECK_N:
            qk = tl.where(inb[None, :], qk, float("-inf"))
        # scale folded into one FMA per score (the max commutes with the positive scale)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_F32:
        acc = tl.dot(rne_bf16(p), v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _key_end(KM, b, smb, sml, Lk, BLOCK_N: tl.constexpr):
    """End of the keys worth visiting for sample b: keys after its last valid one get exactly zero
    weight, so padded conditions (a 77-token prompt in 512 slots) stop early. A sample with no valid key
    keeps all Lk keys, whose uniform average the reference returns."""
    offs = tl.arange(0, BLOCK_N)
    last = tl.full([], -1, tl.int32)
    for s0 in range(0, Lk, BLOCK_N):
        idx = s0 + offs
        valid = tl.load(KM + b.to(tl.int64) * smb + idx * sml, mask=idx < Lk, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(valid, idx, -1), 0))
    return tl.where(last >= 0, tl.minimum(Lk, (last // BLOCK_N + 1) * BLOCK_N), Lk)


@triton.jit
def _attn_fwd_ptr(Q, K, V, O, KM, qk_scale, Lq, Lk, H,
                  sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd, sob, sol, soh, smb, sml,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, WS: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                mask=(offs_m < Lq)[:, None] & dmask[None, :], other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :] * svd
    km_ptrs = KM + b * smb + offs_n * sml
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    keep = offs_n >= 0
    n_end = Lk
    if HAS_MASK:
        n_end = _key_end(KM, b, smb, sml, Lk, BLOCK_N)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    for start in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
        if D == BLOCK_D:
            k = tl.load(k_ptrs + start * skl)
            v = tl.load(v_ptrs + start * svl)
        else:
            k = tl.load(k_ptrs + start * skl, mask=dmask[None, :], other=0.0)
            v = tl.load(v_ptrs + start * svl, mask=dmask[None, :], other=0.0)
        if HAS_MASK:
            keep = tl.load(km_ptrs + start * sml) != 0
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, qk_scale, keep, keep, HAS_MASK, False, DOT_F32)
    if n_full < n_end:  # the partial last tile (n_end = Lk here): bounds-checked, -inf scores past Lk
        inb = (n_full + offs_n) < Lk
        k = tl.load(k_ptrs + n_full * skl, mask=inb[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_ptrs + n_full * svl, mask=inb[:, None] & dmask[None, :], other=0.0)
        if HAS_MASK:
            keep = tl.load(km_ptrs + n_full * sml, mask=inb, other=0) != 0
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, qk_scale, keep, inb, HAS_MASK, True, DOT_F32)
    out = acc / l_i[:, None]
    if DOT_F32:
        out = rne_bf16(out)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=(offs_m < Lq)[:, None] & dmask[None, :])


@triton.jit
def _attn_fwd_tma(Qd, Kd, Vd, Od, KM, qk_scale, B, Lq, Lk, H,
                  sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, smb, sml,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                  DOT_F32: tl.constexpr, WS: tl.constexpr, DEVICE_DESC: tl.constexpr, PIPE: tl.constexpr):
    # descriptors view the (B, L, H, D) tensors with boxes [1, BLOCK, 1, D]; rows past L read as zeros and
    # are dropped on store, so only the scores of the last key tile need masking
    if DEVICE_DESC:  # Q, K, V, O are pointers: build the descriptors here (scratch from triton's allocator)
        q_desc = tl.make_tensor_descriptor(Qd, [B, Lq, H, D], [sqb, sql, sqh, 1], [1, BLOCK_M, 1, D])
        k_desc = tl.make_tensor_descriptor(Kd, [B, Lk, H, D], [skb, skl, skh, 1], [1, BLOCK_N, 1, D])
        v_desc = tl.make_tensor_descriptor(Vd, [B, Lk, H, D], [svb, svl, svh, 1], [1, BLOCK_N, 1, D])
        o_desc = tl.make_tensor_descriptor(Od, [B, Lq, H, D], [sob, sol, soh, 1], [1, BLOCK_M, 1, D])
    else:
        q_desc, k_desc, v_desc, o_desc = Qd, Kd, Vd, Od
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    q = q_desc.load([b, m0, h, 0]).reshape(BLOCK_M, D)
    km_ptrs = KM + b.to(tl.int64) * smb + offs_n * sml
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    keep = offs_n >= 0
    n_end = Lk
    if HAS_MASK:
        n_end = _key_end(KM, b, smb, sml, Lk, BLOCK_N)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    if PIPE and n_full > 0:
        # software pipeline: the scores of tile j+1 are issued to the tensor cores before the softmax
        # of tile j, so the asynchronous wgmma overlaps the exp2 work (as FlashAttention-3 does)
        qk = _scores(q, k_desc.load([b, 0, h, 0]).reshape(BLOCK_N, D), DOT_F32)
        for start in tl.range(BLOCK_N, n_full, BLOCK_N):
            qk_next = _scores(q, k_desc.load([b, start, h, 0]).reshape(BLOCK_N, D), DOT_F32)
            v = v_desc.load([b, start - BLOCK_N, h, 0]).reshape(BLOCK_N, D)
            if HAS_MASK:
                keep = tl.load(km_ptrs + (start - BLOCK_N) * sml) != 0
            acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, qk, v, qk_scale, keep, keep, HAS_MASK, False, DOT_F32)
            qk = qk_next
        v = v_desc.load([b, n_full - BLOCK_N, h, 0]).reshape(BLOCK_N, D)
        if HAS_MASK:
            keep = tl.load(km_ptrs + (n_full - BLOCK_N) * sml) != 0
        acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, qk, v, qk_scale, keep, keep, HAS_MASK, False, DOT_F32)
    else:
        for start in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
            k = k_desc.load([b, start, h, 0]).reshape(BLOCK_N, D)
            v = v_desc.load([b, start, h, 0]).reshape(BLOCK_N, D)
            if HAS_MASK:
                keep = tl.load(km_ptrs + start * sml) != 0
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, qk_scale, keep, keep, HAS_MASK, False, DOT_F32)
    if n_full < n_end:
        inb = (n_full + offs_n) < Lk
        k = k_desc.load([b, n_full, h, 0]).reshape(BLOCK_N, D)
        v = v_desc.load([b, n_full, h, 0]).reshape(BLOCK_N, D)
        if HAS_MASK:
            keep = tl.load(km_ptrs + n_full * sml, mask=inb, other=0) != 0
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, qk_scale, keep, inb, HAS_MASK, True, DOT_F32)
    out = acc / l_i[:, None]
    if DOT_F32:
        out = rne_bf16(out)
    o_desc.store([b, m0, h, 0], out.to(q.dtype).reshape(1, BLOCK_M, 1, D))


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


SHORT_LQ = 4096  # query lengths up to this use the short-sequence tiles (default_config)


def default_config(head_dim: int, lq: int, device: torch.device) -> AttnConfig:
    """Launch parameters measured best on the H100 (bench/bench_ops.py; docs/kernels.md). At 32760 tokens
    (--sweep): head dim 128: 128 x 128 tiles, 8 warps, 3 stages, 558 TFLOP/s; head dim 64: 128 x 64, 458.
    Short query sequences (lq <= 4096, e.g. bbf-s at 720p: 3600 tokens, 5 heads of 64) leave 128-row tiles
    at about one wave of the GPU's SMs; there 64 x 64 tiles, 4 warps, 3 stages measured 289 vs 227 TFLOP/s
    at batch 1 and 383 vs 351 at batch 4 (--only player, ops-player-h100.jsonl). 4096-32760 is unmeasured."""
    if head_dim <= 64 and lq <= SHORT_LQ:
        cfg = AttnConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    elif head_dim <= 64:
        cfg = AttnConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    else:
        cfg = AttnConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    if device.type == "cuda" and _capability(device)[0] < 9:
        cfg = replace(cfg, loader="pointer")
    return cfg


def _tma_ok(*ts: torch.Tensor) -> bool:
    for t in ts:
        es = t.element_size()
        # storage_offset, not data_ptr: fake tensors under torch.compile have no address; allocations
        # themselves are at least 256-byte aligned
        if t.stride(-1) != 1 or (t.storage_offset() * es) % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _tracing(t: torch.Tensor) -> bool:
    """True under torch.compile / export tracing (fake or functional tensors), where host descriptors,
    whose tensors the tracer cannot see, are not allowed."""
    from torch._subclasses.fake_tensor import is_fake  # also sees through functional wrappers

    return is_fake(t)


_allocator_set = False


def _ensure_allocator() -> None:
    """In-kernel descriptors need a little global scratch per program; Triton asks its allocator for it.
    Inductor installs its own in compiled code; eager launches use the torch caching allocator."""
    global _allocator_set
    if not _allocator_set and hasattr(triton, "set_allocator"):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_set = True


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
           cfg: AttnConfig | None = None) -> torch.Tensor:
    """Run the kernel with launch parameters `cfg` (default: default_config). Shapes as `attention`."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    cfg = cfg or default_config(D, Lq, q.device)
    if cfg.loader not in LOADERS:
        raise ValueError(f"attention: loader {cfg.loader!r}; allowed: {LOADERS}")
    block_d = triton.next_power_of_2(D)
    bn = min(cfg.block_n, max(16, triton.next_power_of_2(Lk)))
    bm = cfg.block_m
    has_mask = key_mask is not None
    km = key_mask if has_mask else q  # dummy pointer, never read
    smb, sml = (key_mask.stride(0), key_mask.stride(1)) if has_mask else (0, 0)
    dot_f32 = INTERPRET and q.dtype == torch.bfloat16
    grid = (triton.cdiv(Lq, bm), B * H)
    qk_scale = scale * LOG2E
    common = dict(BLOCK_M=bm, BLOCK_N=bn, HAS_MASK=has_mask, DOT_F32=dot_f32, WS=cfg.warp_specialize,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.loader != "pointer" and block_d == D and _tma_ok(q, k, v):
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], smb, sml)
        if cfg.loader == "tma_host" and TensorDescriptor is not None and not _tracing(q):
            args = [TensorDescriptor.from_tensor(t, [1, blk, 1, D]) for t, blk in ((q, bm), (k, bn), (v, bn), (out, bm))]
            device_desc = False
        else:
            if not INTERPRET:
                _ensure_allocator()
            args, device_desc = [q, k, v, out], True
        wrap_triton(_attn_fwd_tma)[grid](*args, km, qk_scale, B, Lq, Lk, H, *strides, D=D,
                                         DEVICE_DESC=device_desc, PIPE=cfg.pipeline, **common)
        return out
    wrap_triton(_attn_fwd_ptr)[grid](
        q, k, v, out, km, qk_scale, Lq, Lk, H,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3], smb, sml, D=D, BLOCK_D=block_d, **common)
    return out


def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    return launch(q, k, v, key_mask, scale)


def _attention_fake(q, k, v, key_mask, scale):
    return q.new_empty(q.shape)


_op = register_op("attention", _attention_op, _attention_fake)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    """Raise ValueError naming the argument if the kernel cannot take these inputs."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be (B, L, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, _, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, Lk, H={H}, D={D})")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: dtypes {q.dtype}, {k.dtype}, {v.dtype}; allowed: all bfloat16 or all float16")
    if not 16 <= D <= 256 or D % 8:
        raise ValueError(f"attention: head dim {D}; allowed: a multiple of 8 in [16, 256]")
    if k.shape[1] < 1:
        raise ValueError("attention: Lk must be at least 1 (a fully masked row still needs keys to average)")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, k.shape[1])):
        raise ValueError(f"attention: key_mask {key_mask.dtype} {tuple(key_mask.shape)}; allowed: bool (B={B}, Lk={k.shape[1]})")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, keys masked by key_mask) v, as kernels/attention/reference.py.

    q: (B, Lq, H, D); k, v: (B, Lk, H, D), bf16 or fp16, any strides; key_mask: (B, Lk) bool, True =
    attend. Returns (B, Lq, H, D) contiguous in q's dtype; fp32 softmax and accumulation.
    """
    check_inputs(q, k, v, key_mask)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _op(q, k, v, key_mask, s)

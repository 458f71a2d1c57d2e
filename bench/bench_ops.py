"""Benchmark the fused ops on the GPU against PyTorch, one JSONL row per measurement.

    python bench/bench_ops.py --out bench/results/ops-h100.jsonl [--sweep] [--quick] [--git-sha SHA]

Shapes come from the model presets: attention with the presets' heads and head dims at 1560 to 75600
tokens (Wan2.1's 81-frame 480p clip is 21 latent frames x 1560 tokens = 32760; 720p is 21 x 3600 = 75600)
against PyTorch SDPA's flash and cuDNN backends; the memory-bound ops at 21 frames against the eager
references and the references under torch.compile. The ceilings (a device-to-device copy counting bytes
read plus written, an 8192^3 bf16 matmul) are measured in the same run, and every row carries its error
against the fp32 reference. --sweep times alternative launch configurations of the kernels instead.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from bbf_rt import ops
from bbf_rt.config import get_preset
from bbf_rt.kernels.attention import reference as attn_ref
from bbf_rt.kernels.attention import triton as attn_tt
from bbf_rt.kernels.gated_residual import reference as gr_ref
from bbf_rt.kernels.gated_residual import triton as gr_tt
from bbf_rt.kernels.conv_epilogue import reference as ce_ref
from bbf_rt.kernels.conv_epilogue import triton as ce_tt
from bbf_rt.kernels.group_norm import reference as gn_ref
from bbf_rt.kernels.thin_conv import triton as tc_tt
from bbf_rt.kernels.group_norm import triton as gn_tt
from bbf_rt.kernels.norm_modulate import reference as nm_ref
from bbf_rt.kernels.norm_modulate import triton as nm_tt
from bbf_rt.kernels.rope import reference as rope_ref
from bbf_rt.kernels.rope import triton as rope_tt

DEV = torch.device("cuda")
BF16 = torch.bfloat16
PRESETS = ("bbf-s", "wan-1.3b", "wan-14b")
FRAMES = 21


def timed(fn, rep_ms: float = 100.0) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds per call, replaying a CUDA graph of back-to-back calls after a warm-up
    call (triton.testing.do_bench_cudagraph): no Python launch overhead, as in compiled/graph deployment.
    Falls back to do_bench's event timing where a call cannot be captured."""
    try:
        q = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    except RuntimeError as e:
        print(f"  (graph capture failed: {str(e).splitlines()[0][:120]}; timing with events)")
        torch.cuda.synchronize()
        q = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return float(q[0]), float(q[1]), float(q[2])


def ceilings() -> dict[str, float]:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) on random data."""
    a = torch.randn(1 << 29, device=DEV, dtype=BF16)  # 1 GiB
    b = torch.empty_like(a)
    # the best of a memcpy (graph-captured memcpy nodes measured slower than stream memcpy on the H100)
    # and an elementwise kernel that reads a and writes b
    copies = {"memcpy_graph": timed(lambda: b.copy_(a))[1],
              "memcpy_stream": triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median"),
              "kernel_graph": timed(lambda: torch.mul(a, 1.0, out=b))[1]}
    n = 8192
    x, y = torch.randn(n, n, device=DEV, dtype=BF16), torch.randn(n, n, device=DEV, dtype=BF16)
    mm_ms = timed(lambda: x @ y)[1]
    del a, b, x, y
    out = {f"copy_gbps_{k}": round(2 * (1 << 30) / v / 1e6, 1) for k, v in copies.items()}
    out["copy_gbps"] = max(out.values())
    out["matmul_tflops"] = round(2 * n**3 / mm_ms / 1e9, 1)
    return out


class Rows:
    def __init__(self, path: str | None, meta: dict, ceil: dict) -> None:
        self.f = open(path, "a") if path else None
        self.meta, self.ceil = meta, ceil

    def add(self, name, backend, shape, t, *, flops=None, nbytes=None, err=None, err_ref=None, **extra) -> dict:
        row = dict(name=name, backend=backend, shape=list(shape), dtype="bfloat16",
                   p20_ms=round(t[0], 5), p50_ms=round(t[1], 5), p80_ms=round(t[2], 5))
        if flops is not None:
            row["tflops"] = round(flops / t[1] / 1e9, 1)
            row["pct_of_matmul"] = round(100 * row["tflops"] / self.ceil["matmul_tflops"], 1)
        if nbytes is not None:
            row["gbps"] = round(nbytes / t[1] / 1e6, 1)
            row["pct_of_copy"] = round(100 * row["gbps"] / self.ceil["copy_gbps"], 1)
        row.update(err_max=err, err_ref_max=err_ref, peak_mem_mb=round(torch.cuda.max_memory_allocated() / 2**20), **extra)
        row.update(self.meta, ceilings=self.ceil)
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        perf = f"{row['tflops']:7.1f} TFLOP/s" if flops else f"{row['gbps']:7.1f} GB/s ({row['pct_of_copy']:.0f}%)"
        print(f"{name:28s} {backend:24s} {str(tuple(shape)):28s} {t[1]:9.4f} ms {perf}  err {err}", flush=True)
        return row


def _err(out, oracle) -> float:
    """Max abs error; for ops with several outputs, the largest over them."""
    if isinstance(out, (tuple, list)):
        return max(_err(o, r) for o, r in zip(out, oracle))
    return float(f"{(out.float() - oracle).abs().max().item():.3g}")


# ------------------------------------------------------------------ attention

def _sdpa(backend):
    def run(q, k, v):  # (B, L, H, D) in and out, as the model's layout
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def bench_attention(rows: Rows, lengths, quick: bool) -> None:
    for preset in PRESETS:
        cfg = get_preset(preset)
        H, D = cfg.heads, cfg.head_dim
        for L in lengths:
            torch.cuda.reset_peak_memory_stats()
            qkv = torch.randn(1, L, 3, H, D, device=DEV, dtype=BF16)
            q, k, v = qkv.unbind(2)  # strided views of one fused projection, as in the model
            idx = torch.randperm(L, device=DEV)[:256]
            oracle = attn_ref.attention(q[:, idx].float(), k.float(), v.float())  # fp32 on 256 query rows
            flops = 4 * H * L * L * D
            rep = 100
            cands = {"sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
                     "triton": lambda q, k, v: attn_tt.attention(q, k, v)}  # flash first: its error is err_ref
            ref_err = None
            for name, fn in cands.items():
                try:
                    out = fn(q, k, v)
                except RuntimeError as e:  # a backend that refuses the shape is reported, not fatal
                    print(f"attention {preset} L={L} {name}: unavailable ({str(e).splitlines()[0]})")
                    continue
                err = _err(out[:, idx], oracle)
                ref_err = err if name == "sdpa_flash" else ref_err
                t = timed(lambda: fn(q, k, v), rep_ms=rep)
                rows.add("attention", name, (1, L, H, D), t, flops=flops, err=err, err_ref=ref_err, preset=preset,
                         config=asdict(attn_tt.default_config(D, L, DEV)) if name == "triton" else None)
                del out
            del qkv, q, k, v, oracle
        if quick:
            break


def bench_cross_attention(rows: Rows) -> None:
    """Text cross-attention: 32760 queries, 512 padded text tokens with a key mask."""
    for preset in PRESETS:
        cfg = get_preset(preset)
        H, D, L, Lk = cfg.heads, cfg.head_dim, 32760, 512
        q = torch.randn(1, L, H, D, device=DEV, dtype=BF16)
        kv = torch.randn(1, Lk, 2, H, D, device=DEV, dtype=BF16)
        k, v = kv.unbind(2)
        mask = torch.arange(Lk, device=DEV)[None] < 77  # a 77-token prompt padded to 512
        oracle = attn_ref.attention(q.float(), k.float(), v.float(), mask)
        ref_out = attn_ref.attention(q, k, v, mask)
        ref_err = _err(ref_out, oracle)
        flops = 4 * H * L * Lk * D
        for name, fn in (("triton", lambda: attn_tt.attention(q, k, v, mask)), ("sdpa_masked", lambda: attn_ref.attention(q, k, v, mask))):
            t = timed(fn)
            rows.add("cross_attention", name, (1, L, Lk, H, D), t, flops=flops, err=_err(fn(), oracle), err_ref=ref_err,
                 preset=preset, valid_keys=77, flops_note="4*H*L*Lk*D over all Lk slots")


# ------------------------------------------------------------------ memory-bound ops

def _rotating(make, total_bytes: int = 1 << 28):
    """Several input sets, cycled, so that repeated runs read DRAM rather than the 50 MB L2."""
    first = make(0)
    per = sum(t.numel() * t.element_size() for t in first if torch.is_tensor(t))
    sets = [first] + [make(i) for i in range(1, max(1, math.ceil(total_bytes / per)))]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]
    return sets, nxt


def bench_memory_bound(rows: Rows, lengths, compile_glue: bool, ops: set[str]) -> None:
    for preset in PRESETS:
        cfg = get_preset(preset)
        C, H = cfg.dim, cfg.heads
        for L in lengths:
            torch.cuda.reset_peak_memory_stats()

            def nm_in(i):
                return (torch.randn(1, L, C, device=DEV, dtype=BF16), torch.randn(1, FRAMES, C, device=DEV, dtype=BF16),
                        torch.randn(1, FRAMES, C, device=DEV, dtype=BF16), 1e-6, False)

            def gr_in(i):
                return (torch.randn(1, L, C, device=DEV, dtype=BF16), torch.randn(1, L, C, device=DEV, dtype=BF16),
                        torch.randn(1, FRAMES, C, device=DEV, dtype=BF16))

            def rope_in(i):
                ang = torch.rand(1, L, C // H // 2, device=DEV) * 6
                qkv = torch.randn(1, L, 3 * C, device=DEV, dtype=BF16)
                return (qkv[:, :, :C], torch.rand(C, device=DEV, dtype=BF16) + 0.5, ang.cos(), ang.sin(), H, 1e-6)

            def rnm_in(i):
                return (*gr_in(i), *nm_in(i)[1:])

            def rnm_unfused(x, y, gate, shift, scale, eps, rms):  # what the block ran before the fused kernel
                r = gr_tt.gated_residual(x, y, gate)
                return r, nm_tt.norm_modulate(r, shift, scale, eps, rms)

            e = 2  # bf16 bytes
            specs = [
                ("norm_modulate", nm_in, nm_tt.norm_modulate, nm_ref.norm_modulate, 2 * L * C * e + 2 * FRAMES * C * e),
                ("gated_residual", gr_in, gr_tt.gated_residual, gr_ref.gated_residual, 3 * L * C * e + FRAMES * C * e),
                ("residual_norm_modulate", rnm_in, nm_tt.residual_norm_modulate, nm_ref.residual_norm_modulate,
                 4 * L * C * e + 3 * FRAMES * C * e),
                ("rms_norm_rope", rope_in, rope_tt.rms_norm_rope, rope_ref.rms_norm_rope, 2 * L * C * e + 2 * L * (C // H // 2) * 4 + C * e),
            ]
            for name, make, tt_fn, ref_fn, nbytes in (sp for sp in specs if sp[0] in ops):
                sets, nxt = _rotating(make)
                a = sets[0]
                up = [t.float() if torch.is_tensor(t) and t.dtype == BF16 else t for t in a]
                oracle = ref_fn(*up)
                ref_err = _err(ref_fn(*a), oracle)
                backends = [("triton", tt_fn), ("eager", ref_fn)]
                if name == "residual_norm_modulate":  # the two kernels it replaces (bytes: the fused op's floor)
                    backends.append(("triton-unfused", rnm_unfused))
                if compile_glue and L == lengths[0]:
                    backends.append(("compile", torch.compile(ref_fn, fullgraph=True, dynamic=False)))
                for bname, fn in backends:
                    err = _err(fn(*a), oracle)
                    t = timed(lambda: fn(*nxt()))
                    rows.add(name, bname, (1, L, C), t, nbytes=nbytes, err=err, err_ref=ref_err, preset=preset, frames=FRAMES)
                del sets, a, up, oracle


def bench_group_norm(rows: Rows, compile_glue: bool) -> None:
    """GroupNorm+SiLU at the bbf-s VAE's 720p activations (8 groups; N = 2 boundary frames per clip)."""
    shapes = [(N, C, H, W) for N in (2, 8) for C, H, W in ((32, 720, 1280), (32, 360, 640), (64, 180, 320), (128, 90, 160))]
    for shape in shapes:
        C = shape[1]

        def make(i):
            return (torch.randn(shape, device=DEV, dtype=BF16), torch.rand(C, device=DEV, dtype=BF16) + 0.5,
                    torch.randn(C, device=DEV, dtype=BF16), 8, 1e-6, True)
        sets, nxt = _rotating(make)
        a = sets[0]
        oracle = gn_ref.group_norm_silu(*[t.float() if torch.is_tensor(t) else t for t in a])
        ref_err = _err(gn_ref.group_norm_silu(*a), oracle)
        backends = [("triton", gn_tt.group_norm_silu), ("eager", gn_ref.group_norm_silu)]
        if compile_glue:
            backends.append(("compile", torch.compile(gn_ref.group_norm_silu, fullgraph=True, dynamic=False)))
        nbytes = 2 * a[0].numel() * 2  # the floor: read x once, write once (bf16)
        for bname, fn in backends:
            err = _err(fn(*a), oracle)
            t = timed(lambda: fn(*nxt()))
            rows.add("group_norm_silu", bname, shape, t, nbytes=nbytes, err=err, err_ref=ref_err, preset="bbf-s")
        del sets, a, oracle


def _torch_epilogue(y, b, r):  # what the VAE ran before the kernel: the conv's bias add, then `r + h`
    return r + (y + b.view(1, -1, 1, 1))


def bench_conv_epilogue(rows: Rows, compile_glue: bool, N: int = 4) -> None:
    """The VAE's conv epilogues at the bbf-s decoder's channels-last 720p activations (N = 4 frames):
    bias + residual in one pass, and nearest 2x upsampling, against torch eager (and compiled)."""
    cl = torch.channels_last
    for C, H, W in ((32, 720, 1280), (32, 360, 640), (64, 180, 320), (128, 90, 160)):
        def make(i):
            return (torch.randn(N, C, H, W, device=DEV, dtype=BF16).contiguous(memory_format=cl),
                    torch.randn(C, device=DEV, dtype=BF16),
                    torch.randn(N, C, H, W, device=DEV, dtype=BF16).contiguous(memory_format=cl))
        sets, nxt = _rotating(make)
        a = sets[0]
        oracle = ce_ref.conv_epilogue(*[t.float() for t in a])
        ref_err = _err(_torch_epilogue(*a), oracle)
        backends = [("triton", ce_tt.conv_epilogue), ("eager", _torch_epilogue)]
        if compile_glue:
            backends.append(("compile", torch.compile(_torch_epilogue, fullgraph=True, dynamic=False)))
        for bname, fn in backends:
            err = _err(fn(*a), oracle)
            t = timed(lambda: fn(*nxt()))
            rows.add("conv_epilogue", bname, (N, C, H, W), t, nbytes=3 * a[0].numel() * 2, err=err, err_ref=ref_err,
                     preset="bbf-s", layout="nhwc")
        del sets, a, oracle
        if C == 32 and H == 720:
            continue  # the decoder upsamples into 720p, never from it
        sets, nxt = _rotating(lambda i: (torch.randn(N, C, H, W, device=DEV, dtype=BF16).contiguous(memory_format=cl),))
        up = [("triton", ce_tt.upsample_nearest2x), ("eager", ce_ref.upsample_nearest2x)]
        if compile_glue:
            up.append(("compile", torch.compile(ce_ref.upsample_nearest2x, fullgraph=True, dynamic=False)))
        for bname, fn in up:
            err = _err(fn(*sets[0]), ce_ref.upsample_nearest2x(sets[0][0]).float())
            t = timed(lambda: fn(*nxt()))
            rows.add("upsample_nearest2x", bname, (N, C, H, W), t, nbytes=5 * sets[0][0].numel() * 2, err=err,
                     err_ref=0.0, preset="bbf-s", layout="nhwc")
        del sets


def bench_thin_conv(rows: Rows, N: int = 4) -> None:
    """The VAE's RGB-end 3x3 convs at 720p, channels-last bf16: kernels/thin_conv at a few launch configs
    vs cuDNN (F.conv2d with its bias, as the VAE ran them)."""
    cl = torch.channels_last
    for cin, cout in ((3, 32), (32, 3)):
        def make(i):
            return (torch.randn(N, cin, 720, 1280, device=DEV, dtype=BF16).contiguous(memory_format=cl),
                    (torch.randn(cout, cin, 3, 3, device=DEV, dtype=BF16) * 0.2).contiguous(memory_format=cl),
                    torch.randn(cout, device=DEV, dtype=BF16))
        sets, nxt = _rotating(make)
        a = sets[0]
        oracle = F.conv2d(a[0].float(), a[1].float(), a[2].float(), 1, 1)
        ref_err = _err(F.conv2d(a[0], a[1], a[2], 1, 1), oracle)
        flops = 2 * N * 720 * 1280 * cin * cout * 9
        nbytes = N * 720 * 1280 * (cin + cout) * 2
        backends = [(f"triton_{'taps' if taps else 'im2col'}_bp{bp}_w{w}",
                     lambda x, wt, b, bp=bp, w=w, taps=taps: tc_tt.launch(x, wt, b, bp, w, taps))
                    for taps in (False, True) for bp in (64, 128, 256) for w in (4, 8)]
        backends.append(("cudnn", lambda x, wt, b: F.conv2d(x, wt, b, 1, 1)))
        for bname, fn in backends:
            err = _err(fn(*a), oracle)
            t = timed(lambda: fn(*nxt()))
            rows.add("thin_conv3x3", bname, (N, cin, 720, 1280), t, flops=flops, nbytes=nbytes, err=err, err_ref=ref_err,
                     preset="bbf-s", layout="nhwc", cout=cout)
        del sets, a, oracle


def bench_rope_configs(rows: Rows, L: int = 32760) -> None:
    """rms_norm_rope at launch parameters around its defaults (a small sweep, kept as rows)."""
    for preset in PRESETS:
        cfg = get_preset(preset)
        C, H = cfg.dim, cfg.heads
        _, nxt = _rotating(lambda i: (torch.randn(1, L, 3 * C, device=DEV, dtype=BF16)[:, :, :C],))
        ang = torch.rand(1, L, C // H // 2, device=DEV)
        cs, sn, w16 = ang.cos(), ang.sin(), torch.rand(C, device=DEV, dtype=BF16) + 0.5
        block_p, nchunk, r0, w0 = rope_tt.launch_params(C)
        chunks = (None, 256, 0) if nchunk > 1 else (None,)  # default, narrower chunks, one pass
        for chunk in chunks:
            for r in (1, 2, 4, 8):
                for w in (4, 8):
                    per_row = 2 * (triton.next_power_of_2(C // 2) if chunk == 0 else (chunk or block_p))
                    if not 1024 <= r * per_row <= 16384:
                        continue
                    t = timed(lambda: rope_tt.launch(nxt()[0], w16, cs, sn, H, 1e-6, rows=r, num_warps=w, chunk=chunk))
                    rows.add("rms_norm_rope_config", "triton", (1, L, C), t, nbytes=2 * L * C * 2 + 2 * L * (C // H // 2) * 4,
                             preset=preset, config=dict(rows=r, num_warps=w, chunk_pairs=chunk if chunk is not None else block_p,
                                                        default=(r, w, chunk) == (r0, w0, None)))


# ------------------------------------------------------------------ one DiT block

def bench_block(rows: Rows, L: int = 32760) -> None:
    """One wan-1.3b block at 32760 tokens (21 frames x 30 x 52), backbone only and with a text branch."""
    from bbf_rt.model.dit import Block
    from bbf_rt.model.embed import Rope3D

    cfg = get_preset("wan-1.3b")
    d, f = cfg.dim, cfg.ffn_dim
    torch.manual_seed(0)
    blk = Block(cfg).to(DEV, BF16).eval()
    x = torch.randn(1, L, d, device=DEV, dtype=BF16)
    e = torch.randn(1, FRAMES, 6, d, device=DEV, dtype=BF16) * 0.1
    tau = torch.linspace(0.05, 0.95, FRAMES, device=DEV)[None]
    cos, sin = Rope3D(cfg.rope_split(), cfg.rope_theta, cfg.rope_time_scale)(tau, 30, 52)
    Lt = 512
    text = dict(cond=torch.randn(1, Lt, d, device=DEV, dtype=BF16), key_mask=torch.arange(Lt, device=DEV)[None] < 77,
                present=torch.ones(1, 1, device=DEV))
    blk32 = copy.deepcopy(blk).float()
    text32 = dict(text, cond=text["cond"].float())
    for label, conds, extra in (("backbone", {}, 0), ("text", {"text": text}, 2 * L * (2 * d * d) + 2 * Lt * 2 * d * d + 4 * L * Lt * d)):
        flops = 2 * L * (4 * d * d + 2 * d * f) + 4 * L * L * d + extra
        with torch.no_grad():
            with ops.implementation("reference"):
                oracle = blk32(x.float(), e.float(), cos, sin, {"text": text32} if conds else {})
                ref_err = _err(blk(x, e, cos, sin, conds), oracle)
            for impl in ("triton", "reference"):
                with ops.implementation(impl):
                    out = blk(x, e, cos, sin, conds)
                    t = timed(lambda: blk(x, e, cos, sin, conds))
                floor_ms = flops / (rows.ceil["matmul_tflops"] * 1e9)
                rows.add(f"dit_block_{label}", impl, (1, L, d), t, flops=flops, err=_err(out, oracle), err_ref=ref_err,
                         preset="wan-1.3b", x_floor=round(t[1] / floor_ms, 3))


# ------------------------------------------------------------------ config sweep

SWEEP = [  # (block_m, block_n, num_warps, num_stages, loader, pipeline); run 1 ruled out stages 2/4,
    # warp_specialize (no gain on Hopper) and BLOCK_N 128 with 4 warps at head dim 128
    (128, 128, 8, 3, "tma", False), (128, 128, 8, 3, "tma_host", False), (128, 128, 8, 3, "pointer", False),
    (128, 128, 8, 3, "tma", True), (128, 64, 8, 3, "tma", False), (128, 64, 8, 3, "tma", True),
    (128, 64, 8, 4, "tma", True), (128, 128, 4, 3, "tma", False), (128, 64, 4, 3, "tma", True),
    (256, 64, 8, 2, "tma", False), (256, 64, 8, 3, "tma", True), (128, 64, 8, 3, "tma_host", False),
]


def _try_config(q, k, v, D: int, c, label: str):
    """(output, timing) of the Triton attention under config `c`, or None (printed) where it does not compile."""
    try:
        out = attn_tt.launch(q, k, v, None, D**-0.5, c)
        torch.cuda.synchronize()
    except Exception as ex:  # noqa: BLE001 - a config that does not compile is reported and skipped
        print(f"{label} {c}: failed ({type(ex).__name__}: {str(ex).splitlines()[0][:200]})")
        return None
    return out, timed(lambda: attn_tt.launch(q, k, v, None, D**-0.5, c))


def sweep(rows: Rows, L: int = 32760) -> None:
    for preset in ("wan-1.3b", "bbf-s"):
        cfg = get_preset(preset)
        H, D = cfg.heads, cfg.head_dim
        qkv = torch.randn(1, L, 3, H, D, device=DEV, dtype=BF16)
        q, k, v = qkv.unbind(2)
        idx = torch.randperm(L, device=DEV)[:256]
        oracle = attn_ref.attention(q[:, idx].float(), k.float(), v.float())
        for bm, bn, w, s, loader, pipe in SWEEP:
            c = attn_tt.AttnConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=s, loader=loader, pipeline=pipe)
            if (got := _try_config(q, k, v, D, c, f"sweep {preset}")) is None:
                continue
            out, t = got
            rows.add("attention_sweep", "triton", (1, L, H, D), t, flops=4 * H * L * L * D, err=_err(out[:, idx], oracle),
                     preset=preset, config=asdict(c))
        del qkv, q, k, v
    L = 32760
    for preset in PRESETS:  # memory-bound: rows per program and warps around the defaults
        C, H = get_preset(preset).dim, get_preset(preset).heads
        sets, nxt = _rotating(lambda i: (torch.randn(1, L, C, device=DEV, dtype=BF16), torch.randn(1, L, C, device=DEV, dtype=BF16),
                                         torch.randn(1, FRAMES, C, device=DEV, dtype=BF16)))
        cs = torch.rand(1, L, C // H // 2, device=DEV)
        w16 = torch.ones(C, device=DEV, dtype=BF16)
        bc = triton.next_power_of_2(C)
        for r in (1, 2, 4, 8, 16):
            for w in (4, 8):
                if r * bc <= 16384 and r * bc >= 1024:
                    t = timed(lambda: nm_tt.launch(nxt()[0], sets[0][2], sets[0][2], 1e-6, False, rows=r, num_warps=w))
                    rows.add("norm_modulate_sweep", "triton", (1, L, C), t, nbytes=4 * L * C, preset=preset,
                             config=dict(rows=r, num_warps=w))
                    t = timed(lambda: rope_tt.launch(nxt()[0], w16, cs, cs, H, 1e-6, rows=r, num_warps=w))
                    rows.add("rms_norm_rope_sweep", "triton", (1, L, C), t, nbytes=4 * L * C, preset=preset,
                             config=dict(rows=r, num_warps=w))
                if r * 512 <= 16384:
                    t = timed(lambda: gr_tt.launch(*nxt(), rows=r * 2, num_warps=w))
                    rows.add("gated_residual_sweep", "triton", (1, L, C), t, nbytes=6 * L * C, preset=preset,
                             config=dict(rows=r * 2, num_warps=w))
        del sets


PLAYER_SWEEP = [  # (block_m, block_n, num_warps, num_stages): short sequences, few (batch, head) pairs
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 4, 3),
    (64, 64, 8, 3),
]


def bench_player(rows: Rows, L: int = 3600, heads: int = 5, dim: int = 320, ffn: int = 1280) -> None:
    """The shipped bbf-s at 720p (3600 tokens, 5 heads of 64, FFN 320 -> 1280), batch 1 and 4: attention
    launch configurations and SDPA, and the FFN's first GEMM + GELU fused (cuBLASLt epilogue) or not."""
    from bbf_rt import ops

    D = dim // heads
    for B in (1, 4):
        qkv = torch.randn(B, L, 3, heads, D, device=DEV, dtype=BF16)
        q, k, v = qkv.unbind(2)
        idx = torch.randperm(L, device=DEV)[:256]
        oracle = attn_ref.attention(q[:, idx].float(), k.float(), v.float())
        flops = 4 * B * heads * L * L * D
        shape = (B, L, heads, D)
        for name, fn in (("sdpa_flash", _sdpa(SDPBackend.FLASH_ATTENTION)), ("sdpa_cudnn", _sdpa(SDPBackend.CUDNN_ATTENTION))):
            try:
                out = fn(q, k, v)
            except RuntimeError as e:
                print(f"player attention {name}: unavailable ({str(e).splitlines()[0]})")
                continue
            rows.add("player_attention", name, shape, timed(lambda: fn(q, k, v)), flops=flops, err=_err(out[:, idx], oracle),
                     preset="bbf-s (shipped)")
        for bm, bn, w, st in PLAYER_SWEEP:
            c = attn_tt.AttnConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            if (got := _try_config(q, k, v, D, c, "player sweep")) is None:
                continue
            out, t = got
            rows.add("player_attention", "triton", shape, t, flops=flops, err=_err(out[:, idx], oracle),
                     preset="bbf-s (shipped)", config=asdict(c))
        out = attn_tt.attention(q, k, v)
        rows.add("player_attention", "triton_default", shape, timed(lambda: attn_tt.attention(q, k, v)), flops=flops,
                 err=_err(out[:, idx], oracle), preset="bbf-s (shipped)",
                 config=asdict(attn_tt.default_config(D, L, DEV)))
        del qkv, q, k, v
        x = torch.randn(B * L, dim, device=DEV, dtype=BF16)
        w = torch.randn(ffn, dim, device=DEV, dtype=BF16) * dim**-0.5
        b = torch.randn(ffn, device=DEV, dtype=BF16) * 0.1
        oracle = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
        plain = lambda: F.gelu(F.linear(x, w, b), approximate="tanh")  # noqa: E731
        fused = lambda: ops.linear_gelu(x, w, b)  # noqa: E731
        ref_err = _err(plain(), oracle)
        gflop = 2 * B * L * dim * ffn
        for name, fn in (("linear_then_gelu", plain), ("linear_gelu_epilogue", fused)):
            rows.add("player_ffn_up", name, (B * L, dim, ffn), timed(fn), flops=gflop, err=_err(fn(), oracle), err_ref=ref_err,
                     preset="bbf-s (shipped)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="append JSONL rows to this file")
    p.add_argument("--sweep", action="store_true", help="time kernel launch configurations instead")
    p.add_argument("--quick", action="store_true", help="one preset, short lengths (a smoke run)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd glue baselines")
    p.add_argument("--git-sha", default="unknown")
    p.add_argument("--only", default="attention,cross,memory,group_norm,conv_epilogue,rope_configs,block,player",
                   help="comma-separated sections to run (default: all)")
    p.add_argument("--ops", default="norm_modulate,gated_residual,residual_norm_modulate,rms_norm_rope",
                   help="memory-bound ops to run")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops: needs a CUDA GPU", file=sys.stderr)
        return 2
    ceil = ceilings()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), git_sha=a.git_sha)
    print(f"ceilings: copy {ceil['copy_gbps']:.0f} GB/s, bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s on {meta['gpu']}")
    rows = Rows(a.out, meta, ceil)
    if a.sweep:
        sweep(rows)
        return 0
    only = set(a.only.split(","))
    lengths = (1560, 8190) if a.quick else (1560, 8190, 32760, 75600)
    if "attention" in only:
        bench_attention(rows, lengths, a.quick)
    if "cross" in only:
        bench_cross_attention(rows)
    if "memory" in only:
        bench_memory_bound(rows, (32760, 75600), compile_glue=not a.no_compile, ops=set(a.ops.split(",")))
    if "group_norm" in only:
        bench_group_norm(rows, compile_glue=not a.no_compile)
    if "conv_epilogue" in only:
        bench_conv_epilogue(rows, compile_glue=not a.no_compile)
        bench_thin_conv(rows)
    if "rope_configs" in only:
        bench_rope_configs(rows)
    if "block" in only:
        bench_block(rows)
    if "player" in only:
        bench_player(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

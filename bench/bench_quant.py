"""FP8 linear layers and 8-bit attention against bf16 on the GPU, one JSONL row per measurement.

    PYTHONPATH=. python bench/bench_quant.py --out bench/results/quant-h100.jsonl [--only gemm,norm,attention,dit]

Shapes are wan-1.3b's (dim 1536, FFN 8960, 12 heads of 128) at 32760 tokens (21 latent frames x 30 x 52,
Wan2.1's 81-frame 480p clip), with a 512-slot text prompt (77 valid tokens):
- gemm: every linear of one block (self-attention qkv/o, text branch q/kv/o, FFN in/out) in bf16
  (F.linear; the FFN's second one with its GELU pass) and in FP8 (Triton row quantiser + cuBLAS
  row-scaled FP8 GEMM, fast_accum on and off, and the GEMM alone on pre-quantised rows); quality as
  relative L2 error and cosine against the fp32 product of the same bf16 inputs.
- norm: norm_modulate -> quantise (two passes) against the fused norm_modulate_fp8 (one pass).
- attention: SDPA flash / cuDNN, our bf16 Triton kernel, int8 QK with bf16 PV, int8 QK with FP8 PV (and
  a few int8 launch configs), TFLOP/s = 4 L^2 H D / t; error against fp32 attention on 256 sampled
  queries, for Gaussian q, k, v and for K carrying a per-channel offset (what K smoothing is for).
- dit: one whole DiT forward (preset wan-1.3b, depth 4 via dataclasses.replace, random weights with
  non-zero branch gates) in bf16, bf16 + int8 attention, fp8, fp8 + int8, fp8 + int8-fp8: time and the
  output's PSNR (20 log10(range / RMSE)) against the bf16 output and against an fp32 forward.
Times: CUDA-graph replays of back-to-back calls (events around each replay; plain event-timed calls
where capture fails), p20/p50/p80 over the samples after warm-up. Each measurement is guarded: a
failure writes an error row and the rest goes on. About 2-3 minutes on an H100.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from bbf_rt import ops
from bbf_rt.config import get_preset
from bbf_rt.kernels.attention import reference as attn_ref
from bbf_rt.runtime.quant import quantize_model

DEV = torch.device("cuda")
BF16 = torch.bfloat16
FRAMES, HT, WT = 21, 30, 52  # latent frames, tokens per frame = 30 x 52 = 1560
L = FRAMES * HT * WT  # 32760
TEXT, TEXT_VALID = 512, 77


# ------------------------------------------------------------------ timing, rows

def timed(fn, target_ms: float = 8.0, samples: int = 10) -> tuple[tuple[float, float, float], str]:
    """((p20, p50, p80) ms per call, "graph" | "events"). A sample is one replay of a CUDA graph of n
    back-to-back calls (n so that a sample takes ~target_ms), timed with events and divided by n."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    n = max(1, min(50, int(target_ms / max(a.elapsed_time(b), 1e-3))))
    mode = "graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        run = graph.replay
    except Exception as e:  # noqa: BLE001 - not capturable: time eager calls instead, and say so
        print(f"  (graph capture failed: {str(e).splitlines()[0][:120]}; timing eager calls)")
        torch.cuda.synchronize()
        mode = "events"

        def run():
            for _ in range(n):
                fn()
    run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(samples):
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / n)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return (q(0.2), q(0.5), q(0.8)), mode


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(f"{((out.float() - ref.float()).norm() / ref.float().norm()).item():.4g}")


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(f"{F.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0).item():.7f}")


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float | None:
    """20 log10(range(ref) / RMSE) in dB; None for identical tensors (JSON has no infinity)."""
    rmse = (out.float() - ref.float()).pow(2).mean().sqrt().item()
    rng = (ref.max() - ref.min()).float().item()
    return None if rmse == 0 else round(20 * math.log10(rng / rmse), 2)


class Rows:
    def __init__(self, path: str | None, meta: dict) -> None:
        self.f = open(path, "a") if path else None
        self.meta, self.ceil = meta, {}

    def _write(self, row: dict) -> None:
        row.update(self.meta, ceilings=self.ceil)
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def add(self, name, backend, shape, t, mode, *, flops=None, nbytes=None, ceiling="bf16_matmul_tflops", **extra) -> dict:
        row = dict(name=name, backend=backend, shape=list(shape), dtype="bfloat16", p20_ms=round(t[0], 5),
                   p50_ms=round(t[1], 5), p80_ms=round(t[2], 5), timing=mode)
        if flops is not None:
            row["tflops"] = round(flops / t[1] / 1e9, 1)
            if self.ceil.get(ceiling):
                row[f"pct_of_{ceiling}"] = round(100 * row["tflops"] / self.ceil[ceiling], 1)
        if nbytes is not None:
            row["gbps"] = round(nbytes / t[1] / 1e6, 1)
        row.update(extra, peak_mem_mb=round(torch.cuda.max_memory_allocated() / 2**20))
        self._write(row)
        perf = f"{row['tflops']:7.1f} TFLOP/s" if flops else (f"{row['gbps']:7.1f} GB/s" if nbytes else "")
        errs = {k: v for k, v in extra.items() if k.startswith(("rel_err", "cos", "psnr"))}
        print(f"{name:24s} {backend:26s} {str(tuple(shape)):26s} {t[1]:9.4f} ms {perf}  {errs}", flush=True)
        return row

    def error(self, name: str, backend: str, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"[:800]
        print(f"{name:24s} {backend:26s} ERROR {msg.splitlines()[0] if msg else ''}", flush=True)
        traceback.print_exc(limit=3)
        self._write(dict(name=name, backend=backend, error=msg))
        torch.cuda.synchronize()


def ceilings(rows: Rows) -> None:
    """bf16 and FP8 (row-scaled, fast accumulation) 8192^3 matmul TFLOP/s, measured in this run."""
    from bbf_rt.kernels.fp8_linear import triton as fp8_tt

    n = 8192
    x, y = torch.randn(n, n, device=DEV, dtype=BF16), torch.randn(n, n, device=DEV, dtype=BF16)
    try:
        rows.ceil["bf16_matmul_tflops"] = round(2 * n**3 / timed(lambda: x @ y)[0][1] / 1e9, 1)
    except Exception as e:  # noqa: BLE001
        rows.error("ceiling", "bf16_matmul", e)
    try:
        x8, y8 = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn)
        sa, sb = torch.ones(n, device=DEV), torch.ones(n, device=DEV)
        rows.ceil["fp8_matmul_tflops"] = round(
            2 * n**3 / timed(lambda: fp8_tt.scaled_mm(x8, sa, y8, sb, None, BF16, True))[0][1] / 1e9, 1)
    except Exception as e:  # noqa: BLE001
        rows.error("ceiling", "fp8_matmul", e)
    print(f"ceilings: {rows.ceil}")


# ------------------------------------------------------------------ the block's GEMMs

def activations(M: int, K: int, seed: int) -> torch.Tensor:
    """Gaussian rows with every 64th channel x8: the few large channels DiT activations carry."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(M, K, device=DEV, generator=g)
    x[:, ::64] *= 8
    return x.to(BF16)


def bench_gemms(rows: Rows) -> None:
    from bbf_rt.kernels.fp8_linear import reference as fp8_ref
    from bbf_rt.kernels.fp8_linear import triton as fp8_tt

    cfg = get_preset("wan-1.3b")
    d, f, b = cfg.dim, cfg.ffn_dim, cfg.branch_width
    gemms = [("qkv", L, d, 3 * d, False), ("o", L, d, d, False), ("text_q", L, d, b, False),
             ("text_kv", TEXT, d, 2 * b, False), ("text_o", L, b, d, False), ("ffn_in", L, d, f, False),
             ("ffn_out", L, f, d, True)]
    totals: dict[str, float] = {}
    for i, (name, M, K, N, gelu) in enumerate(gemms):
        try:
            x = activations(M, K, seed=i)
            g = torch.Generator(device=DEV).manual_seed(100 + i)
            w = (torch.randn(N, K, device=DEV, generator=g) / K**0.5).to(BF16)
            bias = (torch.randn(N, device=DEV, generator=g) * 0.02).to(BF16)
            xin = F.gelu(x.float(), approximate="tanh") if gelu else x.float()
            oracle = torch.addmm(bias.float(), xin, w.float().t())  # fp32, TF32 off
            del xin
            w8, ws = fp8_ref.quantize_weight(w)
            q, s = fp8_tt.quantize_rows(x, gelu)
        except Exception as e:  # noqa: BLE001
            rows.error(f"gemm_{name}", "setup", e)
            continue
        cands = {
            "bf16": lambda: F.linear(F.gelu(x, approximate="tanh") if gelu else x, w, bias),
            "fp8": lambda: fp8_tt.fp8_linear(x, w8, ws, bias, gelu=gelu, fast_accum=True),
            "fp8_accurate_accum": lambda: fp8_tt.fp8_linear(x, w8, ws, bias, gelu=gelu, fast_accum=False),
            "fp8_gemm_only": lambda: fp8_tt.scaled_mm(q, s, w8, ws, bias, BF16, True),
        }
        for backend, fn in cands.items():
            try:
                out = fn()
                t, mode = timed(fn)
                rows.add(f"gemm_{name}", backend, (M, K, N), t, mode, flops=2 * M * K * N,
                         ceiling="fp8_matmul_tflops" if backend != "bf16" else "bf16_matmul_tflops",
                         rel_err=rel_err(out, oracle), cos=cosine(out, oracle), preset="wan-1.3b",
                         gelu_in=gelu, note="bf16 includes its GELU pass" if gelu and backend == "bf16" else None)
                totals[backend] = totals.get(backend, 0.0) + t[1]
                del out
            except Exception as e:  # noqa: BLE001
                rows.error(f"gemm_{name}", backend, e)
        try:
            t, mode = timed(lambda: fp8_tt.quantize_rows(x, gelu))
            rows.add(f"quantize_rows_{name}", "triton", (M, K), t, mode, nbytes=M * K * 3 + 4 * M, gelu=gelu,
                     preset="wan-1.3b")
        except Exception as e:  # noqa: BLE001
            rows.error(f"quantize_rows_{name}", "triton", e)
    if "bf16" in totals:
        for backend, ms in totals.items():
            rows._write(dict(name="block_gemms_total", backend=backend, p50_ms=round(ms, 4),
                             speedup_vs_bf16=round(totals["bf16"] / ms, 3), gemms=[gm[0] for gm in gemms],
                             note="sum of the medians of the block's 7 linears"))
        print(f"block GEMMs, sum of medians (ms): { {k: round(v, 3) for k, v in totals.items()} }")


def bench_norm(rows: Rows) -> None:
    from bbf_rt.kernels.fp8_linear import triton as fp8_tt
    from bbf_rt.kernels.norm_modulate import triton as nm_tt

    C = get_preset("wan-1.3b").dim
    x = torch.randn(1, L, C, device=DEV, dtype=BF16)
    shift, scale = (torch.randn(1, FRAMES, C, device=DEV, dtype=BF16) * 0.1 for _ in range(2))
    from bbf_rt.kernels.fp8_linear import reference as fp8_ref

    ref_q, ref_s = fp8_ref.norm_modulate_quantize(x, shift, scale, 1e-6)
    ref = ref_q.float() * ref_s[:, None]
    cands = {
        "norm_modulate_bf16": (lambda: nm_tt.norm_modulate(x, shift, scale, 1e-6), 2 * L * C * 2),
        "norm_modulate+quantize": (lambda: fp8_tt.quantize_rows(nm_tt.norm_modulate(x, shift, scale, 1e-6)),
                                   2 * L * C * 2 + L * C * 3 + 4 * L),
        "norm_modulate_fp8_fused": (lambda: fp8_tt.norm_modulate_fp8(x, shift, scale, 1e-6), L * C * 3 + 4 * L),
    }
    for backend, (fn, nbytes) in cands.items():
        try:
            out = fn()
            extra = {}
            if isinstance(out, tuple):
                extra = dict(rel_err=rel_err(out[0].float() * out[1][:, None], ref))
            t, mode = timed(fn)
            rows.add("norm_modulate_quant", backend, (1, L, C), t, mode, nbytes=nbytes, frames=FRAMES, **extra)
        except Exception as e:  # noqa: BLE001
            rows.error("norm_modulate_quant", backend, e)


# ------------------------------------------------------------------ attention

def bench_attention(rows: Rows, sweep: bool) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bbf_rt.kernels.attention import triton as attn_tt
    from bbf_rt.kernels.int8_attention import triton as i8_tt

    cfg = get_preset("wan-1.3b")
    H, D = cfg.heads, cfg.head_dim
    flops = 4 * H * L * L * D

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return run

    cands = {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
             "triton_bf16": lambda q, k, v: attn_tt.attention(q, k, v),
             "int8_pv_bf16": lambda q, k, v: i8_tt.attention(q, k, v, pv="bf16"),
             "int8_pv_fp8": lambda q, k, v: i8_tt.attention(q, k, v, pv="fp8")}
    g = torch.Generator(device=DEV).manual_seed(0)
    qkv = torch.randn(1, L, 3, H, D, device=DEV, dtype=BF16, generator=g)
    q, k, v = qkv.unbind(2)  # strided views of one fused projection, as in the model
    offset = torch.randn(1, 1, H, D, device=DEV, generator=g) * 2
    k_off = (k.float() + offset).to(BF16)
    idx = torch.randperm(L, device=DEV, generator=g)[:256]
    oracles = {"gaussian": attn_ref.attention(q[:, idx].float(), k.float(), v.float()),
               "k_offset": attn_ref.attention(q[:, idx].float(), k_off.float(), v.float())}
    for backend, fn in cands.items():
        try:
            errs = {}
            for kind, kk in (("gaussian", k), ("k_offset", k_off)):
                out = fn(q, kk, v)
                errs[f"rel_err_{kind}"] = rel_err(out[:, idx], oracles[kind])
                errs[f"cos_{kind}"] = cosine(out[:, idx], oracles[kind])
                del out
            t, mode = timed(lambda: fn(q, k, v))
            rows.add("attention", backend, (1, L, H, D), t, mode, flops=flops, preset="wan-1.3b", **errs)
        except Exception as e:  # noqa: BLE001
            rows.error("attention", backend, e)
    for pv in ("bf16", "fp8"):  # the quantisation passes alone (Q, K (+ V) to 8 bits)
        try:
            bn = i8_tt.block_n_for(D, L)
            t, mode = timed(lambda: i8_tt.quantize(q, k, v, None, D**-0.5, pv == "fp8", bn))
            rows.add("int8_attention_quantize", f"pv_{pv}", (1, L, H, D), t, mode,
                     nbytes=L * H * D * (2 * 2 + 2 * 1) + (L * H * D * 3 if pv == "fp8" else 0))
        except Exception as e:  # noqa: BLE001
            rows.error("int8_attention_quantize", f"pv_{pv}", e)
    if sweep:
        configs = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 128, 8, 4)]
        for pv in ("bf16", "fp8"):
            for c in configs:
                try:
                    fn = lambda: i8_tt.launch(q, k, v, None, D**-0.5, pv == "fp8", c)  # noqa: E731
                    out = fn()
                    t, mode = timed(fn)
                    rows.add("int8_attention_config", f"pv_{pv}", (1, L, H, D), t, mode, flops=flops,
                             config=dict(block_m=c[0], block_n=c[1], num_warps=c[2], num_stages=c[3]),
                             rel_err_gaussian=rel_err(out[:, idx], oracles["gaussian"]))
                except Exception as e:  # noqa: BLE001
                    rows.error("int8_attention_config", f"pv_{pv} {c}", e)


# ------------------------------------------------------------------ one DiT forward

def bench_dit(rows: Rows, depth: int) -> None:
    from bbf_rt.model.dit import build_dit
    from bbf_rt.model.flops import dit_flops

    cfg = dataclasses.replace(get_preset("wan-1.3b"), depth=depth)
    torch.manual_seed(0)
    m32 = build_dit(cfg, device=DEV).eval()
    with torch.no_grad():
        for blk in m32.blocks:  # as if trained: branches contribute (a fresh model's gates are zero)
            for br in blk.branches.values():
                br.gate.copy_(torch.randn_like(br.gate) * 0.3)
    C, h, w = cfg.latent_channels, HT * cfg.patch[0], WT * cfg.patch[1]
    g = torch.Generator(device=DEV).manual_seed(1)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    inputs = dict(x=r(1, FRAMES, C, h, w), sigma=torch.full((1,), 0.7, device=DEV),
                  tau=torch.linspace(0.05, 0.95, FRAMES, device=DEV)[None], z0=r(1, C, h, w), z1=r(1, C, h, w),
                  valid=torch.ones(1, 1, h, w, device=DEV), diff=torch.zeros(1, device=DEV),
                  text=r(1, TEXT, cfg.text_dim), text_mask=torch.arange(TEXT, device=DEV)[None] < TEXT_VALID)
    as16 = {k: (v.to(BF16) if v.is_floating_point() and k not in ("sigma", "tau", "diff") else v) for k, v in inputs.items()}
    flops = dit_flops(cfg, FRAMES, HT * WT, {"text": TEXT})
    with torch.no_grad():
        try:
            oracle = m32(**inputs).float()
        except Exception as e:  # noqa: BLE001
            rows.error("dit_forward", "fp32_oracle", e)
            oracle = None
        m16 = copy.deepcopy(m32).to(BF16)
        del m32
        torch.cuda.empty_cache()
        try:
            mq = quantize_model(copy.deepcopy(m16))
        except Exception as e:  # noqa: BLE001
            rows.error("dit_forward", "quantize_model", e)
            mq = None
        variants = [("bf16", m16, "exact"), ("bf16+int8_attn", m16, "int8"), ("fp8", mq, "exact"),
                    ("fp8+int8_attn", mq, "int8"), ("fp8+int8_attn_fp8pv", mq, "int8-fp8")]
        base = None
        for name, model, attn in variants:
            if model is None:
                continue
            try:
                with ops.attention_mode(attn):
                    out = model(**as16).float()
                    t, mode = timed(lambda: model(**as16), target_ms=1.0, samples=5)
                base = out if name == "bf16" else base
                extra = dict(psnr_vs_bf16_db=psnr(out, base) if base is not None else None,
                             rel_err_vs_bf16=rel_err(out, base) if base is not None else None)
                if oracle is not None:
                    extra.update(psnr_vs_fp32_db=psnr(out, oracle), rel_err_vs_fp32=rel_err(out, oracle),
                                 cos_vs_fp32=cosine(out, oracle))
                rows.add("dit_forward", name, (1, L, cfg.dim), t, mode, flops=flops, preset="wan-1.3b", depth=depth,
                         text_tokens=TEXT, text_valid=TEXT_VALID, attention=attn, fp8_linear=model is mq,
                         weights="random (seeded), branch gates N(0, 0.3)", **extra)
                del out
            except Exception as e:  # noqa: BLE001
                rows.error("dit_forward", name, e)


def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+wip" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="append JSONL rows to this file")
    p.add_argument("--only", default="gemm,norm,attention,dit", help="comma-separated sections (default: all)")
    p.add_argument("--depth", type=int, default=4, help="DiT blocks in the whole-forward section")
    p.add_argument("--no-sweep", action="store_true", help="skip the int8 attention launch configs")
    p.add_argument("--git-sha", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 oracles in fp32
    torch.backends.cudnn.allow_tf32 = False
    meta = dict(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), git_sha=a.git_sha or _git_sha())
    rows = Rows(a.out, meta)
    t0 = time.perf_counter()
    ceilings(rows)
    only = set(a.only.split(","))
    sections = [("gemm", lambda: bench_gemms(rows)), ("norm", lambda: bench_norm(rows)),
                ("attention", lambda: bench_attention(rows, sweep=not a.no_sweep)), ("dit", lambda: bench_dit(rows, a.depth))]
    for name, fn in sections:
        if name not in only:
            continue
        t1 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one section failing must not lose the others
            rows.error(f"section_{name}", "-", e)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(f"[{name}: {time.perf_counter() - t1:.0f} s]")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

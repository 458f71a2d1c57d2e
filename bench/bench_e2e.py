"""End-to-end ablation ladder: eager fp32 -> bf16 -> kernels -> CUDA graphs -> step caching -> FP8, plus peers.

    python bench/bench_e2e.py --out bench/results/e2e-h100.jsonl [--model CKPT] [--scenarios player,wan]
    bbf-rt bench --out ...            (the same script, from a source checkout)
    python bench/plot_e2e.py bench/results/e2e-h100.jsonl   (PNG of the ladder)

Each rung adds one thing to the one before: fp32 (eager, reference ops = aten + SDPA: plain PyTorch),
bf16 (the "PyTorch eager" peer), kernels (bbf_rt.ops Triton), graphs (one CUDA graph per step),
step-cache (TeaCache-style skipping, --step-cache T), fp8 (bbf_rt.runtime.quant when present).

player: bbf-s, --player-size (1280x720) 2x at --batches (1, 4): per clip = VAE-encode batch+1 frames, denoise
  `batch` intervals at tau 1/2, VAE-decode, copy to the host (what a player waits for); per step = the
  sampling loop / steps; frames/s = generated frames / clip time; PSNR (8-bit RGB) vs eager fp32 on the
  same frames and seed. At the product's 2 steps step caching cannot skip (the first and last step always
  run), so its rung runs at --cache-steps (20) next to the graphs rung at those steps; its row also gives
  the probe + host-sync overhead per step (a threshold that never skips). A `Player.push` latency row
  follows. Peers: torch.compile (mode default) of the bf16 DiT, and RIFE (bbf_rt.peers) when installed.
wan: the wan-1.3b DiT at --wan-latent (21x60x104 = 480p x 81 frames, 32,760 tokens) with text (--wan-text
  tokens) + audio guidance = 3 batched passes, --wan-steps (50) steps. Per step = one guided call timed;
  clip = steps x per step, extrapolated (stated in each row; the Wan VAE is external, not timed). Quality:
  PSNR of one guided step's velocity vs fp32 (--wan-fp32; an fp32 step is an estimated ~20 s) or else bf16 eager.
  Step caching: DiT calls and latent PSNR come from a full --wan-steps run at --wan-cache-frames latent
  frames (same weights, threshold, solver); its clip = calls x the graphs step + probes, extrapolated.

Random weights unless --model (player only; no trained Wan-shape model exists): those rows measure speed,
and their PSNR measures the runtime's numerical error, not the model's quality. Every measurement is
guarded: a failure writes an error row and the run goes on (exit status 1 if any). --budget-s: a
measurement that would start after the budget writes a skipped row instead. Timing: median of --reps
after --warmup, CUDA events on the GPU (perf_counter on the CPU).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import math
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bbf_rt import ops
from bbf_rt.config import RuntimeConfig, get_preset
from bbf_rt.model import BBFModel, load_model
from bbf_rt.model.dit import build_dit
from bbf_rt.model.flops import dit_flops
from bbf_rt.runtime import sampler
from bbf_rt.runtime.engine import Conditions, DenoiseJob, Engine, resolve_device
from bbf_rt.runtime.graphs import CUDAGraphDenoiser
from bbf_rt.runtime.stepcache import FirstBlockProbe, StepCache, relative_l1

REPO = Path(__file__).resolve().parent.parent


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


def _times(fn, dev: torch.device, warmup: int, reps: int) -> list[float]:
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


def _pct(ts: list[float], q: float) -> float:
    return ts[min(len(ts) - 1, int(q * len(ts)))]


def _stats(ts: list[float]) -> dict:
    return {"p20_ms": _pct(ts, 0.2), "p50_ms": _pct(ts, 0.5), "p80_ms": _pct(ts, 0.8), "reps": len(ts)}


def _psnr(a: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, peak: float | None = None) -> float | None:
    """PSNR in dB, fp64; peak 255 for uint8, else the reference's range (max - min). 99 = identical;
    None when either side is not finite (random weights can overflow), so NaN never reads as a score."""
    a64, r64 = (torch.as_tensor(np.asarray(t) if isinstance(t, np.ndarray) else t.detach().cpu()).double() for t in (a, ref))
    if peak is None:
        peak = 255.0 if isinstance(ref, np.ndarray) and ref.dtype == np.uint8 else float(r64.max() - r64.min())
    mse = float(((a64 - r64) ** 2).mean())
    if not (math.isfinite(mse) and math.isfinite(peak)):
        return None
    return 99.0 if mse == 0 else min(99.0, 10 * math.log10(peak**2 / mse))


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def _frames(n: int, H: int, W: int, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8: a smooth random texture panning 4 px per frame (no scene cuts)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, H // 16 + 2, (W + 4 * n) // 16 + 2, generator=g)
    tex = F.interpolate(base, size=(H, W + 4 * n), mode="bicubic", align_corners=False).clamp(0, 1)
    frames = torch.stack([tex[0, :, :, 4 * k : 4 * k + W] for k in range(n)])
    return (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def _fp8_unavailable() -> str | None:
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


def _unavailable(rung: Rung, dev: torch.device) -> str | None:
    if dev.type != "cuda" and rung.name in ("kernels", "graphs"):
        return f"rung {rung.name!r} needs CUDA (Triton kernels / CUDA graphs); device is {dev}"
    if rung.fp8:
        return _fp8_unavailable()
    return None


def _effective(rung: Rung, dev: torch.device) -> Rung:
    """On the CPU the later rungs run without Triton and CUDA graphs (the row says so)."""
    return rung if dev.type == "cuda" else dataclasses.replace(rung, ops="reference", graphs=False)


def _rung_fields(r: Rung, threshold: float) -> dict:
    return {"rung": r.name, "dtype": str(r.dtype).removeprefix("torch."), "ops": r.ops, "cuda_graphs": r.graphs,
            "step_cache": threshold if r.cache else 0.0, "fp8": r.fp8}


def _flops_fields(flops: float, step_ms: float, ceiling: float | None) -> dict:
    tf = flops / (step_ms * 1e-3) / 1e12
    return {"gflop_per_step": flops / 1e9, "tflops": tf, "ceiling_tflops": ceiling,
            "pct_ceiling": 100 * tf / ceiling if ceiling else None}


def matmul_ceiling(dev: torch.device) -> float | None:
    """bf16 8192^3 matmul TFLOP/s on this GPU (the ceiling for % of peak); None on the CPU."""
    if dev.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ts = _times(lambda: a @ a, dev, 3, 10)
    return 2 * 8192**3 / (_pct(ts, 0.5) * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------- player case


class PlayerCase:
    """bbf-s 2x at one size: the ladder per batch, step caching at --cache-steps, Player latency, peers."""

    def __init__(self, a: argparse.Namespace, dev: torch.device, rows: Rows, ceiling: float | None) -> None:
        self.a, self.dev, self.rows, self.ceiling = a, dev, rows, ceiling
        self.W, self.H = a.player_size
        self.frames = _frames(max(a.batches) + 1, self.H, self.W)
        self.weights = a.model or f"random ({a.player_preset}, seed 0)"
        torch.manual_seed(0)
        fp32 = load_model(a.model, device=dev) if a.model else BBFModel(get_preset(a.player_preset)).to(dev).eval()
        self.models = {torch.float32: fp32, torch.bfloat16: copy.deepcopy(fp32).to(torch.bfloat16)}
        self.cfg = fp32.cfg
        self.refs: dict[tuple[int, int], np.ndarray] = {}  # (batch, steps) -> eager fp32 output

    def base(self, batch: int, steps: int) -> dict:
        m, s = self.cfg.pixel_multiple, self.cfg.vae_stride
        h, w = -(-self.H // m) * m // s, -(-self.W // m) * m // s  # latent size of the padded frames
        return {"name": "e2e", "scenario": "player", "preset": self.cfg.name, "weights": self.weights,
                "shape": {"batch": batch, "size": [self.W, self.H], "steps": steps, "factor": 2, "latent_hw": [h, w],
                          "tokens": (h // 2) * (w // 2)}}

    def _engine(self, r: Rung, steps: int, threshold: float, denoiser=None) -> Engine:
        m = self.models[r.dtype]
        quant = {}
        if r.fp8:  # the engine quantises its model in place (bbf_rt.runtime.quant): give it a copy
            if "fp8" not in self.models:
                self.models["fp8"] = copy.deepcopy(m)
            m, quant = self.models["fp8"], {"fp8_linear": True, "attention": self.a.fp8_attention}
        if denoiser is None and r.graphs:
            denoiser = CUDAGraphDenoiser(m.dit)
        rt = RuntimeConfig(steps=steps, step_cache=threshold if r.cache else 0.0, cuda_graphs=r.graphs, **quant)
        return Engine(m, rt, self.dev, r.dtype, denoiser=denoiser)

    def _clip_fns(self, eng: Engine, batch: int):
        frames = torch.from_numpy(self.frames[: batch + 1]).to(self.dev)
        H, W = self.H, self.W

        def prepare():
            pix = eng.to_pixels(frames)
            lat = eng.encode(pix)
            diff = eng.difference(pix[:-1], pix[1:])
            return [DenoiseJob(key=i, lat0=lat[i], lat1=lat[i + 1], diff=diff[i], taus=[0.5]) for i in range(batch)]

        def clip():
            out = eng.run(prepare(), Conditions(), H, W)
            return eng.decode(torch.stack([o[0] for o in out]), H, W)  # (B, H, W, 3) uint8 on the host

        return prepare, clip

    def reference(self, batch: int, steps: int) -> np.ndarray:
        if (batch, steps) not in self.refs:
            eng = self._engine(LADDER["fp32"], steps, 0.0)
            with torch.no_grad(), ops.implementation("reference"):
                self.refs[(batch, steps)] = self._clip_fns(eng, batch)[1]()
        return self.refs[(batch, steps)]

    def measure(self, r: Rung, batch: int, steps: int, threshold: float = 0.0, denoiser=None) -> dict:
        a, dev = self.a, self.dev
        eng = self._engine(r, steps, threshold, denoiser)
        prepare, clip = self._clip_fns(eng, batch)
        with torch.no_grad(), ops.implementation(r.ops):
            t0 = time.perf_counter()
            out = clip()  # first call: CUDA-graph capture / compilation happen here
            first_s = time.perf_counter() - t0
            jobs = prepare()
            before = dict(eng.cache_stats)
            run_ts = _times(lambda: eng.run(jobs, Conditions(), self.H, self.W), dev, a.warmup, a.reps)
            n_runs = a.warmup + a.reps
            cache = {k: (eng.cache_stats[k] - before[k]) / n_runs for k in before}
            _peak_reset(dev)
            clip_ts = _times(clip, dev, a.warmup, a.reps)
        clip_ms, step_ms = _pct(clip_ts, 0.5), _pct(run_ts, 0.5) / steps
        flops = dit_flops(self.cfg, 1, self.base(batch, steps)["shape"]["tokens"], {}, batch=batch)
        row = {**_rung_fields(r, threshold), **_stats(clip_ts), "timed": "clip", "clip_ms": clip_ms, "per_step_ms": step_ms,
               "frames_per_s": batch / (clip_ms * 1e-3), "display_fps_2x": 2 * batch / (clip_ms * 1e-3),
               "first_call_s": first_s, "peak_mem_gib": _peak_gib(dev),
               **({} if r.cache and threshold > 0 else _flops_fields(flops, step_ms, self.ceiling)),
               "psnr_db": _psnr(out, self.reference(batch, steps)), "quality_ref": "eager fp32, same frames, seed, steps",
               "note": "clip = VAE encode of batch+1 frames + denoise + VAE decode + host copy; per step = sampling loop / steps"}
        if r.cache and threshold > 0 and steps > 2:
            row.update({"dit_calls_per_clip": cache["dit_calls"], "skipped_per_clip": cache["skipped"],
                        "host_syncs_per_clip": cache["syncs"]})
        elif r.cache:
            row["step_cache_note"] = "idle: at <= 2 steps nothing can be skipped (the first and last step always run)"
        return row

    def ladder(self) -> None:
        a, dev, rows = self.a, self.dev, self.rows
        for batch in a.batches:
            for name in a.rungs:
                r = LADDER[name]
                steps = a.cache_steps if r.cache and not r.fp8 else a.player_steps
                base = {**self.base(batch, steps), **_rung_fields(r, a.step_cache)}
                why = _unavailable(r, dev)
                if why:
                    rows.skip(base, why)
                    continue
                eff = _effective(r, dev)
                base.update(_rung_fields(eff, a.step_cache))  # what actually ran (no Triton / graphs on the CPU)
                if r.fp8:
                    rows.guard(base, lambda: {**self.measure(eff, batch, steps, a.step_cache), "attention": a.fp8_attention})
                elif r.cache:
                    self.step_cache_rows(eff, batch, base)
                else:
                    also = {"also": "this rung is the PyTorch eager peer"} if name == "bf16" else {}
                    rows.guard(base, lambda: {**self.measure(eff, batch, steps), **also})
        rows.guard({**self.base(1, a.player_steps), "rung": "player-latency"}, self.player_latency)

    def peers(self) -> None:
        a, rows = self.a, self.rows
        for peer in [p for p in PEERS if p in a.peers]:
            for batch in a.batches:
                base = {**self.base(batch, a.player_steps), "rung": f"peer-{peer}"}
                if peer == "compile":
                    rows.guard(base, lambda: self.compile_peer(batch), est_s=60.0 if batch == a.batches[0] else 20.0)
                else:
                    rows.guard(base, lambda: self.rife_peer(batch))

    def step_cache_rows(self, r: Rung, batch: int, base: dict) -> None:
        """At --cache-steps: the uncached rung below (baseline), the cache, and a never-skipping cache (overhead)."""
        steps, rows = self.a.cache_steps, self.rows
        below = dataclasses.replace(r, name="graphs" if r.graphs else "bf16", cache=False)
        got = rows.guard({**base, **_rung_fields(below, 0.0), "role": "step-cache baseline"}, lambda: self.measure(below, batch, steps))

        def cached() -> dict:
            row = self.measure(r, batch, steps, self.a.step_cache)
            never = self.measure(r, batch, steps, 1e-9)  # same probe and syncs, nothing skipped
            row["probe_overhead_ms_per_step"] = never["per_step_ms"] - got[0]["per_step_ms"] if got else None
            row["speedup_vs_uncached"] = got[0]["clip_ms"] / row["clip_ms"] if got else None
            return row

        rows.guard(base, cached)

    def player_latency(self) -> dict:
        """Player.push latency: encode the new frame, one batch-1 interval (left context 1), decode, copy."""
        from bbf_rt.runtime.player import Player

        a, dev = self.a, self.dev
        rt = RuntimeConfig(steps=a.player_steps, context_frames=1, dtype="bf16", cuda_graphs=dev.type == "cuda")
        player = Player(self.models[torch.bfloat16], 2, runtime=rt, device=str(dev), allow_untrained=True)
        frames = _frames(a.warmup + a.reps + 2, self.H, self.W, seed=1)
        _peak_reset(dev)
        with torch.no_grad(), ops.implementation("auto" if dev.type == "cuda" else "reference"):
            for f in frames:
                player.push(f)
            player.flush()
        ms = sorted(t * 1e3 for t in player.latencies_s[a.warmup + 1 :])  # after the capture and warm-up intervals
        return {**_stats(ms), "timed": "push -> frames", "latency_ms_p50": _pct(ms, 0.5), "latency_ms_p90": _pct(ms, 0.9), "dtype": "bf16",
                "cuda_graphs": rt.cuda_graphs, "frames_per_s": 1e3 / _pct(ms, 0.5), "peak_mem_gib": _peak_gib(dev),
                "note": "Player.push of the frame that completes an interval -> its in-between frame on the host"}

    def compile_peer(self, batch: int) -> dict:
        """torch.compile (mode default) of the bf16 DiT, reference ops (plain PyTorch); compile time apart."""
        if not hasattr(self, "_compiled"):
            self._compiled = torch.compile(self.models[torch.bfloat16].dit)
        r = dataclasses.replace(LADDER["bf16"], name="peer-compile")
        row = self.measure(r, batch, self.a.player_steps, denoiser=self._compiled)
        row["compile_s"] = row.pop("first_call_s")
        row["mode"] = "torch.compile default (no max-autotune), ops reference"
        return row

    def rife_peer(self, batch: int) -> dict:
        from bbf_rt.peers import RIFEPeer, rife_unavailable

        why = rife_unavailable()
        if why:
            return {"skipped": why}
        dev = self.dev
        peer = RIFEPeer(dev, dtype="fp16" if dev.type == "cuda" else "fp32")
        f = torch.from_numpy(self.frames[: batch + 1]).to(dev).permute(0, 3, 1, 2)  # (B+1, 3, H, W) uint8
        clip = lambda: peer.interpolate(f[:-1], f[1:], [0.5]).cpu()  # noqa: E731
        clip()
        _peak_reset(dev)
        ts = _times(clip, dev, self.a.warmup, self.a.reps)
        return {**_stats(ts), "timed": "clip", "clip_ms": _pct(ts, 0.5), "frames_per_s": batch / (_pct(ts, 0.5) * 1e-3),
                "peak_mem_gib": _peak_gib(dev), "peer": peer.describe(), "psnr_db": None,
                "note": "RIFE v4 (trained weights): a different model, so no PSNR vs ours; accuracy in bench_rife.py"}


# ---------------------------------------------------------------------------------------------- wan case


class WanCase:
    """The wan-1.3b DiT at 480p x 81 frames, 3 guidance passes: per-step latency, extrapolated clip."""

    def __init__(self, a: argparse.Namespace, dev: torch.device, rows: Rows, ceiling: float | None) -> None:
        self.a, self.dev, self.rows, self.ceiling = a, dev, rows, ceiling
        self.cfg = get_preset(a.wan_preset)
        self.weights = f"random ({a.wan_preset}, seed 0)"
        self.ref: torch.Tensor | None = None
        self.ref_name = None
        self.step_ms: dict[tuple, float] = {}  # (dtype, ops, graphs, fp8) -> p50 ms of one guided step
        self.cache_calls: int | None = None
        self.dit = None

    def base(self) -> dict:
        Fr, h, w = self.a.wan_latent
        return {"name": "e2e", "scenario": "wan", "preset": self.cfg.name, "weights": self.weights,
                "shape": {"latent": [Fr, h, w], "tokens": Fr * (h // 2) * (w // 2), "text_tokens": self.a.wan_text,
                          "audio_tokens_per_frame": self.cfg.audio_tokens, "cfg_passes": 3, "steps": self.a.wan_steps,
                          "video_frames": self.video_frames}}

    @property
    def video_frames(self) -> int:
        return 4 * (self.a.wan_latent[0] - 1) + 1  # the Wan VAE's temporal stride 4 (first frame alone): 21 -> 81

    def _clip(self, clip_ms: float) -> dict:
        return {"clip_ms": clip_ms, "frames_per_s": self.video_frames / (clip_ms * 1e-3)}

    def inputs(self, frames: int, dtype: torch.dtype) -> tuple[torch.Tensor, dict, list[float]]:
        """x (1, F, C, h, w), the 3-pass tiled conditions (no cond, +text, +text+audio) and the CFG weights."""
        _, h, w = self.a.wan_latent
        cfg, dev = self.cfg, self.dev
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)  # noqa: E731
        C, Lt, La = cfg.latent_channels, self.a.wan_text, cfg.audio_tokens
        kw = {"tau": torch.arange(1, frames + 1, dtype=torch.float32, device=dev)[None] / (frames + 1),
              "z0": r(1, C, h, w), "z1": r(1, C, h, w), "valid": torch.ones(1, 1, h, w, device=dev, dtype=dtype),
              "diff": torch.zeros(1, device=dev), "text": r(1, Lt, cfg.text_dim),
              "text_mask": torch.ones(1, Lt, dtype=torch.bool, device=dev), "audio": r(1, frames, La, cfg.audio_mels),
              "audio_mask": torch.ones(1, frames, dtype=torch.bool, device=dev)}
        kw = Engine._tile_for_cfg(kw, 1, ["text", "audio"])
        return r(1, frames, C, h, w), kw, sampler.cfg_weights([self.a.text_scale, self.a.audio_scale])

    def _build(self, dtype: torch.dtype) -> torch.nn.Module:
        if self.dit is None:
            torch.manual_seed(0)
            self.dit = build_dit(self.cfg, device=self.dev, dtype=dtype).eval()
        elif next(self.dit.parameters()).dtype != dtype:
            self.dit.to(dtype)  # fp32 -> bf16 in place: one copy of the weights at a time
        return self.dit

    def _guided(self, den, x: torch.Tensor, kw: dict, w: list[float]) -> torch.Tensor:
        sig = torch.full((3,), 0.5, device=self.dev)
        v = den(x.repeat(3, 1, 1, 1, 1), sig, **kw).float().unflatten(0, (3, 1))
        return sum(wk * vk for wk, vk in zip(w, v))

    def step(self, r: Rung) -> dict:
        a, dev = self.a, self.dev
        dit = self._build(r.dtype)
        if r.fp8:
            from bbf_rt.runtime.quant import QuantDenoiser, quantize_model

            dit = quantize_model(copy.deepcopy(dit))  # a quantised copy: the compile peer still gets the bf16 DiT
        den = CUDAGraphDenoiser(dit) if r.graphs else dit
        if r.fp8 and a.fp8_attention != "exact":
            den = QuantDenoiser(den, a.fp8_attention)
        x, kw, w = self.inputs(a.wan_latent[0], r.dtype)
        with torch.no_grad(), ops.implementation(r.ops):
            v = self._guided(den, x, kw, w)
            if self.ref is None:
                self.ref, self.ref_name = v, f"{r.name} eager ({r.ops} ops), this run"
            _peak_reset(dev)
            ts = _times(lambda: den(x.repeat(3, 1, 1, 1, 1), torch.full((3,), 0.5, device=dev), **kw), dev, a.wan_warmup, a.wan_reps)
        step_ms = _pct(ts, 0.5)
        self.step_ms[(r.dtype, r.ops, r.graphs, r.fp8)] = step_ms
        flops = 3 * dit_flops(self.cfg, a.wan_latent[0], a.wan_latent[1] * a.wan_latent[2] // 4,
                              {"text": a.wan_text, "audio": self.cfg.audio_tokens})
        extra = {}
        if r.fp8 and self.cache_calls is not None:  # the ladder is cumulative: fp8 on top of the step cache
            extra = {"clip_ms_with_step_cache": self.cache_calls * step_ms + (a.wan_steps - 1) * self.probe_ms,
                     "dit_calls": self.cache_calls}
        if r.fp8:
            extra["attention"] = a.fp8_attention
        return {**_stats(ts), "timed": "guided step", "per_step_ms": step_ms, **self._clip(a.wan_steps * step_ms), **extra,
                "clip_note": f"extrapolated: {a.wan_steps} x p50 step (solver update and Wan VAE not timed)",
                "peak_mem_gib": _peak_gib(dev), **_flops_fields(flops, step_ms, self.ceiling),
                "psnr_db": _psnr(v, self.ref), "quality_ref": self.ref_name,
                "quality_metric": "PSNR of one guided step's velocity, peak = reference range"}

    def step_cache(self, r: Rung) -> dict:
        """Calls and quality from a full run at fewer latent frames; per-step times at the full shape."""
        a, dev = self.a, self.dev
        dit = self._build(r.dtype)
        den = CUDAGraphDenoiser(dit) if r.graphs else dit
        probe = FirstBlockProbe(dit)
        probe = CUDAGraphDenoiser(probe) if r.graphs else probe
        sig = sampler.make_sigmas(a.wan_steps, shift=a.wan_shift)
        with torch.no_grad(), ops.implementation(r.ops):
            x, kw, w = self.inputs(a.wan_cache_frames, r.dtype)
            pass0 = {k: kw[k][:1] for k in ("tau", "z0", "z1", "valid", "diff")}
            denoise = lambda xb, s: den(xb, s, **kw)  # noqa: E731
            full = sampler.sample(denoise, x, sig, solver=a.wan_solver, cfg_weights=w)
            cache = StepCache(denoise, lambda xb, s: probe(xb, s, **pass0), a.step_cache, a.wan_steps, 1)
            cached = sampler.sample(cache, x, sig, solver=a.wan_solver, cfg_weights=w)
            # the probe and its host read at the full shape: what every step pays on top
            xf, kwf, _ = self.inputs(a.wan_latent[0], r.dtype)
            p0 = {k: kwf[k][:1] for k in ("tau", "z0", "z1", "valid", "diff")}
            s1 = torch.full((1,), 0.5, device=dev)
            h_prev = probe(xf, s1, **p0)
            probe_ts = _times(lambda: float(relative_l1(probe(xf, s1, **p0), h_prev).max()), dev, a.wan_warmup, a.wan_reps)
            key = (r.dtype, r.ops, r.graphs, False)
            if key not in self.step_ms:  # the uncached step of the rung below, if it was not run
                self.step(dataclasses.replace(r, cache=False))
        probe_ms, step_ms = _pct(probe_ts, 0.5), self.step_ms[key]
        clip_ms = cache.dit_calls * step_ms + (a.wan_steps - 1) * probe_ms
        self.cache_calls, self.probe_ms = cache.dit_calls, probe_ms
        return {**{f"probe_{k}": v for k, v in _stats(probe_ts).items()}, "timed": "probe + host read, per step",
                "per_step_ms": clip_ms / a.wan_steps, **self._clip(clip_ms), "dit_calls": cache.dit_calls, "skipped_steps": cache.skipped, "host_syncs": cache.syncs,
                "speedup_vs_uncached": a.wan_steps * step_ms / clip_ms,
                "psnr_db": _psnr(cached, full), "quality_ref": f"the uncached {a.wan_steps}-step run at the same reduced shape",
                "quality_metric": "PSNR of the final latents, peak = reference range",
                "clip_note": (f"extrapolated: dit_calls from a {a.wan_steps}-step {a.wan_solver} run (shift {a.wan_shift}) at "
                              f"{a.wan_cache_frames} latent frames x dit step at the full shape + {a.wan_steps - 1} probes")}

    def compile_peer(self) -> dict:
        a, dev = self.a, self.dev
        dit = self._build(torch.bfloat16)
        fn = torch.compile(dit)
        x, kw, w = self.inputs(a.wan_latent[0], torch.bfloat16)
        call = lambda: fn(x.repeat(3, 1, 1, 1, 1), torch.full((3,), 0.5, device=dev), **kw)  # noqa: E731
        with torch.no_grad(), ops.implementation("reference"):
            t0 = time.perf_counter()
            call()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            compile_s = time.perf_counter() - t0
            v = self._guided(fn, x, kw, w)
            _peak_reset(dev)
            ts = _times(call, dev, a.wan_warmup, a.wan_reps)
        return {**_stats(ts), "timed": "guided step", "per_step_ms": _pct(ts, 0.5), **self._clip(a.wan_steps * _pct(ts, 0.5)),
                "compile_s": compile_s,
                "clip_note": f"extrapolated: {a.wan_steps} x p50 step", "peak_mem_gib": _peak_gib(dev),
                "psnr_db": _psnr(v, self.ref) if self.ref is not None else None, "quality_ref": self.ref_name,
                "mode": "torch.compile default (no max-autotune), ops reference, bf16"}

    def ladder(self) -> None:
        a, dev, rows = self.a, self.dev, self.rows
        for name in a.rungs:
            r = LADDER[name]
            base = {**self.base(), **_rung_fields(r, a.step_cache)}
            why = _unavailable(r, dev) or (None if a.wan_fp32 or name != "fp32" else
                                           "eager fp32 at this shape: an estimated ~20 s per 3-pass step on an H100 (not measured); pass --wan-fp32")
            if why:
                rows.skip(base, why)
                continue
            eff = _effective(r, dev)
            base.update(_rung_fields(eff, a.step_cache))  # what actually ran (no Triton / graphs on the CPU)
            if r.cache and not r.fp8:
                rows.guard(base, lambda: self.step_cache(eff))
            else:
                rows.guard(base, lambda: self.step(eff), est_s=60.0 if name == "fp32" else 0.0)

    def peers(self) -> None:
        if "compile" in self.a.peers:
            self.rows.guard({**self.base(), "rung": "peer-compile"}, self.compile_peer, est_s=150.0)
        self.dit = None


# -------------------------------------------------------------------------------------------------- main


def _size(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1280x720 or 21x60x104") from None


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        got = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
        bad = [t for t in got if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not among {allowed}")
        return got
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bbf-rt bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file the rows are appended to")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--model", default=None, help="trained checkpoint for the player case (quality rows); default random weights")
    p.add_argument("--scenarios", type=_names(("player", "wan")), default=["player", "wan"])
    p.add_argument("--rungs", type=_names(tuple(LADDER)), default=list(LADDER), help=f"comma list of {', '.join(LADDER)}")
    p.add_argument("--peers", type=_names(PEERS), default=list(PEERS), help="comma list of rife, compile (or none)")
    p.add_argument("--step-cache", type=float, default=0.1, help="step-cache threshold of the step-cache rung")
    p.add_argument("--fp8-attention", default="exact", help="attention precision of the fp8 rung: exact, int8 or int8-fp8")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=240.0, help="start no measurement after this many seconds")
    p.add_argument("--player-preset", default="bbf-s")
    p.add_argument("--player-size", type=_size, default=(1280, 720), help="WxH")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    p.add_argument("--player-steps", type=int, default=2)
    p.add_argument("--cache-steps", type=int, default=20, help="steps of the player's step-cache rung and its baseline")
    p.add_argument("--wan-preset", default="wan-1.3b")
    p.add_argument("--wan-latent", type=_size, default=(21, 60, 104), help="FxHxW latent (480p x 81 frames: 21x60x104)")
    p.add_argument("--wan-text", type=int, default=512, help="text tokens")
    p.add_argument("--wan-steps", type=int, default=50)
    p.add_argument("--wan-solver", default="unipc")
    p.add_argument("--wan-shift", type=float, default=5.0)
    p.add_argument("--wan-cache-frames", type=int, default=3, help="latent frames of the full step-cache run")
    p.add_argument("--wan-warmup", type=int, default=1)
    p.add_argument("--wan-reps", type=int, default=3)
    p.add_argument("--wan-fp32", action="store_true", help="also run the fp32 rung (the quality reference) at the wan shape")
    p.add_argument("--text-scale", type=float, default=5.0)
    p.add_argument("--audio-scale", type=float, default=3.0)
    return p


def _versions(dev: torch.device) -> dict:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = "unknown"
    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = None
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return {"gpu": gpu, "device": str(dev), "torch": torch.__version__, "triton": tri, "cuda": torch.version.cuda, "git": sha or "unknown"}


def main(argv: list[str] | None = None) -> int:
    """Run the ladder; returns 0, or 1 when any measurement wrote an error row."""
    a = build_parser().parse_args(argv)
    if len(a.player_size) != 2 or len(a.wan_latent) != 3:
        raise SystemExit(f"--player-size must be WxH and --wan-latent FxHxW; got {a.player_size}, {a.wan_latent}")
    dev = resolve_device(a.device)
    try:
        ceiling = matmul_ceiling(dev)
    except RuntimeError as e:  # rows then carry no % of peak
        print(f"bench_e2e: matmul ceiling not measured: {e}", file=sys.stderr)
        ceiling = None
    rows = Rows(a.out, {**_versions(dev), "args": {k: v for k, v in vars(a).items() if k != "out"}}, a.budget_s)
    cases: dict = {}
    # the ladders first, then the peers (compiling is the slowest part and the budget cuts from the end)
    for scen, cls in (("player", PlayerCase), ("wan", WanCase)):
        if scen in a.scenarios:
            base = {"name": "e2e", "scenario": scen, "rung": "setup"}
            rows.guard(base, lambda: cases.__setitem__(scen, cls(a, dev, rows, ceiling)) or [], None)
            if scen in cases:
                rows.guard(base, lambda: cases[scen].ladder() or [], None)
    for scen, case in cases.items():
        rows.guard({"name": "e2e", "scenario": scen, "rung": "peers"}, lambda: case.peers() or [], None)
    print(f"bench_e2e: {rows.count} rows ({rows.errors} errors) -> {a.out} in {time.perf_counter() - rows.t0:.0f} s", file=sys.stderr)
    return 1 if rows.errors else 0


if __name__ == "__main__":
    sys.exit(main())

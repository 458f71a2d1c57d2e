"""bench_e2e's player scenario: bbf-s 2x at one size (see bench_e2e.py's docstring for what each row times)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch

from bbf_rt import ops
from bbf_rt.bench.e2e_common import (LADDER, PEERS, Rows, Rung, effective, flops_fields, midpoint_jobs, panning_frames,
                                     peak_gib, peak_reset, pct, psnr, rung_fields, rung_unavailable, stats, times_ms)
from bbf_rt.config import RuntimeConfig, get_preset
from bbf_rt.model import BBFModel, load_model
from bbf_rt.model.flops import dit_flops
from bbf_rt.runtime.engine import Conditions, Engine
from bbf_rt.runtime.graphs import CUDAGraphDenoiser


class PlayerCase:
    """bbf-s 2x at one size: the ladder per batch, step caching at --cache-steps, Player latency, peers."""

    def __init__(self, a: argparse.Namespace, dev: torch.device, rows: Rows, ceiling: float | None) -> None:
        self.a, self.dev, self.rows, self.ceiling = a, dev, rows, ceiling
        self.W, self.H = a.player_size
        self.frames = panning_frames(max(a.batches) + 1, self.H, self.W)
        self.weights = a.model or f"random ({a.player_preset}, seed 0)"
        torch.manual_seed(0)
        fp32 = load_model(a.model, device=dev) if a.model else BBFModel(get_preset(a.player_preset)).to(dev).eval()
        self.models = {torch.float32: fp32, torch.bfloat16: copy.deepcopy(fp32).to(torch.bfloat16)}
        self.cfg = fp32.cfg
        self.refs: dict[tuple[int, int], np.ndarray] = {}  # (batch, steps) -> eager fp32 output

    def base(self, batch: int, steps: int) -> dict:
        m, s = self.cfg.pixel_multiple, self.cfg.vae_stride
        h, w = -(-self.H // m) * m // s, -(-self.W // m) * m // s  # latent size of the padded frames
        fusion = self.cfg.vae_fusion is not None and not self.a.no_fusion  # the boundary-fusion head decodes
        return {"name": "e2e", "scenario": "player", "preset": self.cfg.name, "weights": self.weights, "fusion": fusion,
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
        rt = RuntimeConfig(steps=steps, step_cache=threshold if r.cache else 0.0, cuda_graphs=r.graphs,
                           fusion=not self.a.no_fusion, **quant)
        return Engine(m, rt, self.dev, r.dtype, denoiser=denoiser)

    def _clip_fns(self, eng: Engine, batch: int):
        frames = torch.from_numpy(self.frames[: batch + 1]).to(self.dev)
        H, W = self.H, self.W

        def prepare():
            return midpoint_jobs(eng, frames)

        def clip():
            jobs, bounds = midpoint_jobs(eng, frames, with_bounds=True)
            out = eng.run(jobs, Conditions(), H, W)
            return eng.decode(torch.stack([o[0] for o in out]), H, W, bounds)  # (B, H, W, 3) uint8 on the host

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
            run_ts = times_ms(lambda: eng.run(jobs, Conditions(), self.H, self.W), dev, a.warmup, a.reps)
            n_runs = a.warmup + a.reps
            cache = {k: (eng.cache_stats[k] - before[k]) / n_runs for k in before}
            peak_reset(dev)
            clip_ts = times_ms(clip, dev, a.warmup, a.reps)
        clip_ms, step_ms = pct(clip_ts, 0.5), pct(run_ts, 0.5) / steps
        flops = dit_flops(self.cfg, 1, self.base(batch, steps)["shape"]["tokens"], {}, batch=batch)
        row = {**rung_fields(r, threshold), **stats(clip_ts), "timed": "clip", "clip_ms": clip_ms, "per_step_ms": step_ms,
               "frames_per_s": batch / (clip_ms * 1e-3), "display_fps_2x": 2 * batch / (clip_ms * 1e-3),
               "first_call_s": first_s, "peak_mem_gib": peak_gib(dev),
               **({} if r.cache and threshold > 0 else flops_fields(flops, step_ms, self.ceiling)),
               "psnr_db": psnr(out, self.reference(batch, steps)), "quality_ref": "eager fp32, same frames, seed, steps",
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
                base = {**self.base(batch, steps), **rung_fields(r, a.step_cache)}
                why = rung_unavailable(r, dev)
                if why:
                    rows.skip(base, why)
                    continue
                eff = effective(r, dev)
                base.update(rung_fields(eff, a.step_cache))  # what actually ran (no Triton / graphs on the CPU)
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
        got = rows.guard({**base, **rung_fields(below, 0.0), "role": "step-cache baseline"}, lambda: self.measure(below, batch, steps))

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
        rt = RuntimeConfig(steps=a.player_steps, context_frames=1, dtype="bf16", cuda_graphs=dev.type == "cuda",
                           fusion=not a.no_fusion)
        player = Player(self.models[torch.bfloat16], 2, runtime=rt, device=str(dev), allow_untrained=True)
        frames = panning_frames(a.warmup + a.reps + 2, self.H, self.W, seed=1)
        peak_reset(dev)
        with torch.no_grad(), ops.implementation("auto" if dev.type == "cuda" else "reference"):
            for f in frames:
                player.push(f)
            player.flush()
        ms = sorted(t * 1e3 for t in player.latencies_s[a.warmup + 1 :])  # after the capture and warm-up intervals
        return {**stats(ms), "timed": "push -> frames", "latency_ms_p50": pct(ms, 0.5), "latency_ms_p90": pct(ms, 0.9), "dtype": "bf16",
                "cuda_graphs": rt.cuda_graphs, "frames_per_s": 1e3 / pct(ms, 0.5), "peak_mem_gib": peak_gib(dev),
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
        peak_reset(dev)
        ts = times_ms(clip, dev, self.a.warmup, self.a.reps)
        return {**stats(ts), "timed": "clip", "clip_ms": pct(ts, 0.5), "frames_per_s": batch / (pct(ts, 0.5) * 1e-3),
                "peak_mem_gib": peak_gib(dev), "peer": peer.describe(), "psnr_db": None,
                "note": "RIFE v4 (trained weights): a different model, so no PSNR vs ours; accuracy in bench_rife.py"}

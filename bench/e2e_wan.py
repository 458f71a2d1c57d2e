"""bench_e2e's wan scenario: the wan-1.3b DiT, 3 guidance passes, per-step latency and an extrapolated clip
(see bench_e2e.py's docstring for what each row times)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

from bbf_rt import ops
from bbf_rt.bench.e2e_common import (LADDER, Rows, Rung, effective, flops_fields, peak_gib, peak_reset, pct, psnr,
                                     rung_fields, rung_unavailable, stats, times_ms)
from bbf_rt.config import get_preset
from bbf_rt.model.dit import build_dit
from bbf_rt.model.flops import dit_flops
from bbf_rt.runtime import sampler
from bbf_rt.runtime.engine import Engine
from bbf_rt.runtime.graphs import CUDAGraphDenoiser
from bbf_rt.runtime.stepcache import FirstBlockProbe, StepCache, relative_l1


class WanCase:
    """The wan-1.3b DiT at 480p x 81 frames, 3 guidance passes: per-step latency, extrapolated clip."""

    def __init__(self, a: argparse.Namespace, dev: torch.device, rows: Rows, ceiling: float | None) -> None:
        self.a, self.dev, self.rows, self.ceiling = a, dev, rows, ceiling
        self.cfg = get_preset(a.wan_preset)
        self.weights = f"random ({a.wan_preset}, seed 0)"
        self.ref: torch.Tensor | None = None
        self.ref_name = None
        self.step_ms: dict[tuple, float] = {}  # (dtype, ops, graphs, fp8) -> p50 ms of one guided step
        self.small: tuple | None = None  # the step-cache rung's reduced-shape run: (x, kw, w, sigmas)
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
            peak_reset(dev)
            ts = times_ms(lambda: den(x.repeat(3, 1, 1, 1, 1), torch.full((3,), 0.5, device=dev), **kw), dev, a.wan_warmup, a.wan_reps)
        step_ms = pct(ts, 0.5)
        self.step_ms[(r.dtype, r.ops, r.graphs, r.fp8)] = step_ms
        flops = 3 * dit_flops(self.cfg, a.wan_latent[0], a.wan_latent[1] * a.wan_latent[2] // 4,
                              {"text": a.wan_text, "audio": self.cfg.audio_tokens})
        extra = {}
        if r.fp8 and self.small is not None:  # the ladder is cumulative: fp8 on top of the step cache
            extra = self._fp8_cached_clip(dit, den, step_ms)
        if r.fp8:
            extra["attention"] = a.fp8_attention
        return {**stats(ts), "timed": "guided step", "per_step_ms": step_ms, **self._clip(a.wan_steps * step_ms), **extra,
                "clip_note": f"extrapolated: {a.wan_steps} x p50 step (solver update and Wan VAE not timed)",
                "peak_mem_gib": peak_gib(dev), **flops_fields(flops, step_ms, self.ceiling),
                "psnr_db": psnr(v, self.ref), "quality_ref": self.ref_name,
                "quality_metric": "PSNR of one guided step's velocity, peak = reference range"}

    def _fp8_cached_clip(self, qdit: torch.nn.Module, den, step_ms: float) -> dict:
        """FP8 + step cache as one clip: its DiT calls and final latents from a full run at the reduced shape
        (the FP8 model's own probe decides the skips) against the eager bf16 reference loop (reference ops,
        no cache) on the same inputs; the clip time extrapolated as in step_cache."""
        a = self.a
        x, kw, w, sig = self.small
        with torch.no_grad():
            with ops.implementation("reference"):
                ref = sampler.sample(lambda xb, s: self.dit(xb, s, **kw), x, sig, solver=a.wan_solver, cfg_weights=w)
            probe, pass0 = FirstBlockProbe(qdit), {k: kw[k][:1] for k in ("tau", "z0", "z1", "valid", "diff")}
            cache = StepCache(lambda xb, s: den(xb, s, **kw), lambda xb, s: probe(xb, s, **pass0), a.step_cache, a.wan_steps, 1)
            out = sampler.sample(cache, x, sig, solver=a.wan_solver, cfg_weights=w)
        clip_ms = cache.dit_calls * step_ms + (a.wan_steps - 1) * self.probe_ms
        eager = self.step_ms.get((torch.bfloat16, "reference", False, False))
        return {"clip_ms_with_step_cache": clip_ms, "dit_calls": cache.dit_calls,
                "clip_psnr_db": psnr(out, ref),
                "clip_quality_ref": (f"the eager bf16 reference loop (reference ops, uncached, {a.wan_steps} steps) at "
                                     f"{a.wan_cache_frames} latent frames, final latents"),
                "clip_speedup_vs_eager_bf16": a.wan_steps * eager / clip_ms if eager else None}

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
            self.small = (x, kw, w, sig)
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
            probe_ts = times_ms(lambda: float(relative_l1(probe(xf, s1, **p0), h_prev).max()), dev, a.wan_warmup, a.wan_reps)
            key = (r.dtype, r.ops, r.graphs, False)
            if key not in self.step_ms:  # the uncached step of the rung below, if it was not run
                self.step(dataclasses.replace(r, cache=False))
        probe_ms, step_ms = pct(probe_ts, 0.5), self.step_ms[key]
        clip_ms = cache.dit_calls * step_ms + (a.wan_steps - 1) * probe_ms
        self.probe_ms = probe_ms
        return {**{f"probe_{k}": v for k, v in stats(probe_ts).items()}, "timed": "probe + host read, per step",
                "per_step_ms": clip_ms / a.wan_steps, **self._clip(clip_ms), "dit_calls": cache.dit_calls, "skipped_steps": cache.skipped, "host_syncs": cache.syncs,
                "speedup_vs_uncached": a.wan_steps * step_ms / clip_ms,
                "psnr_db": psnr(cached, full), "quality_ref": f"the uncached {a.wan_steps}-step run at the same reduced shape",
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
            peak_reset(dev)
            ts = times_ms(call, dev, a.wan_warmup, a.wan_reps)
        return {**stats(ts), "timed": "guided step", "per_step_ms": pct(ts, 0.5), **self._clip(a.wan_steps * pct(ts, 0.5)),
                "compile_s": compile_s,
                "clip_note": f"extrapolated: {a.wan_steps} x p50 step", "peak_mem_gib": peak_gib(dev),
                "psnr_db": psnr(v, self.ref) if self.ref is not None else None, "quality_ref": self.ref_name,
                "mode": "torch.compile default (no max-autotune), ops reference, bf16"}

    def ladder(self) -> None:
        a, dev, rows = self.a, self.dev, self.rows
        for name in a.rungs:
            r = LADDER[name]
            base = {**self.base(), **rung_fields(r, a.step_cache)}
            why = rung_unavailable(r, dev) or (None if a.wan_fp32 or name != "fp32" else
                                           "eager fp32 at this shape: an estimated ~20 s per 3-pass step on an H100 (not measured); pass --wan-fp32")
            if why:
                rows.skip(base, why)
                continue
            eff = effective(r, dev)
            base.update(rung_fields(eff, a.step_cache))  # what actually ran (no Triton / graphs on the CPU)
            if r.cache and not r.fp8:
                rows.guard(base, lambda: self.step_cache(eff))
            else:
                rows.guard(base, lambda: self.step(eff), est_s=60.0 if name == "fp32" else 0.0)

    def peers(self) -> None:
        if "compile" in self.a.peers:
            self.rows.guard({**self.base(), "rung": "peer-compile"}, self.compile_peer, est_s=150.0)
        self.dit = None

"""Where a bbf-s 720p 2x clip spends its time, stage by stage, and what the VAE costs in each form.

    python bench/profile_player.py --out bench/results/profile-player-h100.jsonl [--model CKPT] [--batches 1,4]

One row per (batch, stage): host->device upload of the uint8 frames, VAE encode of batch+1 frames, the
start-end difference, the denoising loop (CUDA graphs, Triton ops), VAE decode on the GPU (to uint8), the
device->host copy (pageable and pinned), and the whole clip as bench_e2e times it. Then one row per VAE
variant (eager NCHW, channels_last, torch's GroupNorm+SiLU instead of the fused Triton op, each with and
without CUDA-graph replay) for encode and decode, with the largest difference from the eager output, so a
faster form is only taken with its error known.
Median of --reps CUDA-event timings after --warmup calls.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _t(e) -> float:
    """An event's device time (us), or its CPU time on a CPU dry run."""
    return e.device_time_total if e.device_time_total > 0 else e.self_cpu_time_total


@contextlib.contextmanager
def torch_groupnorm():
    """Within the block the VAE runs torch's GroupNorm then SiLU (the baseline of the fused op)."""
    import torch.nn.functional as F

    from bbf_rt.model import vae as vae_mod
    fused = vae_mod._norm_silu
    vae_mod._norm_silu = lambda norm, x: F.silu(norm(x))
    try:
        yield
    finally:
        vae_mod._norm_silu = fused


def main(argv: list[str] | None = None) -> int:
    from bbf_rt import ops
    from bbf_rt.bench.bench_e2e import _versions
    from bbf_rt.bench.e2e_common import Rows, midpoint_jobs, panning_frames, pct, stats, times_ms
    from bbf_rt.config import RuntimeConfig
    from bbf_rt.model import load_model
    from bbf_rt.runtime.engine import Conditions, DenoiseJob, Engine
    from bbf_rt.runtime.graphs import CUDAGraphDenoiser
    from torch.profiler import ProfilerActivity, profile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=str(REPO / "bbf_rt" / "weights" / "bbf-s.safetensors"))
    p.add_argument("--size", default="1280x720")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="also time the loop with torch.compile inside the CUDA graphs")
    p.add_argument("--git-sha", default=None, help="recorded instead of the package folder's git HEAD")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of every row (tiny sizes; timings meaningless)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("profile_player: needs a CUDA GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    acts = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    W, H = (int(v) for v in a.size.split("x"))
    batches = [int(b) for b in a.batches.split(",")]
    rows = Rows(a.out, {**_versions(dev, a.git_sha), "name": "profile_player", "size": [W, H], "steps": a.steps, "weights": Path(a.model).name}, 1e9)
    model = load_model(a.model, device=dev, dtype=torch.bfloat16)
    eng = Engine(model, RuntimeConfig(steps=a.steps, cuda_graphs=True), dev, torch.bfloat16, denoiser=CUDAGraphDenoiser(model.dit))
    # the same engine with an NCHW VAE: its own model copy (an engine sets the VAE layout on the model it is
    # given), made once; its VAE is also the NCHW form of the VAE-forms rows, beside one channels-last copy
    nchw_model = copy.deepcopy(model)
    nchw = Engine(nchw_model, RuntimeConfig(steps=a.steps, cuda_graphs=True, vae_channels_last=False), dev,
                  torch.bfloat16, denoiser=eng.denoiser)
    vae_nchw = nchw_model.vae.use_channels_last(False)
    vae_cl = copy.deepcopy(model.vae).use_channels_last(True)
    frames = panning_frames(max(batches) + 1, H, W)
    T = lambda fn: times_ms(fn, dev, a.warmup, a.reps)  # noqa: E731

    with torch.no_grad(), ops.implementation("auto" if dev.type == "cuda" else "reference"):
        for B in batches:
            host = frames[: B + 1]
            pix = eng.to_pixels(host)
            lat = eng.encode(pix)
            diff = eng.difference(pix[:-1], pix[1:])
            jobs = [DenoiseJob(key=i, lat0=lat[i], lat1=lat[i + 1], diff=diff[i], taus=[0.5]) for i in range(B)]
            out = torch.stack([o[0] for o in eng.run(jobs, Conditions(), H, W)])
            u8 = ops.to_uint8_nhwc(model.vae.decode_frames(out), H, W)  # (N, H, W, 3), as Engine.decode
            pinned = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=dev.type == "cuda")

            pageable = Engine(model, RuntimeConfig(steps=a.steps, cuda_graphs=True, pinned_transfers=False), dev, torch.bfloat16,
                              denoiser=eng.denoiser)

            def clip(eng=eng):
                jobs_, bounds = midpoint_jobs(eng, host, with_bounds=True)
                return eng.decode(torch.stack([o[0] for o in eng.run(jobs_, Conditions(), H, W)]), H, W, bounds)

            # its own engine: the VAE's CUDA graphs of `eng` were captured with the fused op
            torch_gn = Engine(model, RuntimeConfig(steps=a.steps, cuda_graphs=True), dev, torch.bfloat16, denoiser=eng.denoiser)

            def clip_torch_gn():
                with torch_groupnorm():
                    return clip(torch_gn)

            stages = {
                "upload_uint8": lambda: eng.to_pixels(host),
                "vae_encode": lambda: eng.encode(pix),
                "difference": lambda: eng.difference(pix[:-1], pix[1:]),
                "denoise_loop": lambda: eng.run(jobs, Conditions(), H, W),
                "vae_decode_to_uint8": lambda: ops.to_uint8_nhwc(model.vae.decode_frames(out), H, W),
                "download_pageable": lambda: u8.cpu().numpy(),
                "download_pinned": lambda: pinned.copy_(u8),
                "clip": clip,
                "clip_pageable_transfers": lambda: clip(pageable),
                "clip_torch_groupnorm": clip_torch_gn,
                "clip_vae_nchw": lambda: clip(nchw),
            }
            for name, fn in stages.items():
                ts = T(fn)
                rows.write({"batch": B, "stage": name, **stats(ts), "ms": pct(ts, 0.5)})

            # the denoising step's kernels, eager launches (graphs hide them from the profiler)
            eager = Engine(model, RuntimeConfig(steps=a.steps, cuda_graphs=False), dev, torch.bfloat16)
            eager.run(jobs, Conditions(), H, W)
            sync()

            with profile(activities=acts) as prof:
                eager.run(jobs, Conditions(), H, W)
                sync()
            evs = [e for e in prof.key_averages() if _t(e) > 0]
            evs.sort(key=lambda e: -_t(e))
            total = sum(_t(e) for e in evs)
            rows.write({"batch": B, "stage": "denoise_kernels", "steps_profiled": a.steps, "kernel_us_total": total,
                        "kernels": sum(e.count for e in evs),
                        "top": [{"k": e.key[:90], "n": e.count, "us": round(_t(e), 1)} for e in evs[:20]]})
            for op, fn in (("encode", lambda: eng.encode(pix)), ("decode", lambda: model.vae.decode_frames(out))):
                with profile(activities=acts) as prof:
                    fn()
                    sync()
                evs = sorted((e for e in prof.key_averages() if _t(e) > 0), key=lambda e: -_t(e))
                rows.write({"batch": B, "stage": f"vae_{op}_kernels", "kernel_us_total": sum(_t(e) for e in evs),
                            "kernels": sum(e.count for e in evs),
                            "top": [{"k": e.key[:90], "n": e.count, "us": round(_t(e), 1)} for e in evs[:12]]})

            # VAE forms: NCHW, channels_last (NHWC GroupNorm kernel), torch's GroupNorm; eager and CUDA-graph
            # replay (error against the eager NCHW output)
            x_in = (pix * 2 - 1).to(torch.bfloat16)
            ref_z, ref_x = vae_nchw.encode_frames(x_in), vae_nchw.decode_frames(out)
            for form, vae, ctx in (("eager_nchw", vae_nchw, contextlib.nullcontext), ("channels_last", vae_cl, contextlib.nullcontext),
                                   ("torch_groupnorm", vae_nchw, torch_groupnorm)):
                for graphed in (False, True):
                    def enc(x, s, v=vae, ctx=ctx):
                        with ctx():
                            return v.encode_frames(x)

                    def dec(z, s, v=vae, ctx=ctx):
                        with ctx():
                            return v.decode_frames(z)
                    if graphed:
                        enc, dec = CUDAGraphDenoiser(enc), CUDAGraphDenoiser(dec)
                    sig = torch.zeros(1, device=dev)
                    for op, fn, arg, ref in (("encode", enc, x_in, ref_z), ("decode", dec, out, ref_x)):
                        t0 = time.perf_counter()
                        got = fn(arg, sig)
                        first = time.perf_counter() - t0
                        ts = T(lambda: fn(arg, sig))
                        rows.write({"batch": B, "stage": f"vae_{op}_form", "form": form, "cuda_graph": graphed, **stats(ts),
                                    "ms": pct(ts, 0.5), "first_call_s": round(first, 3),
                                    "max_abs_vs_eager": (got.float() - ref.float()).abs().max().item()})
        if a.compile:  # Inductor's fused glue replayed by our graphs: the compile time is its own row field
            comp = CUDAGraphDenoiser(torch.compile(model.dit, dynamic=False))
            ceng = Engine(model, RuntimeConfig(steps=a.steps, cuda_graphs=True), dev, torch.bfloat16, denoiser=comp)
            for B in batches:
                pix = eng.to_pixels(frames[: B + 1])
                lat, diff = eng.encode(pix), eng.difference(pix[:-1], pix[1:])
                jobs = [DenoiseJob(key=i, lat0=lat[i], lat1=lat[i + 1], diff=diff[i], taus=[0.5]) for i in range(B)]
                ref = torch.stack([o[0] for o in eng.run(jobs, Conditions(), H, W)])
                t0 = time.perf_counter()
                got = torch.stack([o[0] for o in ceng.run(jobs, Conditions(), H, W)])
                first = time.perf_counter() - t0
                ts = T(lambda: ceng.run(jobs, Conditions(), H, W))
                rows.write({"batch": B, "stage": "denoise_loop", "form": "torch.compile default + cuda graphs", **stats(ts),
                            "ms": pct(ts, 0.5), "first_call_s": round(first, 1),
                            "max_abs_vs_graphs": (got.float() - ref.float()).abs().max().item()})
    print(f"profile_player: {rows.count} rows -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

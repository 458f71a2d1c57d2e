"""Final frames of each denoiser backend against eager, through the whole engine, on the shipped bbf-s.

    python bench/backend_frames.py --out bench/results/export-h100.jsonl [--backends eager,aoti] [--size 1280x720]

Interpolates the midpoints of a panning clip (--frames boundary frames, --steps denoising steps, no
conditions) with the eager backend and with each artifact backend (built into a fresh cache, build time
in the row), decodes to uint8 and writes one row per backend: PSNR of every output frame against eager's
(issue 4's target: >= 40 dB for fp32/bf16 artifacts), the largest latent difference, and the clip time
(median of --reps after a warm-up). --device cpu is a dry run at a small size (fp32).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from bbf_rt.bench.bench_e2e import _versions
    from bbf_rt.bench.e2e_common import Rows, midpoint_jobs, panning_frames, pct, psnr, times_ms
    from bbf_rt.config import RuntimeConfig
    from bbf_rt.model import load_model
    from bbf_rt.runtime.backends import make_backend
    from bbf_rt.runtime.engine import Conditions, Engine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=str(REPO / "bbf_rt" / "weights" / "bbf-s.safetensors"))
    p.add_argument("--backends", default="aoti", help="compared with eager: any of aoti,compile,onnx,tensorrt")
    p.add_argument("--size", default="1280x720")
    p.add_argument("--frames", type=int, default=4, help="boundary frames (frames - 1 intervals, one batch)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--git-sha", default=None)
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("backend_frames: needs a CUDA GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    W, H = (int(v) for v in a.size.split("x"))
    rows = Rows(a.out, {**_versions(dev, a.git_sha), "name": "backend_frames",
                        "size": [W, H], "steps": a.steps, "weights": Path(a.model).name,
                        "dtype": "bf16" if dt == torch.bfloat16 else "fp32"}, 1e9)
    model = load_model(a.model, device=dev, dtype=dt)
    frames = panning_frames(a.frames, H, W)
    cache = tempfile.mkdtemp(prefix="bbf-rt-frames-")

    def clip(eng: Engine):
        jobs, bounds = midpoint_jobs(eng, frames, with_bounds=True)
        lat = torch.stack([o[0] for o in eng.run(jobs, Conditions(), H, W)])
        return lat, eng.decode(lat, H, W, bounds)

    results = {}
    with torch.no_grad():
        for name in ["eager"] + [b for b in a.backends.split(",") if b and b != "eager"]:
            t0 = time.perf_counter()
            try:
                den = make_backend(name, model, dev, dt, cache=cache)
                eng = Engine(model, RuntimeConfig(steps=a.steps), dev, dt, denoiser=den)
                lat, out = clip(eng)  # the first call builds (or loads) the artifact
            except Exception as exc:  # a backend that cannot run here is a row, not a crash
                rows.write({"backend": name, "error": f"{type(exc).__name__}: {str(exc)[:1500]}"})
                continue
            first_s = time.perf_counter() - t0
            ts = times_ms(lambda eng=eng: clip(eng), dev, 2, a.reps)
            results[name] = (lat, out)
            row = {"backend": name, "first_clip_s": round(first_s, 2), "clip_ms": pct(ts, 0.5), "reps": len(ts),
                   "frames_out": len(out)}
            if name != "eager":
                el, eo = results["eager"]
                ps = [psnr(o, e) for o, e in zip(out, eo)]
                row.update(psnr_vs_eager_db=ps, min_psnr_db=min(ps), passes_40db=min(ps) >= 40.0,
                           latent_max_abs_vs_eager=(lat.float() - el.float()).abs().max().item(),
                           latent_max_abs_eager=el.float().abs().max().item())
            rows.write(row)
    print(f"backend_frames: {rows.count} rows -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

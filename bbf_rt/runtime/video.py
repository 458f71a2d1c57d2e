"""The video job behind `bbf-rt interpolate`: decode, plan, denoise in batches, encode in order.

Pass 1 decodes the frames once for their timestamps and scene cuts, so the whole output plan (and the
progress bar's total) is known up front and cuts use the planner's one rule. Pass 2 decodes again and
streams: every frame is encoded by the VAE once (it is the boundary of two intervals and the context of
its neighbours), a batch of intervals is denoised as soon as the frames it needs (its boundaries plus
`context_frames` on each side) have arrived, and output frames are written strictly in time order.
"""
from __future__ import annotations

import logging
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from bbf_rt.config import RuntimeConfig
from bbf_rt.errors import BBFInputError
from bbf_rt.io.scenecut import SceneCuts
from bbf_rt.io.image import read_image
from bbf_rt.io.video import VideoWriter, iter_frames, probe, read_audio
from bbf_rt.runtime.api import encode_text, get_trained_model, make_audio_encoder
from bbf_rt.runtime.backends import make_backend
from bbf_rt.runtime.engine import Conditions, DenoiseJob, Engine, resolve_device, resolve_dtype
from bbf_rt.runtime.stream import BackgroundWriter, prefetch
from bbf_rt.runtime.plan import apply_scene_cuts, batch_intervals, intervals, make_plan, output_fps

log = logging.getLogger(__name__)

OUTPUT_EXTENSIONS = (".mp4", ".mkv", ".mov")
AUDIO_SR = 16000


def _check_runtime(rt: RuntimeConfig) -> None:
    checks = [
        ("--steps", rt.steps, 1, 1000),
        ("--batch", rt.batch, 1, 256),
        ("--context", rt.context_frames, 0, 4),
    ]
    for name, value, lo, hi in checks:
        if not lo <= value <= hi:
            raise BBFInputError(f"{name}={value} is outside the allowed range {lo}..{hi}")
    if not 0.0 < rt.scene_cut_threshold <= 1.0:
        raise BBFInputError(f"--scene-threshold={rt.scene_cut_threshold} must be in (0, 1]")


def _check_paths(in_path: str, out_path: str) -> None:
    ext = Path(out_path).suffix.lower()
    if ext not in OUTPUT_EXTENSIONS:
        raise BBFInputError(f"output {out_path!r} has extension {ext or '(none)'!r}; use one of {', '.join(OUTPUT_EXTENSIONS)}")
    if os.path.exists(out_path) and os.path.exists(in_path) and os.path.samefile(in_path, out_path):
        raise BBFInputError(f"output {out_path!r} is the input file; choose another name (the input is never overwritten)")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise BBFInputError(f"output directory {out_dir!r} does not exist")


def _guidance_audio(mode: str, in_path: str, has_audio: bool) -> np.ndarray | None:
    """Mono 16 kHz samples aligned to the first video frame, or None, per --audio auto|on|off|FILE."""
    if mode == "off":
        return None
    if mode == "auto":
        return read_audio(in_path, AUDIO_SR) if has_audio else None
    if mode == "on":
        if not has_audio:
            raise BBFInputError(f"--audio on: {in_path!r} has no audio stream; use --audio off or --audio FILE")
        return read_audio(in_path, AUDIO_SR)
    if not os.path.isfile(mode):
        raise BBFInputError(f"--audio {mode!r}: expected auto, on, off or an existing audio file")
    return read_audio(mode, AUDIO_SR)


def _scan(in_path: str, threshold: float) -> tuple[list[Fraction], set[int]]:
    """Pass 1: every frame's timestamp and the intervals that are scene cuts."""
    pts: list[Fraction] = []
    cuts: set[int] = set()
    scene = SceneCuts(threshold)
    for i, (t, frame) in enumerate(prefetch(iter_frames(in_path))):
        pts.append(t)
        if scene.push(frame):
            cuts.add(i - 1)
    if len(pts) < 2:
        raise BBFInputError(f"{in_path!r} has {len(pts)} decodable frame(s); interpolation needs at least 2")
    return pts, cuts


def interpolate_video(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    factor: Fraction | None = None,
    fps: Fraction | None = None,
    prompt: str | None = None,
    audio: str = "auto",
    reference: str | None = None,
    model=None,
    runtime: RuntimeConfig | None = None,
    device: str | None = None,
    allow_untrained: bool = False,
    progress: bool = True,
    backend: str = "eager",
    crf: int = 16,
) -> dict:
    """Interpolate a video file to `factor` x its rate or to `fps`; returns a report dict.

    The output is written to a temporary file next to `out_path` and renamed only when complete; the
    input's audio streams are copied back unchanged. `backend` picks the denoiser implementation
    (`bbf_rt.runtime.backends.BACKENDS`); `crf` is the H.264 quality (0 = lossless, 16 default, higher =
    smaller files). Raises BBFInputError on unusable input.
    """
    t_start = time.perf_counter()
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    rt = runtime or RuntimeConfig()
    _check_runtime(rt)
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise BBFInputError(f"--crf={crf!r}: expected an int in [0, 51] (H.264; 0 = lossless)")
    _check_paths(in_path, out_path)
    info = probe(in_path)
    output_fps(info.fps, factor=factor, fps=fps)  # validates --factor/--fps before any work
    dev = resolve_device(device)
    dt = resolve_dtype(rt.dtype, dev)
    m = get_trained_model(model, dev, dt, allow_untrained, "--allow-untrained")
    denoiser = make_backend(backend, m, dev, dt, cuda_graphs=rt.cuda_graphs)
    eng = Engine(m, rt, dev, dt, denoiser=denoiser)
    cond = Conditions()
    if prompt is not None and "text" in m.cfg.modalities:
        cond.text, cond.text_mask = encode_text(m, prompt, dev)
    if reference is not None:
        ref = read_image(reference)
        cond.image = eng.encode(eng.to_pixels(ref[None]))[None]
    samples = _guidance_audio(audio, in_path, info.has_audio) if "audio" in m.cfg.modalities else None

    pts, cuts = _scan(in_path, rt.scene_cut_threshold)
    plan = apply_scene_cuts(make_plan(pts, info.fps, factor=factor, fps=fps), cuts)
    batches = batch_intervals(intervals(plan), rt.batch)
    copies: dict[int, list[int]] = {}
    for f in plan.frames:
        if f.is_copy:
            copies.setdefault(f.src0, []).append(f.index)

    audio_enc = mel = None
    if samples is not None:
        audio_enc = make_audio_encoder(m, dev)
        mel = audio_enc.log_mel(torch.from_numpy(samples)[None].to(dev))  # (1, M, n_mels), once per video

    H, W = info.height, info.width
    k = rt.context_frames
    n_in = len(pts)
    lat: dict[int, torch.Tensor] = {}
    pix: dict[int, torch.Tensor] = {}
    ready: dict[int, np.ndarray] = {}
    state = {"next": 0}

    from tqdm import tqdm

    bar = tqdm(total=len(plan), unit="frame", disable=not progress, desc="bbf-rt")
    with VideoWriter(out_path, W, H, plan.out_fps, audio_from=in_path if info.has_audio else None, crf=crf) as writer:
        encoder = BackgroundWriter(writer.write)  # libx264 runs beside the denoising loop

        def emit() -> None:
            while state["next"] in ready:
                encoder.submit(ready.pop(state["next"]))
                state["next"] += 1
                bar.update(1)

        def in_scene(a: int, b: int) -> bool:  # no cut between input frames a < b
            return not any(c in cuts for c in range(a, b))

        def job_for(i: int, taus) -> DenoiseJob:
            span = pts[i + 1] - pts[i]
            ctx = []
            for j in list(range(i - k, i)) + list(range(i + 2, i + 2 + k)):
                ok = 0 <= j < n_in and in_scene(min(i, j), max(i + 1, j))
                ctx.append((lat[j] if ok else None, float((pts[j] - pts[i]) / span) if 0 <= j < n_in else float(j - i)))
            a = None
            if mel is not None:
                times = torch.tensor([[float(pts[i] + t * span) for t in taus]], device=dev)
                a = audio_enc.windows(mel, times)[0]
            return DenoiseJob(key=i, lat0=lat[i], lat1=lat[i + 1], diff=eng.difference(pix[i][None], pix[i + 1][None])[0],
                              taus=[float(t) for t in taus], audio=a, context=ctx if k else None)

        def run_batch(batch) -> None:
            out = eng.run([job_for(b.i, b.taus) for b in batch], cond, H, W)
            decoded = eng.decode(torch.cat(out), H, W, eng.bounds([(pix[b.i], pix[b.i + 1], b.taus) for b in batch]))
            idx = [o for b in batch for o in b.out_indices]
            for o, fr in zip(idx, decoded):
                ready[o] = fr

        try:
            bi = 0
            decoded = 0
            for n, (_, frame) in enumerate(prefetch(iter_frames(in_path))):
                if n >= n_in:
                    break
                decoded = n + 1
                for o in copies.get(n, ()):
                    ready[o] = frame
                p = eng.to_pixels(frame[None])
                pix[n], lat[n] = p[0], eng.encode(p)[0]
                while bi < len(batches) and batches[bi][-1].i + 1 + k <= n:
                    run_batch(batches[bi])
                    bi += 1
                emit()
                low = (batches[bi][0].i - k) if bi < len(batches) else n
                for d in [j for j in lat if j < low]:
                    del lat[d], pix[d]
            if decoded != n_in:
                raise BBFInputError(f"{in_path!r} decoded {decoded} frames on the second pass but {n_in} on the first")
            while bi < len(batches):
                run_batch(batches[bi])
                bi += 1
            emit()
            if state["next"] != len(plan):
                raise RuntimeError(f"internal error: wrote {state['next']} of {len(plan)} planned frames")
            encoder.finish()  # every frame encoded (or the encoder's error raised) before the file is closed
        except BaseException:
            encoder.cancel()  # stop the encoder thread before the writer deletes its temporary file
            raise
    bar.close()
    n_interp = sum(len(b.taus) for batch in batches for b in batch)
    return {
        "input": in_path, "output": out_path, "frames_in": n_in, "frames_out": len(plan),
        "fps_in": str(info.fps), "fps_out": str(plan.out_fps), "interpolated": n_interp, "scene_cuts": len(cuts),
        "audio_guidance": samples is not None, "text_guidance": cond.text is not None, "model": m.cfg.name,
        "trained": m.trained, "device": str(dev), "dtype": str(dt).replace("torch.", ""), "steps": rt.steps,
        "backend": denoiser.describe(), "step_cache": {"threshold": rt.step_cache, **eng.cache_stats},
        "seconds": time.perf_counter() - t_start,
    }

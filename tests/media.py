"""Tiny synthetic test clips written with PyAV, returning exactly what went into the encoder.

`make_clip` writes a real video file (container chosen by the extension) whose frames show a textured
gradient with a bright square moving a few pixels per frame, plus an optional sine tone lasting exactly
as long as the video. Sizes are tiny so a whole clip encodes in milliseconds.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

# Audio codec per container: AAC where the container is meant for it, PCM where it is not lossy-only.
_AUDIO_CODEC = {".mp4": "aac", ".m4a": "aac", ".mov": "pcm_s16le", ".mkv": "pcm_s16le"}


def _scene(h: int, w: int, k: int, *, alt: bool, pattern: str) -> np.ndarray:
    """One frame (H, W, 3) uint8. `alt` picks a second, unrelated scene (other colours and texture)."""
    y, x = np.mgrid[0:h, 0:w]
    shift = 0 if pattern == "static" else 3 * k  # the square moves 3 px per frame
    if not alt:
        # Warm horizontal gradient with a fine checker texture; a white square moving right.
        r = 40 + (150 * x) // max(w - 1, 1)
        g = 30 + (60 * y) // max(h - 1, 1)
        b = np.full_like(x, 50)
        tex = ((x // 2 + y // 2) % 2) * 25
        img = np.stack([r + tex, g + tex, b + tex], axis=-1)
        x0, y0 = (4 + shift) % max(w - 12, 1), h // 4
        img[y0:y0 + 10, x0:x0 + 10] = 245
    else:
        # Dark blue vertical gradient with coarse stripes; a yellow disc moving down.
        r = np.full_like(x, 10)
        g = 20 + ((y // 4) % 2) * 60
        b = 90 + (120 * y) // max(h - 1, 1)
        img = np.stack([r, g, b], axis=-1)
        cy, cx = (6 + shift) % max(h - 8, 1) + 4, w // 2
        img[(y - cy) ** 2 + (x - cx) ** 2 <= 16] = (230, 220, 20)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_clip(
    path: str | os.PathLike,
    n_frames: int = 12,
    size: tuple[int, int] = (64, 48),
    fps: Fraction = Fraction(24),
    audio: bool = True,
    tone_hz: float = 440.0,
    sr: int = 48000,
    codec: str = "libx264",
    cut_at: int | None = None,
    pattern: str = "moving",
    *,
    pix_fmt: str | None = None,
    channels: int = 1,
    frame_times: Sequence[Fraction] | None = None,
    audio_offset_s: Fraction = Fraction(0),
    faststart: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Write a clip and return `(frames, audio)`.

    frames: (N, H, W, 3) uint8, exactly what was handed to the encoder; size is (width, height).
    audio: (channels, S) float32 tone of exactly `n_frames / fps` seconds (S = round(dur * sr)), or None;
    `n_frames=0` writes an audio-only file with half a second of tone.
    `cut_at=k` makes frames k.. an unrelated scene. `pattern`: "moving" or "static".
    `pix_fmt` defaults to yuv420p (libx264) or the codec's first format. `frame_times` (seconds,
    Fractions) gives a variable frame rate; the stream time base is then 1/1000 s.
    `audio_offset_s` starts the audio stream that much after the video (it still lasts the same).
    `faststart` puts an mp4's index ('moov') before the data, so cutting the file keeps it openable.
    """
    w, h = size
    ext = os.path.splitext(os.fspath(path))[1].lower()
    frames = np.stack([
        _scene(h, w, k, alt=cut_at is not None and k >= cut_at, pattern=pattern) for k in range(n_frames)
    ]) if n_frames else np.zeros((0, h, w, 3), np.uint8)
    samples = None
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(os.fspath(path), "w", options=options) as out:
        if n_frames:
            vs = out.add_stream(codec, rate=fps)
            vs.width, vs.height = w, h
            if pix_fmt is None:
                pix_fmt = "yuv420p" if codec == "libx264" else vs.codec_context.codec.video_formats[0].name
            vs.pix_fmt = pix_fmt
            if codec == "libx264":
                vs.options = {"crf": "8", "preset": "veryfast"}
            tb = Fraction(1, 1000) if frame_times is not None else 1 / Fraction(fps)
            vs.codec_context.time_base = tb
        if audio:
            acodec = _AUDIO_CODEC.get(ext, "aac")
            astream = out.add_stream(acodec, rate=sr)
            astream.layout = "mono" if channels == 1 else "stereo"
            # An audio-only file (n_frames=0) gets half a second of tone.
            dur = Fraction(n_frames) / Fraction(fps) if n_frames else Fraction(1, 2)
            n = round(dur * sr)
            t = np.arange(n, dtype=np.float64) / sr
            tone = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            samples = np.repeat(tone[None, :], channels, axis=0)
        for k in range(n_frames):
            vf = av.VideoFrame.from_ndarray(frames[k], format="rgb24")
            if frame_times is not None:
                vf.pts = int(Fraction(frame_times[k]) * 1000)
            else:
                vf.pts = k
            vf.time_base = tb
            for pkt in vs.encode(vf):
                out.mux(pkt)
        if n_frames:
            for pkt in vs.encode():
                out.mux(pkt)
        if samples is not None:
            fmt = "fltp" if acodec == "aac" else "s16"
            chunk = 1024
            a0 = round(Fraction(audio_offset_s) * sr)
            for j in range(0, samples.shape[1], chunk):
                part = samples[:, j:j + chunk]
                if fmt == "s16":
                    # Packed s16: one row of interleaved channels.
                    data = np.round(part.T.reshape(1, -1) * 32767).astype(np.int16)
                else:
                    data = np.ascontiguousarray(part)
                af = av.AudioFrame.from_ndarray(data, format=fmt, layout=astream.layout.name)
                af.sample_rate = sr
                af.pts = a0 + j
                af.time_base = Fraction(1, sr)
                for pkt in astream.encode(af):
                    out.mux(pkt)
            for pkt in astream.encode():
                out.mux(pkt)
            if fmt == "s16":
                # What the file holds, as decoders read s16 back to float (x / 32768).
                samples = np.round(samples * 32767) / 32768
                samples = samples.astype(np.float32)
    return frames, samples


def capture_video_writes(monkeypatch) -> list[np.ndarray]:
    """Replace the video job's encoder (bbf_rt.runtime.video.VideoWriter) with one that keeps every frame
    it is handed (before libx264's loss); returns the list they are appended to."""
    import bbf_rt.runtime.video as video

    got: list[np.ndarray] = []

    class Capture:
        def __init__(self, *a, **k) -> None: ...
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def write(self, frame): got.append(np.array(frame))

    monkeypatch.setattr(video, "VideoWriter", Capture)
    return got

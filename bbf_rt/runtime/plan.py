"""Output-frame planning: which output timestamps exist and how each one is made.

All times are exact `Fraction`s of a second, so "this output frame falls exactly on input frame i" is an
equality test, not a tolerance. Output frame k is at k / out_fps for k = 0 .. ceil(duration * out_fps) - 1
with duration = last input pts + 1 / in_fps: the output lasts as long as the input, so the original
soundtrack stays in sync, and factor 2 on N frames gives exactly 2N frames.

Each output frame either copies an input frame (its time equals that frame's, or lies after the last
one) or is interpolated in the interval (i, i + 1) at tau = (t - pts[i]) / (pts[i + 1] - pts[i]) in (0, 1).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from numbers import Rational, Real

import numpy as np

from bbf_rt.errors import BBFInputError

MAX_FACTOR = 32


@dataclass(frozen=True)
class OutputFrame:
    """Output frame `index` at `time` seconds: a copy of input frame src0 (src1 = tau = None), or
    interpolated between input frames src0 and src1 = src0 + 1 at tau in (0, 1)."""

    index: int
    time: Fraction
    src0: int
    src1: int | None = None
    tau: Fraction | None = None

    @property
    def is_copy(self) -> bool:
        return self.src1 is None


@dataclass(frozen=True)
class Plan:
    """Every output frame in order, with the rates and input timestamps they were planned from."""

    input_pts: tuple[Fraction, ...]
    in_fps: Fraction
    out_fps: Fraction
    duration: Fraction
    frames: tuple[OutputFrame, ...]

    def __len__(self) -> int:
        return len(self.frames)


@dataclass(frozen=True)
class IntervalJob:
    """The interpolated output frames of interval (i, i + 1): their taus and output indices, in order."""

    i: int
    taus: tuple[Fraction, ...]
    out_indices: tuple[int, ...]


def _rational(value: object, name: str) -> Fraction:
    """int, Fraction, "a/b" string or finite float -> Fraction. Floats are rounded to the nearest
    fraction with denominator <= 1001 (2.5 -> 5/2, 29.97 -> 2997/100); pass Fraction(30000, 1001) for NTSC."""
    if isinstance(value, bool):
        raise BBFInputError(f"{name}: got {value!r}; expected a number such as 2, Fraction(5, 2) or '5/2'")
    if isinstance(value, Rational):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BBFInputError(f"{name}: got {value!r}; expected a finite number")
        return Fraction(value).limit_denominator(1001)
    if isinstance(value, str):
        try:
            return Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            pass
    raise BBFInputError(f"{name}: got {value!r}; expected a number such as 2, Fraction(5, 2) or '5/2'")


def _check_pts(input_pts: Sequence[Fraction]) -> tuple[Fraction, ...]:
    pts = tuple(_rational(p, "input_pts") for p in input_pts)
    if not pts:
        raise BBFInputError("input_pts: got an empty sequence; expected at least one timestamp")
    if pts[0] != 0:
        raise BBFInputError(f"input_pts: first timestamp is {pts[0]}; expected 0 (times relative to frame 0)")
    for j in range(1, len(pts)):
        if pts[j] <= pts[j - 1]:
            raise BBFInputError(f"input_pts: timestamp {j} is {pts[j]}, not after timestamp {j - 1} "
                                f"({pts[j - 1]}); expected strictly increasing times")
    return pts


def output_fps(in_fps: Fraction, *, factor: object = None, fps: object = None) -> Fraction:
    """The output frame rate: in_fps * factor, or fps. Exactly one must be given.

    factor: 1 <= factor <= 32 (1 copies every frame). fps: in_fps <= fps <= 32 * in_fps.
    """
    in_fps = _rational(in_fps, "in_fps")
    if in_fps <= 0:
        raise BBFInputError(f"in_fps: got {in_fps}; expected > 0")
    if (factor is None) == (fps is None):
        raise BBFInputError(f"give exactly one of factor and fps; got factor={factor!r}, fps={fps!r}")
    if factor is not None:
        f = _rational(factor, "factor")
        if f <= 0:
            raise BBFInputError(f"factor: got {f}; expected a positive number >= 1")
        if f < 1:
            raise BBFInputError(f"factor: got {f}; expected >= 1: this tool interpolates (adds frames), "
                                "use a video converter to drop frames")
        if f > MAX_FACTOR:
            raise BBFInputError(f"factor: got {f}; expected at most {MAX_FACTOR}")
        return in_fps * f
    target = _rational(fps, "fps")
    if target <= 0:
        raise BBFInputError(f"fps: got {target}; expected a positive frame rate >= the input's {in_fps}")
    if target < in_fps:
        raise BBFInputError(f"fps: got {target}, below the input's {in_fps} fps; this tool interpolates, "
                            "use a video converter to drop frames")
    if target > MAX_FACTOR * in_fps:
        raise BBFInputError(f"fps: got {target}; expected at most {MAX_FACTOR}x the input's {in_fps} fps "
                            f"({MAX_FACTOR * in_fps})")
    return target


def make_plan(input_pts: Sequence[Fraction], in_fps: Fraction, *, factor: object = None,
              fps: object = None) -> Plan:
    """Plan every output frame for inputs at `input_pts` (seconds, strictly increasing, first 0; a
    variable frame rate is fine) with average rate `in_fps`, at in_fps * factor or at fps.

    Linear in the number of frames: one pointer walks the inputs as output times increase.
    """
    pts = _check_pts(input_pts)
    in_fps = _rational(in_fps, "in_fps")
    out_fps = output_fps(in_fps, factor=factor, fps=fps)
    duration = pts[-1] + 1 / in_fps
    n_out = math.ceil(duration * out_fps)
    frames = []
    i = 0
    last = len(pts) - 1
    for k in range(n_out):
        t = k / out_fps
        while i < last and pts[i + 1] <= t:
            i += 1
        if t == pts[i] or i == last:  # on an input frame, or past the last one: repeat it
            frames.append(OutputFrame(k, t, i))
        else:
            tau = (t - pts[i]) / (pts[i + 1] - pts[i])
            frames.append(OutputFrame(k, t, i, i + 1, tau))
    return Plan(pts, in_fps, out_fps, duration, tuple(frames))


def apply_scene_cuts(plan: Plan, cuts: Iterable[int]) -> Plan:
    """Never interpolate across a scene cut: interval i in `cuts` (frames i and i + 1 are different
    scenes) has its output frames copy the boundary frame nearest in time (tau < 1/2 -> frame i, else
    frame i + 1).

    Nearest, rather than always frame i: each output frame then shows the scene that is on screen at
    its own timestamp in the input, so the cut moves by at most half an input frame and stays in sync
    with the audio (a hard cut in the sound lands on the same frame as the cut in the picture).
    """
    n_intervals = len(plan.input_pts) - 1
    cut_set = set()
    for c in cuts:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < n_intervals:
            raise BBFInputError(f"cuts: got {c!r}; expected interval indices in [0, {n_intervals - 1}]")
        cut_set.add(int(c))
    frames = tuple(
        replace(f, src0=f.src0 if f.tau < Fraction(1, 2) else f.src1, src1=None, tau=None)
        if f.src1 is not None and f.src0 in cut_set else f
        for f in plan.frames
    )
    return replace(plan, frames=frames)


def intervals(plan: Plan) -> list[IntervalJob]:
    """The interpolated frames grouped by interval, ordered by interval index (copies are left out)."""
    jobs: list[IntervalJob] = []
    cur: int | None = None
    taus: list[Fraction] = []
    idx: list[int] = []
    for f in plan.frames:
        if f.src1 is None:
            continue
        if f.src0 != cur:
            if cur is not None:
                jobs.append(IntervalJob(cur, tuple(taus), tuple(idx)))
            cur, taus, idx = f.src0, [], []
        taus.append(f.tau)
        idx.append(f.index)
    if cur is not None:
        jobs.append(IntervalJob(cur, tuple(taus), tuple(idx)))
    return jobs


def batch_intervals(jobs: Sequence[IntervalJob], batch: int) -> list[list[IntervalJob]]:
    """Split `jobs` in order into lists of at most `batch` consecutive jobs with equal len(taus), so that
    one denoiser call can take each list as a batch of same-shaped inputs."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise BBFInputError(f"batch: got {batch!r}; expected an int >= 1")
    out: list[list[IntervalJob]] = []
    for job in jobs:
        if out and len(out[-1]) < batch and len(out[-1][0].taus) == len(job.taus):
            out[-1].append(job)
        else:
            out.append([job])
    return out


def audio_window(samples: np.ndarray, sr: int, center_s: float, window_s: float) -> np.ndarray:
    """The round(window_s * sr) samples centred on `center_s` seconds, zero outside the clip.

    samples: (S,) mono, sample 0 at time 0. The window starts at sample round((center_s - window_s/2) * sr).
    Returns a new (round(window_s * sr),) array of samples' dtype.
    """
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise BBFInputError(f"audio_window(samples): got shape {samples.shape}; expected (S,) mono samples")
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise BBFInputError(f"audio_window(sr): got {sr!r}; expected an int > 0")
    for name, v in (("center_s", center_s), ("window_s", window_s)):
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
            raise BBFInputError(f"audio_window({name}): got {v!r}; expected a finite number of seconds")
    if window_s <= 0:
        raise BBFInputError(f"audio_window(window_s): got {window_s!r}; expected > 0 seconds")
    n = round(window_s * sr)
    if n < 1:
        raise BBFInputError(f"audio_window(window_s): got {window_s!r}; shorter than one sample at {sr} Hz")
    start = round((center_s - window_s / 2) * sr)
    out = np.zeros(n, dtype=samples.dtype)
    lo, hi = max(start, 0), min(start + n, len(samples))
    if lo < hi:
        out[lo - start:hi - start] = samples[lo:hi]
    return out

"""Player mode: interpolated frames in display order, one interval per pushed frame, bounded latency.

    player = Player("ckpt.safetensors", factor=2)
    for frame in source:                  # (H, W, 3) uint8 RGB, constant frame rate
        for out in player.push(frame):    # ready frames, in display order
            show(out)
    for out in player.flush():            # the end of the stream
        show(out)

Display order: frame 0, then per interval (t-1, t) its factor-1 in-between frames and frame t; n frames in
give factor * (n - 1) + 1 frames out. Every pushed frame is VAE-encoded once: its latent is z1 of interval
t-1, z0 of interval t and the context of its neighbours. Interval t-1 runs as soon as the last frame it
needs has arrived: frame t itself (`lookahead=0`, the default), or frame t + lookahead when right-hand
context frames are wanted; left-hand context (runtime.context_frames past frames) costs no latency. Each
interval is its own batch-1 denoiser call (a CUDA graph per step on CUDA). Noise is seeded per interval
exactly as in the video job (seed * 1_000_003 + interval index), so with lookahead = context_frames the
frames equal `bbf-rt interpolate --batch 1` on the same frames; a scene cut repeats the boundary nearest
in time, as there.

Latency: `latencies_s` holds, per interval, the seconds from the start of the push (or flush) that
completed the interval to its frames being ready on the host (decoded, copied back).
"""
from __future__ import annotations

import time

import numpy as np

from bbf_rt.config import RuntimeConfig
from bbf_rt.errors import BBFInputError
from bbf_rt.io.scenecut import SceneCuts
from bbf_rt.runtime.api import check_frame, encode_text, get_trained_model
from bbf_rt.runtime.backends import make_backend
from bbf_rt.runtime.engine import (
    Conditions,
    DenoiseJob,
    Engine,
    resolve_device,
    resolve_dtype,
)
from bbf_rt.runtime.plan import MAX_FACTOR


class Player:
    """Frame-by-frame interpolation for a player: `push(frame) -> ready frames`, `flush()` at the end.

    model: a BBFModel, checkpoint path or preset (None = the embedded default). factor: integer rate
    multiplier (2..32). runtime: sampling settings (its `batch` is ignored: one interval per call).
    lookahead: right-hand context frames waited for (0..runtime.context_frames). prompt: text guidance.
    reference: (H', W', 3) uint8 image guidance. backend: see bbf_rt.runtime.backends.
    """

    def __init__(
        self,
        model=None,
        factor: int = 2,
        *,
        runtime: RuntimeConfig | None = None,
        device: str | None = None,
        prompt: str | None = None,
        reference: np.ndarray | None = None,
        lookahead: int = 0,
        backend: str = "eager",
        allow_untrained: bool = False,
    ) -> None:
        rt = runtime or RuntimeConfig()
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or not 2 <= factor <= MAX_FACTOR:
            raise BBFInputError(f"Player(factor={factor!r}): expected an integer in 2..{MAX_FACTOR}")
        if not 0 <= rt.context_frames <= 4:
            raise BBFInputError(f"Player: runtime.context_frames={rt.context_frames} is outside 0..4")
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or not 0 <= lookahead <= rt.context_frames:
            raise BBFInputError(
                f"Player(lookahead={lookahead!r}): expected an integer in 0..runtime.context_frames={rt.context_frames}"
            )
        dev = resolve_device(device)
        dt = resolve_dtype(rt.dtype, dev)
        m = get_trained_model(model, dev, dt, allow_untrained, "allow_untrained=True")
        self.rt = rt.replace(batch=1)
        self.eng = Engine(m, self.rt, dev, dt, denoiser=make_backend(backend, m, dev, dt, cuda_graphs=rt.cuda_graphs))
        self.cond = Conditions()
        if prompt is not None and "text" in m.cfg.modalities:
            self.cond.text, self.cond.text_mask = encode_text(m, prompt, dev)
        if reference is not None:
            ref = check_frame("reference", reference)
            self.cond.image = self.eng.encode(self.eng.to_pixels(ref[None]))[None]  # (1, 1, C, h', w')
        self.factor, self.lookahead, self.k = int(factor), lookahead, rt.context_frames
        self.taus = [j / self.factor for j in range(1, self.factor)]
        self.latencies_s: list[float] = []
        self._reset()

    def _reset(self) -> None:
        self.n = 0  # frames pushed in this stream
        self.next_interval = 0
        self.size: tuple[int, int] | None = None
        self.frames: dict[int, np.ndarray] = {}
        self.pix: dict = {}
        self.lat: dict = {}
        self.cuts: set[int] = set()
        self._scene = SceneCuts(self.rt.scene_cut_threshold)

    def push(self, frame: np.ndarray) -> list[np.ndarray]:
        """Add the next frame, (H, W, 3) uint8 RGB; returns the frames now ready, in display order."""
        t0 = time.perf_counter()
        a = check_frame("frame", frame).copy()  # the caller may reuse its buffer
        if self.size is None:
            self.size = a.shape[:2]
        elif a.shape[:2] != self.size:
            raise BBFInputError(f"frame {self.n} is {a.shape[1]}x{a.shape[0]}; this stream is {self.size[1]}x{self.size[0]}")
        t = self.n
        self.n += 1
        if self._scene.push(a):  # each frame downsampled once (~1.4 ms per 720p frame, on the host)
            self.cuts.add(t - 1)
        p = self.eng.to_pixels(a[None])
        self.frames[t], self.pix[t], self.lat[t] = a, p[0], self.eng.encode(p)[0]  # encoded once, used up to 2k+2 times
        out = [a] if t == 0 else []
        while self.next_interval + 1 + self.lookahead <= t:
            out += self._interval(t0)
        low = self.next_interval - self.k  # the oldest frame a coming interval still needs
        for j in [j for j in self.frames if j < low]:
            del self.frames[j], self.pix[j], self.lat[j]
        return out

    def flush(self) -> list[np.ndarray]:
        """End the stream: run the intervals still waiting for lookahead frames; the next push starts a new stream."""
        t0 = time.perf_counter()
        out = []
        while self.next_interval + 1 < self.n:
            out += self._interval(t0)
        self._reset()
        return out

    def _interval(self, t0: float) -> list[np.ndarray]:
        i = self.next_interval
        self.next_interval += 1
        H, W = self.size
        if i in self.cuts:  # never morph across a cut: repeat the boundary nearest in time
            mids = [self.frames[i] if tau < 0.5 else self.frames[i + 1] for tau in self.taus]
        else:
            known = min(self.n, i + 2 + self.lookahead)  # frames this interval may use, however late it runs

            def usable(j: int) -> bool:
                return 0 <= j < known and not any(c in self.cuts for c in range(min(i, j), max(i + 1, j)))

            ctx = [(self.lat[j] if usable(j) else None, float(j - i))
                   for j in list(range(i - self.k, i)) + list(range(i + 2, i + 2 + self.k))]
            job = DenoiseJob(key=i, lat0=self.lat[i], lat1=self.lat[i + 1],
                             diff=self.eng.difference(self.pix[i][None], self.pix[i + 1][None])[0],
                             taus=self.taus, context=ctx if self.k else None)
            bounds = self.eng.bounds([(self.pix[i], self.pix[i + 1], self.taus)])
            mids = list(self.eng.decode(self.eng.run([job], self.cond, H, W)[0], H, W, bounds))
        self.latencies_s.append(time.perf_counter() - t0)
        return mids + [self.frames[i + 1]]

    def latency_ms(self) -> dict[str, float | int]:
        """p50 / p90 / max of the per-interval latencies so far, in ms, and their count."""
        if not self.latencies_s:
            return {"n": 0}
        ms = np.asarray(self.latencies_s) * 1e3
        return {"n": int(ms.size), "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)), "max": float(ms.max())}

    def describe(self) -> dict:
        return {"factor": self.factor, "lookahead": self.lookahead, "context_frames": self.k,
                "backend": self.eng.denoiser.describe() if hasattr(self.eng.denoiser, "describe") else None,
                "device": str(self.eng.device), "dtype": str(self.eng.dtype).removeprefix("torch."),
                "step_cache": dict(self.eng.cache_stats)}

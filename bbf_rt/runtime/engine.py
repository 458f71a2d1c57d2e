"""The interpolation engine: frames in, in-between frames out, for a batch of intervals at once.

Shared by the Python API (`bbf_rt.interpolate`) and the video job. It pads frames to the model's
size multiple, encodes them with the VAE, builds the DiT's condition tensors, runs the sampler with
all classifier-free-guidance passes in one batched denoiser call, decodes and crops back.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bbf_rt import ops
from bbf_rt.config import RuntimeConfig
from bbf_rt.errors import BBFInputError
from bbf_rt.model import BBFModel
from bbf_rt.model.embed import boundary_similarity, normalised_difference
from bbf_rt.runtime import sampler

#: modalities that classifier-free guidance can act on, in cascade order
GUIDED = ("text", "audio")


@dataclass
class DenoiseJob:
    """One interval to fill: boundary latents, target timestamps and its conditions.

    lat0, lat1: (C, h, w) boundary latents; diff: () normalised start-end difference; taus: timestamps
    in (0, 1); audio: (F, La, n_mels) log-mel windows or None; context: list of ((C, h, w) latent, tau)
    or None; key: seeds this interval's noise, so its output does not depend on how jobs are batched.
    """

    key: int
    lat0: torch.Tensor
    lat1: torch.Tensor
    diff: torch.Tensor
    taus: Sequence[float]
    audio: torch.Tensor | None = None
    context: list[tuple[torch.Tensor | None, float]] | None = None


@dataclass
class Conditions:
    """Condition tensors shared by a batch (text and reference are per video, not per interval)."""

    text: torch.Tensor | None = None  # (1, Lt, text_dim)
    text_mask: torch.Tensor | None = None  # (1, Lt) bool
    image: torch.Tensor | None = None  # (1, Ni, C, h, w) reference latents


class _Staging:
    """Page-locked host buffers for uint8 frame transfers, one per (direction, shape), reused.

    A pageable copy goes through the driver's own staging in chunks (about 3x slower for a 720p frame on
    an H100 host). Before a buffer is written again, the event of its previous transfer is awaited, so
    an asynchronous upload never reads a buffer being refilled; downloads are copied out of the buffer
    before they are returned, so a caller may keep them.
    """

    def __init__(self, max_buffers: int = 4) -> None:
        self.max_buffers = max_buffers
        self.bufs: dict[tuple, tuple[torch.Tensor, torch.cuda.Event | None]] = {}

    def get(self, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = (kind, tuple(shape))
        if key in self.bufs:
            buf, ev = self.bufs.pop(key)
            if ev is not None:
                ev.synchronize()
        else:
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        while len(self.bufs) >= self.max_buffers:
            # oldest first; torch's pinned-memory allocator keeps a block until its async copies finish
            self.bufs.pop(next(iter(self.bufs)))
        self.bufs[key] = (buf, None)
        return buf

    def mark(self, kind: str, buf: torch.Tensor) -> None:
        ev = torch.cuda.Event()
        ev.record()
        self.bufs[(kind, tuple(buf.shape))] = (buf, ev)

    def upload(self, frames: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
        src = torch.as_tensor(frames)
        buf = self.get("up", tuple(src.shape))
        buf.copy_(src)
        out = buf.to(device, non_blocking=True)
        self.mark("up", buf)
        return out

    def download(self, x: torch.Tensor) -> np.ndarray:
        buf = self.get("down", tuple(x.shape))
        buf.copy_(x, non_blocking=True)
        self.mark("down", buf)
        self.bufs[("down", tuple(x.shape))][1].synchronize()
        return buf.numpy().copy()


def vae_in_layout(vae, channels_last: bool):
    """The VAE in the requested memory layout (CompactVAE.use_channels_last). The first engine sets it in
    place; an engine that wants the other layout of a VAE already in use gets a copy, so the engines
    sharing a model (and CUDA graphs captured on its weights) keep the weights they were built on."""
    if not hasattr(vae, "use_channels_last"):
        return vae
    if vae.channels_last != bool(channels_last):
        if getattr(vae, "_layout_in_use", False):
            vae = copy.deepcopy(vae)
        vae.use_channels_last(channels_last)
    vae._layout_in_use = True
    return vae


class Engine:
    """Holds a model on a device and turns IntervalJobs into frames."""

    def __init__(
        self, model: BBFModel, runtime: RuntimeConfig, device: torch.device, dtype: torch.dtype, denoiser=None,
    ) -> None:
        """`denoiser`: a backend from `bbf_rt.runtime.backends` (called like the DiT); None = eager."""
        if model.vae is None:
            raise BBFInputError(f"model {model.cfg.name!r} has no VAE; the pipeline needs one to turn frames into latents")
        if runtime.steps < 1:
            raise BBFInputError(f"steps={runtime.steps} must be >= 1")
        if runtime.solver not in sampler.SOLVERS:
            raise BBFInputError(f"solver={runtime.solver!r} is not one of {sorted(sampler.SOLVERS)}")
        if not (math.isfinite(runtime.step_cache) and runtime.step_cache >= 0):
            raise BBFInputError(f"step_cache={runtime.step_cache} must be a finite number >= 0 (0 = off)")
        self.model, self.rt, self.device, self.dtype = model, runtime, device, dtype
        self.denoiser = denoiser if denoiser is not None else model.dit
        if runtime.fp8_linear or runtime.attention != "exact":  # reduced precision (bbf_rt.runtime.quant)
            from bbf_rt.runtime.quant import wrap_denoiser

            self.denoiser = wrap_denoiser(model, self.denoiser, runtime.fp8_linear, runtime.attention)
        self.cfg = model.cfg
        self.sigmas = sampler.make_sigmas(runtime.steps, shift=runtime.shift)
        scales = {"text": runtime.text_scale, "audio": runtime.audio_scale}
        self.guided, self.scales = sampler.fold_unit_scales(list(GUIDED), [scales[m] for m in GUIDED])
        # step caching, summed over runs (bbf_rt.runtime.stepcache); the probe is built on first use
        self.cache_stats = {"steps": 0, "dit_calls": 0, "skipped": 0, "syncs": 0}
        self._probe = None
        self._staging = _Staging() if device.type == "cuda" and runtime.pinned_transfers else None
        # NHWC convs without transposes on the GPU (CompactVAE.use_channels_last)
        self.vae = vae_in_layout(model.vae, runtime.vae_channels_last) if device.type == "cuda" else model.vae
        vae = self.vae
        self._vae_enc, self._vae_dec = vae.encode_frames, vae.decode_frames
        if device.type == "cuda" and runtime.cuda_graphs:
            # the VAE at 720p is ~60 launches per call, launch bound once its GroupNorms are fused:
            # replayed per input shape (4 kept), outputs cloned out (bench/profile_player.py measures it)
            from bbf_rt.runtime.graphs import CUDAGraphDenoiser

            enc = CUDAGraphDenoiser(lambda x, s: vae.encode_frames(x), max_graphs=4)
            dec = CUDAGraphDenoiser(lambda z, s, **b: vae.decode_frames(z, **b), max_graphs=4)
            unit = torch.zeros(1, device=device)
            self._vae_enc, self._vae_dec = (lambda x: enc(x, unit)), (lambda z, **b: dec(z, unit, **b))

    # ---- frames <-> latents -------------------------------------------------------------------
    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.cfg.pixel_multiple
        return -(-height // m) * m, -(-width // m) * m

    def to_pixels(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1] on the device."""
        t = torch.as_tensor(frames)
        if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
            raise BBFInputError(f"frames must be uint8 (N, H, W, 3) RGB; got {tuple(t.shape)} {t.dtype}")
        if self._staging is not None and t.device.type == "cpu":
            t = self._staging.upload(t, self.device)
        else:
            t = t.to(self.device)
        return t.permute(0, 3, 1, 2).float() / 255.0

    @property
    def fuses(self) -> bool:
        """True when decoded frames are rebuilt from the boundary frames: the VAE has a fusion head and
        RuntimeConfig.fusion is on."""
        return self.rt.fusion and getattr(self.vae, "fusion", None) is not None

    def _padded(self, pixels: torch.Tensor) -> torch.Tensor:
        H, W = pixels.shape[-2:]
        Hp, Wp = self.padded_size(H, W)
        x = pixels * 2 - 1
        return F.pad(x, (0, Wp - W, 0, Hp - H), mode="replicate") if (Hp, Wp) != (H, W) else x

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, C, h, w) latents of the frames padded by edge replication."""
        return self._vae_enc(self._padded(pixels).to(self.dtype))

    def bounds(self, intervals) -> tuple | None:
        """decode()'s `bounds` for the frames of several intervals, in order: `intervals` holds one
        (pix0, pix1, taus) per interval, pix (3, H, W) in [0, 1] on the device. None unless Engine.fuses."""
        if not self.fuses:
            return None
        p0 = [p[None].expand(len(t), -1, -1, -1) for p, _, t in intervals]
        p1 = [p[None].expand(len(t), -1, -1, -1) for _, p, t in intervals]
        return torch.cat(p0), torch.cat(p1), [float(x) for _, _, t in intervals for x in t]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int, bounds=None) -> np.ndarray:
        """(N, C, h, w) -> (N, height, width, 3) uint8, cropped back from the padded size.

        bounds: (pix0, pix1, taus) of each latent's interval, the boundary frames as (N, 3, H, W) in [0, 1]
        on the device and the times as N floats; a VAE with a fusion head needs them (Engine.fuses) and
        rebuilds each frame from their pixels; others ignore them."""
        kw = {}
        if bounds is not None and self.fuses:
            pix0, pix1, taus = bounds
            n = latents.shape[0]
            if pix0.shape[0] != n or pix1.shape[0] != n or len(taus) != n:
                raise BBFInputError(f"decode: {n} latents need {n} boundary pairs and times; got "
                                    f"{pix0.shape[0]}, {pix1.shape[0]} and {len(taus)}")
            kw = {"frame0": self._padded(pix0).to(self.dtype), "frame1": self._padded(pix1).to(self.dtype),
                  "tau": torch.as_tensor([float(t) for t in taus], device=self.device, dtype=torch.float32)}
        x = ops.to_uint8_nhwc(self._vae_dec(latents.to(self.dtype), **kw), height, width)
        if self._staging is not None:
            return self._staging.download(x)
        return x.cpu().numpy()

    def difference(self, pix0: torch.Tensor, pix1: torch.Tensor) -> torch.Tensor:
        """Normalised start-end difference d for (N, 3, H, W) pixel pairs in [0, 1] -> (N,)."""
        return normalised_difference(boundary_similarity(pix0, pix1), self.cfg.diff_mu, self.cfg.diff_sigma)

    def valid_mask(self, height: int, width: int) -> torch.Tensor:
        """(1, 1, h, w): 1 on latent pixels that cover real image, 0 on padding."""
        s = self.cfg.vae_stride
        Hp, Wp = self.padded_size(height, width)
        m = torch.zeros(1, 1, Hp // s, Wp // s, device=self.device)
        m[..., : -(-height // s), : -(-width // s)] = 1
        return m

    # ---- denoising ----------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, jobs: Sequence[DenoiseJob], cond: Conditions, height: int, width: int) -> list[torch.Tensor]:
        """Denoise a batch of jobs with the same number of timestamps. Returns (F, C, h, w) per job."""
        n_t = {len(j.taus) for j in jobs}
        if len(n_t) != 1:
            raise BBFInputError(f"a batch needs the same number of timestamps per interval; got {sorted(n_t)}")
        B, Fr = len(jobs), n_t.pop()
        C, h, w = jobs[0].lat0.shape
        dev, dt = self.device, self.dtype
        # per-job noise from (seed, key), so a job's output does not depend on its batch mates; drawn on the
        # device (the CPU's MT19937 plus a pageable copy held the GPU idle); CPU and CUDA streams differ
        gdev = dev if dev.type == "cuda" else torch.device("cpu")
        noise = torch.stack([
            torch.randn(Fr, C, h, w, device=gdev, generator=torch.Generator(gdev).manual_seed(self.rt.seed * 1_000_003 + j.key))
            for j in jobs]).to(dev, dt)
        kw = self._inputs(jobs, cond, height, width)
        # guidance only for modalities this batch has; an absent one would add an identical pass
        guided = [(m, s) for m, s in zip(self.guided, self.scales) if f"{m}_mask" in kw]
        K = len(guided) + 1 if guided else 1
        if K > 1:
            kw = self._tile_for_cfg(kw, B, [m for m, _ in guided])

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return self.denoiser(x, sigma.to(dev, torch.float32), **kw)  # fp32: sigma feeds sinusoidal features

        weights = sampler.cfg_weights([s for _, s in guided]) if K > 1 else None
        cache = self._step_cache(denoise, kw, B) if self.rt.step_cache > 0 and self.rt.steps > 2 else None
        out = sampler.sample(cache if cache is not None else denoise, noise, self.sigmas, solver=self.rt.solver, cfg_weights=weights)
        if cache is not None:
            for k, v in cache.stats().items():
                self.cache_stats[k] += v
        return list(out.unbind(0))

    def _step_cache(self, denoise, kw: dict, B: int):
        """A StepCache around `denoise` for one run; its indicator sees the first guidance pass only.
        With fewer than 3 steps nothing can be skipped (the first and last always run), so run() does
        not build one and pays no probe."""
        from bbf_rt.runtime.stepcache import FirstBlockProbe, StepCache

        if self._probe is None:
            self._probe = FirstBlockProbe(self.model.dit)
            if self.device.type == "cuda" and self.rt.cuda_graphs:
                from bbf_rt.runtime.graphs import CUDAGraphDenoiser

                self._probe = CUDAGraphDenoiser(self._probe)  # the probe's ~40 small launches as one replay
        pass0 = {k: kw[k][:B] for k in ("tau", "z0", "z1", "valid", "diff")}
        probe = lambda x, sigma: self._probe(x, sigma, **pass0)  # noqa: E731
        return StepCache(denoise, probe, self.rt.step_cache, self.rt.steps, B)

    def _inputs(self, jobs: Sequence[DenoiseJob], cond: Conditions, height: int, width: int) -> dict:
        B, Fr = len(jobs), len(jobs[0].taus)
        dev, dt = self.device, self.dtype
        kw: dict = {
            "tau": torch.tensor([[float(t) for t in j.taus] for j in jobs], device=dev, dtype=torch.float32),
            "z0": torch.stack([j.lat0 for j in jobs]).to(dt),
            "z1": torch.stack([j.lat1 for j in jobs]).to(dt),
            "valid": self.valid_mask(height, width).expand(B, -1, -1, -1).to(dt),
            "diff": torch.stack([j.diff for j in jobs]).to(dev, torch.float32),
        }
        if cond.text is not None:
            kw["text"] = cond.text.expand(B, -1, -1).to(dev, dt)
            kw["text_mask"] = cond.text_mask.expand(B, -1).to(dev)
        if cond.image is not None:
            kw["image"] = cond.image.expand(B, -1, -1, -1, -1).to(dev, dt)
            kw["image_mask"] = torch.ones(B, cond.image.shape[1], dtype=torch.bool, device=dev)
        if any(j.audio is not None for j in jobs):
            ref = next(j.audio for j in jobs if j.audio is not None)
            kw["audio"] = torch.stack([j.audio if j.audio is not None else torch.zeros_like(ref) for j in jobs]).to(dev, dt)
            kw["audio_mask"] = torch.tensor([[j.audio is not None] * Fr for j in jobs], device=dev)
        if any(j.context for j in jobs):
            n_ctx = max(len(j.context or ()) for j in jobs)
            zeros = torch.zeros_like(jobs[0].lat0)
            lats, taus, mask = [], [], []
            for j in jobs:
                ctx = list(j.context or ()) + [(None, 0.0)] * (n_ctx - len(j.context or ()))
                lats.append(torch.stack([c if c is not None else zeros for c, _ in ctx]))
                taus.append([float(t) for _, t in ctx])
                mask.append([c is not None for c, _ in ctx])
            kw["context"] = torch.stack(lats).to(dt)
            kw["context_tau"] = torch.tensor(taus, device=dev, dtype=torch.float32)
            kw["context_mask"] = torch.tensor(mask, device=dev)
        return kw

    @staticmethod
    def _tile_for_cfg(kw: dict, B: int, guided: list[str]) -> dict:
        """Repeat every input K = len(guided)+1 times (pass-major); pass k keeps guided modalities
        1..k and drops the others (all-False masks), as `sampler.cfg_weights` expects."""
        K = len(guided) + 1
        out = {k: torch.cat([v] * K) for k, v in kw.items()}
        for idx, name in enumerate(guided):
            key = f"{name}_mask"
            if key in out:
                m = out[key].clone()
                for k in range(K):
                    if k < idx + 1:  # pass k has modalities 1..k on; modality idx+1 is off below pass idx+1
                        m[k * B : (k + 1) * B] = False
                out[key] = m
        return out


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BBFInputError(f"--device {device!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BBFInputError(f"--device {device!r} asked for CUDA but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise BBFInputError(f"dtype {name!r} is not one of auto, {', '.join(table)}")
    return table[name]



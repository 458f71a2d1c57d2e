"""`bbf_rt.interpolate`: the Python API for one interval, and the model/encoder loading it shares."""
from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bbf_rt.config import RuntimeConfig
from bbf_rt.errors import BBFInputError
from bbf_rt.model import BBFModel, load_model
from bbf_rt.runtime.engine import Conditions, Engine, DenoiseJob, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

#: where the trained default model ships inside the package (docs/training.md says how it was made)
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "bbf-s.safetensors"
MAX_TIMESTAMPS = 64


def default_model_path() -> Path:
    if not DEFAULT_WEIGHTS.is_file():
        raise BBFInputError(
            f"no trained default model: the embedded bbf-s weights ({DEFAULT_WEIGHTS}) are missing from this "
            "installation (reinstall bbf-rt); or pass a trained checkpoint with --model CHECKPOINT / model=CHECKPOINT"
        )
    return DEFAULT_WEIGHTS


def get_model(spec: BBFModel | str | os.PathLike | None, device: torch.device, dtype: torch.dtype) -> BBFModel:
    """A BBFModel on `device`: an instance as is, a checkpoint path, a preset name, or None = default."""
    if isinstance(spec, BBFModel):
        return spec.to(device=device, dtype=dtype).eval()
    model = load_model(default_model_path() if spec is None else spec, device=device, dtype=dtype)
    if not model.trained:
        log.warning("model %r has untrained (random) weights: its output is noise, for tests only", str(spec))
    return model


def get_trained_model(spec: BBFModel | str | os.PathLike | None, device: torch.device, dtype: torch.dtype,
                      allow_untrained: bool, allow_how: str) -> BBFModel:
    """get_model, refusing random weights unless allowed: their frames would be noise, not a result.
    allow_how: how the caller's user allows them (e.g. "--allow-untrained")."""
    m = get_model(spec, device, dtype)
    if not m.trained and not allow_untrained:
        raise BBFInputError(
            f"model {str(spec)!r} has untrained (random) weights, so its frames would be noise, not a result; "
            f"pass a trained checkpoint (or {allow_how} for plumbing tests)"
        )
    return m


def make_audio_encoder(model: BBFModel, device: torch.device):
    """The log-mel front end matching the model's audio branch (mels and tokens per frame)."""
    from bbf_rt.model.audio import AudioConfig, AudioEncoder

    base = AudioConfig()
    hop_s = base.hop / base.sample_rate
    cfg = AudioConfig(n_mels=model.cfg.audio_mels, window_s=model.cfg.audio_tokens * hop_s)
    return AudioEncoder(cfg).to(device)


def encode_text(model: BBFModel, text: str | torch.Tensor | np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L, text_dim) tokens and (1, L) mask from a prompt (MiniLM) or precomputed embeddings."""
    want = model.cfg.text_dim
    if isinstance(text, str):
        if not text.strip():
            raise BBFInputError("text prompt is empty; pass None for no text guidance")
        from bbf_rt.model.text import MiniLMTextEncoder

        enc = MiniLMTextEncoder(device="cpu")
        if enc.dim != want:
            raise BBFInputError(
                f"model {model.cfg.name!r} takes {want}-d text tokens but the built-in MiniLM encoder gives {enc.dim}; "
                "pass precomputed embeddings from the matching encoder"
            )
        tokens, mask = enc.encode([text])
    else:
        tokens = torch.as_tensor(text, dtype=torch.float32)
        if tokens.ndim == 2:
            tokens = tokens[None]
        if tokens.ndim != 3 or tokens.shape[0] != 1 or tokens.shape[-1] != want:
            raise BBFInputError(f"text embeddings must be (L, {want}) or (1, L, {want}); got {tuple(tokens.shape)}")
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
    return tokens.to(device), mask.to(device)


def check_frame(name: str, frame: np.ndarray | torch.Tensor) -> np.ndarray:
    a = frame.cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise BBFInputError(f"{name} must be an (H, W, 3) uint8 RGB image; got shape {a.shape} dtype {a.dtype}")
    if min(a.shape[:2]) < 16 or max(a.shape[:2]) > 8192:
        raise BBFInputError(f"{name} size {a.shape[1]}x{a.shape[0]} is outside 16..8192 pixels per side")
    return a


def check_timestamps(timestamps: Sequence[float | Fraction]) -> list[float]:
    ts = [float(t) for t in timestamps]
    if not ts or len(ts) > MAX_TIMESTAMPS:
        raise BBFInputError(f"timestamps must hold 1..{MAX_TIMESTAMPS} values in (0, 1); got {len(ts)}")
    bad = [t for t in ts if not (0.0 < t < 1.0)]
    if bad:
        raise BBFInputError(f"timestamps must lie strictly between 0 and 1 (the boundary frames); got {bad}")
    return ts


def interpolate(
    frame0: np.ndarray | torch.Tensor,
    frame1: np.ndarray | torch.Tensor,
    timestamps: Sequence[float | Fraction],
    *,
    text: str | torch.Tensor | None = None,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    reference: np.ndarray | None = None,
    context: Sequence[tuple[np.ndarray, float]] | None = None,
    model: BBFModel | str | os.PathLike | None = None,
    steps: int = 2,
    solver: str = "euler",
    shift: float = 1.0,
    text_scale: float = 1.0,
    audio_scale: float = 1.0,
    seed: int = 0,
    fusion: bool = True,
    device: str | None = None,
) -> np.ndarray:
    """Frames between `frame0` and `frame1` at `timestamps` (fractions of the interval, in (0, 1)).

    frame0, frame1: (H, W, 3) uint8 RGB. text: a prompt or precomputed (L, text_dim) embeddings.
    audio: mono float samples at `sample_rate` spanning exactly frame0 -> frame1 (each target frame
    hears the window centred on its time). reference: an (H', W', 3) uint8 image. context: neighbouring
    frames as (frame, tau) pairs, tau < 0 before frame0 and > 1 after frame1 (e.g. -1.0, 2.0).
    fusion: rebuild the frames from the boundary pixels when the model's VAE has a fusion head
    (RuntimeConfig.fusion). Returns (len(timestamps), H, W, 3) uint8.
    """
    a0, a1 = check_frame("frame0", frame0), check_frame("frame1", frame1)
    if a0.shape != a1.shape:
        raise BBFInputError(f"frame0 {a0.shape} and frame1 {a1.shape} must have the same size")
    taus = check_timestamps(timestamps)
    dev = resolve_device(device)
    dt = resolve_dtype("auto", dev)
    m = get_model(model, dev, dt)
    rt = RuntimeConfig(steps=steps, solver=solver, shift=shift, text_scale=text_scale, audio_scale=audio_scale, seed=seed,
                       fusion=fusion)
    eng = Engine(m, rt, dev, dt)
    H, W = a0.shape[:2]
    pix = eng.to_pixels(np.stack([a0, a1]))
    lat = eng.encode(pix)
    cond = Conditions()
    if text is not None:
        cond.text, cond.text_mask = encode_text(m, text, dev)
    if reference is not None:
        ref = check_frame("reference", reference)
        cond.image = eng.encode(eng.to_pixels(ref[None]))[None]  # (1, 1, C, h', w')
    job = DenoiseJob(key=0, lat0=lat[0], lat1=lat[1], diff=eng.difference(pix[:1], pix[1:])[0], taus=taus)
    if audio is not None:
        samples = np.asarray(audio, dtype=np.float32)
        if samples.ndim != 1 or samples.size < 2 or not np.isfinite(samples).all():
            raise BBFInputError(f"audio must be finite 1-D mono samples spanning the interval; got shape {samples.shape}")
        if sample_rate != 16000:
            raise BBFInputError(f"audio sample_rate must be 16000 (resample first); got {sample_rate}")
        dur = samples.size / sample_rate
        enc = make_audio_encoder(m, dev)
        times = torch.tensor([[t * dur for t in taus]], device=dev)
        job.audio = enc(torch.from_numpy(samples)[None].to(dev), times)[0]
    if context:
        ctx = []
        for i, (frame, tau) in enumerate(context):
            c = check_frame(f"context[{i}]", frame)
            if c.shape != a0.shape:
                raise BBFInputError(f"context[{i}] has size {c.shape}, the boundary frames {a0.shape}")
            if 0.0 <= float(tau) <= 1.0:
                raise BBFInputError(f"context[{i}] tau={tau} must lie outside [0, 1] (before frame0 or after frame1)")
            ctx.append((eng.encode(eng.to_pixels(c[None]))[0], float(tau)))
        job.context = ctx
    lats = eng.run([job], cond, H, W)[0]
    return eng.decode(lats, H, W, eng.bounds([(pix[0], pix[1], taus)]))

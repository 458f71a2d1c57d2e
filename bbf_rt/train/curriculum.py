"""BBF's progressive multi-stage curriculum (reconstruction; the paper gives no formulas).

The start-end difference d (EDEN's normalised mean per-pixel cosine similarity of the boundary
frames; ~0.16 for a static pair, lower = larger change) drives both the data and the loss:

- sampling: from a pool of `pool` candidates per kept sample, keep samples with probability
  p_i = softmax(-lam * d)_i (sampling-importance-resampling without replacement). lam < 0 favours
  small differences, lam = 0 is uniform, lam > 0 favours large ones; lam ramps linearly over a stage:
  lam(step) = lam_start + (lam_end - lam_start) * min(1, step / ramp_steps).
- loss weight: w_i = 1 + alpha * clip(-d_i, 0, d_max), normalised to mean 1 over the batch, so the
  learning rate means the same whatever the batch's mix.

Stages (`STAGES`): "vae" trains the autoencoder; "1" generic interpolation biased to small
differences; "2" large and non-linear motion with lam ramping up and difference-weighted loss;
"3" the condition branches on a mix of generic clips and the ambiguity suites, backbone at a low
learning rate (or frozen), each condition dropped independently so classifier-free guidance works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bbf_rt.errors import BBFInputError

#: condition dropout applies to these, each independently per sample
CONDITIONS = ("text", "image", "audio", "context")
#: data sources a stage mixes: generic clips and the four ambiguity suites
SOURCES = ("generic", "audio", "text", "context", "image")


@dataclass(frozen=True)
class Stage:
    """What one curriculum stage trains, on what data, with which schedule."""

    name: str
    trains: str  # "vae" | "backbone" | "branches" | "decoder" | "fusion"
    lr: float
    warmup: int  # linear learning-rate warmup (steps of this stage)
    lam_start: float = 0.0
    lam_end: float = 0.0
    ramp_steps: int = 1
    alpha: float = 0.0  # loss-weight slope on -d
    d_max: float = 4.0
    pool: int = 4  # candidates drawn per kept sample when lam != 0
    n_targets: tuple[int, ...] = (1, 3, 7)  # in-between frames per sample, cycled step by step (one per batch)
    tau_mode: str = "mixed"
    backbone_lr_mult: float = 1.0  # stage 3: 0 freezes the backbone (default), e.g. 0.1 = low learning rate
    cond_dropout: float = 0.0
    mix: tuple[tuple[str, float], ...] = (("generic", 1.0),)


STAGES: dict[str, Stage] = {
    "vae": Stage(name="vae", trains="vae", lr=4e-4, warmup=200),
    "1": Stage(name="1", trains="backbone", lr=3e-4, warmup=300, lam_start=-1.0, lam_end=-1.0, pool=3),
    "2": Stage(name="2", trains="backbone", lr=2e-4, warmup=100, lam_start=0.0, lam_end=2.0, ramp_steps=3000,
               alpha=1.0, d_max=4.0, pool=4),
    "3": Stage(name="3", trains="branches", lr=3e-4, warmup=200, lam_start=0.5, lam_end=0.5, alpha=0.5, pool=2,
               n_targets=(7,), tau_mode="grid", backbone_lr_mult=0.0, cond_dropout=0.15,
               mix=(("generic", 0.3), ("audio", 0.175), ("text", 0.175), ("context", 0.175), ("image", 0.175))),
    # the VAE decoder alone, encoder and latent statistics frozen: sharper frames without moving the latent
    # space the DiT was trained in (any time after stage 1)
    "decoder": Stage(name="decoder", trains="decoder", lr=2e-4, warmup=100),
    # the boundary-fusion head alone (bbf_rt.model.fusion), everything else frozen: frames rebuilt from the
    # boundary pixels; moderate motion bias (lam 0.5), difference-weighted loss as stage 2 but milder; one
    # in-between frame per clip: the head's cost is per frame, so more distinct scenes per step for the same work
    "fusion": Stage(name="fusion", trains="fusion", lr=3e-4, warmup=100, lam_start=0.5, lam_end=0.5, alpha=0.5,
                    pool=2, n_targets=(1,)),
}


def get_stage(name: str | int) -> Stage:
    key = str(name)
    if key not in STAGES:
        raise BBFInputError(f"stage={name!r}: allowed are {tuple(STAGES)}")
    return STAGES[key]


def targets_at(stage: Stage, step: int) -> int:
    """In-between frames of the batch at `step`: 2x interpolation (1), 4x (3) and 8x (7) in turn."""
    return stage.n_targets[step % len(stage.n_targets)]


def lam_at(stage: Stage, step: int) -> float:
    """The sampling temperature lam at `step` of the stage (linear ramp, then constant)."""
    frac = min(1.0, max(0, step) / max(1, stage.ramp_steps))
    return stage.lam_start + (stage.lam_end - stage.lam_start) * frac


def sampling_probs(d: torch.Tensor, lam: float) -> torch.Tensor:
    """p = softmax(-lam * d) over a pool: (N,) -> (N,) fp32 summing to 1."""
    return torch.softmax(-lam * d.float(), dim=0)


def select(d: torch.Tensor, lam: float, k: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of k of the N pool samples (CPU d), drawn without replacement with `sampling_probs`."""
    if k > d.numel():
        raise BBFInputError(f"k={k}: cannot keep more samples than the pool holds ({d.numel()})")
    return torch.multinomial(sampling_probs(d.cpu(), lam), k, replacement=False, generator=gen)


def loss_weights(d: torch.Tensor, alpha: float, d_max: float) -> torch.Tensor:
    """w = 1 + alpha * clip(-d, 0, d_max), normalised to mean 1: (B,) -> (B,) fp32."""
    w = 1.0 + alpha * (-d.float()).clamp(0.0, d_max)
    return w / w.mean()


def source_counts(mix: tuple[tuple[str, float], ...], batch: int) -> dict[str, int]:
    """Samples per source in a batch of `batch` (largest remainder; every source with weight > 0 gets >= 1
    when the batch is large enough)."""
    names = [n for n, _ in mix]
    bad = [n for n in names if n not in SOURCES]
    if bad:
        raise BBFInputError(f"mix has unknown sources {bad}; allowed: {SOURCES}")
    total = sum(w for _, w in mix)
    raw = [batch * w / total for _, w in mix]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: batch - sum(counts)]:
        counts[i] += 1
    return {n: c for n, c in zip(names, counts) if c > 0}


def dropout_keep(gen: torch.Generator, batch: int, p: float) -> dict[str, torch.Tensor]:
    """Per condition, a (B,) bool 'keep' mask: each condition dropped independently with probability p."""
    return {c: torch.rand(batch, generator=gen) >= p for c in CONDITIONS}

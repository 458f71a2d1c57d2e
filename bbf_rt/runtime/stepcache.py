"""Step caching for many-step samplers (TeaCache-style): skip a denoiser call whose input barely moved.

Indicator (TeaCache's): the first DiT block's timestep-modulated input h = LN(tokens) * (1 + scale1) + shift1,
which sees both the new latent x and the new sigma. Per step, d = mean|h - h_prev| / mean|h_prev| (fp32,
per sample, max over the batch) is added to an accumulator; while the accumulator stays below the
threshold the step reuses the cached output, otherwise the DiT runs and the accumulator resets to 0.
The first and the last step always run. TeaCache maps d through a polynomial fitted per model; we have
no fit, so d is used as is (the threshold is in units of relative L1 change of h).

What is reused: the last computed velocity, all CFG passes (not a residual inside the DiT). The denoiser
backends (eager, compile, CUDA graphs, AOTInductor, ONNX, TensorRT) are opaque callables, so only their
output can be cached; and for rectified flow v = noise - x0 is what stays nearly constant along a
trajectory (exactly constant on a straight one), so a skipped step is an Euler/multistep update with a
slightly stale slope, the solver still using the new x and sigma.

Host syncs: the skip decision must reach the host before the next launch (a skipped step launches
nothing), so each step between the first and the last reads one float back (`StepCache.syncs`).
h is computed by `FirstBlockProbe` on the first guidance pass only (h does not depend on the
conditions), without running any block; on CUDA it is replayed as its own CUDA graph.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from bbf_rt import ops

log = logging.getLogger(__name__)

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _ModulatedInput:
    """Stands in for `dit.blocks`: records block 0's modulated input and returns the tokens unchanged."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.block, self.out = block, None

    def __call__(self, x: torch.Tensor, e: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shift1, scale1 = (self.block.modulation + e).unbind(2)[:2]  # (B, F, dim) each, as Block.forward
        self.out = ops.norm_modulate(x, shift1, scale1, self.block.eps)  # (B, L, dim)
        return x


class _Prefix:
    """The `self` that BBFDiT.forward runs on for a probe: the DiT's own modules and config, its blocks
    replaced by the recorder, and no sequence sharding (every rank then sees the same h)."""

    def __init__(self, dit: torch.nn.Module, recorder: _ModulatedInput) -> None:
        self.__dict__.update(_dit=dit, blocks=[recorder], sharding=None)

    def __getattr__(self, name: str):
        return getattr(self._dit, name)


class FirstBlockProbe:
    """`probe(x, sigma, tau=, z0=, z1=, valid=, diff=) -> h`: the first block's modulated input
    (B, L, dim) in the DiT's dtype, from the DiT's patch and time embeddings, running no block.

    A DiT without `blocks[0].modulation` (or whose forward does not reach its blocks through
    `self.blocks`) falls back, with one warning, to the raw noisy latent x (B, F, C, H, W) as indicator.
    """

    def __init__(self, dit: torch.nn.Module) -> None:
        self.dit = dit
        blocks = getattr(dit, "blocks", None)
        self.usable = bool(blocks) and hasattr(blocks[0], "modulation") and hasattr(blocks[0], "eps")
        if not self.usable:
            self._fallback("the DiT has no blocks[0].modulation")

    def _fallback(self, reason: str) -> None:
        self.usable = False
        log.warning("step cache: %s; using the noisy latent x as the change indicator instead", reason)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        if self.usable:
            rec = _ModulatedInput(self.dit.blocks[0])
            type(self.dit).forward(_Prefix(self.dit, rec), x, sigma, **inputs)
            if rec.out is not None:
                return rec.out
            self._fallback("the DiT's forward did not reach its blocks through self.blocks")
        return x.clone()  # a fresh tensor, as the DiT path returns: callers keep it across steps


def relative_l1(h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """mean|h - prev| / mean|prev| per sample, fp32: (B, ...) x2 -> (B,)."""
    h, prev = h.flatten(1).float(), prev.flatten(1).float()
    return (h - prev).abs().mean(1) / prev.abs().mean(1).clamp_min(1e-12)


class StepCache:
    """Wraps a sampler's `denoise(x_batch, sigma_batch) -> v` for one sampling run of `steps` steps.

    probe(x, sigma) -> indicator tensor, called on the first `batch` rows (the first guidance pass).
    threshold > 0: accumulated relative L1 change of the indicator below which a step reuses the last
    computed output. After the run: `dit_calls`, `skipped`, `syncs` (host reads, one per decided step).
    """

    def __init__(self, denoise: Denoise, probe: Callable[..., torch.Tensor], threshold: float, steps: int, batch: int) -> None:
        assert threshold > 0 and steps >= 1 and batch >= 1
        self.denoise, self.probe, self.threshold = denoise, probe, float(threshold)
        self.steps, self.batch = steps, batch
        self.step = self.dit_calls = self.skipped = self.syncs = 0
        self.acc = 0.0
        self.v: torch.Tensor | None = None
        self.h_prev: torch.Tensor | None = None
        self.distances: list[float] = []  # per decided step: relative L1 change of the indicator

    def __call__(self, xb: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        i, b = self.step, self.batch
        self.step += 1
        last = i == self.steps - 1
        h = None if last else self.probe(xb[:b], sigma[:b])
        run = self.v is None or last or self.h_prev is None
        if not run:
            d = float(relative_l1(h, self.h_prev).max())  # the one host sync of this step
            self.syncs += 1
            self.distances.append(d)
            self.acc += d
            run = self.acc >= self.threshold
        self.h_prev = h
        if not run:
            self.skipped += 1
            return self.v
        self.acc = 0.0
        self.dit_calls += 1
        self.v = self.denoise(xb, sigma)
        return self.v

    def stats(self) -> dict[str, int]:
        return {"steps": self.step, "dit_calls": self.dit_calls, "skipped": self.skipped, "syncs": self.syncs}

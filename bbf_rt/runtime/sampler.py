"""Flow-matching sampling: sigma schedules, ODE solvers and multi-condition classifier-free guidance.

Conventions (rectified flow):
    x_sigma = (1 - sigma) * x0 + sigma * noise,  sigma in [0, 1]   (1 = pure noise, 0 = data)
    the denoiser returns the velocity v = noise - x0 = dx/dsigma
    data prediction: x0_hat = x - sigma * v
    multistep solvers: alpha = 1 - sigma, lambda = log(alpha / sigma) (half log-SNR; -inf at sigma = 1,
    +inf at sigma = 0)

`sample` integrates dx/dsigma = v from the first sigma of the schedule down to the last, with one `denoise`
call per step (all CFG passes batched into that call). The loop never reads a tensor back to the host:
every solver coefficient is a float64 Python float computed from the (host) schedule before the loop, and
the sampler state stays in the dtype of x.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from bbf_rt.errors import BBFInputError

__all__ = [
    "SOLVERS",
    "DPMPP2MSolver",
    "EulerSolver",
    "UniPCSolver",
    "cfg_weights",
    "fold_unit_scales",
    "make_sigmas",
    "sample",
    "shift_sigmas",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, float, torch.Tensor], None]
_S = TypeVar("_S", float, torch.Tensor)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_shift(shift: float) -> float:
    if not _is_real(shift) or not math.isfinite(shift) or shift <= 0:
        raise BBFInputError(f"shift must be a finite number > 0, got {shift!r}")
    return float(shift)


# ---------------------------------------------------------------------------------------------- schedules


def shift_sigmas(sigmas: _S, shift: float) -> _S:
    """Timestep shift sigma' = shift * sigma / (1 + (shift - 1) * sigma), elementwise.

    shift > 1 moves steps towards high noise, shift < 1 towards low noise, shift = 1 is the identity;
    0 and 1 are fixed points. Works on a float or a tensor (dtype kept).
    """
    shift = _check_shift(shift)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def make_sigmas(steps: int, shift: float = 1.0, sigma_max: float = 1.0) -> torch.Tensor:
    """Sampling schedule: `steps + 1` fp32 sigmas, strictly decreasing from sigma_max to exactly 0.

    The grid is uniform before the shift; its top is the pre-image of sigma_max under the shift, so the
    shifted schedule still starts at sigma_max. Computed in float64, rounded once to fp32.
    """
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise BBFInputError(f"steps must be an integer >= 1, got {steps!r}")
    shift = _check_shift(shift)
    if not _is_real(sigma_max) or not 0.0 < sigma_max <= 1.0:
        raise BBFInputError(f"sigma_max must be a number in (0, 1], got {sigma_max!r}")
    u_max = sigma_max / (shift - (shift - 1.0) * sigma_max)
    sig = shift_sigmas(torch.linspace(u_max, 0.0, int(steps) + 1, dtype=torch.float64), shift)
    sig[0], sig[-1] = float(sigma_max), 0.0
    return sig.to(torch.float32)


def _lambda(sigma: float) -> float:
    """Half log-SNR log((1 - sigma) / sigma) in float64, with its infinite limits at the ends."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _check_schedule(sigmas: torch.Tensor) -> list[float]:
    """Validate a schedule and return it as host float64 values (one read, before the loop)."""
    is_tensor = isinstance(sigmas, torch.Tensor)
    if not is_tensor or sigmas.ndim != 1 or sigmas.numel() < 2 or not sigmas.is_floating_point():
        got = f"{sigmas.dtype} {tuple(sigmas.shape)}" if is_tensor else type(sigmas).__name__
        raise BBFInputError(f"sigmas must be a 1-D float tensor of >= 2 values (see make_sigmas), got {got}")
    sig = sigmas.detach().to("cpu", torch.float64).tolist()
    ok = all(math.isfinite(s) for s in sig) and sig[0] <= 1.0 and sig[-1] >= 0.0
    if not ok or any(b >= a for a, b in zip(sig, sig[1:])):
        raise BBFInputError(f"sigmas must be finite, strictly decreasing and within [0, 1], got {sig}")
    return sig


# ------------------------------------------------------------------------------------------------ solvers
#
# Every solver is built once per run from the host schedule and exposes step(i, x, v) -> x at sigmas[i+1],
# where x is the state at sigmas[i] and v the (guided) velocity there. Multistep history lives in the object.
#
# First-order data-prediction step s -> t (DDIM / DPM-Solver++(1)): x_t = (t/s) x_s + (1 - t/s) x0_hat,
# since alpha_t (1 - exp(-h)) = (s - t) / s under alpha = 1 - sigma. For rectified flow this equals the Euler
# step, and stays finite at s = 1 (lambda = -inf) and t = 0 (lambda = +inf, where it returns x0_hat).


def _multistep2(sig: list[float], lam: list[float], i: int) -> tuple[float, float, float]:
    """(c_x, c_0, c_1) of DPM-Solver++(2M): x_{i+1} = c_x x_i + c_0 x0_i + c_1 x0_{i-1}.

    x0 is extrapolated linearly in lambda: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i.
    First order on the first step, when the previous point sits at lambda = -inf (r = inf, the correction
    vanishes in the limit) and on the final step to sigma = 0 (h_i = inf: that step is the x0 prediction).
    """
    s, t = sig[i], sig[i + 1]
    c_x, c_d = t / s, (s - t) / s
    if i == 0 or t == 0.0 or math.isinf(lam[i - 1]):
        return c_x, c_d, 0.0
    r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
    return c_x, c_d * (1.0 + 0.5 / r), -c_d * 0.5 / r


class EulerSolver:
    """First-order Euler on dx/dsigma = v: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i."""

    def __init__(self, sigmas: Sequence[float]) -> None:
        self.sig = list(sigmas)

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x + (self.sig[i + 1] - self.sig[i]) * v


class DPMPP2MSolver:
    """DPM-Solver++(2M), data-prediction form, for alpha = 1 - sigma; second order, one call per step."""

    def __init__(self, sigmas: Sequence[float]) -> None:
        self.sig = list(sigmas)
        lam = [_lambda(s) for s in self.sig]
        self.coef = [_multistep2(self.sig, lam, i) for i in range(len(self.sig) - 1)]
        self.x0_prev: torch.Tensor | None = None

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x0 = x - self.sig[i] * v
        c_x, c_0, c_1 = self.coef[i]
        out = c_x * x + c_0 * x0
        if c_1 != 0.0:
            out = out + c_1 * self.x0_prev
        self.x0_prev = x0
        return out


class UniPCSolver:
    """UniPC with B(h) = expm1(-h) ("bh2"), data prediction, solver order 2.

    Predictor UniP-2 with rho = 1/2 (as diffusers; then it is DPM-Solver++(2M)); corrector UniC re-solves the
    step just taken with the x0 prediction at its end point, which the next step needs anyway, so the
    order rises by one at no extra denoiser call. The model output is not re-evaluated at the corrected
    point. No corrector before the final step to sigma = 0, whose x0 prediction ignores x.
    """

    def __init__(self, sigmas: Sequence[float]) -> None:
        self.sig = list(sigmas)
        lam = [_lambda(s) for s in self.sig]
        n = len(self.sig) - 1
        self.pred = [_multistep2(self.sig, lam, i) for i in range(n)]
        orders = [2 if c[2] != 0.0 else 1 for c in self.pred]
        self.corr: list[tuple[float, float, float, float] | None] = [None] * n
        for i in range(1, n):
            if self.sig[i + 1] > 0.0:
                self.corr[i] = self._corrector(lam, i, orders[i - 1])
        self.x_prev: torch.Tensor | None = None
        self.x0_hist: list[torch.Tensor] = []  # x0 predictions at sigmas[i-1], sigmas[i-2]

    def _corrector(self, lam: list[float], i: int, order: int) -> tuple[float, float, float, float]:
        """(a_x, a_0, a_1, a_2) of x_i^c = a_x x_{i-1}^c + a_0 x0_i + a_1 x0_{i-1} + a_2 x0_{i-2}.

        UniC-p for the step i-1 -> i, p = order of the predictor used on it:
        x_i^c = (t/s) x_{i-1} + c_d [x0_{i-1} + rho_1 (x0_{i-2} - x0_{i-1}) / r_1 + rho_t (x0_i - x0_{i-1})],
        with c_d = alpha_t (1 - exp(-h)) = (s - t)/s, r_1 = (lambda_{i-2} - lambda_{i-1}) / h and rho
        solving [[1, 1], [r_1, 1]] (rho_1, rho_t) = (b_0, b_1), where B = expm1(-h),
        g_1 = B / (-h) - 1, g_2 = g_1 / (-h) - 1/2, b_0 = g_1 / B, b_1 = 2 g_2 / B (b -> 1/2, 1/3 as h -> 0,
        i.e. Adams-Moulton 3 on uniform steps). p = 1 uses rho_t = 1/2 as the reference implementations do
        (trapezoid in alpha/sigma; finite even when h = inf on the first step).
        """
        s, t = self.sig[i - 1], self.sig[i]
        c_x, c_d = t / s, (s - t) / s
        if order == 1:
            return c_x, 0.5 * c_d, 0.5 * c_d, 0.0
        h = lam[i] - lam[i - 1]
        r1 = (lam[i - 2] - lam[i - 1]) / h
        hh = -h
        b_h = math.expm1(hh)
        g1 = b_h / hh - 1.0
        g2 = g1 / hh - 0.5
        b0, b1 = g1 / b_h, 2.0 * g2 / b_h
        rho_1 = (b0 - b1) / (1.0 - r1)
        rho_t = b0 - rho_1
        return c_x, c_d * rho_t, c_d * (1.0 - rho_1 / r1 - rho_t), c_d * rho_1 / r1

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x0 = x - self.sig[i] * v
        corr = self.corr[i]
        if corr is not None:
            a_x, a_0, a_1, a_2 = corr
            x = a_x * self.x_prev + a_0 * x0 + a_1 * self.x0_hist[0]
            if a_2 != 0.0:
                x = x + a_2 * self.x0_hist[1]
        c_x, c_0, c_1 = self.pred[i]
        out = c_x * x + c_0 * x0
        if c_1 != 0.0:
            out = out + c_1 * self.x0_hist[0]
        self.x_prev = x
        self.x0_hist = [x0] + self.x0_hist[:1]
        return out


SOLVERS: dict[str, type[EulerSolver] | type[DPMPP2MSolver] | type[UniPCSolver]] = {
    "euler": EulerSolver,
    "dpmpp2m": DPMPP2MSolver,
    "unipc": UniPCSolver,
}


# ---------------------------------------------------------------------------------------------------- CFG


def _check_scales(scales: Sequence[float]) -> list[float]:
    out = []
    for k, s in enumerate(scales):
        if not _is_real(s) or not math.isfinite(s) or s < 0:
            raise BBFInputError(f"scales[{k}] must be a finite number >= 0, got {s!r}")
        out.append(float(s))
    return out


def cfg_weights(scales: Sequence[float]) -> list[float]:
    """Per-pass weights of cascaded multi-condition classifier-free guidance.

    With M guided modalities ordered 1..M and scales s_1..s_M, pass 0 has every guided modality off and
    pass k has modalities 1..k on. The guided velocity
        v = v_0 + sum_{k=1..M} s_k (v_k - v_{k-1})
    is the weighted sum sum_k w_k v_k with
        w_0 = 1 - s_1,  w_k = s_k - s_{k+1} (0 < k < M),  w_M = s_M,
    so the weights sum to 1. M = 0 gives [1.0] (one unguided pass). A scale of 0 turns its modality's
    effect off; a pass whose weight is 0 (s_1 = 1, or equal consecutive scales) contributes nothing and can
    be dropped by the caller, see `fold_unit_scales`. Returns K = M + 1 floats, pass order = block order
    in `sample(..., cfg_weights=...)`.
    """
    s = _check_scales(scales)
    if not s:
        return [1.0]
    return [1.0 - s[0]] + [a - b for a, b in zip(s, s[1:])] + [s[-1]]


def fold_unit_scales(names: Sequence[str], scales: Sequence[float]) -> tuple[list[str], list[float]]:
    """Drop modalities whose scale is exactly 1 from the cascade; the caller keeps them on in every pass.

    Saves one pass per folded modality. The guided velocity is unchanged when the folded modalities lead
    the cascade (s_1 = 1 makes w_0 = 0, so pass 0 is dead and pass 1 becomes the new base). Folding a
    unit-scale modality further down keeps it on in the passes before its own, which assumes its effect
    is additive to the others' (the usual approximation), not an exact identity. Returns (names, scales)
    of the remaining guided modalities, in order.
    """
    names, s = list(names), _check_scales(scales)
    if len(names) != len(s):
        raise BBFInputError(
            f"names and scales must have the same length, got {len(names)} names and {len(s)} scales"
        )
    kept = [(n, v) for n, v in zip(names, s) if v != 1.0]
    return [n for n, _ in kept], [v for _, v in kept]


def _check_weights(weights: Sequence[float]) -> list[float]:
    w = [float(v) if _is_real(v) else math.nan for v in weights]
    if not w or not all(math.isfinite(v) for v in w) or abs(math.fsum(w) - 1.0) > 1e-6:
        raise BBFInputError(
            f"cfg_weights must be finite numbers summing to 1 (see cfg_weights()), got {list(weights)!r}"
        )
    return w


# ------------------------------------------------------------------------------------------------ sampling


def sample(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str = "euler",
    cfg_weights: Sequence[float] | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1]; returns x there (x0 when the schedule ends at 0).

    denoise(x_batch, sigma_batch) -> v is called once per step (len(sigmas) - 1 calls). Without CFG,
    x_batch is x, shape (B, ...), and sigma_batch is (B,). With cfg_weights = [w_0..w_{K-1}] (K passes,
    summing to 1; see `cfg_weights()`), x_batch is x tiled K times, shape (K*B, ...), block k = pass k;
    the caller's denoiser sets each block's conditioning, and the guided velocity is sum_k w_k v_k.
    sigma_batch has dtype promote(sigmas.dtype, x.dtype), i.e. fp32 for a bf16 x and the fp32 schedule,
    so timestep embeddings do not see bf16-rounded sigmas. v must have x_batch's shape; it is cast to
    x.dtype and the whole state stays in x.dtype. callback(i, sigma, x) gets the state after step i
    with sigma = sigmas[i+1] as a host float. Run under torch.inference_mode() for inference.
    """
    sig = _check_schedule(sigmas)
    if solver not in SOLVERS:
        raise BBFInputError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise BBFInputError(f"x must be a floating tensor of shape (B, ...), got {got}")
    weights = [1.0] if cfg_weights is None else _check_weights(cfg_weights)
    k, b = len(weights), x.shape[0]
    # One contiguous (K*B,) sigma row per step, built once before the loop: the loop only indexes it.
    sig_dtype = torch.promote_types(sigmas.dtype, x.dtype)
    sig_rows = sigmas.to(device=x.device, dtype=sig_dtype)[:, None].expand(-1, k * b).contiguous()
    tile = (k,) + (1,) * (x.ndim - 1)
    state = SOLVERS[solver](sig)
    for i in range(len(sig) - 1):
        xb = x if k == 1 else x.repeat(tile)  # (K*B, ...)
        v = denoise(xb, sig_rows[i])
        if not isinstance(v, torch.Tensor) or v.shape != xb.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise BBFInputError(f"denoise must return a tensor of shape {tuple(xb.shape)}, got {got}")
        v = v.to(x.dtype)
        if k > 1:
            vk = v.unflatten(0, (k, b))  # (K, B, ...)
            v = weights[0] * vk[0]
            for w, vj in zip(weights[1:], vk[1:]):
                v = v + w * vj
        x = state.step(i, x, v)
        if callback is not None:
            callback(i, sig[i + 1], x)
    return x

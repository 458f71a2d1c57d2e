"""Flow-matching sampler: schedules, solver convergence orders on an exact flow, batched CFG, argument checks.

The convergence tests use Gaussian data x0 ~ N(mu, s^2), for which the probability-flow ODE is known in
closed form: the marginal at sigma is N(m, sd^2) with m = (1 - sigma) mu and
sd = sqrt((1 - sigma)^2 s^2 + sigma^2), the exact velocity is v = m' + sd' (x - m) / sd, and the
trajectory starting at x(1) = z is x(sigma) = m(sigma) + sd(sigma) z.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from bbf_rt.errors import BBFInputError
from bbf_rt.runtime.sampler import (
    SOLVERS,
    DPMPP2MSolver,
    cfg_weights,
    fold_unit_scales,
    make_sigmas,
    sample,
    shift_sigmas,
)

@dataclass(frozen=True)
class GaussianFlow:
    """Exact probability flow of data x0 ~ N(mu, s^2) per element, float64."""

    mu: float
    s: float

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """v = m' + sd' (x - m) / sd. x: (B, N), sigma: (B,)."""
        sig = sigma.to(torch.float64)[:, None]
        m = (1.0 - sig) * self.mu
        sd = torch.sqrt((1.0 - sig) ** 2 * self.s**2 + sig**2)
        dsd = (sig - (1.0 - sig) * self.s**2) / sd
        return -self.mu + dsd * (x - m) / sd

    def state(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """x(sigma) on the trajectory through x(1) = z."""
        return (1.0 - sigma) * self.mu + math.sqrt((1.0 - sigma) ** 2 * self.s**2 + sigma**2) * z

    def max_error(self, solver: str, sigmas: torch.Tensor) -> float:
        z = start_points()
        out = sample(self.velocity, z, sigmas, solver)
        return (out - self.state(z, float(sigmas[-1]))).abs().max().item()


def start_points() -> torch.Tensor:
    return torch.linspace(-3.0, 3.0, 4 * 65, dtype=torch.float64).reshape(4, 65)  # (B, N)


def fitted_slope(steps: list[int], errors: list[float]) -> float:
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


FULL_FLOW = GaussianFlow(mu=1.0, s=0.7)
TRUNC_FLOW = GaussianFlow(mu=1.5, s=0.3)


@pytest.mark.parametrize("flow", [FULL_FLOW, TRUNC_FLOW])
def test_exact_velocity_matches_fine_rk4(flow):
    z = start_points()
    x, n = z.clone(), 2000
    h = -1.0 / n

    def f(x: torch.Tensor, s: float) -> torch.Tensor:
        return flow.velocity(x, torch.full((x.shape[0],), s, dtype=torch.float64))

    for i in range(n):
        s = 1.0 + i * h
        k1 = f(x, s)
        k2 = f(x + 0.5 * h * k1, s + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, s + 0.5 * h)
        k4 = f(x + h * k3, s + h)
        x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        if i + 1 == n // 2:
            torch.testing.assert_close(x, flow.state(z, 0.5), rtol=0, atol=1e-10)
    torch.testing.assert_close(x, flow.mu + flow.s * z, rtol=0, atol=1e-10)


# Full runs from sigma = 1 to 0. DPM-Solver++(2M) is O(N^-2 log N) here, not clean O(N^-2): near both ends
# of a uniform-sigma grid the lambda steps stay O(1) (lambda -> -inf at sigma = 1 and +inf at 0), and the
# j-th step from an end makes a local error ~ 1/(N^2 j), whose sum grows like log N. The measured slope
# thus creeps towards -2 (-1.6 at 64 steps, -1.8 at 1000); the step counts are chosen large enough that
# "< -1.7" separates it from a first-order bug (slope -1). UniPC's corrector cancels that term (slope -2).
FULL_STEPS = [256, 512, 1024, 2048]
FULL_ORDER = {"euler": (-1.3, -0.8), "dpmpp2m": (-3.0, -1.7), "unipc": (-3.0, -1.95)}


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("solver", sorted(FULL_ORDER))
def test_convergence_order_full_schedule(solver, shift):
    errors = [FULL_FLOW.max_error(solver, make_sigmas(n, shift)) for n in FULL_STEPS]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    slope = fitted_slope(FULL_STEPS, errors)
    lo, hi = FULL_ORDER[solver]
    assert lo < slope < hi, (solver, shift, slope, errors)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_unipc_corrector_beats_its_predictor(shift):
    """UniPC's predictor is DPM-Solver++(2M); the corrector must lower the error at every step count."""
    for n in (16, 64, 256):
        sigmas = make_sigmas(n, shift)
        assert FULL_FLOW.max_error("unipc", sigmas) < FULL_FLOW.max_error("dpmpp2m", sigmas)


def sawtooth_schedule(steps: int, end: float, shift: float) -> torch.Tensor:
    """sigma from 1 to `end` with step sizes cycling 1:2:3 before the shift (steps divisible by 3), fp64."""
    d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).repeat(steps // 3)
    u = torch.cat([torch.zeros(1, dtype=torch.float64), d.cumsum(0)]) / d.sum()
    return shift_sigmas(1.0 - (1.0 - end) * u, shift)


# Runs stopped at sigma = 0.2 (no first-order x0 step at the end), on a non-smooth grid so the multistep
# coefficients are exercised with step ratios far from 1: the UniPC corrector's extra order shows (~3).
TRUNC_STEPS = [48, 96, 192, 384]
TRUNC_ORDER = {"euler": (-1.3, -0.8), "dpmpp2m": (-2.5, -1.85), "unipc": (-3.5, -2.5)}


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("solver", sorted(TRUNC_ORDER))
def test_convergence_order_truncated_sawtooth_schedule(solver, shift):
    errors = [TRUNC_FLOW.max_error(solver, sawtooth_schedule(n, 0.2, shift)) for n in TRUNC_STEPS]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    slope = fitted_slope(TRUNC_STEPS, errors)
    lo, hi = TRUNC_ORDER[solver]
    assert lo < slope < hi, (solver, shift, slope, errors)


def test_dpmpp2m_steps_match_textbook_form():
    """Against DPM-Solver++(2M) as published (lambda, expm1): x_t = (sigma_t/sigma_s) x - alpha_t expm1(-h) D.

    Convergence orders cannot catch a swapped step ratio r (its first-order error telescopes over the
    steps), so the coefficients are pinned here on a grid with unequal steps.
    """
    sig = [0.9, 0.6, 0.5, 0.2, 0.0]
    lam = [math.log((1.0 - s) / s) for s in sig[:-1]]
    gen = torch.Generator().manual_seed(4)
    x, *vs = torch.randn(5, 8, dtype=torch.float64, generator=gen)
    solver, x0_prev, ref = DPMPP2MSolver(sig), None, x
    for i in range(4):
        x0 = ref - sig[i] * vs[i]
        if i == 3:
            want = x0  # sigma_t = 0: the x0 prediction
        else:
            h = lam[i + 1] - lam[i]
            d = x0
            if x0_prev is not None:
                r = (lam[i] - lam[i - 1]) / h
                d = (1.0 + 1.0 / (2.0 * r)) * x0 - x0_prev / (2.0 * r)
            want = sig[i + 1] / sig[i] * ref - (1.0 - sig[i + 1]) * math.expm1(-h) * d
        got = solver.step(i, ref, vs[i])
        torch.testing.assert_close(got, want)
        ref, x0_prev = want, x0


def test_make_sigmas_endpoints_and_shift():
    for steps, shift in [(1, 1.0), (7, 1.0), (30, 3.0), (13, 0.5)]:
        s = make_sigmas(steps, shift)
        assert s.dtype == torch.float32 and s.shape == (steps + 1,)
        assert s[0].item() == 1.0 and s[-1].item() == 0.0
        assert bool((s[1:] < s[:-1]).all())
    torch.testing.assert_close(make_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # u = 1, .75, .5, .25, 0 -> 3u / (1 + 2u)
    torch.testing.assert_close(make_sigmas(4, shift=3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert shift_sigmas(0.5, 3.0) == 0.75
    assert shift_sigmas(0.3, 1.0) == 0.3
    # sigma_max is the first value after the shift: u_max = 0.9 / (3 - 2 * 0.9) = 0.75.
    torch.testing.assert_close(make_sigmas(3, shift=3.0, sigma_max=0.9), torch.tensor([0.9, 0.75, 0.5, 0.0]))
    for sigma_max, shift in [(0.93, 2.9), (0.377, 7.3), (0.61, 0.45)]:
        s = make_sigmas(11, shift, sigma_max)
        assert s[0].item() == torch.tensor(sigma_max, dtype=torch.float32).item() and s[-1].item() == 0.0


def _field(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """A nonlinear velocity that depends on a per-sample condition. x, cond: (B, D), sigma: (B,)."""
    return torch.tanh(x * cond) - sigma[:, None] * x + 0.3 * cond


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_cfg_one_batched_call_equals_separate_passes(solver):
    gen = torch.Generator().manual_seed(0)
    k, b, d, steps = 3, 2, 7, 6
    cond = torch.randn(k, b, d, generator=gen)  # pass k's conditioning for each sample
    x = torch.randn(b, d, generator=gen)
    weights = cfg_weights([5.0, 3.0])
    sigmas = make_sigmas(steps, shift=3.0)
    calls = []

    def batched(xb: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
        calls.append((xb.clone(), sb.clone()))
        return _field(xb, sb, cond.reshape(k * b, d))

    def separate(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return sum(w * _field(x, s, cond[j]) for j, w in enumerate(weights))

    got = sample(batched, x, sigmas, solver, cfg_weights=weights)
    want = sample(separate, x, sigmas, solver)
    torch.testing.assert_close(got, want)
    assert len(calls) == steps
    for i, (xb, sb) in enumerate(calls):
        assert xb.shape == (k * b, d) and sb.shape == (k * b,)
        assert all(torch.equal(xb[j * b : (j + 1) * b], xb[:b]) for j in range(k))
        assert torch.equal(sb, torch.full((k * b,), sigmas[i].item()))
    # The guided run must differ from the unguided conditional one (the guidance did something).
    plain = sample(lambda x, s: _field(x, s, cond[-1]), x, sigmas, solver)
    assert (got - plain).abs().max() > 1e-2


def test_cfg_weights_cascade():
    s = 2.5
    assert cfg_weights([s]) == [1.0 - s, s]
    assert cfg_weights([]) == [1.0]
    w = cfg_weights([5.0, 3.0])
    assert w == [-4.0, 2.0, 3.0] and math.fsum(w) == 1.0
    assert math.isclose(math.fsum(cfg_weights([7.5, 0.0, 2.25, 1.0])), 1.0)
    v0, v1, v2 = torch.randn(3, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(w[0] * v0 + w[1] * v1 + w[2] * v2, v0 + 5.0 * (v1 - v0) + 3.0 * (v2 - v1))


def test_fold_unit_scales():
    assert fold_unit_scales(["text", "audio"], [5.0, 3.0]) == (["text", "audio"], [5.0, 3.0])
    assert fold_unit_scales(["text", "audio", "pose"], [1.0, 3.0, 1.0]) == (["audio"], [3.0])
    assert fold_unit_scales(["text", "audio"], [0.0, 1.0]) == (["text"], [0.0])
    # A leading unit scale is an exact fold: pass 0's weight is 0 and pass 1 becomes the new base.
    v0, v1, v2 = torch.randn(3, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = cfg_weights([1.0, 3.0])
    assert full[0] == 0.0
    _, scales = fold_unit_scales(["text", "audio"], [1.0, 3.0])
    folded = cfg_weights(scales)
    torch.testing.assert_close(full[0] * v0 + full[1] * v1 + full[2] * v2, folded[0] * v1 + folded[1] * v2)
    with pytest.raises(BBFInputError, match="same length"):
        fold_unit_scales(["text"], [1.0, 2.0])


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "5"])
def test_invalid_scales_rejected(bad):
    with pytest.raises(BBFInputError, match=r"scales\[1\]"):
        cfg_weights([2.0, bad])
    with pytest.raises(BBFInputError, match=r"scales\[1\]"):
        fold_unit_scales(["a", "b"], [2.0, bad])


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"steps": 2.5}, "steps"),
        ({"steps": 4, "shift": 0.0}, "shift"),
        ({"steps": 4, "shift": math.nan}, "shift"),
        ({"steps": 4, "sigma_max": 1.5}, "sigma_max"),
    ],
)
def test_make_sigmas_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(BBFInputError, match=pattern):
        make_sigmas(**kwargs)


def test_sample_rejects_bad_arguments():
    x = torch.zeros(2, 3)

    def ident(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x

    with pytest.raises(BBFInputError, match="solver must be one of .*'heun'"):
        sample(ident, x, make_sigmas(4), solver="heun")
    with pytest.raises(BBFInputError, match="sigmas"):
        sample(ident, x, torch.tensor([1.0, 0.5, 0.5, 0.0]))
    with pytest.raises(BBFInputError, match="sigmas"):
        sample(ident, x, torch.tensor([1.0]))
    with pytest.raises(BBFInputError, match="cfg_weights"):
        sample(ident, x, make_sigmas(4), cfg_weights=[2.0, 2.0])
    with pytest.raises(BBFInputError, match="denoise must return"):
        sample(lambda x, s: x[:1], x, make_sigmas(4))
    with pytest.raises(BBFInputError, match="x must be"):
        sample(ident, torch.zeros(2, 3, dtype=torch.int64), make_sigmas(4))


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_is_exact_for_a_constant_data_prediction(solver):
    """A point-mass data set: v = (x - c) / sigma, x0_hat = c at every sigma; the flow is a straight line."""
    gen = torch.Generator().manual_seed(5)
    c = torch.randn(2, 9, dtype=torch.float64, generator=gen)
    x = torch.randn(2, 9, dtype=torch.float64, generator=gen)
    for sigmas in (make_sigmas(7, shift=2.0), sawtooth_schedule(9, 0.3, 1.0)):
        end = float(sigmas[-1])
        out = sample(lambda xb, s: (xb - c) / s[:, None], x, sigmas, solver)
        torch.testing.assert_close(out, (1.0 - end) * c + end * x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_callback_dtype_and_sigma_batch(solver):
    seen, sigma_dtypes = [], []

    def denoise(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sigma_dtypes.append(s.dtype)
        return (x - 1.0) / s[:, None]  # x0_hat = x - sigma v = 1 everywhere

    sigmas = make_sigmas(5, shift=2.0)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out = sample(denoise, x, sigmas, solver, callback=lambda i, s, xi: seen.append((i, s, xi)))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert sigma_dtypes == [torch.float32] * 5  # the bf16 state does not quantise the timestep
    assert [i for i, _, _ in seen] == list(range(5))
    assert [s for _, s, _ in seen] == sigmas[1:].tolist()
    assert seen[-1][2] is out
    # Every solver is exact for a constant x0_hat: the sample must land on it.
    torch.testing.assert_close(out, torch.ones_like(out))

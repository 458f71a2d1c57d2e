"""Procedural generic-motion video: exact ground truth at any time, deterministic from a seed.

Every clip is a scene (render.py) whose poses are analytic functions of time t, in interval units:
t = 0 is frame0, t = 1 is frame1, the targets lie at taus in (0, 1), the context frames at
t = -k..-1 and 2..k+1. Motion per clip (all scaled by a motion level m in [0, 1] and a
non-linearity level n in [0, 1]):

    camera   c(t) = c0 + v t + a t^2 / 2,  extent e(t) = e0 exp(kz t),  roll r(t) = r0 + w t
    sprite   p(t) = p0 + v t + a t^2 / 2 + A ([cos(wt + phi), sin(wt + phi)] - [cos phi, sin phi])
             theta(t) = th0 + w t + al t^2 / 2,   size s(t) = s0 exp(ks t)
    light    g(t) = g0 (1 + gl t + ga (sin(gw t + gp) - sin gp)),  gradient rotating at gr per unit t

Sprites are photo crops or procedural patterns (checker, stripes, rings) in superellipse shapes;
sprite k covers sprites < k, and with some probability two sprites are made to cross (occlusion).
A batch is rendered in one vectorised pass per time set, on any torch device (on a GPU the renderer
keeps up with training); parameters are drawn on the CPU from a torch.Generator seeded by
(seed, split, index), so a batch is a pure function of its index (resume = same index).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from bbf_rt.config import ModelConfig
from bbf_rt.errors import BBFInputError
from bbf_rt.model.embed import boundary_similarity, normalised_difference
from bbf_rt.train import curriculum
from bbf_rt.train.render import (
    HELDOUT_PHOTOS,
    N_KINDS,
    SHAPES,
    TRAIN_PHOTOS,
    Appearance,
    PhotoAtlas,
    Poses,
    render,
    screen_extent,
    take,
    to_device,
)

SPLITS = {"train": (TRAIN_PHOTOS, 0), "heldout": (HELDOUT_PHOTOS, 0x5EED_0F_4E1D)}
TAU_MODES = ("grid", "random", "mixed")
_EDEN = ModelConfig(name="_stats", dim=64, depth=1, heads=2, ffn_dim=64)


def batch_seed(seed: int, salt: int, index: int) -> int:
    """A 63-bit seed for (seed, split salt, batch index); splitmix64-style mixing."""
    x = (seed * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return (x ^ (x >> 29)) & (2**63 - 1)


def check_size(height: int, width: int, multiple: int = 16) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < multiple or v % multiple:
            raise BBFInputError(f"{name}={v!r}: allowed is a positive multiple of {multiple} (VAE stride x patch)")


def _u(gen: torch.Generator, shape, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def _sym(gen: torch.Generator, shape, mag) -> torch.Tensor:
    return (2 * torch.rand(shape, generator=gen) - 1) * mag


def random_appearance(gen: torch.Generator, n: int, sprites: int, photos: int) -> Appearance:
    """Random backgrounds and sprites for n clips (CPU tensors)."""
    K = sprites
    return Appearance(
        bg_photo=torch.randint(0, photos, (n,), generator=gen),
        bg_tint=_u(gen, (n, 3), 0.8, 1.2),
        bg_flat=torch.where(_u(gen, (n,)) < 0.1, _u(gen, (n,), 0.3, 0.9), torch.zeros(n)),
        bg_color=_u(gen, (n, 3), 0.1, 0.9),
        spr_active=_u(gen, (n, K)) < 0.65,
        spr_kind=torch.randint(0, N_KINDS, (n, K), generator=gen),
        spr_photo=torch.randint(0, photos, (n, K), generator=gen),
        spr_crop=torch.cat([_sym(gen, (n, K, 2), 0.6), _u(gen, (n, K, 1), 0.15, 0.4)], dim=-1),
        spr_c0=_u(gen, (n, K, 3)),
        spr_c1=_u(gen, (n, K, 3)),
        spr_freq=_u(gen, (n, K), math.pi, 2.5 * math.pi),
        spr_phase=_u(gen, (n, K), 0, 2 * math.pi),
        spr_shape=torch.randint(0, len(SHAPES), (n, K), generator=gen),
        spr_aspect=torch.exp(_sym(gen, (n, K), 0.35)),
        spr_tint=_u(gen, (n, K, 3), 0.7, 1.3),
    )


@dataclass
class Motion:
    """Coefficients of the analytic trajectories of n clips (see the module docstring)."""

    cam_c0: torch.Tensor  # (B, 2)
    cam_v: torch.Tensor
    cam_a: torch.Tensor
    cam_e0: torch.Tensor  # (B,)
    cam_kz: torch.Tensor
    cam_r0: torch.Tensor
    cam_w: torch.Tensor
    p0: torch.Tensor  # (B, K, 2)
    v: torch.Tensor
    a: torch.Tensor
    circ_amp: torch.Tensor  # (B, K)
    circ_w: torch.Tensor
    circ_phi: torch.Tensor
    th0: torch.Tensor
    th_w: torch.Tensor
    th_a: torch.Tensor
    s0: torch.Tensor
    s_k: torch.Tensor
    g0: torch.Tensor  # (B,)
    g_lin: torch.Tensor
    g_amp: torch.Tensor
    g_w: torch.Tensor
    g_phi: torch.Tensor
    grad0: torch.Tensor  # (B, 2)
    grad_w: torch.Tensor
    level: torch.Tensor  # (B,) motion level m (for analysis)

    def sprite_pos(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B, K, T) -> (B, K, T, 2) sprite centres."""
        tt = t[..., None]
        ang = self.circ_w[..., None] * t + self.circ_phi[..., None]
        phi = self.circ_phi[..., None]
        circ = torch.stack([torch.cos(ang) - torch.cos(phi), torch.sin(ang) - torch.sin(phi)], dim=-1)
        return (
            self.p0[:, :, None] + self.v[:, :, None] * tt + 0.5 * self.a[:, :, None] * tt * tt
            + self.circ_amp[..., None, None] * circ
        )

    def poses(self, times: torch.Tensor) -> Poses:
        """times: (B, T) -> Poses evaluated there."""
        t = times
        tk = t[:, None, :].expand(-1, self.p0.shape[1], -1)  # (B, K, T)
        t2 = t[..., None]
        g = self.g0[:, None] * (
            1 + self.g_lin[:, None] * t + self.g_amp[:, None] * (torch.sin(self.g_w[:, None] * t + self.g_phi[:, None]) - torch.sin(self.g_phi[:, None]))
        )
        gang = self.grad_w[:, None] * t
        gx, gy = self.grad0[:, None, 0], self.grad0[:, None, 1]
        grad = torch.stack([gx * torch.cos(gang) - gy * torch.sin(gang), gx * torch.sin(gang) + gy * torch.cos(gang)], dim=-1)
        return Poses(
            cam_c=self.cam_c0[:, None] + self.cam_v[:, None] * t2 + 0.5 * self.cam_a[:, None] * t2 * t2,
            cam_e=self.cam_e0[:, None] * torch.exp(self.cam_kz[:, None] * t),
            cam_r=self.cam_r0[:, None] + self.cam_w[:, None] * t,
            spr_p=self.sprite_pos(tk),
            spr_theta=self.th0[..., None] + self.th_w[..., None] * tk + 0.5 * self.th_a[..., None] * tk * tk,
            spr_s=self.s0[..., None] * torch.exp(self.s_k[..., None] * tk),
            spr_vis=torch.ones_like(tk),
            spr_gain=torch.ones_like(tk),
            light_g=g.clamp_min(0.2),
            light_grad=grad,
        )


def random_motion(gen: torch.Generator, n: int, sprites: int, extent: tuple[float, float], level: torch.Tensor | None = None) -> Motion:
    """Random trajectories for n clips; `level` (n,) in [0, 1] overrides the drawn motion level."""
    K = sprites
    m = torch.rand(n, generator=gen) if level is None else level.float()
    m = torch.where(_u(gen, (n,)) < 0.08, torch.zeros(n), m)  # some exactly static clips
    nl = _u(gen, (n,))  # non-linearity level
    cam_on = (_u(gen, (n,)) < 0.6).float() * m
    light = (_u(gen, (n,)) < 0.3).float() * _u(gen, (n,))
    e0 = _u(gen, (n,), 0.35, 0.7)
    ext = torch.tensor(extent)
    mk, nk = m[:, None], (m * nl)[:, None]
    mot = Motion(
        cam_c0=_sym(gen, (n, 2), 0.5),
        cam_v=_sym(gen, (n, 2), 0.5) * (cam_on * e0)[:, None],
        cam_a=_sym(gen, (n, 2), 0.6) * (cam_on * nl * e0)[:, None],
        cam_e0=e0,
        cam_kz=_sym(gen, (n,), 0.35) * cam_on,
        cam_r0=_sym(gen, (n,), 0.15),
        cam_w=_sym(gen, (n,), 0.3) * cam_on,
        p0=_sym(gen, (n, K, 2), 0.7) * ext,
        v=_sym(gen, (n, K, 2), 1.2) * mk[..., None],
        a=_sym(gen, (n, K, 2), 2.0) * nk[..., None],
        circ_amp=_u(gen, (n, K), 0.0, 0.35) * nk,
        circ_w=_sym(gen, (n, K), 1.5 * math.pi),
        circ_phi=_u(gen, (n, K), 0, 2 * math.pi),
        th0=_u(gen, (n, K), 0, 2 * math.pi),
        th_w=_sym(gen, (n, K), 1.5) * mk,
        th_a=_sym(gen, (n, K), 1.0) * nk,
        s0=_u(gen, (n, K), 0.1, 0.3),
        s_k=_sym(gen, (n, K), 0.4) * mk,
        g0=_u(gen, (n,), 0.85, 1.15),
        g_lin=_sym(gen, (n,), 0.3) * light,
        g_amp=_u(gen, (n,), 0, 0.2) * light,
        g_w=_sym(gen, (n,), 2 * math.pi),
        g_phi=_u(gen, (n,), 0, 2 * math.pi),
        grad0=_sym(gen, (n, 2), 0.25) * light[:, None],
        grad_w=_sym(gen, (n,), 1.0) * light,
        level=m,
    )
    if K >= 2:  # occlusion: sprite 1 meets sprite 0 at a time inside the interval
        cross = _u(gen, (n,)) < 0.4
        tc = _u(gen, (n,), 0.25, 0.75)[:, None, None].expand(n, K, 1)
        pos = mot.sprite_pos(tc)[:, :, 0]  # (n, K, 2) every sprite's position at tc
        shift = torch.where(cross[:, None], pos[:, 0] - pos[:, 1], torch.zeros(n, 2))
        mot.p0 = mot.p0.clone()
        mot.p0[:, 1] += shift
    return mot


def sample_taus(gen: torch.Generator, n: int, count: int, mode: str) -> torch.Tensor:
    """(n, count) target timestamps in (0, 1): the regular grid i/(count+1), sorted uniform draws, or a mix."""
    if mode not in TAU_MODES:
        raise BBFInputError(f"tau_mode={mode!r}: allowed are {TAU_MODES}")
    grid = (torch.arange(1, count + 1, dtype=torch.float32) / (count + 1)).expand(n, count)
    rand = _u(gen, (n, count), 0.04, 0.96).sort(dim=1).values
    use_grid = _u(gen, (n, 1)) < 0.5
    if mode == "grid":
        return grid.clone()
    if mode == "random":
        return rand
    return torch.where(use_grid, grid, rand)


def context_taus(per_side: int) -> torch.Tensor:
    """(2k,) context timestamps: -k..-1 before frame0, 2..k+1 after frame1."""
    before = -torch.arange(per_side, 0, -1, dtype=torch.float32)
    return torch.cat([before, 1.0 + torch.arange(1, per_side + 1, dtype=torch.float32)])


def difference(frame0: torch.Tensor, frame1: torch.Tensor, mu: float = _EDEN.diff_mu, sigma: float = _EDEN.diff_sigma) -> torch.Tensor:
    """Normalised start-end difference d of (B, 3, H, W) frames in [0, 1]: (B,), lower = bigger change."""
    return normalised_difference(boundary_similarity(frame0, frame1), mu, sigma)


def quantize(frames: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels (what a real video holds), staying float in [0, 1]."""
    return torch.round(frames * 255.0) / 255.0


class GenericMotion:
    """Training/evaluation batches of generic motion.

    `batch(index, size, lam)` returns a dict of fp32 tensors on `device`, frames in [0, 1]:
    frame0, frame1 (B, 3, H, W); targets (B, F, 3, H, W) at taus (B, F); context (B, 2k, 3, H, W) at
    context_tau (B, 2k); diff (B,) the normalised start-end difference; level (B,) motion level.
    lam != 0 draws `pool` candidates per sample and keeps `size` of them with probability
    proportional to exp(-lam * d) (curriculum.sampling_probs): lam > 0 favours large differences.
    """

    def __init__(
        self, height: int, width: int, *, split: str = "train", n_targets: int = 3, context_per_side: int = 1,
        sprites: int = 4, seed: int = 0, tau_mode: str = "mixed", pool: int = 4, atlas_size: int | None = None,
        device: torch.device | str = "cpu", quantized: bool = True, diff_stats: tuple[float, float] | None = None,
    ) -> None:
        check_size(height, width)
        if split not in SPLITS:
            raise BBFInputError(f"split={split!r}: allowed are {tuple(SPLITS)}")
        if not isinstance(n_targets, int) or n_targets < 1:
            raise BBFInputError(f"n_targets={n_targets!r}: allowed is an int >= 1")
        if tau_mode not in TAU_MODES:
            raise BBFInputError(f"tau_mode={tau_mode!r}: allowed are {TAU_MODES}")
        if not isinstance(pool, int) or pool < 1:
            raise BBFInputError(f"pool={pool!r}: allowed is an int >= 1 (candidates per kept sample)")
        names, self.salt = SPLITS[split]
        self.height, self.width, self.split = height, width, split
        self.n_targets, self.context_per_side, self.sprites = n_targets, context_per_side, sprites
        self.seed, self.tau_mode, self.pool, self.quantized = seed, tau_mode, pool, quantized
        self.device = torch.device(device)
        size = atlas_size or min(512, max(256, 2 * max(height, width)))
        self.atlas = PhotoAtlas(names, size, self.device)
        self.extent = screen_extent(height, width)
        self.diff_stats = diff_stats or (_EDEN.diff_mu, _EDEN.diff_sigma)

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(batch_seed(self.seed, self.salt, index))

    def scenes(self, gen: torch.Generator, n: int, level: torch.Tensor | None = None) -> tuple[Appearance, Motion]:
        app = random_appearance(gen, n, self.sprites, self.atlas.count)
        mot = random_motion(gen, n, self.sprites, self.extent, level)
        return app, mot

    def render(self, app: Appearance, mot: Motion, times: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """(B, T) times -> (B, T, 3, H/scale, W/scale) frames on the device (8-bit levels if `quantized`)."""
        app_d, mot_d = to_device(app, self.device), to_device(mot, self.device)
        poses = mot_d.poses(times.to(self.device))
        frames = render(self.atlas, app_d, poses, self.height // scale, self.width // scale)
        return quantize(frames) if self.quantized else frames

    def batch(self, index: int, size: int, lam: float = 0.0) -> dict[str, torch.Tensor]:
        gen = self.generator(index)
        n = size * self.pool if lam != 0.0 else size
        app, mot = self.scenes(gen, n)
        taus = sample_taus(gen, size, self.n_targets, self.tau_mode)
        if lam != 0.0:
            # the pool's d at half resolution (4x cheaper; only ranks candidates), d of the kept at full
            ends = self.render(app, mot, torch.tensor([0.0, 1.0]).expand(n, 2), scale=2 if self.height >= 64 and self.width >= 64 else 1)
            d = difference(ends[:, 0], ends[:, 1], *self.diff_stats).cpu()
            idx = curriculum.select(d, lam, size, gen)
            app, mot = take(app, idx), take(mot, idx)
        ctx = context_taus(self.context_per_side).expand(size, -1)
        times = torch.cat([torch.tensor([0.0, 1.0]).expand(size, 2), taus, ctx], dim=1)
        frames = self.render(app, mot, times)
        F = self.n_targets
        out = {
            "frame0": frames[:, 0], "frame1": frames[:, 1], "targets": frames[:, 2 : 2 + F],
            "taus": taus.to(self.device), "context": frames[:, 2 + F :], "context_tau": ctx.to(self.device),
            "level": mot.level.to(self.device),
        }
        out["diff"] = difference(out["frame0"], out["frame1"], *self.diff_stats)
        return out

    def frames_at(self, index: int, size: int, times: torch.Tensor) -> torch.Tensor:
        """Frames of batch `index`'s scenes (lam = 0) at arbitrary (size, T) times: ground truth anywhere."""
        app, mot = self.scenes(self.generator(index), size)
        return self.render(app, mot, times)

    def stills(self, index: int, size: int) -> torch.Tensor:
        """(size, 3, H, W) single frames at random times, for VAE training."""
        gen = self.generator(index)
        app, mot = self.scenes(gen, size)
        return self.render(app, mot, _u(gen, (size, 1), -1.0, 2.0))[:, 0]


class GenericMotionDataset(IterableDataset):
    """Iterable of whole batches, index `start`, `start + 1`, ... (each a pure function of its index).

    With DataLoader(batch_size=None, num_workers=w) worker i yields indices i, i + w, ... and the
    loader's round-robin restores index order. `lam` is a float or a function of the batch index
    (the curriculum's schedule), so a worker needs no shared state.
    """

    def __init__(self, source: GenericMotion, batch: int, start: int = 0, stop: int | None = None,
                 lam: float | Callable[[int], float] = 0.0) -> None:
        super().__init__()
        self.source, self.size, self.start, self.stop, self.lam = source, batch, start, stop, lam

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start + wid
        while self.stop is None or i < self.stop:
            lam = self.lam(i) if callable(self.lam) else self.lam
            yield self.source.batch(i, self.size, lam)
            i += nw


def heldout_batches(height: int, width: int, batches: int = 4, size: int = 8, n_targets: int = 3, seed: int = 0,
                    device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """A fixed evaluation set: held-out photographs, a different seed stream, the regular tau grid."""
    src = GenericMotion(height, width, split="heldout", n_targets=n_targets, seed=seed, tau_mode="grid", device=device)
    return [src.batch(i, size) for i in range(batches)]

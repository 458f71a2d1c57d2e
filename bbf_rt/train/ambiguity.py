"""The ambiguity suite: clips whose boundary frames do not decide the in-between, but one modality does.

Four suites, each rendered with exact ground truth (render.py) on a dimmed photo backdrop with a
bright patterned "actor" sprite and a static camera; targets sit on the regular grid i / (F + 1):

- audio: the actor jumps one step along a line and flashes on each click of a click track; the
  clicks fall at random times, so only the audio says in which frame each jump happens. Label: click
  times (B, N), in interval units. Audio: 16 kHz mono spanning the interval, D = (F + 1) / fps s.
- text: the actor circles (clockwise or counterclockwise, one full turn) or bounces (once or twice);
  both boundary frames show it at the same place. Label 0..3 = cw, ccw, bounce once, bounce twice;
  the caption says which.
- context: the actor moves with constant acceleration a; frame0 and frame1 fix the chord, only the
  context frames (t = -k..-1, 2..k+1) reveal a. Label: a (B, 2) in screen units per interval^2.
- image: an actor hidden behind a wall in both boundary frames rises above it in between; which of
  `n_cand` candidate actors it is, only the reference image (the actor alone) shows. Label: index.

Scoring (`Suite.score`) tracks the actor in generated frames (centroid of the pixels that differ from
the known backdrop) or compares whole frames with every hypothesis, so it needs no model internals.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from bbf_rt.errors import BBFInputError
from bbf_rt.train.data import SPLITS, batch_seed, check_size, context_taus, difference, quantize
from bbf_rt.train.render import Appearance, PhotoAtlas, Poses, render, screen_extent, screen_grid, to_device

SUITES = ("audio", "text", "context", "image")
SAMPLE_RATE = 16000
NOUNS = ("the ball", "the object", "a square", "the sprite", "a disc")
CAPTIONS = {
    0: ("{n} circles clockwise", "{n} goes around clockwise", "a clockwise circle", "{n} moves in a clockwise circle"),
    1: ("{n} circles counterclockwise", "{n} goes around anticlockwise", "a counterclockwise circle",
        "{n} moves in a counter-clockwise circle"),
    2: ("{n} bounces once", "{n} makes a single bounce", "one bounce", "{n} hops once"),
    3: ("{n} bounces twice", "{n} makes two bounces", "two bounces", "{n} hops twice"),
}


def all_captions() -> list[str]:
    """Every caption the text suite can produce (for precomputing text-encoder embeddings)."""
    out = {t.format(n=n) for temps in CAPTIONS.values() for t in temps for n in NOUNS}
    return sorted(out)


def _u(gen, shape, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def actor_appearance(gen: torch.Generator, n: int, photos: int, sprites: int = 1) -> Appearance:
    """Dim, low-contrast backdrops and a bright saturated patterned actor as sprite 0 (others off)."""
    K = sprites
    c = _u(gen, (n, K, 3))
    lo, hi = c.min(-1, keepdim=True).values, c.max(-1, keepdim=True).values
    c0 = 0.1 + 0.9 * (c - lo) / (hi - lo).clamp_min(1e-3)  # saturated, brightest channel = 1
    return Appearance(
        bg_photo=torch.randint(0, photos, (n,), generator=gen),
        bg_tint=torch.full((n, 3), 0.8),
        bg_flat=_u(gen, (n,), 0.55, 0.75),
        bg_color=_u(gen, (n, 1), 0.2, 0.35).expand(n, 3).clone(),
        spr_active=torch.arange(K).expand(n, K) == 0,
        spr_kind=torch.randint(1, 4, (n, K), generator=gen),
        spr_photo=torch.randint(0, photos, (n, K), generator=gen),
        spr_crop=torch.cat([_u(gen, (n, K, 2), -0.5, 0.5), _u(gen, (n, K, 1), 0.2, 0.4)], dim=-1),
        spr_c0=c0,
        spr_c1=1.0 - 0.8 * c0,
        spr_freq=_u(gen, (n, K), math.pi, 2.0 * math.pi),
        spr_phase=_u(gen, (n, K), 0, 2 * math.pi),
        spr_shape=torch.randint(2, 4, (n, K), generator=gen),
        spr_aspect=torch.ones(n, K),
        spr_tint=torch.ones(n, K, 3),
    )


def static_scene(p: torch.Tensor, s: torch.Tensor, gain: torch.Tensor | None = None, cam_c=None, cam_e=None) -> Poses:
    """Poses with a fixed camera and constant light; p: (B, K, T, 2) sprite centres, s: (B, K) sizes."""
    B, K, T, _ = p.shape
    ones = torch.ones(B, K, T)
    return Poses(
        cam_c=(torch.zeros(B, 2) if cam_c is None else cam_c)[:, None].expand(B, T, 2),
        cam_e=(torch.full((B,), 0.5) if cam_e is None else cam_e)[:, None].expand(B, T),
        cam_r=torch.zeros(B, T), spr_p=p, spr_theta=torch.zeros(B, K, T), spr_s=s[..., None].expand(B, K, T),
        spr_vis=ones, spr_gain=ones if gain is None else gain, light_g=torch.ones(B, T), light_grad=torch.zeros(B, T, 2),
    )


def track(frames: torch.Tensor, background: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """Actor centre per frame: centroid of pixels whose summed |RGB - backdrop| > threshold.

    frames (B, F, 3, H, W), background (B, 3, H, W) in [0, 1] -> (B, F, 2) screen coordinates, NaN where
    no pixel differs.
    """
    H, W = frames.shape[-2:]
    scr = screen_grid(H, W, frames.device)  # (H, W, 2)
    m = ((frames.float() - background.float()[:, None]).abs().sum(2) > threshold).float()  # (B, F, H, W)
    tot = m.sum((-2, -1))
    cx = (m * scr[..., 0]).sum((-2, -1)) / tot
    cy = (m * scr[..., 1]).sum((-2, -1)) / tot
    pos = torch.stack([cx, cy], dim=-1)
    return torch.where(tot[..., None] > 0, pos, torch.full_like(pos, float("nan")))


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distance summed over the last dim, NaN (nothing tracked) counted as far (4 = screen size^2)."""
    return torch.nan_to_num(((a - b) ** 2).sum(-1), nan=4.0)


class Suite:
    """Base: deterministic batches of one ambiguity suite; subclasses define draw / poses / extra / score."""

    name = ""
    modality = ""
    sprites = 1

    def __init__(self, height: int, width: int, *, n_targets: int = 7, context_per_side: int = 1, split: str = "train",
                 seed: int = 0, fps: float = 25.0, device: torch.device | str = "cpu", quantized: bool = True) -> None:
        check_size(height, width)
        if split not in SPLITS:
            raise BBFInputError(f"split={split!r}: allowed are {tuple(SPLITS)}")
        if not isinstance(n_targets, int) or n_targets < 3:
            raise BBFInputError(f"n_targets={n_targets!r}: the ambiguity suites need an int >= 3")
        names, salt = SPLITS[split]
        self.height, self.width, self.n_targets, self.k = height, width, n_targets, context_per_side
        self.seed, self.salt = seed, salt + 1 + SUITES.index(self.name)
        self.fps, self.device, self.quantized = fps, torch.device(device), quantized
        self.atlas = PhotoAtlas(names, min(512, max(256, 2 * max(height, width))), self.device)
        self.ext = torch.tensor(screen_extent(height, width))
        self.taus = torch.arange(1, n_targets + 1, dtype=torch.float32) / (n_targets + 1)
        self.seconds = (n_targets + 1) / fps  # interval duration the audio spans

    # -- subclass hooks ------------------------------------------------------------------------
    def draw(self, gen: torch.Generator, n: int) -> dict:
        raise NotImplementedError

    def poses(self, prm: dict, label: torch.Tensor, times: torch.Tensor) -> Poses:
        raise NotImplementedError

    def extra(self, prm: dict, label: torch.Tensor, gen: torch.Generator) -> dict:
        return {}

    def appearance(self, prm: dict, label: torch.Tensor) -> Appearance:
        return prm["app"]

    def score(self, batch: dict, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def render(self, app: Appearance, poses: Poses) -> torch.Tensor:
        f = render(self.atlas, to_device(app, self.device), to_device(poses, self.device), self.height, self.width)
        return quantize(f) if self.quantized else f

    def batch(self, index: int, size: int, labels: torch.Tensor | None = None, hypotheses: bool = False) -> dict:
        """One batch: the generic keys (frame0, frame1, targets, taus, context, context_tau, diff), plus
        suite (B,) id, label, background (B, 3, H, W) without the actor, the modality's input and, with
        `hypotheses`, what scoring needs. `labels` overrides the drawn labels (same scenes otherwise)."""
        gen = torch.Generator().manual_seed(batch_seed(self.seed, self.salt, index))
        prm = self.draw(gen, size)
        label = prm["label"] if labels is None else labels.to(prm["label"].dtype)
        F = self.n_targets
        taus = self.taus.expand(size, F)
        ctx = context_taus(self.k).expand(size, -1)
        times = torch.cat([torch.tensor([0.0, 1.0]).expand(size, 2), taus, ctx], dim=1)
        poses = self.poses(prm, label, times)
        app = self.appearance(prm, label)
        frames = self.render(app, poses)
        hidden = self.poses(prm, label, times[:, :1])  # the camera is static: one backdrop frame per clip
        hidden.spr_vis = hidden.spr_vis.clone()
        hidden.spr_vis[:, 0] = 0.0  # the actor removed: the backdrop the tracker compares against
        out = {
            "frame0": frames[:, 0], "frame1": frames[:, 1], "targets": frames[:, 2 : 2 + F],
            "taus": taus.to(self.device), "context": frames[:, 2 + F :], "context_tau": ctx.to(self.device),
            "suite": torch.full((size,), SUITES.index(self.name), device=self.device), "label": label.to(self.device),
            "background": self.render(app, hidden)[:, 0],
        }
        out["diff"] = difference(out["frame0"], out["frame1"])
        for key, val in self.extra(prm, label, gen).items():
            out[key] = val.to(self.device) if isinstance(val, torch.Tensor) else val
        if hypotheses:
            for key, val in self.hypotheses(prm, label).items():
                out[key] = val.to(self.device)
        return out

    def hypotheses(self, prm: dict, label: torch.Tensor) -> dict:
        return {}

    def positions(self, prm: dict, label: torch.Tensor) -> torch.Tensor:
        """(B, F, 2) true actor centres at the targets."""
        return self.poses(prm, label, self.taus.expand(label.shape[0], -1)).spr_p[:, 0]


class AudioSuite(Suite):
    """Jump + flash on each click; label = click times (B, N)."""

    name, modality = "audio", "audio"

    def __init__(self, *args, n_clicks: int = 2, **kw) -> None:
        super().__init__(*args, **kw)
        self.n_clicks = n_clicks
        self.flash = 1.5 / (self.n_targets + 1)  # flash length: 1.5 frame spacings

    def draw(self, gen, n):
        N, F = self.n_clicks, self.n_targets
        ang = _u(gen, (n,), 0, 2 * math.pi)
        dirv = torch.stack([torch.cos(ang), torch.sin(ang)], -1) * _u(gen, (n, 1), 0.3, 0.6)
        mid = _u(gen, (n, 2), -0.3, 0.3) * self.ext
        lo, hi = 0.5 / (F + 1), 1.0 - self.flash - 0.5 / (F + 1)
        gap = 1.5 / (F + 1)
        u = _u(gen, (n, N), 0.0, hi - lo - (N - 1) * gap).sort(-1).values
        times = lo + u + gap * torch.arange(N)
        return {"app": actor_appearance(gen, n, self.atlas.count), "p0": mid - dirv / 2, "p1": mid + dirv / 2,
                "s": _u(gen, (n, 1), 0.11, 0.15), "label": times}

    def poses(self, prm, label, times):
        N = label.shape[1]
        after = times[:, :, None] >= label[:, None, :]  # (B, T, N)
        count = after.float().sum(-1)  # (B, T)
        pos = prm["p0"][:, None] + (prm["p1"] - prm["p0"])[:, None] * (count / N)[..., None]
        flash = ((1 - (times[:, :, None] - label[:, None, :]) / self.flash).clamp(0, 1) * after.float()).sum(-1)
        return static_scene(pos[:, None], prm["s"], gain=(1 + 0.8 * flash)[:, None])

    def extra(self, prm, label, gen):
        n = label.shape[0]
        S = round(self.seconds * SAMPLE_RATE)
        t = torch.arange(S, dtype=torch.float32) / SAMPLE_RATE  # (S,)
        onset = label * self.seconds  # (B, N) seconds
        freq = _u(gen, label.shape, 1500.0, 3500.0)[..., None]
        amp = _u(gen, label.shape, 0.4, 0.9)[..., None]
        dt = t - onset[..., None]  # (B, N, S)
        burst = amp * torch.sin(2 * math.pi * freq * dt) * torch.exp(-dt.clamp_min(0) / 0.002) * (dt >= 0)
        audio = burst.sum(1) + 0.003 * torch.randn(n, S, generator=gen)
        steps = torch.arange(self.n_clicks + 1, dtype=torch.float32) / self.n_clicks
        hyp = prm["p0"][:, None] + (prm["p1"] - prm["p0"])[:, None] * steps[None, :, None]  # (B, N+1, 2)
        event = (self.taus[None, :, None] < label[:, None, :]).sum(1)  # (B, N) first frame with tau >= t_k
        return {"audio": audio.clamp(-1, 1), "audio_seconds": torch.full((n,), self.seconds), "hyp_pos": hyp,
                "event_frame": event}

    def score(self, batch, frames):
        """timing_error: mean |estimated - true| event frame over the clicks; within_one / exact: every click
        within 1 frame / in its frame."""
        pos = track(frames, batch["background"])  # (B, F, 2)
        count = _sqdist(pos[:, :, None], batch["hyp_pos"][:, None]).argmin(-1)  # (B, F)
        k = torch.arange(1, batch["event_frame"].shape[1] + 1, device=count.device)
        reached = count[:, :, None] >= k  # (B, F, N)
        est = torch.where(reached.any(1), reached.float().argmax(1), torch.full_like(k, frames.shape[1]))
        err = (est - batch["event_frame"]).abs().float()
        return {"timing_error": err.mean(-1), "within_one": (err <= 1).all(-1), "exact": (err == 0).all(-1)}

    @staticmethod
    def oracle(audio: torch.Tensor, seconds: float, count: int, threshold: float = 0.2) -> torch.Tensor:
        """Click times (interval units) read off the waveform: the first `count` rises of |x| above
        `threshold` after at least 2 ms of quiet. (B, S) -> (B, count)."""
        loud = audio.abs() > threshold
        quiet = int(0.002 * SAMPLE_RATE)
        out = []
        for row in loud:
            idx = row.nonzero().flatten().tolist()
            starts = [i for j, i in enumerate(idx) if j == 0 or i - idx[j - 1] > quiet][:count]
            out.append([i / SAMPLE_RATE / seconds for i in starts] + [float("nan")] * (count - len(starts)))
        return torch.tensor(out)


class TextSuite(Suite):
    """Circle cw/ccw or bounce once/twice; label 0..3 (CAPTIONS keys); the caption names it."""

    name, modality = "text", "text"

    def draw(self, gen, n):
        ext = self.ext
        s = _u(gen, (n, 1), 0.11, 0.15)
        r = _u(gen, (n, 1), 0.25, 0.4) * min(1.0, (float(ext[1]) - 0.2) / 0.4)  # fits a landscape screen
        room = (ext - r - s - 0.05).clamp_min(0)
        run = _u(gen, (n,), 0.15, 0.4) * torch.where(_u(gen, (n,)) < 0.5, -1.0, 1.0)
        h = _u(gen, (n,), 0.35, 0.6)
        lo, hi = -ext[1] + h + s[:, 0] + 0.05, ext[1] - s[:, 0] - 0.05
        ground = lo + (hi - lo) * _u(gen, (n,))
        return {
            "app": actor_appearance(gen, n, self.atlas.count), "s": s, "r": r, "centre": _u(gen, (n, 2), -1, 1) * room,
            "phi": _u(gen, (n,), 0, 2 * math.pi), "xm": _u(gen, (n,), -0.3, 0.3) * ext[0], "run": run, "h": h,
            "ground": ground, "template": torch.randint(0, 4, (n,), generator=gen),
            "noun": torch.randint(0, len(NOUNS), (n,), generator=gen), "label": torch.randint(0, 4, (n,), generator=gen),
        }

    def poses(self, prm, label, times):
        task, bit = (label // 2)[:, None], (label % 2)[:, None].float()
        frac = torch.remainder(times, 1.0)  # one turn / whole bounces per interval: exact at integer times
        ang = prm["phi"][:, None] + (1 - 2 * bit) * 2 * math.pi * frac  # screen y is down: + is clockwise
        circ = prm["centre"][:, None] + prm["r"][:, None] * torch.stack([torch.cos(ang), torch.sin(ang)], -1)
        x = prm["xm"][:, None] + prm["run"][:, None] * (2 * times - 1)
        y = prm["ground"][:, None] - prm["h"][:, None] * torch.sin((1 + bit) * math.pi * frac).abs()
        pos = torch.where(task[..., None] == 0, circ, torch.stack([x, y], -1))
        return static_scene(pos[:, None], prm["s"])

    def extra(self, prm, label, gen):
        caps = [CAPTIONS[int(lb)][int(t)].format(n=NOUNS[int(nn)]) for lb, t, nn in zip(label, prm["template"], prm["noun"])]
        base = (label // 2) * 2
        hyp = torch.stack([self.positions(prm, base), self.positions(prm, base + 1)], dim=1)  # (B, 2, F, 2)
        return {"caption": caps, "hyp_pos": hyp}

    def score(self, batch, frames):
        """correct: the tracked path is nearer the true direction / bounce count than the other one."""
        pos = track(frames, batch["background"])
        dist = _sqdist(pos[:, None], batch["hyp_pos"]).sum(-1)  # (B, 2)
        return {"correct": dist.argmin(-1) == batch["label"] % 2}

    @staticmethod
    def oracle(captions: list[str]) -> torch.Tensor:
        """Label from the words of a caption."""
        out = []
        for c in captions:
            words = c.lower()
            if "bounce" in words or "hop" in words:
                out.append(3 if ("twice" in words or "two" in words) else 2)
            else:
                out.append(1 if ("counter" in words or "anti" in words) else 0)
        return torch.tensor(out)


class ContextSuite(Suite):
    """Constant acceleration visible only in the context frames; label = a (B, 2)."""

    name, modality = "context", "context"

    def draw(self, gen, n, tries: int = 16):
        ext = self.ext
        s = _u(gen, (n, 1), 0.11, 0.15)
        m = n * tries
        ang = _u(gen, (m,), 0, 2 * math.pi)
        d = torch.stack([torch.cos(ang), torch.sin(ang)], -1)
        perp = torch.stack([-d[:, 1], d[:, 0]], -1)
        L = _u(gen, (m, 1), 0.2, 0.45)
        sign = torch.where(_u(gen, (m, 1)) < 0.5, -1.0, 1.0)
        a = L * (sign * _u(gen, (m, 1), 0.6, 1.6) * d + _u(gen, (m, 1), -0.5, 0.5) * perp)
        p0 = _u(gen, (m, 2), -0.35, 0.35) * ext
        chord = L * d
        t = torch.cat([context_taus(self.k), torch.tensor([0.0, 0.5, 1.0])])  # (Tc,)
        v = chord - a / 2
        pts = p0[:, None] + v[:, None] * t[:, None] + 0.5 * a[:, None] * (t * t)[:, None]
        ok = (pts.abs() <= ext - s.repeat_interleave(tries, 0)[:, None] - 0.02).all(-1).all(-1).view(n, tries)
        pick = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long)) + torch.arange(n) * tries
        return {"app": actor_appearance(gen, n, self.atlas.count), "s": s, "p0": p0[pick], "chord": chord[pick],
                "label": a[pick]}

    def _pos(self, prm, a, times):
        # p0 + v t + a t^2 / 2 with v = chord - a / 2, written so that t = 0 and 1 are exact for any a
        tt = times[..., None]
        return prm["p0"][:, None] + prm["chord"][:, None] * tt + 0.5 * a[:, None] * tt * (tt - 1)

    def poses(self, prm, label, times):
        return static_scene(self._pos(prm, label, times)[:, None], prm["s"])

    def extra(self, prm, label, gen):
        taus = self.taus.expand(label.shape[0], -1)
        v0 = prm["chord"] - label / 2
        return {"true_pos": self._pos(prm, label, taus), "mirror_pos": self._pos(prm, -label, taus), "p0": prm["p0"],
                "p1": prm["p0"] + prm["chord"], "velocity": torch.stack([v0, v0 + label], 1)}

    def score(self, batch, frames):
        """position_error_px, accel_correct (nearer the true than the mirrored acceleration), velocity_error
        (|v_hat - v| at both ends over the chord length, from a quadratic fit) and velocity_ok (<= 10%)."""
        pos = track(frames, batch["background"])  # (B, F, 2)
        half = max(frames.shape[-2:]) / 2
        err = ((pos - batch["true_pos"]) ** 2).sum(-1).sqrt().mean(-1) * half
        correct = _sqdist(pos, batch["true_pos"]).sum(-1) < _sqdist(pos, batch["mirror_pos"]).sum(-1)
        t = torch.cat([torch.zeros(1), self.taus.cpu(), torch.ones(1)]).to(frames.device)
        basis = torch.stack([torch.ones_like(t), t, t * t], -1)  # (F+2, 3)
        y = torch.cat([batch["p0"][:, None], torch.nan_to_num(pos, nan=0.0), batch["p1"][:, None]], 1)  # (B, F+2, 2)
        coef = torch.linalg.lstsq(basis.expand(y.shape[0], -1, -1), y).solution  # (B, 3, 2)
        v_hat = torch.stack([coef[:, 1], coef[:, 1] + 2 * coef[:, 2]], 1)
        chord = (batch["p1"] - batch["p0"]).norm(dim=-1)
        verr = (v_hat - batch["velocity"]).norm(dim=-1).mean(-1) / chord
        verr = torch.where(pos.isnan().any(-1).any(-1), torch.full_like(verr, float("inf")), verr)
        return {"position_error_px": err, "accel_correct": correct, "velocity_error": verr, "velocity_ok": verr <= 0.1}

    @staticmethod
    def oracle(batch: dict) -> torch.Tensor:
        """Acceleration from the actor's positions in the context and boundary frames (quadratic fit)."""
        frames = torch.cat([batch["context"], batch["frame0"][:, None], batch["frame1"][:, None]], 1)
        t = torch.cat([batch["context_tau"], torch.zeros_like(batch["context_tau"][:, :1]),
                       torch.ones_like(batch["context_tau"][:, :1])], 1)  # (B, Fc+2)
        pos = track(frames, batch["background"])
        basis = torch.stack([torch.ones_like(t), t, t * t], -1)
        return 2 * torch.linalg.lstsq(basis, pos).solution[:, 2]


class ImageSuite(Suite):
    """An actor hidden behind a wall at both ends rises above it in between; the reference shows it."""

    name, modality, sprites = "image", "image", 2

    def __init__(self, *args, n_cand: int = 4, **kw) -> None:
        super().__init__(*args, **kw)
        self.n_cand = n_cand

    def draw(self, gen, n):
        ext, C = self.ext, self.n_cand
        base = actor_appearance(gen, n, self.atlas.count, sprites=2)
        cands = actor_appearance(gen, n * C, self.atlas.count, sprites=1)  # candidate actors, (n*C) rows
        ww, wh, sa = _u(gen, (n,), 0.25, 0.4), _u(gen, (n,), 0.16, 0.22), _u(gen, (n,), 0.1, 0.13)
        lo, hi = -ext[1] + wh + 2 * sa + 0.06, ext[1] - wh - 0.02
        wy = lo + (hi - lo) * _u(gen, (n,))
        wx = _u(gen, (n,), -1, 1) * (ext[0] - ww - 0.02)
        base.spr_active = torch.ones(n, 2, dtype=torch.bool)
        base.spr_kind[:, 1], base.spr_shape[:, 1] = 0, 3  # the wall: a textured rounded box
        base.spr_aspect[:, 1] = (ww / wh).sqrt()
        base.spr_tint[:, 1] = _u(gen, (n, 1), 0.5, 0.8)
        return {"app": base, "cands": cands, "wall": torch.stack([wx, wy], -1), "wall_s": (ww * wh).sqrt(), "wh": wh,
                "sa": sa, "label": torch.randint(0, C, (n,), generator=gen)}

    def appearance(self, prm, label):
        app, cands, C = prm["app"], prm["cands"], self.n_cand
        rows = torch.arange(label.shape[0]) * C + label.cpu()
        fields = ("spr_kind", "spr_photo", "spr_crop", "spr_c0", "spr_c1", "spr_freq", "spr_phase", "spr_shape", "spr_tint")
        new = {f: getattr(app, f).clone() for f in fields}
        for f in fields:
            new[f][:, 0] = getattr(cands, f)[rows, 0]
        return dataclasses.replace(app, **new)

    def poses(self, prm, label, times):
        rise = (prm["wh"] + prm["sa"] + 0.04)[:, None] * torch.sin(math.pi * times.clamp(0, 1))
        actor = torch.stack([prm["wall"][:, 0:1].expand_as(times), prm["wall"][:, 1:2] - rise], -1)
        wall = prm["wall"][:, None].expand_as(actor)
        return static_scene(torch.stack([actor, wall], 1), torch.stack([prm["sa"], prm["wall_s"]], 1))

    def _reference(self, prm, label):
        app = self.appearance(prm, label)
        n = label.shape[0]
        app.bg_flat, app.bg_color = torch.ones(n), torch.full((n, 3), 0.5)
        app.spr_active = torch.tensor([True, False]).expand(n, 2).clone()
        p = torch.zeros(n, 2, 1, 2)
        return self.render(app, static_scene(p, torch.stack([prm["sa"], prm["wall_s"]], 1)))[:, 0]

    def extra(self, prm, label, gen):
        return {"reference": self._reference(prm, label), "true_pos": self.positions(prm, label)}

    def hypotheses(self, prm, label):
        n, F = label.shape[0], self.n_targets
        taus = self.taus.expand(n, F)
        hyp, refs = [], []
        for c in range(self.n_cand):
            lab = torch.full((n,), c)
            hyp.append(self.render(self.appearance(prm, lab), self.poses(prm, lab, taus)))
            refs.append(self._reference(prm, lab))
        return {"hyp_targets": torch.stack(hyp, 1), "cand_refs": torch.stack(refs, 1)}

    def score(self, batch, frames):
        """correct: the frames are nearest (MSE) to the true candidate's; position_error_px of the tracked actor."""
        mse = ((frames[:, None].float() - batch["hyp_targets"].float()) ** 2).mean((2, 3, 4, 5))  # (B, n_cand)
        pos = track(frames, batch["background"])
        err = torch.nan_to_num(((pos - batch["true_pos"]) ** 2).sum(-1).sqrt(), nan=2.0).mean(-1) * max(frames.shape[-2:]) / 2
        return {"correct": mse.argmin(-1) == batch["label"], "position_error_px": err}

    @staticmethod
    def oracle(batch: dict) -> torch.Tensor:
        """The candidate whose reference rendering is nearest the given reference image."""
        d = ((batch["cand_refs"] - batch["reference"][:, None]) ** 2).mean((2, 3, 4))
        return d.argmin(-1)


SUITE_CLASSES = {"audio": AudioSuite, "text": TextSuite, "context": ContextSuite, "image": ImageSuite}


def make_suite(name: str, height: int, width: int, **kw) -> Suite:
    if name not in SUITE_CLASSES:
        raise BBFInputError(f"suite={name!r}: allowed are {SUITES}")
    return SUITE_CLASSES[name](height, width, **kw)


__all__ = [
    "SUITES",
    "AudioSuite",
    "ContextSuite",
    "ImageSuite",
    "Suite",
    "TextSuite",
    "all_captions",
    "make_suite",
    "track",
]

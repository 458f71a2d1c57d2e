"""Batched 2.5D renderer: a scene is a function of time, so any instant can be rendered exactly.

A scene is a photograph seen through a moving camera, K textured sprites composited back to front
(sprite k covers sprites < k: occlusion), and a global lighting term. `Appearance` holds what does
not change with time; `Poses` holds every time-varying quantity already evaluated at the requested
times, so motion models (data.py, ambiguity.py) only have to produce Poses.

Screen coordinates: x to the right, y down, the longer image side spans [-1, 1]; pixel (i, j) has its
centre at x = ((j + 0.5) / W * 2 - 1) * W / max(H, W), y = ((i + 0.5) / H * 2 - 1) * H / max(H, W).
Rendering is resolution independent: the same scene at 128x128 and 1280x720 shows the same content.

Photo coordinates: every photograph is centre-cropped to a square and resized to S x S; (u, v) in
[-1, 1] spans it; coordinates outside are mirrored back (reflection), so a camera may drift off the
picture. All photographs of a split live side by side in one atlas (3, S, S * P), so every lookup of
a batch is a single `grid_sample` call. Sampling is bilinear, fp32.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bbf_rt.errors import BBFInputError

#: scikit-image's bundled photographs (offline), by split; the held-out ones never appear in training
TRAIN_PHOTOS = (
    "astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "colorwheel", "camera",
    "moon", "coins", "brick", "grass", "gravel", "cell",
)
HELDOUT_PHOTOS = ("chelsea", "rocket", "motorcycle", "retina")
#: sprite pattern kinds: 0 photo crop, 1 checker, 2 stripes, 3 rings
N_KINDS = 4
#: sprite shapes: superellipse exponents (0.5 four-pointed star, 1 diamond, 2 ellipse, 4 rounded box)
SHAPES = (0.5, 1.0, 2.0, 4.0)


def _load_photo(name: str) -> np.ndarray:
    """(h, w, 3) uint8 RGB of a scikit-image sample image (grey images are repeated on 3 channels)."""
    try:
        import skimage.data as skd
    except ImportError as e:  # pragma: no cover - the train extra installs it
        raise BBFInputError("the training data needs scikit-image: pip install 'bbf-rt[train]'") from e
    img = skd.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skd, name)()
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


@functools.lru_cache(maxsize=8)
def _atlas_cpu(names: tuple[str, ...], size: int) -> torch.Tensor:
    tiles = []
    for n in names:
        img = torch.from_numpy(_load_photo(n)).permute(2, 0, 1).float() / 255.0  # (3, h, w)
        h, w = img.shape[1:]
        s = min(h, w)
        img = img[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        tiles.append(F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.cat(tiles, dim=2).clamp(0, 1).contiguous()  # (3, S, S*P)


class PhotoAtlas:
    """The photographs of one split as one (1, 3, S, S*P) fp32 texture on `device`."""

    def __init__(self, names: tuple[str, ...], size: int, device: torch.device | str = "cpu") -> None:
        if not names:
            raise BBFInputError("names=(): the atlas needs at least one photograph")
        self.names, self.size, self.count = tuple(names), int(size), len(names)
        self.texture = _atlas_cpu(self.names, self.size).to(device)[None]

    def sample(self, photo: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """photo: (N,) long slot per item; uv: (N, A, B, 2) photo coordinates -> (N, 3, A, B) fp32."""
        n, a, b, _ = uv.shape
        half = 1.0 - 1.0 / self.size  # stay half a texel inside the slot: no bleeding into a neighbour
        u = _mirror(uv[..., 0]).clamp(-half, half)
        v = _mirror(uv[..., 1]).clamp(-half, half)
        x = (photo.view(n, 1, 1).float() + (u + 1) * 0.5) / self.count * 2 - 1
        grid = torch.stack([x, v], dim=-1).reshape(1, n * a, b, 2)
        out = F.grid_sample(self.texture, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.reshape(3, n, a, b).transpose(0, 1)


def _mirror(u: torch.Tensor) -> torch.Tensor:
    """Fold any coordinate into [-1, 1] by reflection at the borders (period 4)."""
    return 1.0 - torch.remainder(u + 1.0, 4.0).sub(2.0).abs()


def screen_grid(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W, 2) fp32 screen coordinates of the pixel centres (see the module docstring)."""
    m = max(height, width)
    xs = ((torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 - 1) * (width / m)
    ys = ((torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 - 1) * (height / m)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)


def screen_extent(height: int, width: int) -> tuple[float, float]:
    """Half-extents (x, y) of the visible screen: the longer side is 1."""
    m = max(height, width)
    return width / m, height / m


@dataclass
class Appearance:
    """What a scene looks like, constant in time. B clips, K sprites; every field is a tensor."""

    bg_photo: torch.Tensor  # (B,) long atlas slot
    bg_tint: torch.Tensor  # (B, 3) colour gain
    bg_flat: torch.Tensor  # (B,) in [0, 1]: blend of the photo towards bg_color (plain backdrops)
    bg_color: torch.Tensor  # (B, 3)
    spr_active: torch.Tensor  # (B, K) bool
    spr_kind: torch.Tensor  # (B, K) long in [0, N_KINDS)
    spr_photo: torch.Tensor  # (B, K) long
    spr_crop: torch.Tensor  # (B, K, 3): centre (u, v) and half-extent of the photo crop
    spr_c0: torch.Tensor  # (B, K, 3) pattern colours
    spr_c1: torch.Tensor  # (B, K, 3)
    spr_freq: torch.Tensor  # (B, K) pattern frequency (radians per local unit)
    spr_phase: torch.Tensor  # (B, K) pattern angle / phase
    spr_shape: torch.Tensor  # (B, K) long index into SHAPES
    spr_aspect: torch.Tensor  # (B, K) width / height ratio is aspect**2
    spr_tint: torch.Tensor  # (B, K, 3) gain on photo crops

    @property
    def batch(self) -> int:
        return self.bg_photo.shape[0]

    @property
    def sprites(self) -> int:
        return self.spr_active.shape[1]


@dataclass
class Poses:
    """Every time-varying quantity at T times per clip."""

    cam_c: torch.Tensor  # (B, T, 2) camera centre in photo coordinates
    cam_e: torch.Tensor  # (B, T) photo half-extent seen by the longer screen side (zoom)
    cam_r: torch.Tensor  # (B, T) camera roll (radians)
    spr_p: torch.Tensor  # (B, K, T, 2) sprite centres, screen coordinates
    spr_theta: torch.Tensor  # (B, K, T) sprite rotation
    spr_s: torch.Tensor  # (B, K, T) sprite half-size (screen units)
    spr_vis: torch.Tensor  # (B, K, T) opacity multiplier in [0, 1]
    spr_gain: torch.Tensor  # (B, K, T) brightness multiplier (flashes)
    light_g: torch.Tensor  # (B, T) global gain
    light_grad: torch.Tensor  # (B, T, 2) linear illumination gradient across the screen


def take(obj, idx: torch.Tensor):
    """The same dataclass with every tensor field indexed along dim 0 (a subset of clips)."""
    return dataclasses.replace(obj, **{f.name: getattr(obj, f.name)[idx] for f in dataclasses.fields(obj)})


def to_device(obj, device: torch.device | str):
    return dataclasses.replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)})


def _shape_r(lx: torch.Tensor, ly: torch.Tensor, shape: int) -> torch.Tensor:
    """Superellipse radius (|lx|^e + |ly|^e)^(1/e) for e = SHAPES[shape], without a general pow."""
    e = SHAPES[shape]
    if e == 2.0:
        return torch.sqrt(lx * lx + ly * ly)
    if e == 1.0:
        return lx.abs() + ly.abs()
    if e == 4.0:
        return torch.sqrt(torch.sqrt(lx.pow(4) + ly.pow(4)))
    q = torch.sqrt(lx.abs()) + torch.sqrt(ly.abs())  # e = 0.5: a four-pointed star
    return q * q


def _pattern(kind: int, u: torch.Tensor, v: torch.Tensor, f: torch.Tensor, ph: torch.Tensor) -> torch.Tensor:
    """Procedural pattern in [0, 1] on local coordinates (N, T, H, W); f, ph: (N, 1, 1, 1)."""
    if kind == 1:
        wave = torch.sin(f * u + ph) * torch.sin(f * v)
    elif kind == 2:
        wave = torch.sin(f * (u * torch.cos(ph) + v * torch.sin(ph)))
    else:
        wave = torch.sin(f * torch.sqrt(u * u + v * v + 1e-6) + ph)
    return (0.5 + 1.25 * wave).clamp_(0, 1)  # soft, clipped edges: no aliasing


def _sprites(atlas: PhotoAtlas, app: Appearance, poses: Poses, scr: torch.Tensor):
    """Alpha (N, T, H, W) and colour (N, T, 3, H, W) of the N active sprites, with their (clip, layer)."""
    H, W = scr.shape[:2]
    X, Y = scr[..., 0].contiguous(), scr[..., 1].contiguous()  # (H, W)
    b, k = app.spr_active.nonzero(as_tuple=True)  # (N,), sorted by clip then layer
    N, T = b.numel(), poses.cam_e.shape[1]
    alpha = torch.zeros(N, T, H, W, device=X.device)
    colour = torch.zeros(N, T, 3, H, W, device=X.device)
    if N == 0:
        return b, k, alpha, colour
    p, th, s = poses.spr_p[b, k], poses.spr_theta[b, k], poses.spr_s[b, k]  # (N, T, 2), (N, T), (N, T)
    asp = app.spr_aspect[b, k][:, None]  # (N, 1)
    cos, sin = torch.cos(th), torch.sin(th)
    # local = (R(-theta)(screen - p)) / s, x / aspect, y * aspect: an affine map of (X, Y) per (N, T)
    ax, bx = cos / (s * asp), sin / (s * asp)
    ay, by = -sin * asp / s, cos * asp / s
    cx = -(ax * p[..., 0] + bx * p[..., 1])
    cy = -(ay * p[..., 0] + by * p[..., 1])
    e4 = lambda t: t[..., None, None]
    lx = torch.addcmul(torch.addcmul(e4(cx), e4(bx), Y), e4(ax), X)  # (N, T, H, W)
    ly = torch.addcmul(torch.addcmul(e4(cy), e4(by), Y), e4(ay), X)
    px = (2.0 / max(H, W)) / (s * torch.minimum(asp, 1 / asp))  # one pixel in local units, (N, T)
    vis = poses.spr_vis[b, k]
    gain = poses.spr_gain[b, k]
    shape, kind = app.spr_shape[b, k], app.spr_kind[b, k]
    for sh in range(len(SHAPES)):
        idx = (shape == sh).nonzero(as_tuple=True)[0]
        if idx.numel():
            r = _shape_r(lx[idx], ly[idx], sh)
            alpha[idx] = ((1 - r) / e4(px[idx]) + 0.5).clamp(0, 1) * e4(vis[idx])
    for kd in range(N_KINDS):
        idx = (kind == kd).nonzero(as_tuple=True)[0]
        if not idx.numel():
            continue
        u, v = lx[idx], ly[idx]
        bi, ki = b[idx], k[idx]
        if kd == 0:  # photo crop
            crop = app.spr_crop[bi, ki].view(-1, 1, 1, 1, 3)
            uv = torch.stack([crop[..., 0] + crop[..., 2] * u, crop[..., 1] + crop[..., 2] * v], dim=-1)
            n = idx.numel()
            col = atlas.sample(app.spr_photo[bi, ki], uv.view(n, T * H, W, 2)).view(n, 3, T, H, W).transpose(1, 2)
            col = col * app.spr_tint[bi, ki].view(n, 1, 3, 1, 1)
        else:
            pat = _pattern(kd, u, v, app.spr_freq[bi, ki].view(-1, 1, 1, 1), app.spr_phase[bi, ki].view(-1, 1, 1, 1))
            c0 = app.spr_c0[bi, ki].view(-1, 1, 3, 1, 1)
            c1 = app.spr_c1[bi, ki].view(-1, 1, 3, 1, 1)
            col = c0 + (c1 - c0) * pat.unsqueeze(2)
        colour[idx] = col * gain[idx].view(-1, T, 1, 1, 1)
    return b, k, alpha, colour


def render(atlas: PhotoAtlas, app: Appearance, poses: Poses, height: int, width: int, chunk: int = 32) -> torch.Tensor:
    """Frames of every clip at every time: (B, T, 3, H, W) fp32 in [0, 1], on the atlas's device.

    Work is O(B*T*(1 + active sprites)*H*W) elementwise ops and bilinear lookups; clips are processed
    `chunk` at a time to bound memory.
    """
    B = app.batch
    if B > chunk:
        outs = [
            render(atlas, take(app, slice(i, i + chunk)), take(poses, slice(i, i + chunk)), height, width, chunk)
            for i in range(0, B, chunk)
        ]
        return torch.cat(outs)
    T = poses.cam_e.shape[1]
    dev = atlas.texture.device
    scr = screen_grid(height, width, dev)  # (H, W, 2)
    X, Y = scr[..., 0], scr[..., 1]

    # background: photo coordinates = c + e * R(r) * screen
    e4 = lambda t: t[..., None, None]
    ec, es = poses.cam_e * torch.cos(poses.cam_r), poses.cam_e * torch.sin(poses.cam_r)
    u = torch.addcmul(torch.addcmul(e4(poses.cam_c[..., 0]), e4(-es), Y), e4(ec), X)  # (B, T, H, W)
    v = torch.addcmul(torch.addcmul(e4(poses.cam_c[..., 1]), e4(ec), Y), e4(es), X)
    uv = torch.stack([u, v], dim=-1).view(B, T * height, width, 2)
    img = atlas.sample(app.bg_photo, uv).view(B, 3, T, height, width).transpose(1, 2)
    flat = app.bg_flat.view(B, 1, 1, 1, 1)
    tint = (app.bg_tint * (1 - app.bg_flat[:, None])).view(B, 1, 3, 1, 1)
    img = img * tint + app.bg_color.view(B, 1, 3, 1, 1) * flat  # (B, T, 3, H, W)

    if app.sprites:
        b, k, alpha, colour = _sprites(atlas, app, poses, scr)
        for layer in range(app.sprites):  # back to front: occlusion
            idx = (k == layer).nonzero(as_tuple=True)[0]
            if idx.numel():
                bi = b[idx]
                img[bi] = torch.lerp(img[bi], colour[idx], alpha[idx].unsqueeze(2))  # (n, T, 3, H, W)

    gx, gy = poses.light_grad[..., 0], poses.light_grad[..., 1]
    light = torch.addcmul(torch.addcmul(e4(poses.light_g), e4(poses.light_g * gy), Y), e4(poses.light_g * gx), X)
    return (img * light.unsqueeze(2)).clamp(0, 1)

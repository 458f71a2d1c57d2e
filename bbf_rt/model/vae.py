"""Video VAEs: the interface the pipeline talks to, and a compact frame-wise autoencoder.

Tensor conventions (every VAE here):
- frames: (B, F, 3, H, W) float in [-1, 1]; H and W multiples of `spatial_stride` (padding is the
  pipeline's job, the VAE refuses other sizes).
- latents: (B, F', C, H/s, W/s) with F' = F for frame-wise VAEs (temporal_stride 1) and
  F' = 1 + (F - 1) / 4 for a causal 3D VAE such as Wan2.1's (temporal_stride 4, first frame kept).
  Latents are normalised to roughly unit variance: z_norm = (z - shift) * scale, with `shift` and
  `scale` stored as fp32 buffers of shape (C,) so per-channel statistics (Wan's) fit the same slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bbf_rt import ops
from bbf_rt.errors import BBFInputError
from bbf_rt.model.fusion import BoundaryFusion

__all__ = [
    "VAEConfig",
    "VideoVAE",
    "CompactVAE",
    "frames_to_uint8",
    "per_frame",
    "uint8_to_frames",
]


@dataclass(frozen=True)
class VAEConfig:
    """Shape of a `CompactVAE`.

    `scale`/`shift` are the latent normalisation (z_norm = (z - shift) * scale): one float for every
    channel, or a tuple with one value per latent channel.
    """

    latent_channels: int = 16
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    scale: float | tuple[float, ...] = 1.0
    shift: float | tuple[float, ...] = 0.0
    fusion_width: int | None = None  # a BoundaryFusion head of this width after the decoder; None = none

    @property
    def stride(self) -> int:
        """Spatial stride: each entry of `channel_mult` is one stride-2 down stage."""
        return 2 ** len(self.channel_mult)


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BBFInputError(f"{name}={value!r}: must be a positive int")


def _per_channel(name: str, value: float | tuple[float, ...], channels: int) -> Tensor:
    """A (C,) fp32 tensor from a scalar or a per-channel tuple."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((channels,), float(value), dtype=torch.float32)
    values = tuple(value)
    if len(values) != channels:
        raise BBFInputError(
            f"{name} has {len(values)} values: allowed are one float or {channels} (one per latent channel)"
        )
    return torch.tensor(values, dtype=torch.float32)


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8 (Stable-Diffusion-style VAEs use 32; 8 suits 32..128 channels)."""
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class VideoVAE(nn.Module):
    """Base class of every VAE the pipeline can host.

    Subclasses set `latent_channels`, `spatial_stride`, `temporal_stride` and implement `encode` and
    `decode` on videos; the frame-wise helpers default to treating each frame as a one-frame video
    (right for a causal 3D VAE, which keeps the first frame on its own).
    """

    latent_channels: int
    spatial_stride: int
    temporal_stride: int
    # CompactVAE may own a `fusion` submodule (bbf_rt.model.fusion); read it as getattr(vae, "fusion", None)

    def _register_norm(self, scale: Tensor, shift: Tensor) -> None:
        self.register_buffer("scale", scale.to(torch.float32))  # (C,)
        self.register_buffer("shift", shift.to(torch.float32))  # (C,)

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents (..., C, h, w) -> normalised: (z - shift) * scale."""
        c = self.latent_channels
        return (z - self.shift.view(c, 1, 1).to(z.dtype)) * self.scale.view(c, 1, 1).to(z.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """Normalised latents (..., C, h, w) -> raw: z / scale + shift."""
        c = self.latent_channels
        return z / self.scale.view(c, 1, 1).to(z.dtype) + self.shift.view(c, 1, 1).to(z.dtype)

    def check_frames(self, frames: Tensor, name: str = "frames", ndim: int = 5) -> None:
        """Raise BBFInputError unless `frames` is a float (.., 3, H, W) tensor with H, W multiples of the stride."""
        if not isinstance(frames, Tensor):
            raise BBFInputError(f"{name}: expected a torch.Tensor, got {type(frames).__name__}")
        layout = "(B, F, 3, H, W)" if ndim == 5 else "(N, 3, H, W)"
        if frames.dim() != ndim or frames.shape[-3] != 3:
            raise BBFInputError(f"{name} has shape {tuple(frames.shape)}: allowed is {layout}")
        if not frames.is_floating_point():
            raise BBFInputError(f"{name} has dtype {frames.dtype}: allowed are float dtypes in [-1, 1]")
        h, w = frames.shape[-2], frames.shape[-1]
        s = self.spatial_stride
        if h % s or w % s or h == 0 or w == 0:
            raise BBFInputError(
                f"{name} has size H={h}, W={w}: both must be positive multiples of the VAE's spatial "
                f"stride {s} (pad the frames first)"
            )

    def check_latents(self, latents: Tensor, name: str = "latents", ndim: int = 5) -> None:
        """Raise BBFInputError unless `latents` is a float (.., C, h, w) tensor with C = latent_channels."""
        if not isinstance(latents, Tensor):
            raise BBFInputError(f"{name}: expected a torch.Tensor, got {type(latents).__name__}")
        layout = "(B, F', C, h, w)" if ndim == 5 else "(N, C, h, w)"
        if latents.dim() != ndim or latents.shape[-3] != self.latent_channels:
            raise BBFInputError(
                f"{name} has shape {tuple(latents.shape)}: allowed is {layout} with C={self.latent_channels}"
            )
        if not latents.is_floating_point():
            raise BBFInputError(f"{name} has dtype {latents.dtype}: allowed are float dtypes")

    def encode(self, frames: Tensor) -> Tensor:
        """(B, F, 3, H, W) in [-1, 1] -> normalised latents (B, F', C, H/s, W/s)."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, F', C, h, w) -> frames (B, F, 3, h*s, w*s), not clamped."""
        raise NotImplementedError

    def encode_frames(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> normalised latents (N, C, H/s, W/s), each frame on its own."""
        self.check_frames(x, "x", ndim=4)
        return self.encode(x.unsqueeze(1))[:, 0]

    def decode_frames(self, z: Tensor) -> Tensor:
        """Normalised latents (N, C, h, w) -> frames (N, 3, h*s, w*s), each frame on its own."""
        self.check_latents(z, "z", ndim=4)
        return self.decode(z.unsqueeze(1))[:, 0]

    def forward(self, frames: Tensor) -> Tensor:
        """Reconstruction: decode(encode(frames)), (B, F, 3, H, W) -> same shape."""
        return self.decode(self.encode(frames))


def _norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """silu(norm(x)) through bbf_rt.ops (a fused Triton kernel on CUDA); the module keeps the weights."""
    return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


def _conv(conv: nn.Conv2d, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """conv(x) (+ residual) through bbf_rt.ops (bias and residual in one Triton pass on CUDA)."""
    return ops.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, residual)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the identity; shape-preserving (N, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = _conv(self.conv1, _norm_silu(self.norm1, x))
        return _conv(self.conv2, _norm_silu(self.norm2, h), residual=x)


class _Encoder(nn.Module):
    """(N, 3, H, W) -> raw latents (N, C, H/s, W/s).

    conv_in at full resolution, then per down stage a stride-2 3x3 conv followed by residual blocks,
    so only the first conv (3 -> base channels) touches full-resolution pixels.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, chans[0], 3, padding=1)
        stages = []
        prev = chans[0]
        for ch in chans:
            layers: list[nn.Module] = [nn.Conv2d(prev, ch, 3, stride=2, padding=1)]
            layers += [ResBlock(ch) for _ in range(cfg.num_res_blocks)]
            stages.append(nn.Sequential(*layers))
            prev = ch
        self.stages = nn.ModuleList(stages)
        self.mid = ResBlock(prev)
        self.norm_out = nn.GroupNorm(_groups(prev), prev)
        self.conv_out = nn.Conv2d(prev, cfg.latent_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = _conv(self.conv_in, x)
        for stage in self.stages:
            for layer in stage:
                h = _conv(layer, h) if isinstance(layer, nn.Conv2d) else layer(h)
        h = self.mid(h)
        return _conv(self.conv_out, _norm_silu(self.norm_out, h))


class _Decoder(nn.Module):
    """Raw latents (N, C, h, w) -> frames (N, 3, h*s, w*s); mirror of `_Encoder`.

    Per up stage: residual blocks, nearest 2x upsample, 3x3 conv to the next (smaller) width.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        top = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, top, 3, padding=1)
        self.mid = ResBlock(top)
        stages = []
        prev = top
        for i in reversed(range(len(chans))):
            nxt = chans[i - 1] if i > 0 else chans[0]
            blocks = nn.Sequential(*[ResBlock(prev) for _ in range(cfg.num_res_blocks)])
            stages.append(nn.ModuleDict({"blocks": blocks, "conv": nn.Conv2d(prev, nxt, 3, padding=1)}))
            prev = nxt
        self.stages = nn.ModuleList(stages)
        self.norm_out = nn.GroupNorm(_groups(prev), prev)
        self.conv_out = nn.Conv2d(prev, 3, 3, padding=1)
        # the up stages' sub-pixel form (ops.upsample_conv2d, 4/9 of the FLOPs); off: on the H100 it made
        # no end-to-end difference (720p batch 4: 300-307 vs 298-308 fps, three alternating rounds)
        self.subpixel = False

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(_conv(self.conv_in, z))
        for stage in self.stages:
            h = stage["blocks"](h)
            if self.subpixel:  # opt-in (ops.upsample_conv2d)
                h = ops.upsample_conv2d(h, stage["conv"].weight, stage["conv"].bias)
            else:
                h = _conv(stage["conv"], ops.upsample_nearest2x(h))
        return _conv(self.conv_out, _norm_silu(self.norm_out, h))


class CompactVAE(VideoVAE):
    """Deterministic frame-wise conv autoencoder (temporal_stride 1), for real-time use.

    With the default `VAEConfig` (widths 32/64/128, one residual block per stage, 16 latent channels,
    stride 8) it has 1,594,003 parameters (~1.6M; 0.79M encoder, 0.81M decoder). Per 1280x720 frame it
    costs about 22 GMAC to encode and 35 GMAC to decode (measured with torch's FlopCounterMode); the
    largest single layer is the decoder's last full-resolution 32->32 conv (8.5 GMAC). "Deterministic" means the encoder outputs the latent directly (no sampled
    posterior), so encode is a pure function of the frame. Weights are random until trained.
    """

    def __init__(self, cfg: VAEConfig | None = None) -> None:
        super().__init__()
        cfg = VAEConfig() if cfg is None else cfg
        if not isinstance(cfg, VAEConfig):
            raise BBFInputError(f"cfg: expected a VAEConfig, got {type(cfg).__name__}")
        _check_positive("latent_channels", cfg.latent_channels)
        _check_positive("base_channels", cfg.base_channels)
        _check_positive("num_res_blocks", cfg.num_res_blocks)
        if cfg.fusion_width is not None:
            _check_positive("fusion_width", cfg.fusion_width)
        if len(cfg.channel_mult) == 0:
            raise BBFInputError("channel_mult=(): allowed is a non-empty tuple of positive ints")
        for m in cfg.channel_mult:
            _check_positive("channel_mult entry", m)
        self.cfg = cfg
        self.latent_channels = cfg.latent_channels
        self.spatial_stride = cfg.stride
        self.temporal_stride = 1
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        self.fusion = BoundaryFusion(cfg.fusion_width) if cfg.fusion_width else None
        # checked on the config's numbers, not the tensor: the model may be built on the meta device
        scales = (cfg.scale,) if isinstance(cfg.scale, (int, float)) else tuple(cfg.scale)
        if any(float(v) == 0.0 for v in scales):
            raise BBFInputError(f"scale={cfg.scale!r}: every value must be non-zero")
        scale = _per_channel("scale", cfg.scale, cfg.latent_channels)
        self._register_norm(scale, _per_channel("shift", cfg.shift, cfg.latent_channels))
        self.channels_last = False

    def use_channels_last(self, on: bool = True) -> "CompactVAE":
        """Run every convolution and GroupNorm in NHWC (`channels_last`) memory, or back in NCHW.

        cuDNN's fast convolution kernels are NHWC: fed NCHW they transpose in and out around every conv
        (bench/profile_player.py). The weights move to channels_last, inputs are converted on entry, and
        ops.group_norm_silu keeps the layout; values are the same either way. Latents are returned
        contiguous; decoded frames are channels-last (their NHWC uint8 conversion is then a plain copy)."""
        self.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        self.channels_last = bool(on)
        return self

    def _layout(self, t: Tensor) -> Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def encode_frames(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) float in [-1, 1] -> normalised latents (N, C, H/s, W/s), same dtype."""
        self.check_frames(x, "x", ndim=4)
        z = self.normalize(self.encoder(self._layout(x)))
        return z.contiguous() if self.channels_last else z

    def decode_frames(self, z: Tensor, frame0: Tensor | None = None, frame1: Tensor | None = None,
                      tau: Tensor | None = None) -> Tensor:
        """Normalised latents (N, C, h, w) -> frames (N, 3, h*s, w*s), nominally [-1, 1], not clamped.

        With the boundary frames of each latent's interval (frame0, frame1: (N, 3, H, W) in [-1, 1], the
        decoded size) and its time tau (N,), a VAE with a fusion head rebuilds the frame from their pixels
        (bbf_rt.model.fusion); without a head they are not needed and are ignored."""
        self.check_latents(z, "z", ndim=4)
        x = self.decoder(self._layout(self.denormalize(z)))
        given = [t is not None for t in (frame0, frame1, tau)]
        if any(given) and not all(given):
            raise BBFInputError("decode_frames: pass frame0, frame1 and tau together, or none of them")
        if self.fusion is None or not all(given):
            return x
        return self.fusion(x, self._layout(frame0.to(x.dtype)), self._layout(frame1.to(x.dtype)), tau)

    def encode(self, frames: Tensor) -> Tensor:
        """(B, F, 3, H, W) float in [-1, 1] -> normalised latents (B, F, C, H/s, W/s).

        Frames are folded into the batch, so each frame's latent is independent of the others.
        """
        self.check_frames(frames, "frames")
        b, f = frames.shape[0], frames.shape[1]
        z = self.encode_frames(frames.flatten(0, 1))  # (B*F, C, h, w)
        return z.unflatten(0, (b, f))

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, F, C, h, w) -> frames (B, F, 3, h*s, w*s), not clamped."""
        self.check_latents(latents, "latents")
        b, f = latents.shape[0], latents.shape[1]
        x = self.decode_frames(latents.flatten(0, 1))  # (B*F, 3, H, W)
        return x.unflatten(0, (b, f))

    def decode_between(self, latents: Tensor, frame0: Tensor, frame1: Tensor, taus: Tensor) -> Tensor:
        """In-between latents (B, F, C, h, w) of B intervals -> frames (B, F, 3, H, W), through the fusion
        head when there is one: frame0, frame1 (B, 3, H, W) in [-1, 1] bound each interval, taus (B, F)."""
        self.check_latents(latents, "latents")
        b, f = latents.shape[0], latents.shape[1]
        if self.fusion is None:
            return self.decode(latents)
        if tuple(taus.shape) != (b, f):
            raise BBFInputError(f"taus has shape {tuple(taus.shape)}; allowed is ({b}, {f}), one time per latent")
        x = self.decode_frames(latents.flatten(0, 1), per_frame(frame0, f), per_frame(frame1, f), taus.flatten().float())
        return x.unflatten(0, (b, f))


def per_frame(t: Tensor, f: int) -> Tensor:
    """(B, ...) -> (B*f, ...): each interval's tensor (e.g. a boundary frame) once per in-between frame."""
    return t[:, None].expand(t.shape[0], f, *t.shape[1:]).flatten(0, 1)


def frames_to_uint8(frames: Tensor) -> Tensor:
    """Float frames in [-1, 1] (any shape) -> uint8 in [0, 255], clamping out-of-range values first."""
    if not isinstance(frames, Tensor) or not frames.is_floating_point():
        raise BBFInputError(f"frames: expected a float tensor, got {getattr(frames, 'dtype', type(frames))}")
    return ((frames.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def uint8_to_frames(pixels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels in [0, 255] (any shape) -> float frames in [-1, 1] of `dtype`."""
    if not isinstance(pixels, Tensor) or pixels.dtype != torch.uint8:
        raise BBFInputError(f"pixels: expected a uint8 tensor, got {getattr(pixels, 'dtype', type(pixels))}")
    return pixels.to(dtype) / 127.5 - 1.0

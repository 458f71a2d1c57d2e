"""The exported denoiser's fixed signature per condition set, its example inputs and dynamic dims.

A condition set is the tuple of modalities an artifact runs. The DiT skips an absent modality's
branch (no zero tokens, no compute), so which modalities are present changes the graph, and every
set is its own artifact with its own positional, tensors-only signature:

    x, sigma, tau, z0, z1, valid, diff            always
    text, text_mask                               "text"
    image, image_mask                             "image"
    audio, audio_mask                             "audio"
    context, context_tau, context_mask            "context"

Shapes (B batch rows, F target frames, C latent channels, H x W latent size): x (B, F, C, H, W);
sigma (B,) fp32; tau (B, F) fp32; z0, z1 (B, C, H, W); valid (B, 1, H, W); diff (B,) fp32;
text (B, Lt, text_dim) + text_mask (B, Lt) bool; image (B, Ni, C, Hi, Wi) + image_mask (B, Ni) bool;
audio (B, F, audio_tokens, audio_mels) + audio_mask (B, F) bool; context (B, Fc, C, H, W) +
context_tau (B, Fc) fp32 + context_mask (B, Fc) bool. Output: v (B, F, C, H, W) in x's dtype.
Latent tensors and condition tokens are in the artifact's precision; times and masks never are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bbf_rt.config import MODALITIES, ExportConfig, ModelConfig
from bbf_rt.errors import BBFInputError

BASE_INPUTS: tuple[str, ...] = ("x", "sigma", "tau", "z0", "z1", "valid", "diff")
COND_INPUTS: dict[str, tuple[str, ...]] = {
    "text": ("text", "text_mask"),
    "image": ("image", "image_mask"),
    "audio": ("audio", "audio_mask"),
    "context": ("context", "context_tau", "context_mask"),
}
FP32_INPUTS = frozenset({"sigma", "tau", "diff", "context_tau"})
BOOL_INPUTS = frozenset({"text_mask", "image_mask", "audio_mask", "context_mask"})
OUTPUT = "v"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def condition_set(modalities) -> tuple[str, ...]:
    """Canonical (block order, no duplicates) condition set; raises on an unknown modality."""
    bad = [m for m in modalities if m not in MODALITIES]
    if bad:
        raise BBFInputError(f"condition set {list(modalities)} has unknown {bad}; allowed: {MODALITIES}")
    return tuple(m for m in MODALITIES if m in modalities)


def condition_tag(modalities) -> str:
    """Short name of a condition set for artifact file names: "text+audio", or "nocond"."""
    return "+".join(condition_set(modalities)) or "nocond"


def condition_set_of(kw: dict) -> tuple[str, ...]:
    """The condition set of a DiT call's keyword tensors (as Engine builds them: a modality is present
    when its mask is)."""
    return tuple(m for m in MODALITIES if f"{m}_mask" in kw)


def input_names(modalities) -> tuple[str, ...]:
    names = list(BASE_INPUTS)
    for m in condition_set(modalities):
        names.extend(COND_INPUTS[m])
    return tuple(names)


def input_dtype(name: str, precision: str) -> torch.dtype:
    if name in BOOL_INPUTS:
        return torch.bool
    return torch.float32 if name in FP32_INPUTS else DTYPES[precision]


class Denoiser(nn.Module):
    """The DiT behind a positional, tensors-only signature for one condition set (see module doc)."""

    def __init__(self, dit: nn.Module, modalities) -> None:
        super().__init__()
        self.dit = dit
        self.modalities = condition_set(modalities)
        missing = [m for m in self.modalities if m not in dit.cfg.modalities]
        if missing:
            raise BBFInputError(f"model {dit.cfg.name!r} has no branch for {missing}; its modalities are {dit.cfg.modalities}")
        self.names = input_names(self.modalities)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.dit(**dict(zip(self.names, inputs)))


class VAEEncoder(nn.Module):
    """(N, 3, H, W) frames in [-1, 1] -> (N, C, H/s, W/s) normalised latents."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.vae.encode_frames(frames)


class VAEDecoder(nn.Module):
    """(N, C, h, w) normalised latents -> (N, 3, h*s, w*s) frames, nominally [-1, 1], not clamped.

    A VAE with a boundary-fusion head also takes frame0, frame1 (N, 3, h*s, w*s) in [-1, 1] and tau (N,)
    fp32, the inputs of bbf_rt.model.fusion, so the graph holds the head too."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor, frame0: torch.Tensor | None = None, frame1: torch.Tensor | None = None,
                tau: torch.Tensor | None = None) -> torch.Tensor:
        return self.vae.decode_frames(latents, frame0, frame1, tau)


@dataclass(frozen=True)
class DimRange:
    """One dynamic dimension: the input's size is `mult * k` with k in [lo, hi], opt = mult * k_opt."""

    name: str
    lo: int
    opt: int
    hi: int
    mult: int = 1

    @property
    def static(self) -> bool:
        return self.lo == self.hi

    def example(self, preferred: int) -> int:
        """A small example size in range (k; not 1 when avoidable: torch.export specialises sizes of 1)."""
        return min(max(preferred, self.lo), self.hi)


def latent_dims(cfg: ModelConfig, ecfg: ExportConfig) -> dict[str, DimRange]:
    """ExportConfig's pixel-space profile -> ranges of the denoiser's input dims (latent units, k per
    patch row/col for spatial dims). Raises BBFInputError if a pixel size is not a multiple of the
    model's `pixel_multiple`."""
    s, (ph, pw) = cfg.vae_stride, cfg.patch
    out = {}
    for name in ("batch", "frames", "text", "image", "context"):
        lo, opt, hi = ecfg.dim(name)
        out[name] = DimRange(name, lo, opt, hi)
    for name, p in (("height", ph), ("width", pw), ("image_height", ph), ("image_width", pw)):
        lo, opt, hi = ecfg.dim(name)
        bad = [v for v in (lo, opt, hi) if v % (s * p)]
        if bad:
            raise BBFInputError(
                f"export shape {name}={lo}:{opt}:{hi}: every size must be a multiple of {s * p} "
                f"(VAE stride {s} x patch {p}) for model {cfg.name!r}"
            )
        out[name] = DimRange(name, lo // (s * p), opt // (s * p), hi // (s * p), mult=p)
    return out


# the dims of each input, in order; None = a fixed size from the model config
def _layout(cfg: ModelConfig) -> dict[str, tuple]:
    C = cfg.latent_channels
    return {
        "x": ("batch", "frames", C, "height", "width"),
        "sigma": ("batch",),
        "tau": ("batch", "frames"),
        "z0": ("batch", C, "height", "width"),
        "z1": ("batch", C, "height", "width"),
        "valid": ("batch", 1, "height", "width"),
        "diff": ("batch",),
        "text": ("batch", "text", cfg.text_dim),
        "text_mask": ("batch", "text"),
        "image": ("batch", "image", C, "image_height", "image_width"),
        "image_mask": ("batch", "image"),
        "audio": ("batch", "frames", cfg.audio_tokens, cfg.audio_mels),
        "audio_mask": ("batch", "frames"),
        "context": ("batch", "context", C, "height", "width"),
        "context_tau": ("batch", "context"),
        "context_mask": ("batch", "context"),
    }


# distinct small example sizes per dim (k units), so that no two dims are confused by a tracer
_EXAMPLE_K = {"batch": 2, "frames": 3, "height": 4, "width": 5, "text": 6, "image": 2, "image_height": 3,
              "image_width": 2, "context": 4}


def shapes_at(cfg: ModelConfig, modalities, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes for dim sizes `sizes` (spatial dims in latent units)."""
    lay = _layout(cfg)
    return {n: tuple(sizes[d] if isinstance(d, str) else d for d in lay[n]) for n in input_names(modalities)}


def example_sizes(cfg: ModelConfig, ecfg: ExportConfig, fixed: dict[str, int] | None = None, at_opt: bool = False) -> dict[str, int]:
    """Sizes inside the profile (latent units) for tracing: small distinct ones, or (at_opt) the
    profile's opt with 1 raised to 2 and repeats bumped, since torch.export specialises a size of 1
    and may equate dims of equal size. `fixed` overrides dims (k units)."""
    dims = latent_dims(cfg, ecfg)
    out, used = {}, set()
    for name, r in dims.items():
        if name in (fixed or {}):
            k = fixed[name]
        elif at_opt:
            k = r.example(max(r.opt, 2))
            while k in used and k < r.hi:
                k += 1
        else:
            k = r.example(_EXAMPLE_K[name])
        used.add(k)
        out[name] = k * r.mult
    return out


def example_inputs(cfg: ModelConfig, ecfg: ExportConfig, device, sizes: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
    """Random inputs of the artifact's signature at `sizes` (default: `example_sizes`)."""
    sizes = sizes or example_sizes(cfg, ecfg)
    g = torch.Generator().manual_seed(0)
    out = []
    for name, shape in shapes_at(cfg, ecfg.modalities, sizes).items():
        dt = input_dtype(name, ecfg.precision)
        if dt == torch.bool:
            t = torch.ones(shape, dtype=torch.bool)
            if t.ndim == 2 and t.shape[1] > 1:
                t[0, -1] = False  # some padding keys, as real masks have
        elif name in ("sigma", "tau"):
            t = torch.rand(shape, generator=g)
        elif name == "valid":
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g)
        out.append(t.to(device=device, dtype=dt))
    return tuple(out)


def torch_export_dynamic_shapes(cfg: ModelConfig, ecfg: ExportConfig, static: dict[str, int] | None = None) -> tuple:
    """dynamic_shapes for torch.export / the dynamo ONNX exporter, for a `forward(*inputs)` signature.

    Spatial sizes are exported as `patch * Dim` (derived dims), so the graph knows they divide by the
    patch. Dims with min == max (or listed in `static`) stay static."""
    from torch.export import Dim

    dims = latent_dims(cfg, ecfg)
    sym = {}
    for name, r in dims.items():
        if r.static or name in (static or {}):
            continue
        d = Dim(name, min=r.lo, max=r.hi)
        sym[name] = d * r.mult if r.mult != 1 else d
    lay = _layout(cfg)
    specs = []
    for n in input_names(ecfg.modalities):
        spec = {i: sym[d] for i, d in enumerate(lay[n]) if isinstance(d, str) and d in sym}
        specs.append(spec or None)
    return (tuple(specs),)


def onnx_dynamic_axes(cfg: ModelConfig, ecfg: ExportConfig, static: dict[str, int] | None = None) -> dict[str, dict[int, str]]:
    """dynamic_axes for the TorchScript ONNX exporter (names only; it takes no bounds)."""
    dims = latent_dims(cfg, ecfg)
    lay = _layout(cfg)
    axes = {}
    for n in input_names(ecfg.modalities):
        ax = {i: d for i, d in enumerate(lay[n]) if isinstance(d, str) and not dims[d].static and d not in (static or {})}
        if ax:
            axes[n] = ax
    out_ax = {i: d for i, d in enumerate(lay["x"]) if isinstance(d, str) and not dims[d].static and d not in (static or {})}
    axes[OUTPUT] = out_ax
    return axes


def profile_shapes(cfg: ModelConfig, ecfg: ExportConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Per input name, its (min, opt, max) shapes: a TensorRT optimization profile."""
    dims = latent_dims(cfg, ecfg)
    at = {which: {n: getattr(r, which) * r.mult for n, r in dims.items()} for which in ("lo", "opt", "hi")}
    lo, opt, hi = (shapes_at(cfg, ecfg.modalities, at[w]) for w in ("lo", "opt", "hi"))
    return {n: (lo[n], opt[n], hi[n]) for n in lo}


def observed_dims(cfg: ModelConfig, args: dict[str, torch.Tensor]) -> dict[str, int]:
    """Profile dims (pixel sizes for spatial dims) of one DiT call's inputs."""
    s = cfg.vae_stride
    x = args["x"]
    out = {"batch": x.shape[0], "frames": x.shape[1], "height": x.shape[3] * s, "width": x.shape[4] * s}
    if "text" in args:
        out["text"] = args["text"].shape[1]
    if "image" in args:
        im = args["image"]
        out.update(image=im.shape[1], image_height=im.shape[3] * s, image_width=im.shape[4] * s)
    if "context" in args:
        out["context"] = args["context"].shape[1]
    return out


def covers(ecfg: ExportConfig, dims: dict[str, int]) -> list[str]:
    """Names of the observed dims that fall outside the profile (empty: the artifact covers them)."""
    out = []
    for name, v in dims.items():
        lo, _, hi = ecfg.dim(name)
        if not lo <= v <= hi:
            out.append(f"{name}={v} (profile {lo}..{hi})")
    return out


def widen(ecfg: ExportConfig, dims: dict[str, int]) -> ExportConfig:
    """The profile stretched to include the observed dims (opt unchanged)."""
    new = {}
    for name, v in dims.items():
        lo, opt, hi = ecfg.dim(name)
        if not lo <= v <= hi:
            new[name] = (min(lo, v), opt, max(hi, v))
    return ecfg.with_dims(**new) if new else ecfg

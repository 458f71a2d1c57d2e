"""Frozen dataclass configs and the named model presets.

`ModelConfig` fully describes a BBF DiT (and, for the self-contained presets, its compact VAE); it is
stored as JSON in every checkpoint's metadata and next to every artifact and benchmark row.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from bbf_rt.errors import BBFInputError, CheckpointError

#: Condition branches in the order each block applies them (the paper's "sequential injection").
MODALITIES: tuple[str, ...] = ("text", "image", "audio", "context")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the BBF DiT and of the encoders whose outputs it consumes.

    Token layout: latents (B, F, C, H, W) are cut into (1, ph, pw) patches, so one target frame of an
    (H, W) latent is (H/ph)*(W/pw) tokens. The DiT input per frame is the noisy latent, the two
    boundary latents and a one-channel valid-pixel mask concatenated on channels: 3*C + 1 channels.
    """

    name: str
    dim: int
    depth: int
    heads: int
    ffn_dim: int
    latent_channels: int = 16
    patch: tuple[int, int] = (2, 2)  # (ph, pw); the temporal patch is 1 so every frame has its own time
    freq_dim: int = 256  # sinusoidal features for the flow time, the frame timestamp and RoPE
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_time_scale: float = 8.0  # RoPE temporal position = timestamp (in interval units) * this
    text_dim: int = 384  # token width of the text encoder (MiniLM 384; umt5-xxl 4096)
    audio_mels: int = 64
    audio_tokens: int = 32  # log-mel frames per target frame window (window_s / hop_s)
    # start-end difference normalisation (EDEN's statistics of per-pixel cosine similarity)
    diff_mu: float = 0.990539
    diff_sigma: float = 0.0608093
    # compact frame-wise VAE of the self-contained presets; None = an external VAE (Wan2.1's 3D VAE)
    vae_base_channels: int | None = 32
    vae_channel_mult: tuple[int, ...] = (1, 2, 4)
    vae_res_blocks: int = 1
    # width of the compact VAE's boundary-fusion head (bbf_rt.model.fusion); None = the plain decoder
    vae_fusion: int | None = None
    modalities: tuple[str, ...] = MODALITIES
    # width of each condition branch's attention (its q/k/v/o and the condition embeddings), a multiple
    # of head_dim; None = dim (full-width branches, as Wan's cross-attention)
    branch_dim: int | None = None

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise BBFInputError(f"ModelConfig.dim={self.dim} must be divisible by heads={self.heads}")
        hd = self.head_dim
        if hd % 2 or (hd // 6) * 2 % 2 or (hd - 4 * (hd // 6)) % 2 or hd < 12:
            raise BBFInputError(f"ModelConfig head_dim={hd} cannot be split into 3 even RoPE axes")
        if self.branch_dim is not None and (self.branch_dim <= 0 or self.branch_dim % hd):
            raise BBFInputError(f"ModelConfig.branch_dim={self.branch_dim} must be a positive multiple of head_dim={hd}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise BBFInputError(f"ModelConfig.modalities has unknown {bad}; allowed: {MODALITIES}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def branch_width(self) -> int:
        return self.dim if self.branch_dim is None else self.branch_dim

    @property
    def branch_heads(self) -> int:
        return self.branch_width // self.head_dim

    @property
    def in_channels(self) -> int:
        return 3 * self.latent_channels + 1

    @property
    def vae_stride(self) -> int:
        return 2 ** len(self.vae_channel_mult) if self.vae_base_channels else 8

    @property
    def pixel_multiple(self) -> int:
        """Frame sizes must be multiples of this (VAE stride x patch); the pipeline pads to it."""
        return self.vae_stride * max(self.patch)

    def rope_split(self) -> tuple[int, int, int]:
        """Head-dim channels given to the (time, height, width) RoPE axes (Wan2.1's split)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"model config has unknown fields {unknown}; this bbf-rt knows {sorted(names)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"model config metadata is not valid JSON: {e}") from e
        return cls.from_dict(d)


PRESETS: dict[str, ModelConfig] = {
    # 2 blocks, for tests only (random weights are fine there and only there)
    "tiny": ModelConfig(
        name="tiny", dim=64, depth=2, heads=2, ffn_dim=128, latent_channels=4, audio_mels=16,
        audio_tokens=8, vae_base_channels=8, vae_channel_mult=(1, 2),
    ),
    # the embedded default: real-time at 720p, small enough for the repository (<= 40M parameters)
    # (14.4M DiT parameters: 29 MiB in bf16; narrow 128-wide condition branches keep the four modalities cheap)
    "bbf-s": ModelConfig(name="bbf-s", dim=320, depth=8, heads=5, ffn_dim=1280, latent_channels=16, branch_dim=128,
                         vae_fusion=48),
    # Wan2.1 shapes (umt5-xxl text tokens; the Wan 3D VAE is external to the DiT)
    "wan-1.3b": ModelConfig(
        name="wan-1.3b", dim=1536, depth=30, heads=12, ffn_dim=8960, latent_channels=16, text_dim=4096,
        vae_base_channels=None,
    ),
    "wan-14b": ModelConfig(
        name="wan-14b", dim=5120, depth=40, heads=40, ffn_dim=13824, latent_channels=16, text_dim=4096,
        vae_base_channels=None,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise BBFInputError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class RuntimeConfig:
    """How one interpolation is sampled (see bbf_rt.runtime.sampler)."""

    steps: int = 2
    solver: str = "euler"
    shift: float = 1.0
    text_scale: float = 1.0  # classifier-free guidance scale per modality; 1.0 = no extra pass
    audio_scale: float = 1.0
    context_frames: int = 1  # neighbouring frames given as context on each side of an interval
    seed: int = 0
    batch: int = 4  # intervals per denoiser call
    scene_cut_threshold: float = 0.4
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    cuda_graphs: bool = True  # replay each denoising step as a CUDA graph (CUDA only)
    pinned_transfers: bool = True  # uint8 frames cross host<->GPU through reused page-locked buffers (CUDA only)
    vae_channels_last: bool = True  # the VAE's convolutions and GroupNorms in NHWC, no transposes (CUDA only)
    # decode through the VAE's boundary-fusion head when it has one (bbf_rt.model.fusion); False = the plain
    # decoder: less work per frame, blurrier frames
    fusion: bool = True
    # step caching (TeaCache-style, bbf_rt.runtime.stepcache): accumulated relative L1 change of the first
    # block's modulated input below which a step reuses the last velocity; 0 = off
    step_cache: float = 0.0
    # reduced precision (bbf_rt.runtime.quant; eager/compile backends): FP8 e4m3 block linears, and
    # attention "exact", "int8" (SageAttention-style int8 Q K^T, P V in the model dtype) or "int8-fp8"
    fp8_linear: bool = False
    attention: str = "exact"

    def replace(self, **kw: Any) -> "RuntimeConfig":
        return replace(self, **kw)


#: denoiser implementations (`bbf-rt interpolate --backend`; bbf_rt.runtime.backends)
BACKENDS: tuple[str, ...] = ("eager", "compile", "aoti", "onnx", "tensorrt")
#: attention precisions (`RuntimeConfig.attention`, `bbf-rt interpolate --attention`; bbf_rt.ops.attention_mode)
ATTENTION_MODES: tuple[str, ...] = ("exact", "int8", "int8-fp8")
#: export targets and artifact precisions (`bbf-rt export --target/--precision`)
EXPORT_TARGETS: tuple[str, ...] = ("onnx", "tensorrt", "aoti")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")

#: Shape profile dims of an exported denoiser: name -> (min, opt, max). Pixel sizes are of the padded
#: frames (multiples of `ModelConfig.pixel_multiple`); batch counts denoiser rows (intervals x CFG passes);
#: text/image/context count tokens, reference images and context frames. Audio windows have the fixed
#: length `ModelConfig.audio_tokens`, so they have no entry.
SHAPE_DIMS: tuple[str, ...] = (
    "batch", "frames", "height", "width", "text", "image", "image_height", "image_width", "context",
)
DEFAULT_SHAPES: tuple[tuple[str, int, int, int], ...] = (
    ("batch", 1, 4, 64),
    ("frames", 1, 1, 32),
    ("height", 16, 256, 1088),
    ("width", 16, 256, 1920),
    ("text", 1, 32, 512),
    ("image", 1, 1, 4),
    ("image_height", 16, 256, 1088),
    ("image_width", 16, 256, 1920),
    ("context", 1, 2, 8),
)


@dataclass(frozen=True)
class ExportConfig:
    """What an exported denoiser artifact is built for; every field is part of its cache key.

    `modalities` is the condition set: the branches the artifact runs (absent ones are skipped, not
    zero-fed, so each set is its own graph). `shapes` holds (dim, min, opt, max) for every SHAPE_DIMS
    entry (see DEFAULT_SHAPES); TensorRT builds its optimization profile from it, torch.export and the
    ONNX exporter their dynamic-dim bounds.
    """

    target: str = "onnx"
    precision: str = "fp32"
    modalities: tuple[str, ...] = ()
    shapes: tuple[tuple[str, int, int, int], ...] = DEFAULT_SHAPES
    opset: int = 18
    trt_workspace_gib: float = 8.0
    trt_strongly_typed: bool = True  # precision from the graph's types; False = fp32 graph + fp16/bf16 builder flags
    # ops compiled into a CUDA AOTInductor package: "reference" (Inductor generates the kernels, attention
    # through aten SDPA) or "auto" (our Triton kernels via torch.library.triton_op; crashed at load/first
    # call on the H100 with torch 2.11, see docs/export.md). CPU packages always use the references.
    aoti_ops: str = "reference"

    def __post_init__(self) -> None:
        if self.target not in EXPORT_TARGETS:
            raise BBFInputError(f"export target {self.target!r} is not one of {EXPORT_TARGETS}")
        if self.precision not in PRECISIONS:
            raise BBFInputError(f"export precision {self.precision!r} is not one of {PRECISIONS}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise BBFInputError(f"export modalities {list(self.modalities)} have unknown {bad}; allowed: {MODALITIES}")
        # canonical order and no duplicates, so equal condition sets give equal configs (and cache keys)
        object.__setattr__(self, "modalities", tuple(m for m in MODALITIES if m in self.modalities))
        given = {}
        for entry in self.shapes:
            if len(entry) != 4:
                raise BBFInputError(f"export shape entry {entry!r} must be (dim, min, opt, max)")
            name, lo, opt, hi = entry
            if name not in SHAPE_DIMS:
                raise BBFInputError(f"export shape dim {name!r} is not one of {SHAPE_DIMS}")
            if not (isinstance(lo, int) and isinstance(opt, int) and isinstance(hi, int) and 1 <= lo <= opt <= hi):
                raise BBFInputError(f"export shape {name}={lo}:{opt}:{hi} must be integers with 1 <= min <= opt <= max")
            given[name] = (lo, opt, hi)
        full = dict((n, (a, b, c)) for n, a, b, c in DEFAULT_SHAPES)
        full.update(given)
        object.__setattr__(self, "shapes", tuple((n, *full[n]) for n in SHAPE_DIMS))
        if self.opset < 17:
            raise BBFInputError(f"export opset {self.opset} is too old; scaled_dot_product_attention needs >= 17")
        if self.aoti_ops not in ("reference", "auto"):
            raise BBFInputError(f"aoti_ops={self.aoti_ops!r} is not one of ('reference', 'auto')")
        if self.trt_workspace_gib <= 0:
            raise BBFInputError(f"trt_workspace_gib={self.trt_workspace_gib} must be > 0")

    def dim(self, name: str) -> tuple[int, int, int]:
        """(min, opt, max) of one shape dim."""
        for n, lo, opt, hi in self.shapes:
            if n == name:
                return lo, opt, hi
        raise BBFInputError(f"export shape dim {name!r} is not one of {SHAPE_DIMS}")

    def replace(self, **kw: Any) -> "ExportConfig":
        return replace(self, **kw)

    def with_dims(self, **dims: tuple[int, int, int]) -> "ExportConfig":
        """A copy with some shape dims replaced: with_dims(batch=(1, 2, 8))."""
        cur = {n: (a, b, c) for n, a, b, c in self.shapes}
        cur.update(dims)
        return replace(self, shapes=tuple((n, *cur[n]) for n in SHAPE_DIMS))


def parse_shapes(text: str) -> tuple[tuple[str, int, int, int], ...]:
    """`--shapes` text -> shape entries: "batch=1:2:8,height=256,width=256:448:832".

    Each item is DIM=MIN:OPT:MAX or DIM=N (a static dim: min = opt = max = N); dims left out keep
    DEFAULT_SHAPES. Raises BBFInputError naming the item and what is allowed.
    """
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        parts = value.split(":")
        if not sep or name not in SHAPE_DIMS or len(parts) not in (1, 3):
            raise BBFInputError(f"--shapes item {item!r}: expected DIM=MIN:OPT:MAX or DIM=N with DIM one of {SHAPE_DIMS}")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise BBFInputError(f"--shapes item {item!r}: sizes must be integers") from None
        lo, opt, hi = nums * 3 if len(nums) == 1 else nums
        out.append((name, lo, opt, hi))
    return tuple(out)

"""The fused ops the model calls, and the choice of implementation.

The model imports only this module. Each op has an eager reference (kernels/<op>/reference.py, used on
CPU, for ONNX export and as the test oracle) and, where written, a Triton kernel registered as a torch
op (kernels/<op>/triton.py). `implementation("reference")` forces the references, e.g. for export.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, NamedTuple

import torch

from bbf_rt.config import ATTENTION_MODES
from bbf_rt.errors import BBFInputError
from bbf_rt.kernels.attention import reference as _attn_ref
from bbf_rt.kernels.conv_epilogue import reference as _ce_ref
from bbf_rt.kernels.fusion import reference as _fu_ref
from bbf_rt.kernels.fp8_linear import reference as _fp8_ref
from bbf_rt.kernels.gated_residual import reference as _gr_ref
from bbf_rt.kernels.group_norm import reference as _gn_ref
from bbf_rt.kernels.int8_attention import reference as _i8_ref
from bbf_rt.kernels.norm_modulate import reference as _nm_ref
from bbf_rt.kernels.pixels import reference as _px_ref
from bbf_rt.kernels.rope import reference as _rope_ref

log = logging.getLogger(__name__)

_CHOICES = ("auto", "reference", "triton")
_mode = "auto"


@contextlib.contextmanager
def implementation(mode: str) -> Iterator[None]:
    """Within the block, ops use `mode`: auto (Triton on CUDA when available), reference, or triton."""
    global _mode
    if mode not in _CHOICES:
        raise BBFInputError(f"ops implementation {mode!r} is not one of {_CHOICES}")
    prev, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = prev


def current_implementation() -> str:
    return _mode


# attention precisions (bbf_rt.config.ATTENTION_MODES): exact (bf16/fp16 as given), int8 (int8 Q K^T, P V in
# the input dtype), int8-fp8 (int8 Q K^T, e4m3 P V); see kernels/int8_attention
_attention_mode = "exact"


@contextlib.contextmanager
def attention_mode(mode: str) -> Iterator[None]:
    """Within the block, `attention` runs at precision `mode` (one of ATTENTION_MODES). CUDA graphs
    captured and torch.compile graphs traced inside the block keep it."""
    global _attention_mode
    if mode not in ATTENTION_MODES:
        raise BBFInputError(f"attention mode {mode!r} is not one of {ATTENTION_MODES}")
    prev, _attention_mode = _attention_mode, mode
    try:
        yield
    finally:
        _attention_mode = prev


def current_attention_mode() -> str:
    return _attention_mode


def _triton_module(name: str, x: torch.Tensor):
    """The Triton implementation of op `name` for tensor x, or None to use the reference."""
    if _mode == "reference" or (_mode == "auto" and not x.is_cuda):
        return None
    from bbf_rt import _triton_ops  # deferred: the model must not import Triton on CPU

    mod = _triton_ops.get(name)
    if mod is None and _mode == "triton":
        raise BBFInputError(f"ops implementation 'triton' requested but no Triton kernel for {name!r} is usable here")
    return mod


_warned: set[str] = set()


def _fallback(op: str, reason: str) -> None:
    """Log once per (op, reason) that the reference runs instead of the requested Triton kernel."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        log.warning("%s: Triton kernel not used (%s); running the PyTorch reference", op, reason)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, Lq, H, D); k, v: (B, Lk, H, D); key_mask: (B, Lk) bool.

    The Triton kernel takes bf16/fp16 with head dims that are multiples of 8 up to 256; other inputs
    (fp32 above all) run the reference, with one logged warning. Inside `attention_mode("int8")` (or
    "int8-fp8") the 8-bit kernel runs instead (`int8_attention`).
    """
    if _attention_mode != "exact":
        return int8_attention(q, k, v, key_mask, pv="fp8" if _attention_mode == "int8-fp8" else "bf16")
    mod = _triton_module("attention", q)
    if mod is not None:
        D = q.shape[-1]
        if q.dtype not in (torch.bfloat16, torch.float16):
            _fallback("attention", f"dtype {q.dtype}; the kernel takes bfloat16 or float16")
        elif not 16 <= D <= 256 or D % 8:
            _fallback("attention", f"head dim {D}; the kernel takes multiples of 8 in [16, 256]")
        else:
            return mod.attention(q, k, v, key_mask)
    return _attn_ref.attention(q, k, v, key_mask)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """QK RMSNorm over (B, L, H*D) then RoPE per head -> (B, L, H, D); cos/sin (B|1, L, D/2) fp32."""
    mod = _triton_module("rope", x)
    if mod is not None:
        return mod.rms_norm_rope(x, weight, cos, sin, heads, eps)
    return _rope_ref.rms_norm_rope(x, weight, cos, sin, heads, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (used on cross-attention keys, which carry no RoPE)."""
    return _rope_ref.rms_norm(x, weight, eps)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool = False) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift; x (B, L, C), shift/scale (B, F, C) per frame (F divides L)."""
    mod = _triton_module("norm_modulate", x)
    if mod is not None:
        return mod.norm_modulate(x, shift, scale, eps, rms)
    return _nm_ref.norm_modulate(x, shift, scale, eps, rms)


def residual_norm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                           scale: torch.Tensor, eps: float, rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + gate * y and norm(r) * (1 + scale) + shift in one pass -> (r, normalised r); gate (B, Fg, C),
    shift/scale (B, Fm, C), each per sample or per frame. Where a block's residual add is followed by the
    next sub-layer's norm (self-attention -> a condition branch -> the next branch -> the FFN)."""
    mod = _triton_module("norm_modulate", x)
    if mod is not None:
        return mod.residual_norm_modulate(x, y, gate, shift, scale, eps, rms)
    return _nm_ref.residual_norm_modulate(x, y, gate, shift, scale, eps, rms)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y; x, y (B, L, C), gate (B, F, C) per frame (F divides L)."""
    mod = _triton_module("gated_residual", x)
    if mod is not None:
        return mod.gated_residual(x, y, gate)
    return _gr_ref.gated_residual(x, y, gate)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu_tanh(x @ weight^T + bias), the FFN's first half; x (..., K), weight (N, K), bias (N,).

    On CUDA (implementation auto or triton) one cuBLASLt GEMM whose epilogue adds the bias and applies
    the tanh GELU on the fp32 accumulator (torch._addmm_activation), so the (tokens, ffn_dim) activation is
    written once instead of written, read and written again. Elsewhere, and while torch.compile or export
    trace (Inductor fuses the GELU itself), F.linear then F.gelu(approximate="tanh")."""
    if (x.is_cuda and bias is not None and _mode != "reference" and x.dtype == weight.dtype == bias.dtype
            and not torch.compiler.is_compiling()):
        y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return y.view(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="tanh")


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float, silu: bool = True) -> torch.Tensor:
    """silu(group_norm(x, groups, weight, bias, eps)) over (N, C, *spatial) (the VAE's norm); silu=False
    leaves the SiLU out. On CUDA the Triton kernel splits each group's statistics over many programs
    (torch's GroupNorm reduces a group in one thread block) and applies norm, affine and SiLU in one pass."""
    mod = _triton_module("group_norm", x)
    if mod is not None:
        return mod.group_norm_silu(x, weight, bias, groups, eps, silu)
    return _gn_ref.group_norm_silu(x, weight, bias, groups, eps, silu)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int | tuple[int, int] = 1,
           padding: int | tuple[int, int] = 0, residual: torch.Tensor | None = None,
           dilation: int | tuple[int, int] = 1) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation), plus `residual` if given (the VAE's and the
    fusion head's convolutions).

    On CUDA the convolution runs without its bias and one Triton pass adds bias and residual: torch adds
    a cuDNN convolution's bias in a pass of its own (on channels-last activations its non-vectorised
    broadcast path) and the residual in another; 3x3 convolutions with few input or output channels (the
    RGB ends) run kernels/thin_conv instead of cuDNN. Elsewhere exactly `residual + F.conv2d(...)`."""
    dil = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation, dilation)
    if residual is None and dil == (1, 1):
        thin = _triton_module("thin_conv", x)
        if thin is not None and thin.applies(x, weight, stride, padding):
            return thin.thin_conv3x3(x, weight, bias)
    mod = _triton_module("conv_epilogue", x)
    if mod is not None:
        y = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation)
        return mod.conv_epilogue(y, bias, residual)
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)
    return y if residual is None else residual + y


def fusion_pack(flow_q: torch.Tensor, x: torch.Tensor, frame0: torch.Tensor, frame1: torch.Tensor) -> torch.Tensor:
    """The fusion head's full-resolution input (N, 16, H, W): x, frame0 and frame1 warped by the x4-upsampled
    1/4-resolution flows flow_q (N, 4, H/4, W/4), both frames, a zero plane (kernels/fusion). On CUDA one
    Triton pass, channels-last, flows and sampling in fp32."""
    mod = _triton_module("fusion", x)
    if mod is not None:
        return mod.pack(flow_q, x, frame0, frame1)
    return _fu_ref.pack(flow_q, x, frame0, frame1)


def fusion_mix(logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """softmax(logits[:, :3]) weights on (warp0, warp1, x) of `packed` (from fusion_pack) plus the RGB
    residual logits[:, 3:6] -> (N, 3, H, W); on CUDA one Triton pass in fp32."""
    mod = _triton_module("fusion", packed)
    if mod is not None:
        return mod.mix(logits, packed)
    return _fu_ref.mix(logits, packed)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of (N, C, H, W), keeping x's layout; on CUDA one Triton copy
    kernel (torch's channels-last kernel ran at ~0.4 TB/s on the H100)."""
    mod = _triton_module("conv_epilogue", x)
    if mod is not None:
        return mod.upsample_nearest2x(x)
    return _ce_ref.upsample_nearest2x(x)


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(upsample_nearest2x(x), weight, bias, padding=1) for a 3x3 weight (the VAE decoder's up
    stages). On CUDA, channels-last: the sub-pixel form, one 3x3 conv at low resolution to 4 x Cout
    channels (kernels/conv_epilogue subpixel_weight: 4/9 of the FLOPs) and one pass that pixel-shuffles
    and adds the bias; the upsampled activation is never written. Elsewhere the two ops as written."""
    mod = _triton_module("conv_epilogue", x)
    if mod is not None and weight.shape[2:] == (3, 3) and x.is_contiguous(memory_format=torch.channels_last):
        y = torch.nn.functional.conv2d(x, mod.subpixel_weight(weight), None, 1, 1)
        return mod.shuffle_epilogue(y, bias)
    return conv2d(upsample_nearest2x(x), weight, bias, 1, 1)


def to_uint8_nhwc(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Decoded (N, 3, H, W) frames in [-1, 1] -> (N, height, width, 3) uint8 of the top-left crop, rounded
    to nearest (ties to even); on CUDA one Triton pass instead of five torch ops over an fp32 copy."""
    mod = _triton_module("pixels", x)
    if mod is not None:
        return mod.to_uint8_nhwc(x, height, width)
    return _px_ref.to_uint8_nhwc(x, height, width)


def boundary_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean per-pixel RGB cosine similarity of (B, 3, H, W) frame pairs -> (B,) fp32 (kernels/pixels);
    on CUDA one Triton read of both frames plus a fixed-order sum of per-block partials."""
    mod = _triton_module("pixels", a)
    if mod is not None:
        return mod.boundary_similarity(a, b, eps)
    return _px_ref.boundary_similarity(a, b, eps)


def int8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, pv: str = "bf16",
) -> torch.Tensor:
    """SageAttention-style attention: K smoothed, Q (per token) and K (per key tile) in int8, P V in the
    input dtype (pv="bf16") or e4m3 (pv="fp8"). Shapes as `attention`. The kernel takes bf16/fp16 with
    head dims 32, 64, 128; other inputs run the (query-chunked) reference, with one logged warning."""
    mod = _triton_module("int8_attention", q)
    if mod is not None:
        why = mod.unsupported(q, pv)
        if why is None:
            return mod.attention(q, k, v, key_mask, pv=pv)
        _fallback("int8_attention", why)
    return _i8_ref.int8_attention(q, k, v, key_mask, pv=pv)


class FP8Rows(NamedTuple):
    """An activation already quantised per row, as the norm kernels hand it to the next FP8 linear:
    q (M, K) float8_e4m3fn and scale (M,) fp32 for the tokens of a (..., K) tensor of `shape` and `dtype`."""
    q: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype


def fp8_linear(
    x: torch.Tensor | FP8Rows, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
    gelu: bool = False, fast_accum: bool = True,
) -> torch.Tensor:
    """quantise_rows(gelu?(x)) @ dequantise(weight)^T + bias; x (..., K), weight (N, K) float8_e4m3fn with
    weight_scale (N,) fp32 (kernels/fp8_linear). Returns (..., N) in x's dtype. On the GPU a Triton kernel
    quantises the rows and cuBLAS multiplies in FP8 (compute capability >= 8.9, K and N multiples of 16);
    elsewhere the reference dequantises and multiplies in fp32. x may be FP8Rows (quantised by the norm
    before it): then only the GEMM runs."""
    if isinstance(x, FP8Rows):
        if gelu:
            raise BBFInputError("fp8_linear: gelu=True needs the activation unquantised, not FP8Rows")
        out_shape = (*x.shape[:-1], weight.shape[0])
        mod = _triton_module("fp8_linear", x.q)
        if mod is not None:
            why = mod.supported(x.q.device)
            if why is None and (x.shape[-1] % 16 or weight.shape[0] % 16):
                why = f"shape (K={x.shape[-1]}, N={weight.shape[0]}); the FP8 GEMM needs multiples of 16"
            if why is None:
                return mod.scaled_mm(x.q, x.scale, weight, weight_scale, bias, x.dtype, fast_accum).reshape(out_shape)
            _fallback("fp8_linear", why)
        return _fp8_ref.scaled_matmul(x.q, x.scale, weight, weight_scale, bias, x.dtype).reshape(out_shape)
    mod = _triton_module("fp8_linear", x)
    if mod is not None:
        why = mod.supported(x.device)
        if why is None and (x.shape[-1] % 16 or weight.shape[0] % 16):
            why = f"shape (K={x.shape[-1]}, N={weight.shape[0]}); the FP8 GEMM needs multiples of 16"
        if why is None:
            return mod.fp8_linear(x, weight, weight_scale, bias, gelu=gelu, fast_accum=fast_accum)
        _fallback("fp8_linear", why)
    return _fp8_ref.fp8_linear(x, weight, weight_scale, bias, gelu=gelu)


def norm_modulate_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_modulate with its rows quantised to e4m3 in the same pass: x (B, L, C), shift/scale (B, F, C)
    -> (q (B*L, C) float8_e4m3fn, row scale (B*L,) fp32), the input `fp8_linear` quantises to itself."""
    mod = _triton_module("fp8_linear", x)
    if mod is not None:
        return mod.norm_modulate_fp8(x, shift, scale, eps, rms)
    return _fp8_ref.norm_modulate_quantize(x, shift, scale, eps, rms)


def norm_modulate_to_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                         rms: bool = False) -> FP8Rows:
    """norm_modulate_fp8 as the FP8Rows an FP8 linear takes (the block's qkv input, quantised by the norm)."""
    q, s = norm_modulate_fp8(x, shift, scale, eps, rms)
    return FP8Rows(q, s, x.shape, x.dtype)


def residual_norm_modulate_fp8(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor, eps: float, rms: bool = False) -> tuple[torch.Tensor, FP8Rows]:
    """residual_norm_modulate with the normalised rows quantised for the next FP8 linear in the same pass:
    -> (r = x + gate * y in x's dtype, FP8Rows of norm(r) * (1 + scale) + shift)."""
    mod = _triton_module("fp8_linear", x)
    if mod is not None:
        r, q, s = mod.residual_norm_modulate_fp8(x, y, gate, shift, scale, eps, rms)
    else:
        r, q, s = _fp8_ref.residual_norm_modulate_quantize(x, y, gate, shift, scale, eps, rms)
    return r, FP8Rows(q, s, x.shape, x.dtype)

"""Reduced-precision inference: FP8 (e4m3) linear layers and 8-bit attention, each switchable.

- `quantize_model(dit, fp8=True)` swaps the block linears of a BBFDiT (self-attention qkv and o, each
  condition branch's q, kv and o, both FFN linears) for `FP8Linear`: weights quantised once to e4m3 with
  a scale per output channel, activations quantised per token on the fly (kernels/fp8_linear). The
  FFN's GELU moves into the second linear's quantisation pass (one read of the 8960-wide hidden state
  instead of a GELU pass plus a quantisation pass). Embeddings, the time MLPs and the output head stay in
  the model dtype: they are small and feed every token.
- attention precision is not module state: `bbf_rt.ops.attention_mode("int8")` (kernels/int8_attention)
  around the calls, which `wrap_denoiser` does for the engine.

- The inputs of qkv, of each branch's q and of the FFN's first linear are quantised by the norm before
  them (`ops.norm_modulate_to_fp8`, `ops.residual_norm_modulate_fp8`): Block sees `accepts_fp8_rows` on
  the linear and hands it `ops.FP8Rows` instead of a bf16 tensor, so no separate quantisation pass runs
  there. The o projections (after attention) and each branch's kv (condition tokens) quantise their input
  themselves.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from bbf_rt import ops
from bbf_rt.errors import BBFInputError
from bbf_rt.kernels.fp8_linear.reference import GRANULARITIES, quantize_weight

log = logging.getLogger(__name__)


class FP8Linear(nn.Module):
    """y = x W^T + b with W in float8 e4m3 (scale per output channel, or one per tensor) and x quantised
    per row at call time; `gelu_input`: y = GELU_tanh(x) W^T + b, the GELU fused into the quantisation.

    The weight is held as uint8 bytes and its fp32 scales as int32 bits, so `model.to(dtype)` (which
    casts every floating-point buffer, fp8 included) leaves them alone; forward views them back.
    """

    def __init__(self, in_features: int, out_features: int, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, gelu_input: bool = False, fast_accum: bool = True) -> None:
        super().__init__()
        if weight_fp8.dtype != torch.float8_e4m3fn or tuple(weight_fp8.shape) != (out_features, in_features):
            raise BBFInputError(f"FP8Linear weight {weight_fp8.dtype} {tuple(weight_fp8.shape)}; "
                                f"needs float8_e4m3fn ({out_features}, {in_features})")
        self.in_features, self.out_features = in_features, out_features
        self.gelu_input, self.fast_accum = gelu_input, fast_accum
        self.register_buffer("weight_bytes", weight_fp8.contiguous().view(torch.uint8))
        self.register_buffer("scale_bits", weight_scale.float().contiguous().view(torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, granularity: str = "channel", gelu_input: bool = False,
                    fast_accum: bool = True) -> "FP8Linear":
        w8, scale = quantize_weight(lin.weight, granularity)
        return cls(lin.in_features, lin.out_features, w8, scale, lin.bias, gelu_input, fast_accum)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_bytes.view(torch.float8_e4m3fn)

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float32)

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) fp32: the weight the layer multiplies by."""
        return self.weight.float() * self.weight_scale[:, None]

    #: Block may pass ops.FP8Rows (quantised by the norm before) instead of a tensor; not with gelu_input
    @property
    def accepts_fp8_rows(self) -> bool:
        return not self.gelu_input

    def forward(self, x: torch.Tensor | ops.FP8Rows) -> torch.Tensor:
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias, gelu=self.gelu_input, fast_accum=self.fast_accum)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gelu_input={self.gelu_input}, fast_accum={self.fast_accum}")


def _block_linears(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every nn.Linear under `block`, the FFN's excepted (handled with its GELU)."""
    out = []
    for parent in block.modules():
        if parent is getattr(block, "ffn", None):
            continue
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                out.append((parent, name))
    return out


@torch.no_grad()
def quantize_model(dit: nn.Module, fp8: bool = True, granularity: str = "channel", fast_accum: bool = True) -> nn.Module:
    """Swap the linear layers of every block of `dit` (a BBFDiT) for FP8Linear, in place; returns `dit`.

    Idempotent (FP8Linear layers are left as they are); fp8=False leaves the model untouched.
    granularity: weight scales per output "channel" or one per "tensor". fast_accum: cuBLAS FP8 GEMMs
    without periodic fp32 promotion of the partial sums (bench/bench_quant.py measures both).
    """
    if granularity not in GRANULARITIES:
        raise BBFInputError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    if not fp8:
        return dit
    blocks = getattr(dit, "blocks", None)
    if blocks is None:
        raise BBFInputError(f"quantize_model expects a BBFDiT (with .blocks); got {type(dit).__name__}")
    n = 0
    for blk in blocks:
        for parent, name in _block_linears(blk):
            setattr(parent, name, FP8Linear.from_linear(getattr(parent, name), granularity, fast_accum=fast_accum))
            n += 1
        ffn = getattr(blk, "ffn", None)
        if isinstance(ffn, nn.Sequential) and len(ffn) == 3 and isinstance(ffn[0], nn.Linear):
            if not (isinstance(ffn[1], nn.GELU) and ffn[1].approximate == "tanh" and isinstance(ffn[2], nn.Linear)):
                raise BBFInputError(f"quantize_model: FFN {ffn} is not Linear -> GELU(tanh) -> Linear")
            ffn[0] = FP8Linear.from_linear(ffn[0], granularity, fast_accum=fast_accum)
            ffn[2] = FP8Linear.from_linear(ffn[2], granularity, gelu_input=True, fast_accum=fast_accum)
            ffn[1] = nn.Identity()  # GELU now runs inside ffn[2]'s quantisation
            n += 2
    log.info("quantize_model: %d linear layers now FP8 (e4m3, %s scales)", n, granularity)
    return dit


class QuantDenoiser:
    """Calls a denoiser with `ops.attention_mode(mode)` around it (CUDA-graph capture and torch.compile
    tracing happen inside the call, so they keep the mode)."""

    def __init__(self, fn, attention: str) -> None:
        self.fn, self.attention = fn, attention
        self.name = getattr(fn, "name", "eager")

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conds: torch.Tensor) -> torch.Tensor:
        with ops.attention_mode(self.attention):
            return self.fn(x, sigma, **conds)

    def describe(self) -> dict:
        inner = self.fn.describe() if hasattr(self.fn, "describe") else {"name": self.name}
        return {**inner, "attention": self.attention}


def check_options(fp8_linear: bool, attention: str) -> None:
    if attention not in ops.ATTENTION_MODES:
        raise BBFInputError(f"attention={attention!r} is not one of {ops.ATTENTION_MODES}")
    if not isinstance(fp8_linear, bool):
        raise BBFInputError(f"fp8_linear={fp8_linear!r} must be True or False")


def wrap_denoiser(model, denoiser, fp8_linear: bool, attention: str):
    """Apply the runtime's precision options to `model.dit` (in place) and its denoiser; returns the
    denoiser to call. Artifact backends (onnx, aoti, tensorrt) are built from the unquantised graph and
    refuse the options."""
    check_options(fp8_linear, attention)
    if not fp8_linear and attention == "exact":
        return denoiser
    from bbf_rt.runtime.backends import ArtifactBackend

    inner = getattr(denoiser, "fn", denoiser)  # through a CUDAGraphDenoiser
    if isinstance(inner, ArtifactBackend):
        raise BBFInputError(f"--fp8 / --attention {attention} need the eager or compile backend, not {inner.name!r}")
    if fp8_linear:
        quantize_model(model.dit)
    return QuantDenoiser(denoiser, attention) if attention != "exact" else denoiser

"""3x3 convolutions with few input or output channels, registered as `bbf_rt::thin_conv3x3`.

The VAE's two RGB ends are the convolutions cuDNN runs worst: the encoder's 3 -> 32 conv_in (a padding
kernel to 8 channels, then an implicit GEMM at ~12 TFLOP/s) and the decoder's 32 -> 3 conv_out (an sm80
kernel with 3 of its 32 output columns used), both at full resolution (bench/profile_player.py). Here
the convolution is an implicit GEMM over K = 9 * Cin, a program owning BP pixels of one output row and
accumulating tl.dot in fp32, the bias added before the single store:
- `_conv3x3` (Cin <= 4): gathers the (BP, BK) slice of the im2col matrix (tap-major:
  k = (dy * 3 + dx) * Cin + ci) straight from x, zero outside the frame (3 -> 32 at 720p, 4 frames:
  0.106 ms vs cuDNN's 0.922 on the H100);
- `_conv3x3_taps` (Cin >= 8): one (BP, Cin) tile per tap (32 -> 3: 0.303 ms vs 0.439).
The weight is read through its (Cout, Cin, 3, 3) strides. Inputs and outputs of any strides
(channels-last in, channels-last out). Bytes: read x (~once from DRAM, the 3-row halo from L2), write
the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.triton_common import INTERPRET, register_op, rne_bf16

MAX_K = 9 * 64  # the largest 9 * Cin taken (the whole K loop is unrolled)
MAX_COUT = 64


@triton.jit
def _mma(acc, a, w, F32: tl.constexpr):
    """acc += a @ w; F32: fp32 inputs (and bf16 under the interpreter, whose bf16 dot is wrong) as exact
    fp32 products."""
    if F32:
        return acc + tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return acc + tl.dot(a, w)


@triton.jit
def _bias_store(acc, B, OUT, n, y, xs, co, W, son, soc, soh, sow, COUT: tl.constexpr, HAS_B: tl.constexpr,
                RNE: tl.constexpr):
    """The shared epilogue: + bias, one rounding, store the (pixels, Cout) tile of output row y."""
    if HAS_B:
        acc += tl.load(B + co, mask=co < COUT, other=0.0).to(tl.float32)[None, :]
    if RNE:
        acc = rne_bf16(acc)
    om = (xs < W)[:, None] & (co < COUT)[None, :]
    tl.store(OUT + n * son + y * soh + (xs[:, None] * sow + co[None, :] * soc), acc.to(OUT.dtype.element_ty), mask=om)


@triton.jit
def _conv3x3(X, Wt, B, OUT, H, W, sxn, sxc, sxh, sxw, swo, swi, swh, sww, son, soc, soh, sow,
             CIN: tl.constexpr, COUT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
             HAS_B: tl.constexpr, F32: tl.constexpr, RNE: tl.constexpr):
    xs = tl.program_id(0) * BP + tl.arange(0, BP)
    y = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    co = tl.arange(0, BN)
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    K: tl.constexpr = 9 * CIN
    for kk in tl.static_range(0, K, BK):
        k = kk + tl.arange(0, BK)
        tap = k // CIN
        ci = k % CIN
        dy = tap // 3
        dx = tap % 3
        yy = y + dy - 1
        xx = xs[:, None] + dx[None, :] - 1
        m = ((k < K) & (yy >= 0) & (yy < H))[None, :] & (xx >= 0) & (xx < W)
        a = tl.load(X + n * sxn + ci[None, :] * sxc + yy[None, :] * sxh + xx * sxw, mask=m, other=0.0)
        wm = (k < K)[:, None] & (co < COUT)[None, :]
        w = tl.load(Wt + co[None, :] * swo + ci[:, None] * swi + dy[:, None] * swh + dx[:, None] * sww, mask=wm,
                    other=0.0)
        acc = _mma(acc, a, w, F32)
    _bias_store(acc, B, OUT, n, y, xs, co, W, son, soc, soh, sow, COUT, HAS_B, RNE)


@triton.jit
def _conv3x3_taps(X, Wt, B, OUT, H, W, sxn, sxc, sxh, sxw, swo, swi, swh, sww, son, soc, soh, sow,
                  CIN: tl.constexpr, COUT: tl.constexpr, CP: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                  HAS_B: tl.constexpr, F32: tl.constexpr, RNE: tl.constexpr):
    """Cin >= 8: one (BP, Cin) tile per tap, its column index plain arange(Cin) (contiguous, so vector
    loads in NHWC) and int32 offsets from a per-row base pointer; the rows above and below the frame are
    skipped, the columns outside it masked. (The gathered im2col tile of `_conv3x3`, whose channel index is
    k % Cin, loaded element by element: the 32 -> 3 conv ran at 27% of the copy rate.)"""
    xs = tl.program_id(0) * BP + tl.arange(0, BP)
    y = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    co = tl.arange(0, BN)
    ci = tl.arange(0, CP)
    wm = (ci < CIN)[:, None] & (co < COUT)[None, :]
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    for dy in tl.static_range(3):
        yy = y + dy - 1
        if (yy >= 0) & (yy < H):
            row = X + n * sxn + yy * sxh
            for dx in tl.static_range(3):
                xx = xs + (dx - 1)
                m = ((xx >= 0) & (xx < W))[:, None] & (ci < CIN)[None, :]
                a = tl.load(row + (xx[:, None] * sxw + ci[None, :] * sxc), mask=m, other=0.0)
                w = tl.load(Wt + co[None, :] * swo + ci[:, None] * swi + dy * swh + dx * sww, mask=wm, other=0.0)
                acc = _mma(acc, a, w, F32)
    _bias_store(acc, B, OUT, n, y, xs, co, W, son, soc, soh, sow, COUT, HAS_B, RNE)


def _out_format(x: torch.Tensor) -> torch.memory_format:
    """The output's layout: channels-last if x is (and not also NCHW-contiguous), else contiguous."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def applies(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> bool:
    """True for the shapes this kernel is for: a 3x3, stride 1, padding 1 conv of a 4-D float16/bfloat16/
    float32 x with Cin <= 4 (9 * Cin fits one K tile) or Cout <= 4 and 9 * Cin <= MAX_K."""
    s = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
    p = tuple(padding) if isinstance(padding, (tuple, list)) else (padding, padding)
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or s != (1, 1) or p != (1, 1):
        return False
    cout, cin = weight.shape[0], weight.shape[1]
    thin = cin <= 4 or (cout <= 4 and 9 * cin <= MAX_K)
    return thin and cout <= MAX_COUT and x.shape[1] == cin and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bp: int = 128,
           num_warps: int = 4, taps: bool | None = None) -> torch.Tensor:
    """thin_conv3x3 at explicit launch parameters; taps: the per-tap kernel (None: for Cin >= 8) or the
    gathered im2col one."""
    N, cin, H, W = x.shape
    cout = weight.shape[0]
    fmt = _out_format(x)
    out = torch.empty((N, cout, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    w = weight.to(x.dtype)
    grid = (triton.cdiv(W, bp), H, N)
    args = (x, w, bias if bias is not None else w, out, H, W, *x.stride(), *w.stride(), *out.stride())
    common = dict(CIN=cin, COUT=cout, BN=max(16, triton.next_power_of_2(cout)), BP=bp, HAS_B=bias is not None,
                  F32=x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16),
                  RNE=INTERPRET and x.dtype == torch.bfloat16, num_warps=num_warps)
    if taps if taps is not None else cin >= 8:
        wrap_triton(_conv3x3_taps)[grid](*args, CP=max(16, triton.next_power_of_2(cin)), **common)
    else:
        wrap_triton(_conv3x3)[grid](*args, BK=max(16, min(64, triton.next_power_of_2(9 * cin))), **common)
    return out


def _op_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return launch(x, weight, bias)


def _fake(x, weight, bias):
    N, _, H, W = x.shape
    fmt = _out_format(x)
    return x.new_empty((N, weight.shape[0], H, W)).contiguous(memory_format=fmt)


_op = register_op("thin_conv3x3", _op_impl, _fake)


def thin_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, 1, 1) as kernels/thin_conv/reference.py, for the shapes `applies` takes.

    Returned in x's dtype, channels-last if x is (and not also NCHW-contiguous), else contiguous."""
    if not applies(x, weight, 1, 1):
        raise ValueError(f"thin_conv3x3: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)}: needs a 3x3 "
                         f"weight with Cin = x's channels and Cin <= 4, or Cout <= 4 and 9 * Cin <= {MAX_K}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"thin_conv3x3: bias {tuple(bias.shape)} must be (Cout={weight.shape[0]},)")
    return _op(x, weight, bias)

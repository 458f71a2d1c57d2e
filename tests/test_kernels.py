"""Triton kernels against their eager references (kernels/<op>/{triton,reference}.py).

Pass rule (flash-attention's): the kernel's max error against an fp32 oracle (the reference on
fp32-upcast inputs) is at most 2x the error of the reference run at the kernel's precision, plus a
floor of 1e-5 x the output's scale that only matters where both errors are ~0 (fp32 inputs).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before Triton
is imported) on small shapes; with CUDA they are compiled, and the GPU-only tests (preset shapes,
torch.compile with Inductor, torch.export, the model) run too.
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton and of the kernels

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'bbf-rt[kernels]')")

from bbf_rt import ops  # noqa: E402
from bbf_rt.config import get_preset  # noqa: E402
from bbf_rt.kernels.attention import reference as attn_ref  # noqa: E402
from bbf_rt.kernels.attention import triton as attn_tt  # noqa: E402
from bbf_rt.kernels.gated_residual import reference as gr_ref  # noqa: E402
from bbf_rt.kernels.gated_residual import triton as gr_tt  # noqa: E402
from bbf_rt.kernels.group_norm import reference as gn_ref  # noqa: E402
from bbf_rt.kernels.group_norm import triton as gn_tt  # noqa: E402
from bbf_rt.kernels.norm_modulate import reference as nm_ref  # noqa: E402
from bbf_rt.kernels.norm_modulate import triton as nm_tt  # noqa: E402
from bbf_rt.kernels.rope import reference as rope_ref  # noqa: E402
from bbf_rt.kernels.rope import triton as rope_tt  # noqa: E402
from bbf_rt.model.dit import build_dit  # noqa: E402
from models import trained_gates, within_2x

DEV = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton, Inductor, preset shapes)")
LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def _triton_runs():
    """Skip the module, saying why, if Triton cannot run a kernel here (interpreter or GPU)."""
    x = torch.randn(3, 8, 16, device=DEV)
    try:
        gr_tt.gated_residual(x, x, x[:, :1])
    except Exception as e:  # noqa: BLE001 - any failure means the backend is unusable; the reason is reported
        pytest.skip(f"Triton cannot run kernels here ({'GPU' if CUDA else 'TRITON_INTERPRET=1'}): {e!r}")


def rnd(*shape, dtype=torch.float32, gen=None, scale=1.0):
    return (torch.randn(*shape, generator=gen, device="cpu") * scale).to(device=DEV, dtype=dtype)


def poison(*like: torch.Tensor) -> None:
    """Fill freed CUDA cache blocks with NaN so that an output element the kernel never writes shows up."""
    if CUDA:
        for t in like:
            torch.full((t.numel() * t.element_size() // 4 + 1,), float("nan"), device=DEV)


def check(out: torch.Tensor, low: torch.Tensor, oracle: torch.Tensor) -> tuple[float, float]:
    """The 2x rule; returns (kernel error, reference error)."""
    return within_2x(out, low, oracle, "kernel")


# ---------------------------------------------------------------- attention

ATTN_CASES = [  # (B, Lq, Lk, H, D, masked)
    (2, 77, 77, 2, 64, False),  # self-attention, L not a multiple of any block
    (1, 130, 1000, 1, 64, True),  # Lk spans several key tiles plus a partial one, with padding
    (2, 33, 1, 2, 128, False),  # a single key
    (2, 40, 13, 2, 32, True),  # short masked condition, head dim 32 (tiny preset)
    (1, 64, 300, 2, 128, True),
    (1, 50, 30, 2, 24, True),  # head dim not a power of two: the pointer loader with a masked D
]


def _qkv(B, Lq, Lk, H, D, dtype, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # views of fused projections, as the model passes them: row stride 3*H*D
        q = rnd(B, Lq, 3, H, D, dtype=dtype, gen=g)[:, :, 1]
        kv = rnd(B, Lk, 2, H, D, dtype=dtype, gen=g)
        return q, kv[:, :, 0], kv[:, :, 1]
    return rnd(B, Lq, H, D, dtype=dtype, gen=g), rnd(B, Lk, H, D, dtype=dtype, gen=g), rnd(B, Lk, H, D, dtype=dtype, gen=g)


def _mask(B, Lk, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, Lk, generator=g) > 0.4
    m[:, 0] = True  # partially masked rows here; fully masked rows have their own test
    return m.to(DEV)


def _attn_check(q, k, v, m, cfg=None):
    poison(q)
    out = attn_tt.launch(q, k, v, m, q.shape[-1] ** -0.5, cfg) if cfg else attn_tt.attention(q, k, v, m)
    return check(out, attn_ref.attention(q, k, v, m), attn_ref.attention(q.float(), k.float(), v.float(), m))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c)))
def test_attention_matches_oracle(case, dtype):
    B, Lq, Lk, H, D, masked = case
    q, k, v = _qkv(B, Lq, Lk, H, D, dtype)
    _attn_check(q, k, v, _mask(B, Lk) if masked else None)


@pytest.mark.parametrize("loader,pipeline", [(lo, False) for lo in attn_tt.LOADERS] + [("tma", True)])
def test_attention_strided_views_and_every_loader(loader, pipeline):
    q, k, v = _qkv(2, 100, 70, 2, 64, torch.bfloat16, strided=True)
    m = _mask(2, 70)[:1].expand(2, 70)  # stride-0 batch, as the audio branch passes it
    assert not q.is_contiguous() and m.stride(0) == 0
    cfg = attn_tt.AttnConfig(block_m=64, block_n=16, num_warps=4, num_stages=2, loader=loader, pipeline=pipeline)
    _attn_check(q, k, v, m, cfg)


@pytest.mark.parametrize("loader", ["tma", "pointer"])
def test_attention_padded_conditions_stop_at_last_valid_key(loader):
    """Prefix masks (a prompt padded to its slots): tiles past the last valid key are skipped."""
    q, k, v = _qkv(3, 40, 300, 2, 64, torch.bfloat16)
    m = torch.arange(300, device=DEV)[None] < torch.tensor([[77], [200], [0]], device=DEV)  # sample 2: none
    out = attn_tt.launch(q, k, v, m, 64**-0.5, attn_tt.AttnConfig(block_m=64, block_n=32, num_warps=4, loader=loader))
    check(out, attn_ref.attention(q, k, v, m), attn_ref.attention(q.float(), k.float(), v.float(), m))
    torch.testing.assert_close(out[2].float(), v[2].float().mean(0, keepdim=True).expand(40, 2, 64), atol=2e-2, rtol=0)


def test_attention_fully_masked_rows_average_uniformly():
    q, k, v = _qkv(2, 50, 20, 2, 64, torch.bfloat16)
    m = _mask(2, 20)
    m[1] = False  # sample 1 has no valid key at all
    out = attn_tt.attention(q, k, v, m)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1].float(), v[1].float().mean(0, keepdim=True).expand(50, 2, 64), atol=2e-2, rtol=0)
    check(out[:1], attn_ref.attention(q, k, v, m)[:1], attn_ref.attention(q.float(), k.float(), v.float(), m)[:1])


def test_attention_rejects_bad_inputs():
    q = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="dtypes"):
        attn_tt.attention(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="key_mask"):
        attn_tt.attention(q, q, q, torch.ones(1, 5, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="head dim"):
        attn_tt.attention(q[..., :12], q[..., :12], q[..., :12])


def test_ops_attention_falls_back_for_fp32(caplog, monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())  # logged once per process: an earlier test may have used it up
    q, k, v = _qkv(1, 9, 9, 2, 32, torch.float32)
    with ops.implementation("triton"):
        out = ops.attention(q, k, v)
    assert "dtype torch.float32" in caplog.text
    torch.testing.assert_close(out, attn_ref.attention(q, k, v))


# ---------------------------------------------------------------- memory-bound ops

MB_CASES = [(2, 3, 77, 96), (1, 1, 1000, 384), (2, 2, 5, 1536)]  # (B, F, S, C): odd S, 1 frame, wide rows


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=str)
@pytest.mark.parametrize("case", MB_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_norm_modulate_matches_oracle(case, dtype, rms):
    B, F, S, C = case
    g = torch.Generator().manual_seed(2)
    x = rnd(B, F * S, 2 * C, dtype=dtype, gen=g, scale=3.0)[:, :, C:] + 1  # strided rows, non-zero mean
    shift, scale = rnd(B, F, C, dtype=dtype, gen=g), rnd(B, F, C, dtype=dtype, gen=g)
    poison(x)
    check(nm_tt.norm_modulate(x, shift, scale, 1e-6, rms), nm_ref.norm_modulate(x, shift, scale, 1e-6, rms),
          nm_ref.norm_modulate(x.float(), shift.float(), scale.float(), 1e-6, rms))


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=str)
@pytest.mark.parametrize("case", MB_CASES, ids=lambda c: "x".join(map(str, c)))
def test_gated_residual_matches_oracle(case, dtype):
    B, F, S, C = case
    g = torch.Generator().manual_seed(3)
    x, y = rnd(B, F * S, C, dtype=dtype, gen=g, scale=4.0), rnd(B, F * S, C, dtype=dtype, gen=g)
    gate = rnd(B, F, C, dtype=dtype, gen=g)
    poison(x)
    check(gr_tt.gated_residual(x, y, gate), gr_ref.gated_residual(x, y, gate),
          gr_ref.gated_residual(x.float(), y.float(), gate.float()))


RNM_CASES = [(2, 3, 1, 77, 96), (1, 1, 1, 250, 384), (2, 2, 1, 5, 1536), (2, 1, 4, 9, 64)]  # (B, Fg, Fm, S, C)


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=str)
@pytest.mark.parametrize("case", RNM_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_residual_norm_modulate_matches_oracle_and_the_two_ops(case, dtype, rms):
    """The fused residual + next norm: both outputs under the 2x rule, and bit-equal to gated_residual
    then norm_modulate (the stream the unfused block carried). Gates and modulation with different frame
    counts (a per-frame audio gate before a per-sample LayerNorm, and the reverse); the LayerNorm affine
    arrives as stride-0 fp32 (shift, scale), as the model passes it."""
    B, Fg, Fm, S, C = case
    L = max(Fg, Fm) * S
    g = torch.Generator().manual_seed(5)
    x = rnd(B, L, 2 * C, dtype=dtype, gen=g, scale=3.0)[:, :, C:] + 1  # strided rows, non-zero mean
    y, gate = rnd(B, L, C, dtype=dtype, gen=g), rnd(B, Fg, C, dtype=dtype, gen=g)
    shift, scale = rnd(1, Fm, C, gen=g).expand(B, Fm, C), rnd(1, Fm, C, gen=g).expand(B, Fm, C)
    poison(x, y)
    r, h = nm_tt.residual_norm_modulate(x, y, gate, shift, scale, 1e-6, rms)
    r_low, h_low = nm_ref.residual_norm_modulate(x, y, gate, shift, scale, 1e-6, rms)
    r32, h32 = nm_ref.residual_norm_modulate(x.float(), y.float(), gate.float(), shift, scale, 1e-6, rms)
    check(r, r_low, r32)
    check(h, h_low, h32)
    r2 = gr_tt.gated_residual(x, y, gate)
    assert torch.equal(r, r2)
    torch.testing.assert_close(h, nm_tt.norm_modulate(r2, shift, scale, 1e-6, rms), atol=0, rtol=0)


def test_residual_norm_modulate_rejects_bad_shapes():
    x = rnd(2, 6, 32, dtype=torch.bfloat16)
    f = rnd(2, 1, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gate"):
        nm_tt.residual_norm_modulate(x, x, rnd(2, 4, 32), f, f, 1e-6)  # 4 frames do not divide 6 tokens
    with pytest.raises(ValueError, match="shift/scale"):
        nm_tt.residual_norm_modulate(x, x, f, rnd(2, 1, 16), rnd(2, 1, 16), 1e-6)
    with pytest.raises(ValueError, match="must be equal"):
        nm_tt.residual_norm_modulate(x, x[:, :5], f, f, f, 1e-6)


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=str)
@pytest.mark.parametrize("case", [(2, 77, 2, 32), (1, 1000, 6, 64), (2, 5, 12, 128), (1, 33, 3, 24)],
                         ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("shared_table", [True, False], ids=["cos1", "cosB"])
def test_rms_norm_rope_matches_oracle(case, dtype, shared_table, chunk=None):
    B, L, H, D = case
    C = H * D
    g = torch.Generator().manual_seed(4)
    x = rnd(B, L, 3 * C, dtype=dtype, gen=g, scale=2.0)[:, :, :C]  # the q slice of a fused qkv
    w = (torch.rand(C, generator=g) + 0.5).to(DEV, dtype)
    ang = torch.rand(1 if shared_table else B, L, D // 2, generator=g).to(DEV) * 6.28
    cos, sin = ang.cos(), ang.sin()
    poison(x)
    out = rope_tt.rms_norm_rope(x, w, cos, sin, H, 1e-6) if chunk is None else rope_tt.launch(x, w, cos, sin, H, 1e-6, chunk=chunk)
    check(out, rope_ref.rms_norm_rope(x, w, cos, sin, H, 1e-6),
          rope_ref.rms_norm_rope(x.float(), w.float(), cos, sin, H, 1e-6))


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=str)
@pytest.mark.parametrize("case", [(2, 5, 12, 128), (1, 33, 3, 24)], ids=lambda c: "x".join(map(str, c)))
def test_rms_norm_rope_two_pass_matches_oracle(case, dtype):
    """The chunked two-pass path that rows wider than 1024 channel pairs take, on small rows."""
    test_rms_norm_rope_matches_oracle(case, dtype, False, chunk=16)


# ---------------------------------------------------------------- group norm + SiLU (the VAE)

GN_CASES = [  # (N, C, H, W, groups)
    (1, 32, 9, 13, 8),  # one chunk per group, partial
    (2, 64, 70, 70, 8),  # 39,200 elements a group: ten chunks, the last partial
    (1, 3, 5, 7, 1),  # odd channels, one group
    (3, 12, 1, 1, 4),  # three elements a group
    (2, 128, 7, 9, 8),  # the VAE's widest stage
    (1, 16, 11, 5, 1),  # one group of all channels
]


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=str)
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("affine,silu", [(True, True), (False, False)], ids=["affine-silu", "plain"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_group_norm_silu_matches_oracle(case, dtype, affine, silu, layout):
    N, C, H, W, G = case
    g = torch.Generator().manual_seed(6)
    x = rnd(N, C, H, W, dtype=dtype, gen=g, scale=3.0) + 5.0  # an offset mean: E[x^2] - E[x]^2 would cancel
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(C, generator=g) + 0.5).to(DEV, dtype) if affine else None
    b = rnd(C, dtype=dtype, gen=g) if affine else None
    up = lambda t: None if t is None else t.float()  # noqa: E731
    poison(x)
    out = gn_tt.group_norm_silu(x, w, b, G, 1e-6, silu)
    assert out.dtype == dtype and out.shape == x.shape
    # a channels-last input is read in place and answered channels-last (no transposes around the convs)
    assert out.stride() == (x.stride() if gn_tt.nhwc(x, G) else x.contiguous().stride())
    assert gn_tt.nhwc(x, G) == (layout == "nhwc" and C in (16, 32, 64, 128) and H * W > 1)
    check(out, gn_ref.group_norm_silu(x, w, b, G, 1e-6, silu), gn_ref.group_norm_silu(x.float(), up(w), up(b), G, 1e-6, silu))


def test_group_norm_silu_rejects_bad_shapes():
    x = rnd(1, 6, 4, 4)
    with pytest.raises(ValueError, match="divisible by groups"):
        gn_tt.group_norm_silu(x, None, None, 4, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        gn_tt.group_norm_silu(x, rnd(5), None, 3, 1e-6)


@torch.no_grad()
def test_vae_with_group_norm_kernel_matches_references():
    """The VAE (bf16) through ops.group_norm_silu: the Triton kernel vs torch's GroupNorm + SiLU, fp32 oracle."""
    from bbf_rt.model.vae import CompactVAE, VAEConfig

    torch.manual_seed(0)
    vae = CompactVAE(VAEConfig(latent_channels=4, base_channels=8, channel_mult=(1, 2))).to(DEV).eval()
    frames = (torch.rand(1, 2, 3, 24, 40) * 2 - 1).to(DEV)
    with ops.implementation("reference"):
        oracle = vae(frames)
    low, lf = vae.to(torch.bfloat16), frames.to(torch.bfloat16)
    with ops.implementation("reference"):
        ref = low(lf)
    with ops.implementation("triton"):
        out = low(lf)
    check(out, ref, oracle)
    # NHWC (what the engine runs on CUDA): same rule, and the decoder's output stays channels-last
    low.use_channels_last()
    with ops.implementation("triton"):
        out_cl = low(lf)
        dec = low.decode_frames(low.encode_frames(lf[:, 0]))
    assert dec.is_contiguous(memory_format=torch.channels_last) and not dec.is_contiguous()
    check(out_cl, ref, oracle)
    low.use_channels_last(False)
    assert low.decoder.conv_out.weight.is_contiguous()


# ---------------------------------------------------------------- torch.library integration

def _op_samples():
    q, k, v = _qkv(1, 20, 17, 2, 32, torch.bfloat16)
    x = rnd(2, 6, 64, dtype=torch.bfloat16)
    f = rnd(2, 3, 64, dtype=torch.bfloat16)
    ang = torch.rand(1, 6, 16, device=DEV)
    w = torch.ones(64, dtype=torch.bfloat16, device=DEV)
    return {
        "attention": (torch.ops.bbf_rt.attention, (q, k, v, _mask(1, 17), 0.2)),
        "norm_modulate": (torch.ops.bbf_rt.norm_modulate, (x, f, f, 1e-6, False)),
        "gated_residual": (torch.ops.bbf_rt.gated_residual, (x, x, f)),
        "residual_norm_modulate": (torch.ops.bbf_rt.residual_norm_modulate, (x, x, f[:, :1], f, f, 1e-6, True)),
        "rms_norm_rope": (torch.ops.bbf_rt.rms_norm_rope, (x, w, ang.cos(), ang.sin(), 2, 1e-6)),
        "group_norm_silu": (torch.ops.bbf_rt.group_norm_silu, (rnd(2, 8, 5, 6, dtype=torch.bfloat16), w[:8], w[:8], 4,
                                                               1e-6, True)),
        "group_norm_silu_nhwc": (torch.ops.bbf_rt.group_norm_silu,
                                 (rnd(2, 8, 5, 6, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last),
                                  w[:8], w[:8], 4, 1e-6, True)),
    }


@pytest.mark.parametrize("name", ["attention", "norm_modulate", "gated_residual", "residual_norm_modulate",
                                  "rms_norm_rope", "group_norm_silu", "group_norm_silu_nhwc"])
def test_opcheck(name):
    op, args = _op_samples()[name]
    # the autograd checks do not apply: forward-only ops without a backward formula
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _block_glue(x, y, shift, scale, gate, w, cos, sin, mask):
    h = ops.norm_modulate(x, shift, scale, 1e-6)
    q = ops.rms_norm_rope(h, w, cos, sin, 2, 1e-6)
    a = ops.attention(q, q, q, mask).flatten(2)
    r, h = ops.residual_norm_modulate(x, a + y, gate, shift, scale, 1e-6)
    return ops.gated_residual(r, h, gate)


def test_torch_compile_fullgraph_through_public_ops():
    """All five ops in one graph; Inductor on the GPU, the aot_eager backend under the interpreter (whose
    kernels torch cannot trace, so they stay opaque custom ops)."""
    x, y = rnd(2, 12, 64, dtype=torch.bfloat16), rnd(2, 12, 64, dtype=torch.bfloat16)
    shift, scale, gate = (rnd(2, 3, 64, dtype=torch.bfloat16) for _ in range(3))
    ang = torch.rand(1, 12, 16, device=DEV)
    w = torch.ones(64, dtype=torch.bfloat16, device=DEV)
    mask = _mask(2, 12)
    args = (x, y, shift, scale, gate, w, ang.cos(), ang.sin(), mask)
    fn = torch.compile(_block_glue, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    with ops.implementation("triton"):
        got = fn(*args)
        eager = _block_glue(*args)
    torch.testing.assert_close(got, eager, atol=0, rtol=0)


def test_torch_compile_fullgraph_group_norm_silu():
    x = rnd(2, 8, 6, 10, dtype=torch.bfloat16)
    w = torch.linspace(0.5, 1.5, 8, device=DEV, dtype=torch.bfloat16)
    fn = torch.compile(lambda t: ops.group_norm_silu(t, w, w, 4, 1e-6) * 2, fullgraph=True,
                       backend="inductor" if CUDA else "aot_eager")
    with ops.implementation("triton"):
        got, eager = fn(x), ops.group_norm_silu(x, w, w, 4, 1e-6) * 2
    torch.testing.assert_close(got, eager, atol=0, rtol=0)


@gpu
def test_export_keeps_triton_ops():
    class Glue(torch.nn.Module):
        def forward(self, *args):
            return _block_glue(*args)

    x = rnd(1, 8, 64, dtype=torch.bfloat16)
    f = rnd(1, 2, 64, dtype=torch.bfloat16)
    ang = torch.rand(1, 8, 16, device=DEV)
    args = (x, x, f, f, f, torch.ones(64, dtype=torch.bfloat16, device=DEV), ang.cos(), ang.sin(), _mask(1, 8))
    with ops.implementation("triton"):
        ep = torch.export.export(Glue(), args)
    code = ep.graph_module.code
    for name in ("attention", "norm_modulate", "gated_residual", "residual_norm_modulate", "rms_norm_rope"):
        assert f"bbf_rt.{name}" in code, f"bbf_rt::{name} missing from the exported graph"


# ---------------------------------------------------------------- preset shapes and the model (GPU)

@gpu
@pytest.mark.parametrize("preset,L", [("bbf-s", 3600), ("wan-1.3b", 8190), ("wan-14b", 1560)])
def test_preset_shapes(preset, L):
    cfg = get_preset(preset)
    H, D, C = cfg.heads, cfg.head_dim, cfg.dim
    q, k, v = _qkv(1, L, L, H, D, torch.bfloat16, strided=True)
    _attn_check(q, k, v, None)
    qc, kc, vc = _qkv(2, L // 3, 512, H, D, torch.bfloat16)  # text cross-attention, padded to 512
    _attn_check(qc, kc, vc, _mask(2, 512))
    test_norm_modulate_matches_oracle((1, 3, L // 3, C), torch.bfloat16, False)
    test_gated_residual_matches_oracle((1, 3, L // 3, C), torch.bfloat16)
    test_residual_norm_modulate_matches_oracle_and_the_two_ops((1, 3, 3, L // 3, C), torch.bfloat16, False)
    test_rms_norm_rope_matches_oracle((1, L, H, D), torch.bfloat16, True)


def _model_inputs(cfg, dtype, B=2, Fr=2, H=8, W=12):
    g = torch.Generator().manual_seed(0)
    C = cfg.latent_channels
    r = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    mask = torch.tensor([[True, True, True, False, False], [False] * 5], device=DEV)  # padded; absent
    return dict(
        x=r(B, Fr, C, H, W), sigma=torch.rand(B, generator=g).to(DEV), tau=torch.tensor([[0.3, 0.6]] * B, device=DEV),
        z0=r(B, C, H, W), z1=r(B, C, H, W), valid=torch.ones(B, 1, H, W, device=DEV, dtype=dtype), diff=r(B),
        text=r(B, 5, cfg.text_dim), text_mask=mask,
        image=r(B, 1, C, H, W), image_mask=torch.ones(B, 1, dtype=torch.bool, device=DEV),
        audio=r(B, Fr, cfg.audio_tokens, cfg.audio_mels), audio_mask=torch.tensor([[True, False]] * B, device=DEV),
        context=r(B, 2, C, H, W), context_tau=torch.tensor([[-1.0, 2.0]] * B, device=DEV),
        context_mask=torch.ones(B, 2, dtype=torch.bool, device=DEV),
    )


@torch.no_grad()
def test_tiny_model_with_kernels_matches_references():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = build_dit(cfg).to(DEV).eval()
    trained_gates(model, seed=5)  # every branch is exercised
    with ops.implementation("reference"):
        oracle = model(**_model_inputs(cfg, torch.float32)).float()
    low = model.to(torch.bfloat16)
    inputs = _model_inputs(cfg, torch.bfloat16)
    with ops.implementation("reference"):
        ref = low(**inputs)
    with ops.implementation("triton"):
        out = low(**inputs)
    check(out, ref, oracle)

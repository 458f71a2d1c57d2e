"""CUDA-graph replay of the denoiser: same output as the direct call, one capture per shape bucket."""
from __future__ import annotations

import pytest
import torch

from bbf_rt.config import get_preset
from bbf_rt.model.dit import build_dit
from bbf_rt.runtime.graphs import CUDAGraphDenoiser


def _inputs(cfg, device, B=2, Fr=2, H=16, W=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = cfg.latent_channels
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    return dict(
        x=r(B, Fr, C, H, W), sigma=torch.rand(B, generator=g).to(device), tau=torch.rand(B, Fr, generator=g).to(device),
        z0=r(B, C, H, W), z1=r(B, C, H, W), valid=torch.ones(B, 1, H, W, device=device), diff=r(B),
        text=r(B, 5, cfg.text_dim), text_mask=torch.ones(B, 5, dtype=torch.bool, device=device),
    )


def test_cpu_tensors_call_through():
    cfg = get_preset("tiny")
    model = build_dit(cfg).eval()
    den = CUDAGraphDenoiser(model)
    kw = _inputs(cfg, "cpu")
    with torch.no_grad():
        assert torch.equal(den(**kw), model(**kw))
    assert den.captures == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_replay_equals_direct_call_and_reuses_the_capture():
    cfg = get_preset("tiny")
    model = build_dit(cfg, device="cuda").eval()
    den = CUDAGraphDenoiser(model)
    with torch.no_grad():
        for seed in range(3):  # new values each call: the replay reads the copied inputs
            kw = _inputs(cfg, "cuda", seed=seed)
            torch.testing.assert_close(den(**kw), model(**kw), rtol=1e-5, atol=1e-5)
        assert den.captures == 1
        kw = _inputs(cfg, "cuda", B=1)  # another shape bucket
        torch.testing.assert_close(den(**kw), model(**kw), rtol=1e-5, atol=1e-5)
        assert den.captures == 2

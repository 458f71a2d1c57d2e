"""The BBF DiT: preset sizes, condition branches, timestamps, the difference embedding."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from bbf_rt.config import MODALITIES, PRESETS, ModelConfig, get_preset
from bbf_rt.errors import BBFInputError
from bbf_rt.model.dit import build_dit, patchify, unpatchify
from bbf_rt.model.embed import boundary_similarity, normalised_difference
from models import trained_gates


def expected_dit_params(c: ModelConfig) -> int:
    """Parameter count derived by hand from the architecture (not by instantiating it)."""
    d, f, p = c.dim, c.ffn_dim, c.patch[0] * c.patch[1]
    b = c.dim if c.branch_dim is None else c.branch_dim
    lin = lambda i, o: i * o + o  # noqa: E731
    time_mlp = lin(c.freq_dim, d) + lin(d, d)
    embeds = {"text": c.text_dim, "image": c.latent_channels * p, "audio": c.audio_mels, "context": c.latent_channels * p}
    top = (
        lin(c.in_channels * p, d) + 2 * time_mlp + lin(1, d) + lin(d, 6 * d)
        + sum(lin(embeds[m], b) + lin(b, b) for m in c.modalities)
        + (c.audio_tokens * b if "audio" in c.modalities else 0)
        + 2 * d + lin(d, c.latent_channels * p)
    )
    self_attn = lin(d, 3 * d) + lin(d, d) + 2 * d
    branch = 2 * d + lin(d, b) + lin(b, 2 * b) + lin(b, d) + 2 * b + d  # LN, q, kv, o, qk norms, gate
    block = self_attn + len(c.modalities) * branch + lin(d, f) + lin(f, d) + 6 * d
    return top + c.depth * block


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_on_meta(name):
    cfg = get_preset(name)
    model = build_dit(cfg, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert n == expected_dit_params(cfg)
    # sanity of the presets' scale: tiny < 1M, bbf-s <= 40M (issue target), Wan shapes in billions
    bounds = {"tiny": (1e4, 1e6), "bbf-s": (10e6, 16e6), "wan-1.3b": (1.3e9, 2.5e9), "wan-14b": (14e9, 28e9)}
    lo, hi = bounds[name]
    assert lo <= n <= hi


def test_wan_presets_have_wan_shapes():
    c = get_preset("wan-1.3b")
    assert (c.dim, c.depth, c.heads, c.ffn_dim, c.latent_channels, c.head_dim) == (1536, 30, 12, 8960, 16, 128)
    c = get_preset("wan-14b")
    assert (c.dim, c.depth, c.heads, c.ffn_dim, c.latent_channels, c.head_dim) == (5120, 40, 40, 13824, 16, 128)
    assert c.rope_split() == (44, 42, 42)


def test_bad_config_rejected():
    with pytest.raises(BBFInputError, match="divisible by heads"):
        ModelConfig(name="x", dim=100, depth=1, heads=3, ffn_dim=10)
    with pytest.raises(BBFInputError, match="branch_dim=48 must be a positive multiple of head_dim=32"):
        ModelConfig(name="x", dim=64, depth=1, heads=2, ffn_dim=10, branch_dim=48)
    with pytest.raises(BBFInputError, match="unknown"):
        get_preset("nope")


def _inputs(cfg, B=2, Fr=2, H=8, W=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = cfg.latent_channels
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    base = dict(
        x=r(B, Fr, C, H, W), sigma=torch.rand(B, generator=g), tau=torch.rand(B, Fr, generator=g) * 0.8 + 0.1,
        z0=r(B, C, H, W), z1=r(B, C, H, W), valid=torch.ones(B, 1, H, W), diff=r(B),
    )
    conds = dict(
        text=r(B, 5, cfg.text_dim), text_mask=torch.ones(B, 5, dtype=torch.bool),
        image=r(B, 1, C, H, W), image_mask=torch.ones(B, 1, dtype=torch.bool),
        audio=r(B, Fr, cfg.audio_tokens, cfg.audio_mels), audio_mask=torch.ones(B, Fr, dtype=torch.bool),
        context=r(B, 2, C, H, W), context_tau=torch.tensor([[-1.0, 2.0]] * B),
        context_mask=torch.ones(B, 2, dtype=torch.bool),
    )
    return base, conds


def _by_modality(conds, m):
    return {k: v for k, v in conds.items() if k.startswith(m)}


@torch.no_grad()
def test_fresh_model_ignores_conditions_and_trained_gates_do_not():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = build_dit(cfg).eval()
    base, conds = _inputs(cfg)
    plain = model(**base)
    assert torch.equal(model(**base, **conds), plain)  # zero gates: exactly the backbone's output
    trained_gates(model)
    for m in MODALITIES:
        out = model(**base, **_by_modality(conds, m))
        assert (out - plain).abs().max() > 1e-4, f"{m} branch has no effect with a non-zero gate"


def _tiny(narrow: bool) -> ModelConfig:
    """The tiny preset, or the same with 1-head condition branches narrower than the tokens (as bbf-s)."""
    cfg = get_preset("tiny")
    return dataclasses.replace(cfg, branch_dim=cfg.head_dim) if narrow else cfg


@torch.no_grad()
@pytest.mark.parametrize("narrow", [False, True], ids=["full-branches", "narrow-branches"])
@pytest.mark.parametrize("modality", MODALITIES)
def test_absent_modality_equals_branch_skipped(modality, narrow):
    cfg = _tiny(narrow)
    torch.manual_seed(0)
    model = trained_gates(build_dit(cfg).eval())
    base, conds = _inputs(cfg)
    others = {k: v for k, v in conds.items() if not k.startswith(modality)}
    absent = model(**base, **others)
    # the same model with that branch removed from every block, fed the modality anyway
    pruned = copy.deepcopy(model)
    for blk in pruned.blocks:
        del blk.branches[modality]
    assert torch.allclose(pruned(**base, **conds), absent, atol=1e-6)
    # absent for the whole batch: the branch is not run at all
    calls = []
    hooks = [blk.branches[modality].register_forward_hook(lambda *a: calls.append(1)) for blk in model.blocks]
    model(**base, **others)
    assert not calls
    for h in hooks:
        h.remove()
    # absent for one sample of a batch (a CFG pass): an all-False mask equals that sample alone without it
    masked = dict(conds)
    for k in conds:
        if k.startswith(modality) and k.endswith("mask"):
            masked[k] = conds[k].clone()
            masked[k][0] = False
    batch_out = model(**base, **masked)
    single = model(**{k: v[:1] for k, v in base.items()}, **{k: v[:1] for k, v in others.items()})
    assert torch.allclose(batch_out[:1], single, atol=1e-5)


@torch.no_grad()
def test_padded_text_in_batch_equals_separate_calls():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = trained_gates(build_dit(cfg).eval())
    base, conds = _inputs(cfg)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # sample 1 has a 3-token prompt padded to 5
    batched = model(**base, text=conds["text"], text_mask=mask)
    one = model(**{k: v[1:] for k, v in base.items()}, text=conds["text"][1:, :3], text_mask=mask[1:, :3])
    assert torch.allclose(batched[1:], one, atol=1e-5)


@torch.no_grad()
def test_frames_are_defined_by_timestamps_not_order():
    """Any number of frames at any positions: permuting (frame, timestamp) pairs permutes the output."""
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = build_dit(cfg).eval()
    base, _ = _inputs(cfg, B=1, Fr=3)
    base["tau"] = torch.tensor([[1 / 3, 1 / 2, 5 / 7]])
    out = model(**base)
    perm = torch.tensor([2, 0, 1])
    shuffled = dict(base, x=base["x"][:, perm], tau=base["tau"][:, perm])
    assert torch.allclose(model(**shuffled), out[:, perm], atol=1e-5)
    moved = dict(base, tau=torch.tensor([[0.2, 0.5, 0.9]]))
    assert (model(**moved) - out).abs().max() > 1e-4  # the timestamps are used


def test_patchify_roundtrip():
    z = torch.randn(2, 3, 4, 6, 10)
    t = patchify(z, 2, 2)
    assert t.shape == (2, 3 * 3 * 5, 16)
    assert torch.equal(unpatchify(t, 3, 3, 5, 2, 2), z)


def test_boundary_similarity_on_known_pairs():
    H = W = 8
    red = torch.zeros(1, 3, H, W)
    red[:, 0] = 1.0
    green = torch.zeros(1, 3, H, W)
    green[:, 1] = 1.0
    assert boundary_similarity(red, red).item() == pytest.approx(1.0)
    assert boundary_similarity(red, 0.5 * red).item() == pytest.approx(1.0)  # cosine ignores brightness scale
    assert boundary_similarity(red, green).item() == pytest.approx(0.0, abs=1e-6)
    half = red.clone()
    half[..., : H // 2, :] = green[..., : H // 2, :]
    assert boundary_similarity(red, half).item() == pytest.approx(0.5)
    gray = torch.full((1, 3, H, W), 0.5)
    assert boundary_similarity(red, gray).item() == pytest.approx(1 / math.sqrt(3), rel=1e-5)
    cfg = get_preset("bbf-s")
    d = normalised_difference(torch.tensor([1.0, cfg.diff_mu]), cfg.diff_mu, cfg.diff_sigma)
    assert d[0].item() == pytest.approx((1 - 0.990539) / 0.0608093, rel=1e-5)
    assert d[1].item() == pytest.approx(0.0, abs=1e-6)


@torch.no_grad()
def test_difference_embedding_feeds_the_modulation():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = build_dit(cfg).eval()
    base, _ = _inputs(cfg, B=1)
    a = model(**dict(base, diff=torch.tensor([0.0])))
    b = model(**dict(base, diff=torch.tensor([-5.0])))
    assert (a - b).abs().max() > 1e-4
    with torch.no_grad():
        model.diff_embed.weight.zero_()
    assert torch.equal(model(**dict(base, diff=torch.tensor([0.0]))), model(**dict(base, diff=torch.tensor([-5.0]))))


@pytest.mark.parametrize("narrow", [False, True], ids=["full-branches", "narrow-branches"])
def test_analytic_flops_match_counted_linear_flops(narrow):
    """dit_flops = counted matmul FLOPs (torch's FlopCounterMode) + attention's 4*L*Lk*d per layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from bbf_rt.model.flops import dit_flops

    cfg = _tiny(narrow)
    model = build_dit(cfg).eval()
    base, _ = _inputs(cfg, B=1, Fr=3, H=16, W=24)
    text = dict(text=torch.randn(1, 7, cfg.text_dim), text_mask=torch.ones(1, 7, dtype=torch.bool))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(**base, **text)
    L, d = 3 * 8 * 12, cfg.dim
    attention = cfg.depth * (4 * L * L * d + 4 * L * 7 * cfg.branch_width)
    counted = fc.get_total_flops() + attention  # the timestep/timestamp MLPs (<1% here) are left out
    assert abs(dit_flops(cfg, 3, 96, {"text": 7}) - counted) / counted < 0.01

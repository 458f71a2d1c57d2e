"""Training groundwork on the CPU: data, ambiguity suite, curriculum, loop, sharded states, metrics (tiny preset)."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

pytest.importorskip("skimage", reason="the training data needs scikit-image (pip install 'bbf-rt[train]')")

from bbf_rt.errors import BBFError, BBFInputError, CheckpointError
from bbf_rt.train import curriculum
from bbf_rt.train.ambiguity import AudioSuite, ContextSuite, ImageSuite, TextSuite, all_captions, make_suite
from bbf_rt.train.batching import TextBank
from bbf_rt.train.data import GenericMotion, GenericMotionDataset, difference, random_appearance, random_motion
from bbf_rt.train.loop import TrainConfig, make_trainer, train, weights_to_checkpoint
from bbf_rt.train.metrics import linear_blend, predict, psnr, ssim
from bbf_rt.train.shards import load_shards, save_shards

H, W = 48, 64
CFG = TrainConfig(preset="tiny", height=32, width=32, batch=6, device="cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core machine the threads only wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bank() -> TextBank:
    g = torch.Generator().manual_seed(0)
    return TextBank({c: torch.randn(4, 384, generator=g) for c in all_captions()})


def test_text_bank_round_trips_into_a_new_folder(tmp_path):
    """--make-text-bank on a fresh checkout writes under a folder that does not exist yet."""
    bank = _bank()
    path = tmp_path / "new" / "bank.safetensors"
    bank.save(path)
    back = TextBank.load(path)
    assert sorted(back.table) == sorted(bank.table)
    for c, v in bank.table.items():
        assert torch.equal(back.table[c], v), c


# ---- generic data ---------------------------------------------------------------------------------
def test_generic_is_deterministic_and_exact_at_any_time():
    src = GenericMotion(H, W, n_targets=3, context_per_side=1)
    a, b = src.batch(5, 4), src.batch(5, 4)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(src.batch(6, 4)["frame0"], a["frame0"])
    # ground truth anywhere: the scene rendered at 0, 1 and the targets' taus reproduces the sample
    times = torch.cat([torch.tensor([[0.0, 1.0]]).expand(4, 2), a["taus"], a["context_tau"]], 1)
    again = src.frames_at(5, 4, times)
    assert torch.equal(again[:, 0], a["frame0"]) and torch.equal(again[:, 1], a["frame1"])
    assert torch.equal(again[:, 2:5], a["targets"]) and torch.equal(again[:, 5:], a["context"])
    assert a["targets"].shape == (4, 3, 3, H, W) and a["context_tau"].tolist()[0] == [-1.0, 2.0]
    assert 0.0 <= float(a["targets"].min()) and float(a["targets"].max()) <= 1.0
    with pytest.raises(BBFInputError, match="multiple of 16"):
        GenericMotion(50, 64)


def test_sprites_move_and_difference_orders_static_above_motion():
    src = GenericMotion(H, W)
    gen = torch.Generator().manual_seed(1)
    n = 6
    app = random_appearance(gen, n, 4, src.atlas.count)
    app.spr_active[:, 0] = True
    still = random_motion(torch.Generator().manual_seed(2), n, 4, src.extent, level=torch.zeros(n))
    moving = random_motion(torch.Generator().manual_seed(2), n, 4, src.extent, level=torch.ones(n))
    for m in (still, moving):  # camera and light fixed: only sprites can change the picture
        for f in ("cam_v", "cam_a", "cam_kz", "cam_w", "g_lin", "g_amp", "grad0"):
            setattr(m, f, torch.zeros_like(getattr(m, f)))
    t01 = torch.tensor([[0.0, 1.0]]).expand(n, 2)
    fs, fm = src.render(app, still, t01), src.render(app, moving, t01)
    assert torch.equal(fs[:, 0], fs[:, 1])  # nothing moves at motion level 0
    moved = (fm[:, 0] - fm[:, 1]).abs().amax(dim=(1, 2, 3))
    assert bool((moved > 0.1).all()), moved
    path = moving.sprite_pos(t01[:, None].expand(n, 4, 2))
    assert bool(((path[:, 0, 1] - path[:, 0, 0]).norm(dim=-1) > 0).all())
    d_static, d_motion = difference(fs[:, 0], fs[:, 1]), difference(fm[:, 0], fm[:, 1])
    assert torch.equal(d_static, difference(fs[:, 0], fs[:, 0]))  # a static pair is a pair of equal frames
    assert bool((d_static > d_motion).all())


def test_dataset_iterates_batches_in_index_order():
    src = GenericMotion(32, 32, n_targets=1, context_per_side=0)
    got = list(GenericMotionDataset(src, batch=2, start=3, stop=5))
    assert len(got) == 2 and torch.equal(got[1]["frame0"], src.batch(4, 2)["frame0"])


# ---- ambiguity suite ------------------------------------------------------------------------------
def _flip(suite, b):
    lab = b["label"]
    if isinstance(suite, AudioSuite):
        early = lab[:, :1] < 0.4  # move both clicks to the other half of the interval
        return torch.where(early, torch.tensor([0.6, 0.72]), torch.tensor([0.1, 0.2]))
    if isinstance(suite, TextSuite):
        return lab // 2 * 2 + (1 - lab % 2)  # cw <-> ccw, once <-> twice
    if isinstance(suite, ContextSuite):
        return -lab
    return (lab + 1) % suite.n_cand


@pytest.mark.parametrize("name", ["audio", "text", "context", "image"])
def test_ambiguity_label_comes_from_the_modality_not_the_boundaries(name):
    suite = make_suite(name, 64, 64)
    b = suite.batch(0, 4, hypotheses=True)
    alt = suite.batch(0, 4, labels=_flip(suite, b), hypotheses=True)
    # the boundary frames are identical for different labels, the in-between is not
    assert torch.equal(b["frame0"], alt["frame0"]) and torch.equal(b["frame1"], alt["frame1"])
    assert bool(((b["targets"] - alt["targets"]).abs().amax(dim=(1, 2, 3, 4)) > 0.2).all())
    # a simple oracle recovers the label from the resolving modality
    if name == "audio":
        assert torch.allclose(AudioSuite.oracle(b["audio"], suite.seconds, 2), b["label"], atol=1e-3)
        assert b["audio"].shape == (4, round(suite.seconds * 16000))
    elif name == "text":
        assert torch.equal(TextSuite.oracle(b["caption"]), b["label"])
    elif name == "context":
        a = ContextSuite.oracle(b)
        assert bool(((a - b["label"]).norm(dim=-1) < 0.15 * b["label"].norm(dim=-1)).all())
    else:
        assert torch.equal(ImageSuite.oracle(b), b["label"])
    # scoring: ground truth scores perfectly, the other label's frames do not
    good, bad = suite.score(b, b["targets"]), suite.score(b, alt["targets"])
    key = {"audio": "within_one", "text": "correct", "context": "accel_correct", "image": "correct"}[name]
    assert bool(good[key].all())
    if name == "audio":
        assert bool(good["exact"].all()) and bool((bad["timing_error"] > 0).any()) and not bool(bad["exact"].all())
    else:
        assert not bool(bad[key].any())
    if name == "context":
        assert bool(good["velocity_ok"].all()) and bool((good["position_error_px"] < 1.0).all())


# ---- curriculum -----------------------------------------------------------------------------------
def test_curriculum_sampling_shifts_to_large_differences_and_weights_grow_with_them():
    d = torch.linspace(-3, 0.15, 50)
    means = [float((curriculum.sampling_probs(d, lam) * d).sum()) for lam in (-1.0, 0.0, 1.0, 2.0)]
    assert means == sorted(means, reverse=True) and means[0] > means[-1] + 0.5
    src = GenericMotion(32, 32, n_targets=1, context_per_side=0, pool=4)
    lo = torch.cat([src.batch(i, 8, lam=-2.0)["diff"] for i in range(3)])
    hi = torch.cat([src.batch(i, 8, lam=2.0)["diff"] for i in range(3)])
    assert float(hi.mean()) < float(lo.mean()) - 0.2
    w = curriculum.loss_weights(d, alpha=1.0, d_max=4.0)
    assert bool((w[1:] <= w[:-1]).all()) and float(w[0]) > float(w[-1]) and abs(float(w.mean()) - 1) < 1e-6
    assert torch.allclose(curriculum.loss_weights(d, 0.0, 4.0), torch.ones(50))
    s2 = curriculum.get_stage(2)
    assert curriculum.lam_at(s2, 0) == s2.lam_start and curriculum.lam_at(s2, 10**6) == s2.lam_end
    assert sum(curriculum.source_counts(curriculum.get_stage(3).mix, 13).values()) == 13
    with pytest.raises(BBFInputError, match="stage"):
        curriculum.get_stage(7)


# ---- training loop --------------------------------------------------------------------------------
def test_training_steps_reduce_the_loss_on_a_fixed_batch():
    tr = make_trainer(CFG, "1")
    batch = tr.batch(0)
    keep = curriculum.dropout_keep(torch.Generator().manual_seed(0), CFG.batch, 0.0)

    def loss():
        return tr.dit_loss(batch, torch.Generator().manual_seed(0), keep)[0]

    with torch.no_grad():
        before = float(loss())
    for g in tr.opt.param_groups:
        g["lr"] = 3e-3
    for _ in range(25):
        loss().backward()
        tr.opt.step()
        tr.opt.zero_grad()
    with torch.no_grad():
        after = float(loss())
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("stage", ["vae", "3"])
def test_resume_gives_bit_identical_next_step(tmp_path, stage):
    cfg = TrainConfig(preset="tiny", height=32, width=32, batch=5, device="cpu", shard_mib=0.25)
    text = _bank()
    a = make_trainer(cfg, stage, text=text)
    for _ in range(2):
        a.step()
    state = a.save(tmp_path / "run")
    a.step()
    b = make_trainer(cfg, stage, resume=tmp_path / "run", text=text)
    assert (b.global_step, b.stage_step) == (2, 2)
    b.step()
    for (n, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), n
    for n in a.ema:
        assert torch.equal(a.ema[n], b.ema[n]), n
    files = list(state.glob("shard-*.safetensors"))
    assert len(files) > 1 and max(f.stat().st_size for f in files) <= 0.25 * 1024 * 1024


def test_stage_transition_export_and_checkpoint(tmp_path):
    r = train("vae", 1.0, tmp_path / "run", cfg=CFG, max_steps=2)
    assert r["global_step"] == 2 and json.loads((tmp_path / "run" / "latest.json").read_text())["stage"] == "vae"
    tr = make_trainer(CFG, "2", resume=tmp_path / "run")
    assert tr.vae_calibrated and tr.global_step == 2 and tr.stage_step == 0
    z = tr.model.vae.encode_frames(tr.stills.stills(10**6, 16) * 2 - 1)  # calibrated: ~unit latents
    assert abs(float(z.std()) - 1) < 0.1
    tr.step()
    tr.export(tmp_path / "w", part="backbone")
    ck = weights_to_checkpoint(tmp_path / "w", tmp_path / "w.safetensors")
    from bbf_rt.model import load_model

    m = load_model(ck)
    assert m.trained and torch.equal(m.vae.scale, tr.model.vae.scale)
    with pytest.raises(CheckpointError, match="tiny"):
        make_trainer(TrainConfig(preset="bbf-s", height=32, width=32, batch=2), "2", resume=tmp_path / "w")
    # prediction runs on suite batches with a modality withheld
    suite = make_suite("audio", 32, 32, n_targets=3, n_clicks=1)
    out = predict(m, suite.batch(0, 2), withhold=("audio",))
    assert out.shape == (2, 3, 3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_train_stops_before_the_wall_clock_budget(tmp_path):
    tr = make_trainer(CFG, "1")
    t0 = time.monotonic()
    r = train("1", 0.05, tmp_path / "run", cfg=CFG, trainer=tr)  # 3 s for steps and the save
    assert time.monotonic() - t0 < 3.0 + 0.5 and r["steps"] >= 2  # 0.5 s: scheduling noise of a busy machine
    assert (tmp_path / "run" / r["state"].split("/")[-1] / "index.json").is_file()
    with pytest.raises(BBFInputError, match="minutes"):
        train("1", 0, tmp_path / "run", cfg=CFG)


def test_shards_respect_the_size_limit_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"big": torch.randn(300, 100, generator=g), "half": torch.randn(64, generator=g).to(torch.bfloat16),
         "step": torch.tensor(3.0), "ids": torch.arange(10)}
    d = save_shards(tmp_path / "s", t, {"note": "x"}, shard_bytes=32 * 1024)
    sizes = [f.stat().st_size for f in d.glob("shard-*.safetensors")]
    assert len(sizes) >= 4 and max(sizes) <= 32 * 1024
    back, meta = load_shards(d)
    assert meta == {"note": "x"} and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in t.items())
    next(d.glob("shard-*.safetensors")).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_shards(d)
    with pytest.raises(CheckpointError, match="index.json"):
        load_shards(tmp_path)


# ---- metrics --------------------------------------------------------------------------------------
def test_psnr_and_ssim_on_known_cases():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 40, 48, generator=g) * 128 + 64
    assert torch.isinf(psnr(img, img)).all() and torch.allclose(ssim(img, img), torch.ones(2, dtype=torch.float64))
    signs = torch.where(torch.rand(img.shape, generator=g) < 0.5, -1.0, 1.0)  # error of exactly 5 levels
    want = 20 * torch.log10(torch.tensor(255.0 / 5.0, dtype=torch.float64))
    assert torch.allclose(psnr(img + 5.0 * signs, img), want.expand(2), atol=1e-6)
    noisy = img + 5.0 * torch.randn(img.shape, generator=g)
    assert torch.allclose(psnr(noisy, img), want.expand(2), atol=0.25)  # Gaussian noise, sigma 5
    from skimage.metrics import structural_similarity

    a, b = img[0].permute(1, 2, 0).double().numpy(), noisy[0].permute(1, 2, 0).double().numpy()
    ref = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert abs(float(ssim(noisy, img)[0]) - ref) < 1e-6
    assert float(ssim(noisy, img, mode="luma")[0]) < 1.0
    blend = linear_blend(torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4), torch.tensor([[0.25, 0.5]]))
    assert torch.allclose(blend[0, :, 0, 0, 0], torch.tensor([0.25, 0.5]))
    with pytest.raises(BBFInputError, match="shapes"):
        psnr(img, img[:, :, :8])


def test_decoder_stage_moves_only_the_decoder_and_keeps_the_latent_space(tmp_path):
    train("1", 1.0, tmp_path / "run", cfg=CFG, max_steps=1)
    tr = make_trainer(CFG, "decoder", resume=tmp_path / "run")
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    buffers = {n: b.clone() for n, b in tr.model.vae.named_buffers()}
    for g in tr.opt.param_groups:
        g["base_lr"] = 1e-3
    for _ in range(3):
        stats = tr.step()
    assert math.isfinite(stats["l1"])
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("vae.decoder.") for n in moved), sorted(moved)[:5]
    assert all(torch.equal(b, buffers[n]) for n, b in tr.model.vae.named_buffers())  # latent shift/scale kept


def test_non_finite_loss_stops_training_without_saving(tmp_path, monkeypatch):
    tr = make_trainer(CFG, "1")
    monkeypatch.setattr(tr, "step", lambda: {"loss": float("nan")})
    with pytest.raises(BBFError, match="non-finite loss"):
        train("1", 1.0, tmp_path / "run", cfg=CFG, trainer=tr)
    assert not (tmp_path / "run" / "latest.json").exists()


def test_cli_passes_sampler_focus_and_ema_flags_and_refuses_bad_ones(tmp_path, capsys):
    """--sigma-one/--ema-decay/--fusion-steps reach the run's TrainConfig (stored in its state); bad values
    stop before anything is written."""
    from bbf_rt.train.loop import main

    base = ["--stage", "1", "--preset", "tiny", "--height", "32", "--width", "32", "--batch", "2", "--device", "cpu"]
    for bad in (["--sigma-one", "1.5"], ["--ema-decay", "1"], ["--fusion-steps", "0"]):
        with pytest.raises(SystemExit) as e:
            main(base + ["--out", str(tmp_path / "bad")] + bad)
        assert e.value.code == 2 and not (tmp_path / "bad").exists()
    assert "--sigma-one" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "run"), "--max-steps", "1", "--sigma-one", "1", "--ema-decay", "0.99"]) == 0
    state = json.loads((tmp_path / "run" / "latest.json").read_text())["dir"]
    cfg = json.loads((tmp_path / "run" / state / "index.json").read_text())["meta"]["train_config"]
    assert cfg["sigma_one"] == 1.0 and cfg["ema_decay"] == 0.99 and cfg["fusion_steps"] == 2

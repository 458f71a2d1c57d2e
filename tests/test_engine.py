"""Engine, checkpoints and the Python API on the tiny preset (random weights: plumbing only)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import bbf_rt
from bbf_rt.config import RuntimeConfig, get_preset
from bbf_rt.errors import BBFInputError, CheckpointError
from bbf_rt.model import BBFModel, load_model, save_checkpoint
from bbf_rt.runtime import sampler
from bbf_rt.runtime.engine import Conditions, Engine, DenoiseJob
from models import trained_gates


def _model(seed=0, gates=True):
    torch.manual_seed(seed)
    m = BBFModel(get_preset("tiny")).eval()
    if gates:  # as if trained: branches active, so guidance and conditions change the output
        trained_gates(m.dit)
    return m


def _frames(n=2, H=24, W=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, H, W, 3), dtype=np.uint8)


@torch.no_grad()
def test_batched_cfg_equals_separate_calls():
    m = _model()
    rt = RuntimeConfig(steps=3, text_scale=3.0, audio_scale=2.0)
    eng = Engine(m, rt, torch.device("cpu"), torch.float32)
    fr = _frames()
    pix = eng.to_pixels(fr)
    lat = eng.encode(pix)
    C, h, w = lat.shape[1:]
    audio = torch.randn(2, m.cfg.audio_tokens, m.cfg.audio_mels)
    job = DenoiseJob(key=7, lat0=lat[0], lat1=lat[1], diff=eng.difference(pix[:1], pix[1:])[0], taus=[0.25, 0.75], audio=audio)
    text = torch.randn(1, 4, m.cfg.text_dim)
    cond = Conditions(text=text, text_mask=torch.ones(1, 4, dtype=torch.bool))

    calls = []
    orig = m.dit.forward
    m.dit.forward = lambda *a, **k: (calls.append(a[0].shape[0]), orig(*a, **k))[1]
    got = eng.run([job], cond, 24, 40)[0]
    m.dit.forward = orig
    assert calls == [3, 3, 3]  # one batched call per step, three guidance passes

    # the same sampling done by hand with three separate calls per step
    kw = eng._inputs([job], cond, 24, 40)
    no_text = {k: v for k, v in kw.items() if not k.startswith(("text", "audio"))}
    text_only = {k: v for k, v in kw.items() if not k.startswith("audio")}
    x = torch.randn(2, C, h, w, generator=torch.Generator().manual_seed(rt.seed * 1_000_003 + 7))[None]
    sig = sampler.make_sigmas(3)
    for i in range(3):
        s = sig[i].expand(1)
        v0, v1, v2 = m.dit(x, s, **no_text), m.dit(x, s, **text_only), m.dit(x, s, **kw)
        v = v0 + 3.0 * (v1 - v0) + 2.0 * (v2 - v1)
        x = x + (sig[i + 1] - sig[i]) * v
    torch.testing.assert_close(got, x[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_output_does_not_depend_on_batching():
    m = _model()
    eng = Engine(m, RuntimeConfig(steps=2), torch.device("cpu"), torch.float32)
    fr = _frames(3)
    pix = eng.to_pixels(fr)
    lat = eng.encode(pix)
    jobs = [DenoiseJob(key=i, lat0=lat[i], lat1=lat[i + 1], diff=eng.difference(pix[i : i + 1], pix[i + 1 : i + 2])[0], taus=[0.5]) for i in range(2)]
    both = eng.run(jobs, Conditions(), 24, 40)
    alone = [eng.run([j], Conditions(), 24, 40)[0] for j in jobs]
    for a, b in zip(both, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = _model(gates=True)
    p = save_checkpoint(m, tmp_path / "m.safetensors", trained=False, info={"why": "test"})
    loaded = load_model(p)
    assert loaded.cfg == m.cfg and loaded.trained is False
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # a checkpoint of another shape: key/shape mismatch named clearly
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(p))
    meta = {"format": "bbf-rt/1", "config": m.cfg.to_json(), "trained": "false"}
    bad = dict(tensors)
    bad.pop("dit.head.weight")
    bad["dit.extra"] = torch.zeros(1)
    bad["dit.patch_in.bias"] = torch.zeros(3)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "missing keys: dit.head.weight" in msg and "unexpected keys: dit.extra" in msg and "dit.patch_in.bias" in msg
    # no metadata, a pickle, a truncated file, a missing file
    save_file(tensors, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CheckpointError, match="no bbf-rt metadata"):
        load_model(tmp_path / "nometa.safetensors")
    torch.save(m.state_dict(), tmp_path / "pickle.safetensors")
    with pytest.raises(CheckpointError, match="never loads pickles"):
        load_model(tmp_path / "pickle.safetensors")
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothere.safetensors")


def test_interpolate_api_shapes_and_conditions():
    m = _model()
    fr = _frames(4, H=30, W=44)  # not a multiple of 8: padded and cropped back
    out = bbf_rt.interpolate(fr[0], fr[1], [0.25, 0.5, 0.75], model=m, steps=2)
    assert out.shape == (3, 30, 44, 3) and out.dtype == np.uint8
    again = bbf_rt.interpolate(fr[0], fr[1], [0.25, 0.5, 0.75], model=m, steps=2)
    assert np.array_equal(out, again)  # seeded: reproducible
    audio = np.sin(np.linspace(0, 200, 8000)).astype(np.float32)
    full = bbf_rt.interpolate(
        fr[0], fr[1], [0.5], model=m, text=torch.randn(3, m.cfg.text_dim), audio=audio,
        reference=fr[2], context=[(fr[3], -1.0), (fr[2], 2.0)],
    )
    plain = bbf_rt.interpolate(fr[0], fr[1], [0.5], model=m)
    assert full.shape == (1, 30, 44, 3) and not np.array_equal(full, plain)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(timestamps=[0.0]), "strictly between 0 and 1"),
        (dict(timestamps=[1.2]), "strictly between 0 and 1"),
        (dict(timestamps=[]), "1..64"),
        (dict(frame1=np.zeros((10, 10, 3), np.uint8)), "outside 16..8192"),
        (dict(frame1=np.zeros((24, 40), np.uint8)), r"\(H, W, 3\) uint8"),
        (dict(frame1=np.zeros((24, 40, 3), np.float32)), "uint8"),
        (dict(frame1=np.zeros((32, 40, 3), np.uint8)), "same size"),
        (dict(context=[(np.zeros((24, 40, 3), np.uint8), 0.5)]), "outside \\[0, 1\\]"),
        (dict(text=torch.randn(3, 7)), "text embeddings must be"),
        (dict(audio=np.zeros((2, 100), np.float32)), "1-D mono"),
        (dict(steps=0), "steps"),
        (dict(solver="rk45"), "solver"),
    ],
)
def test_interpolate_api_bad_input(kwargs, match):
    m = _model(gates=False)
    fr = _frames(2)
    args = dict(frame0=fr[0], frame1=fr[1], timestamps=[0.5])
    args.update(kwargs)
    with pytest.raises(BBFInputError, match=match):
        bbf_rt.interpolate(args.pop("frame0"), args.pop("frame1"), args.pop("timestamps"), model=m, **args)


def test_no_default_model_is_a_clear_error(monkeypatch, tmp_path):
    from bbf_rt.runtime import api

    monkeypatch.setattr(api, "DEFAULT_WEIGHTS", tmp_path / "absent.safetensors")
    fr = _frames(2)
    with pytest.raises(BBFInputError, match="no trained default model"):
        bbf_rt.interpolate(fr[0], fr[1], [0.5])


def test_cli_info_lists_every_preset_with_its_size(capsys):
    from bbf_rt.cli import main

    assert main(["info", "--json"]) == 0
    import json

    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"tiny", "bbf-s", "wan-1.3b", "wan-14b"}
    assert rows["bbf-s"]["vae_params"] > 0 and rows["wan-14b"]["vae_params"] == 0
    assert rows["wan-1.3b"]["dit_params"] > 1_000_000_000


def test_embedded_default_model_interpolates_held_out_motion():
    """The shipped bbf-s: trained, within the size budget, with its boundary-fusion head, and through the
    public API its in-between frames of held-out procedural clips are far closer to the truth than
    repeating a boundary frame (docs/training.md has the full evaluation: +1.1 dB over linear blending
    on 31 held-out clips, though blending still wins on near-static ones)."""
    pytest.importorskip("skimage", reason="the held-out clips need scikit-image (pip install 'bbf-rt[train]')")
    from bbf_rt.model import load_model
    from bbf_rt.runtime.api import default_model_path
    from bbf_rt.train.data import heldout_batches

    path = default_model_path()
    assert path.stat().st_size < 40 * 2**20
    model = load_model(path)
    assert model.trained and model.cfg.name == "bbf-s" and model.vae.fusion is not None
    assert sum(p.numel() for p in model.parameters()) <= 40e6
    b = next(iter(heldout_batches(128, 128, batches=1, size=6)))
    u8 = lambda t: (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # noqa: E731

    def psnr(a, gt):
        mse = ((a.astype(np.float64) - gt) ** 2).mean()
        return 10 * np.log10(255**2 / mse)

    got = {"bbf-s": [], "linear": [], "copy": []}
    for i in range(6):
        f0, f1 = u8(b["frame0"][i]), u8(b["frame1"][i])
        if np.array_equal(f0, f1):
            continue  # a static clip: copying and blending are exact, PSNR infinite
        taus = b["taus"][i].tolist()
        gt = np.stack([u8(t) for t in b["targets"][i]]).astype(np.float64)
        got["bbf-s"].append(psnr(bbf_rt.interpolate(f0, f1, taus, model=model, device="cpu"), gt))
        got["linear"].append(psnr(np.stack([((1 - t) * f0 + t * f1.astype(np.float64)).round() for t in taus]), gt))
        got["copy"].append(psnr(np.stack([f0] * len(taus)), gt))
    m = {k: float(np.mean(v)) for k, v in got.items()}
    assert len(got["copy"]) >= 4
    # 5.4 dB over copying here (the checkpoint before the fusion head: 4.2); blending still wins on this
    # batch's near-static clips (30.4 dB mean), which the held-out mean over 31 clips outweighs
    assert m["bbf-s"] > m["copy"] + 4.8, m


def test_vae_layout_is_never_switched_under_another_engine():
    """The first engine sets the shared VAE's layout in place; one that wants the other layout gets a
    copy, so the first engine's weights (and CUDA graphs captured on them) stay as they were."""
    from bbf_rt.model.vae import CompactVAE
    from bbf_rt.runtime.engine import vae_in_layout

    torch.manual_seed(0)
    vae = CompactVAE()
    first = vae_in_layout(vae, True)
    assert first is vae and vae.channels_last
    w = vae.decoder.conv_out.weight
    assert vae_in_layout(vae, True) is vae  # same layout: shared
    other = vae_in_layout(vae, False)
    assert other is not vae and not other.channels_last
    assert vae.channels_last and vae.decoder.conv_out.weight is w  # the first engine's weights untouched
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    torch.testing.assert_close(other.encode_frames(x), vae.encode_frames(x), atol=1e-5, rtol=0)

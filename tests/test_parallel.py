"""Sequence- and CFG-parallel DiT on the CPU: gloo, 2 and 4 processes, tiny preset (random weights, plumbing).

Each launch runs a scenario in every process and saves what every rank ended up with; the tests compare
each rank's result with the single-process result computed here. Token counts per frame (5*7, 3*3) do not
divide by the ranks, so the padded shards and their key mask are exercised; every condition is present,
with padding masks (text), per-frame absence (audio), RoPE (context) and a reference image.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bbf_rt import parallel
from bbf_rt.config import RuntimeConfig, get_preset
from bbf_rt.errors import BBFInputError
from bbf_rt.model import BBFModel
from bbf_rt.model.dit import build_dit
from bbf_rt.runtime.distributed import check_degrees, parallelize
from bbf_rt.runtime.engine import Conditions, DenoiseJob, Engine
from models import trained_gates

TINY = get_preset("tiny")  # 2 heads: SP degree 2
TINY4 = replace(TINY, name="tiny-4h", heads=4)  # SP degree 4
TINY3 = replace(TINY, name="tiny-3h", dim=96, heads=3)  # 3 heads: SP 2 must be refused
HW = (38, 53)  # pixels; padded to 40 x 56 -> 10 x 14 latents -> 5 x 7 = 35 tokens per frame


# ------------------------------------------------------------------------ deterministic models and inputs


def _dit(cfg):
    torch.manual_seed(0)
    return trained_gates(build_dit(cfg).eval())


def _model(fusion=None):
    torch.manual_seed(0)
    m = BBFModel(replace(TINY, vae_fusion=fusion)).eval()
    trained_gates(m.dit)
    if fusion:
        with torch.no_grad():  # a head away from its identity start, as after training
            for p in m.vae.fusion.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return m


def _bounds(n=3):
    g = torch.Generator().manual_seed(4)
    s = TINY.vae_stride
    return (torch.rand(n, 3, 10 * s, 14 * s, generator=g) * 2 - 1, torch.rand(n, 3, 10 * s, 14 * s, generator=g) * 2 - 1,
            torch.rand(n, generator=g))


def _dit_inputs(cfg, h, w, B=2, Fr=3):
    """DiT inputs with every condition present and partly masked; h x w tokens per frame."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    C, H, W = cfg.latent_channels, 2 * h, 2 * w
    valid = torch.ones(B, 1, H, W)
    valid[:, :, -1:] = 0
    text_mask = torch.ones(B, 5, dtype=torch.bool)
    text_mask[1, 3:] = False  # a 3-token prompt padded to 5
    audio_mask = torch.ones(B, Fr, dtype=torch.bool)
    audio_mask[0, 1] = False  # one frame without audio
    context_mask = torch.tensor([[True, True], [False, True]])
    return dict(
        x=r(B, Fr, C, H, W), sigma=torch.rand(B, generator=g), tau=torch.rand(B, Fr, generator=g) * 0.8 + 0.1,
        z0=r(B, C, H, W), z1=r(B, C, H, W), valid=valid, diff=r(B),
        text=r(B, 5, cfg.text_dim), text_mask=text_mask,
        image=r(B, 1, C, H, W), image_mask=torch.tensor([[True], [False]]),
        audio=r(B, Fr, cfg.audio_tokens, cfg.audio_mels), audio_mask=audio_mask,
        context=r(B, 2, C, H, W), context_tau=torch.tensor([[-1.0, 2.0], [-0.5, 1.5]]), context_mask=context_mask,
    )


def _engine(model):
    rt = RuntimeConfig(steps=3, solver="unipc", text_scale=3.0, audio_scale=2.0)  # K = 3 guidance passes
    return Engine(model, rt, torch.device("cpu"), torch.float32)


def _jobs(B):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    C, h, w = TINY.latent_channels, 10, 14
    jobs = [
        DenoiseJob(key=i, lat0=r(C, h, w), lat1=r(C, h, w), diff=r(()), taus=[0.25, 0.5, 0.75],
                   audio=r(3, TINY.audio_tokens, TINY.audio_mels), context=[(r(C, h, w), -1.0), (None, 2.0)])
        for i in range(B)
    ]
    text_mask = torch.tensor([[True, True, True, False, False]])
    return jobs, Conditions(text=r(1, 5, TINY.text_dim), text_mask=text_mask, image=r(1, 1, C, h, w))


def _guided_call(eng, B):
    """The engine's K*B-row denoiser inputs for one step: (x, sigma, kwargs)."""
    jobs, cond = _jobs(B)
    kw = Engine._tile_for_cfg(eng._inputs(jobs, cond, *HW), B, ["text", "audio"])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3 * B, 3, TINY.latent_channels, 10, 14, generator=g)
    return x, torch.full((3 * B,), 0.7), kw


def _latents(n=3):
    return torch.randn(n, TINY.latent_channels, 10, 14, generator=torch.Generator().manual_seed(9))


# ------------------------------------------------------------------------------------- per-rank scenarios


@torch.no_grad()
def _scenario_two(rank, world):
    res = {}
    # sequence parallel over both ranks: odd (5x7) and even (4x4) tokens per frame, fp32 and bf16
    mesh = parallel.make_mesh(1, 2)
    dit = _dit(TINY)
    parallel.enable_sequence_parallel(dit, mesh.sp_group)
    for h, w in ((5, 7), (4, 4)):
        res[f"sp_{h}x{w}"] = dit(**_dit_inputs(TINY, h, w))
    res["sp_bf16"] = dit.to(torch.bfloat16)(**_dit_inputs(TINY, 5, 7))
    try:
        parallel.enable_sequence_parallel(_dit(TINY3), mesh.sp_group)
    except BBFInputError as e:
        res["heads_error"] = str(e)
    # CFG parallel: K=3 passes x B=1 interval = 3 rows over 2 ranks; VAE decode of 3 frames over 2 ranks
    model = _model()
    hooks = parallelize(model, parallel.make_mesh(2, 1))
    eng = _engine(model)
    x, sigma, kw = _guided_call(eng, 1)
    res["cfg_velocity"] = model.dit(x, sigma, **kw)
    jobs, cond = _jobs(1)
    res["cfg_sample"] = torch.stack(eng.run(jobs, cond, *HW))
    res["vae_float"] = model.vae.decode_frames(_latents())
    res["vae_uint8"] = torch.from_numpy(eng.decode(_latents(), *HW))
    fused = _model(fusion=8)
    parallelize(fused, parallel.make_mesh(2, 1))
    res["vae_fused"] = fused.vae.decode_frames(_latents(), *_bounds())
    try:
        model.dit(x, sigma, **dict(kw, text=kw["text"][:1]))
    except BBFInputError as e:
        res["batch_error"] = str(e)
    hooks.remove()
    res["removed"] = model.dit(x, sigma, **kw)
    return res


@torch.no_grad()
def _scenario_four(rank, world):
    res = {}
    mesh = parallel.make_mesh(1, 4)
    dit = _dit(TINY4)
    parallel.enable_sequence_parallel(dit, mesh.sp_group)
    for h, w in ((5, 7), (3, 3)):  # 3x3 over 4: slices of 3, 3, 3 and 0 real tokens
        res[f"sp_{h}x{w}"] = dit(**_dit_inputs(TINY4, h, w))
    # a grid over some of the ranks (as the benchmark builds its 1, 2 and 4 GPU runs): ranks 2, 3 only
    sub = parallel.make_mesh(1, 2, ranks=[2, 3])
    res["sub_mesh"] = sub is not None
    if sub is not None:
        dit = _dit(TINY)
        parallel.enable_sequence_parallel(dit, sub.sp_group)
        res["sub_sp"] = dit(**_dit_inputs(TINY, 5, 7))
    # sequence parallel 2 x CFG parallel 2: 3 passes x 2 intervals = 6 rows, 3 per CFG rank
    model = _model()
    parallelize(model, parallel.make_mesh(2, 2))
    eng = _engine(model)
    x, sigma, kw = _guided_call(eng, 2)
    res["velocity"] = model.dit(x, sigma, **kw)
    jobs, cond = _jobs(2)
    res["sample"] = torch.stack(eng.run(jobs, cond, *HW))
    res["vae_float"] = model.vae.decode_frames(_latents())  # 3 frames over 4 ranks
    return res


_SCENARIOS = {"two": _scenario_two, "four": _scenario_four}


def _worker(rank, world, port, scenario, out_dir):
    torch.set_num_threads(1)  # 2 to 4 processes share the CI machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        res = _SCENARIOS[scenario](rank, world)
    finally:
        dist.destroy_process_group()
    torch.save(res, os.path.join(out_dir, f"{scenario}-{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, scenario, out_dir):
    mp.spawn(_worker, args=(world, _free_port(), scenario, str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"{scenario}-{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _launch(2, "two", tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _launch(4, "four", tmp_path_factory.mktemp("four"))


def _close(got, want):
    """fp32 on the CPU: the shards differ from one process only by summation order (softmax over keys in
    another order, matmuls over fewer rows), i.e. a few fp32 ulps of the activations."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- tests


@torch.no_grad()
@pytest.mark.parametrize("hw", [(5, 7), (4, 4)])
def test_sequence_parallel_2_ranks_equals_one_process(two, hw):
    want = _dit(TINY)(**_dit_inputs(TINY, *hw))
    for rank, res in enumerate(two):  # every rank holds the whole velocity
        _close(res[f"sp_{hw[0]}x{hw[1]}"], want)


@torch.no_grad()
@pytest.mark.parametrize("hw", [(5, 7), (3, 3)])
def test_sequence_parallel_4_ranks_equals_one_process(four, hw):
    want = _dit(TINY4)(**_dit_inputs(TINY4, *hw))
    for res in four:
        _close(res[f"sp_{hw[0]}x{hw[1]}"], want)


@torch.no_grad()
def test_mesh_over_a_subset_of_ranks(four):
    want = _dit(TINY)(**_dit_inputs(TINY, 5, 7))
    assert [res["sub_mesh"] for res in four] == [False, False, True, True]
    for res in four[2:]:
        _close(res["sub_sp"], want)


@torch.no_grad()
def test_sequence_parallel_bf16_within_flash_attention_rule(two):
    """bf16 shards vs an fp32 oracle: error at most 2x that of the plain single-process bf16 model."""
    inputs = _dit_inputs(TINY, 5, 7)
    dit = _dit(TINY)
    oracle = dit(**inputs)
    plain = (dit.to(torch.bfloat16)(**inputs) - oracle).abs().max().item()
    assert plain > 0  # bf16 does round: the rule compares two non-trivial errors
    for res in two:
        assert (res["sp_bf16"] - oracle).abs().max().item() <= 2 * plain


@torch.no_grad()
def test_cfg_parallel_2_ranks_equals_batched_guidance(two):
    """3 guidance passes split over 2 ranks (2 rows and 1 padded row): the same velocity rows and the
    same guided UniPC sample as the single-process batched call."""
    model = _model()
    eng = _engine(model)
    x, sigma, kw = _guided_call(eng, 1)
    want_v = model.dit(x, sigma, **kw)
    jobs, cond = _jobs(1)
    want = torch.stack(eng.run(jobs, cond, *HW))
    for res in two:
        _close(res["cfg_velocity"], want_v)
        _close(res["cfg_sample"], want)
        _close(res["removed"], want_v)  # hooks removed: the single-process path again


@torch.no_grad()
def test_sp_x_cfg_4_ranks_equals_one_process(four):
    model = _model()
    eng = _engine(model)
    x, sigma, kw = _guided_call(eng, 2)
    want_v = model.dit(x, sigma, **kw)
    jobs, cond = _jobs(2)
    want = torch.stack(eng.run(jobs, cond, *HW))
    for res in four:
        _close(res["velocity"], want_v)
        _close(res["sample"], want)


@torch.no_grad()
def test_vae_decode_split_by_frames_equals_whole_decode(two, four):
    model = _model()
    want = model.vae.decode_frames(_latents())
    want_u8 = torch.from_numpy(_engine(model).decode(_latents(), *HW))
    for res in two + four:
        _close(res["vae_float"], want)
    fused = _model(fusion=8).vae.decode_frames(_latents(), *_bounds())
    assert (fused - want).abs().max() > 0.05  # the head changes the frames
    for res in two:  # decoder and fusion head each split by frames: 3 frames over 2 ranks
        _close(res["vae_fused"], fused)
    for res in two:
        assert res["vae_uint8"].shape == want_u8.shape
        assert (res["vae_uint8"].int() - want_u8.int()).abs().max() <= 1  # rounding of fp32 ulps at most


def test_clear_errors(two):
    for res in two:
        assert "--sp 2 must divide the model's 3 attention heads" in res["heads_error"]
        assert "allowed degrees: [1, 3]" in res["heads_error"]
        assert "batch (3) as its first dimension" in res["batch_error"]
    with pytest.raises(BBFInputError, match=r"without --cfg-parallel --sp must equal the process count"):
        check_degrees(4, 2, cfg_parallel=False)
    with pytest.raises(BBFInputError, match=r"multiple of --sp"):
        check_degrees(4, 3, cfg_parallel=True)
    with pytest.raises(BBFInputError, match=r"neither --sp nor --cfg-parallel"):
        check_degrees(2, 1, cfg_parallel=False)
    with pytest.raises(BBFInputError, match=r"--sp 0 must be an integer >= 1"):
        check_degrees(2, 0, cfg_parallel=False)
    assert check_degrees(4, 2, cfg_parallel=True) == (2, 2)
    assert check_degrees(4, 4, cfg_parallel=False) == (1, 4)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def clip_and_ckpt(tmp_path_factory):
    from media import make_clip

    from bbf_rt.cli import main

    d = tmp_path_factory.mktemp("cli")
    make_clip(d / "clip.mp4", n_frames=4, size=(54, 38), fps=Fraction(24), audio=True)
    assert main(["init-checkpoint", "--preset", "tiny", "-o", str(d / "tiny.safetensors")]) == 0
    return d / "clip.mp4", d / "tiny.safetensors"


@pytest.mark.parametrize("flags", [["--sp", "2"], ["--cfg-parallel"], ["--sp", "2", "--cfg-parallel"]])
def test_cli_parallel_flags_without_torchrun_are_clear_errors(clip_and_ckpt, tmp_path, monkeypatch, capsys, flags):
    from bbf_rt.cli import main

    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    src, ckpt = clip_and_ckpt
    out = tmp_path / "o.mp4"
    rc = main(["interpolate", str(src), "-o", str(out), "--factor", "2", "--model", str(ckpt), "--allow-untrained",
               "--no-progress", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert rc == 2
    assert "must be launched by torchrun" in err and "torchrun --nproc-per-node" in err
    assert not out.exists()


# --crf 0: lossless H.264, so the comparison sees the two runs' frames and not the encoder's choices: at the
# default crf 16, x264 wrote bit-identical frames differently in the two runs (62 dB here, once 35 dB)
_JOB = ["--factor", "2", "--allow-untrained", "--no-progress", "--device", "cpu", "--prompt", "a square moves",
        "--text-scale", "3", "--audio-scale", "2", "--steps", "2", "--json", "--crf", "0"]


def _frames(path):
    from bbf_rt.io.video import iter_frames

    return [(t, f.astype(np.float64)) for t, f in iter_frames(str(path))]


def test_torchrun_sp2_x_cfg2_writes_the_single_process_video(clip_and_ckpt, tmp_path):
    """`bbf-rt interpolate --sp 2 --cfg-parallel` under torchrun on 4 processes: rank 0 writes the video the
    single-process run writes (35 tokens per frame over 2 SP ranks, 3 guidance passes over 2 CFG ranks)."""
    from bbf_rt.cli import main

    src, ckpt = clip_and_ckpt
    single, par = tmp_path / "single" / "out.mp4", tmp_path / "par" / "out.mp4"
    single.parent.mkdir()
    par.parent.mkdir()
    assert main(["interpolate", str(src), "-o", str(single), "--model", str(ckpt), *_JOB]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "bbf_rt.cli", "interpolate", str(src), "-o", str(par),
           "--model", str(ckpt), "--sp", "2", "--cfg-parallel", *_JOB]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # cwd away from the checkout: `-m` puts the cwd on sys.path, and the source folder `kernels/` there would
    # shadow the PyPI package `kernels` that transformers (the MiniLM text encoder) imports
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and '"ranks": 4' in reports[0] and '"sp": 2' in reports[0]  # rank 0 alone reports
    assert sorted(os.listdir(par.parent)) == ["out.mp4"]  # the other ranks left nothing next to it
    a, b = _frames(single), _frames(par)
    assert [t for t, _ in a] == [t for t, _ in b] and len(a) == 8
    for (_, fa), (_, fb) in zip(a, b):
        mse = np.mean((fa - fb) ** 2)
        psnr = 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)
        assert psnr > 45, psnr

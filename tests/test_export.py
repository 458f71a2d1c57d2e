"""Export stage on the CPU: ONNX (dynamic shapes, ONNX Runtime parity), AOTInductor (.pt2 loaded in a
fresh process without bbf_rt), the artifact cache, runtime backends and the TensorRT error.

Tiny preset with random weights (plumbing only), gates randomised so every condition branch changes
the output. Tolerance: fp32 artifacts must match eager fp32 within 1e-4 of the output's max |value|
(observed: ~3e-6; ONNX Runtime and Inductor reorder fp32 sums, nothing more), and decoded frames within
one uint8 level. fp16 ONNX artifacts follow the flash-attention rule against an fp32 eager oracle (at
most 2x the error of eager fp16). Expensive exports run once per module (fixtures) and are reused by
the backend tests.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from bbf_rt.export import ArtifactCache, export_denoiser, export_vae, load_artifact
from bbf_rt.export import api as export_api
from bbf_rt.export import cache as cache_mod
from bbf_rt.export import signature as sig
from media import make_clip

from bbf_rt.cli import main
from bbf_rt.config import (
    MODALITIES,
    ExportConfig,
    RuntimeConfig,
    get_preset,
    parse_shapes,
)
from bbf_rt.errors import BackendUnavailableError, BBFInputError
from bbf_rt.io.video import iter_frames
from bbf_rt.model import BBFModel
from bbf_rt.runtime.backends import make_backend
from bbf_rt.runtime.engine import Conditions, DenoiseJob, Engine
from models import trained_gates, within_2x

ALL = tuple(MODALITIES)
# AOTInductor is tested without the audio branch: torch.export's symbolic-shape reasoning over the
# per-frame audio attention costs ~30 s of sympy on its own (ONNX covers audio)
AOTI_SET = ("text", "image", "context")
FP16_SET = AOTI_SET  # the fp16 ONNX graph: every branch the engine test sends, and a 3x faster export than ALL
REL_TOL = 1e-4
# (batch, frames, latent height, latent width, ...): two resolutions, frame counts and batch sizes
SIZES = [
    {"batch": 2, "frames": 3, "height": 8, "width": 10, "text": 6, "image": 2, "image_height": 6, "image_width": 4, "context": 4},
    {"batch": 1, "frames": 1, "height": 4, "width": 6, "text": 1, "image": 1, "image_height": 4, "image_width": 4, "context": 1},
    {"batch": 5, "frames": 2, "height": 16, "width": 12, "text": 9, "image": 3, "image_height": 8, "image_width": 10,
     "context": 2},
]

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False


def _tiny_model(seed: int = 0) -> BBFModel:
    torch.manual_seed(seed)
    m = BBFModel(get_preset("tiny")).eval()
    trained_gates(m.dit)  # as if trained: every branch reaches the output
    return m


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ArtifactCache(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def onnx_all(model, store):
    """The ONNX denoiser with every condition branch, default (fully dynamic) profile."""
    return export_denoiser(model, ExportConfig(target="onnx", modalities=ALL), cache=store)


@pytest.fixture(scope="module")
def model16(model):
    """The model in fp16, as `bbf-rt export --precision fp16` loads it."""
    return copy.deepcopy(model).to(torch.float16)


@pytest.fixture(scope="module")
def onnx_fp16(model16, store):
    """The fp16 ONNX denoiser (text, image, context), default profile."""
    return export_denoiser(model16, ExportConfig(target="onnx", precision="fp16", modalities=FP16_SET), cache=store)


@pytest.fixture(scope="module")
def aoti_all(model, store):
    """The AOTInductor package (text, image, context), default profile (compiled once: ~40 s)."""
    return export_denoiser(model, ExportConfig(target="aoti", modalities=AOTI_SET), cache=store)


def _eager(model, modalities, inputs):
    with torch.no_grad():
        return sig.Denoiser(model.dit, modalities)(*inputs)


def _within_2x(out: torch.Tensor, low: torch.Tensor, oracle: torch.Tensor) -> tuple[float, float]:
    return within_2x(out, low, oracle, "artifact")


def _up(inputs):
    return [t.float() if t.is_floating_point() else t for t in inputs]


# ---- ONNX ----------------------------------------------------------------------------------------
def test_onnx_dynamic_shapes_match_eager(model, onnx_all):
    import onnx

    graph = onnx.load(str(onnx_all.path), load_external_data=False).graph
    x_dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert x_dims[2] == model.cfg.latent_channels and all(isinstance(d, str) and d for d in x_dims[:2] + x_dims[3:])
    assert onnx_all.manifest["build"]["inputs"] == list(sig.input_names(ALL))
    run = load_artifact(onnx_all, "cpu")
    ecfg = ExportConfig(target="onnx", modalities=ALL)
    for sizes in SIZES:
        inputs = sig.example_inputs(model.cfg, ecfg, "cpu", sizes)
        ref = _eager(model, ALL, inputs)
        out = run(*inputs)
        assert out.shape == ref.shape == (sizes["batch"], sizes["frames"], 4, sizes["height"], sizes["width"])
        assert _rel_err(out, ref) < REL_TOL, sizes


def test_onnx_torchscript_fallback_is_logged_and_static_in_frames(model, tmp_path, monkeypatch, caplog):
    real_export = torch.onnx.export

    def no_dynamo(*a, **k):
        if k.get("dynamo", True):
            raise ImportError("onnxscript is not installed (simulated)")
        return real_export(*a, **k)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    be = make_backend("onnx", model, torch.device("cpu"), torch.float32, cache=tmp_path)
    ecfg = ExportConfig(target="onnx", modalities=("text",))
    with caplog.at_level(logging.WARNING, logger="bbf_rt.export.onnx_export"):
        for sizes in (SIZES[0], dict(SIZES[0], batch=3, height=12, width=6, text=2), dict(SIZES[0], frames=1)):
            inputs = sig.example_inputs(model.cfg, ecfg, "cpu", sizes)
            kw = dict(zip(sig.input_names(("text",)), inputs))
            out = be(kw.pop("x"), kw.pop("sigma"), **kw)
            assert _rel_err(out, _eager(model, ("text",), inputs)) < REL_TOL, sizes
    warnings = [r for r in caplog.records if "falling back to the TorchScript exporter" in r.getMessage()]
    assert warnings and "onnxscript is not installed (simulated)" in warnings[0].getMessage()
    # frames=3 and frames=1 need two graphs (the TorchScript exporter bakes the frame count in)
    builds = [e.artifact.manifest["build"] for e in be.entries]
    assert [b["exporter"] for b in builds] == ["torchscript", "torchscript"]
    assert sorted(b["static_dims"]["frames"] for b in builds) == [1, 3]


def test_vae_onnx_encoder_decoder_match_eager(model, store):
    ecfg = ExportConfig(target="onnx")
    enc = load_artifact(export_vae(model, "vae_encoder", ecfg, cache=store))
    dec = load_artifact(export_vae(model, "vae_decoder", ecfg, cache=store))
    for n, H, W in ((2, 24, 40), (3, 48, 16)):
        frames = torch.rand(n, 3, H, W) * 2 - 1
        with torch.no_grad():
            lat = model.vae.encode_frames(frames)
            rec = model.vae.decode_frames(lat)
        assert _rel_err(enc(frames), lat) < REL_TOL and _rel_err(dec(lat), rec) < REL_TOL


# ---- ONNX at fp16 and bf16 -------------------------------------------------------------------------
def test_onnx_fp16_within_2x_of_eager_fp16(model, model16, onnx_fp16):
    import onnx

    graph = onnx.load(str(onnx_fp16.path), load_external_data=False).graph
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert types["x"] == types["text"] == onnx.TensorProto.FLOAT16 and types["sigma"] == onnx.TensorProto.FLOAT
    run = load_artifact(onnx_fp16, "cpu")
    ecfg = ExportConfig(target="onnx", precision="fp16", modalities=FP16_SET)
    for sizes in SIZES[:2]:  # two resolutions, 3 and 1 frames, batch 2 and 1
        inputs = sig.example_inputs(model.cfg, ecfg, "cpu", sizes)
        oracle = _eager(model, FP16_SET, _up(inputs))
        out = run(*inputs)
        assert out.dtype == torch.float16
        _within_2x(out, _eager(model16, FP16_SET, inputs), oracle)


def test_vae_onnx_fp16_within_2x_of_eager_fp16(model, model16, store):
    ecfg = ExportConfig(target="onnx", precision="fp16")
    enc = load_artifact(export_vae(model16, "vae_encoder", ecfg, cache=store))
    dec = load_artifact(export_vae(model16, "vae_decoder", ecfg, cache=store))
    for n, H, W in ((2, 24, 40), (3, 48, 16)):
        frames = (torch.rand(n, 3, H, W) * 2 - 1).half()
        with torch.no_grad():
            lat = model.vae.encode_frames(frames.float())
            rec = model.vae.decode_frames(lat)
            lat16, rec16 = model16.vae.encode_frames(frames), model16.vae.decode_frames(lat.half())
        _within_2x(enc(frames), lat16, lat)
        _within_2x(dec(lat.half()), rec16, rec)


def test_onnx_bf16_fails_clearly_and_names_fp16(model, tmp_path, caplog):
    """ONNX Runtime (1.32) has no CPU bf16 kernels for the graph: exporting warns, running raises
    BackendUnavailableError naming the op and --precision fp16; the bf16 VAE is refused before export
    (opset 18 Conv has no bf16); an engine asking the onnx backend for bf16 gets an fp16 artifact."""
    with caplog.at_level(logging.WARNING, logger="bbf_rt.export.api"):
        art = export_denoiser(model, ExportConfig(target="onnx", precision="bf16", modalities=()), cache=tmp_path)
    assert any("export --precision fp16" in r.getMessage() for r in caplog.records)
    with pytest.raises(BackendUnavailableError, match=r"cannot run the bf16 graph .*NOT_IMPLEMENTED.*--precision fp16"):
        load_artifact(art, "cpu")
    with pytest.raises(BBFInputError, match=r"opset 18.*--precision fp16"):
        export_vae(model, "vae_decoder", ExportConfig(target="onnx", precision="bf16"), cache=tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bbf_rt.runtime.backends"):
        be = make_backend("onnx", model, torch.device("cpu"), torch.bfloat16, cache=tmp_path)
    assert be.precision == "fp16" and any("fp16 artifact" in r.getMessage() for r in caplog.records)


# ---- AOTInductor ---------------------------------------------------------------------------------
_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    run = torch._inductor.aoti_load_package(sys.argv[1])
    for path in sys.argv[2:]:
        d = load_file(path)
        save_file({"v": run(*[d[str(i)] for i in range(len(d))]).contiguous()}, path + ".out")
    print(json.dumps(sorted(m for m in sys.modules if m.startswith("bbf_rt"))))
    """
)


def test_aoti_package_runs_in_a_fresh_process_without_bbf_rt(model, aoti_all, tmp_path):
    from safetensors.torch import load_file, save_file

    assert aoti_all.path.suffix == ".pt2" and aoti_all.manifest["build"]["ops"] == "reference"
    ecfg = ExportConfig(target="aoti", modalities=AOTI_SET)
    files, refs = [], []
    for i, sizes in enumerate(SIZES):
        inputs = sig.example_inputs(model.cfg, ecfg, "cpu", sizes)
        refs.append(_eager(model, AOTI_SET, inputs))
        files.append(str(tmp_path / f"in{i}.safetensors"))
        save_file({str(j): t.contiguous() for j, t in enumerate(inputs)}, files[-1])
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(aoti_all.path), *files], check=False, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # no bbf_rt module was imported
    for f, ref in zip(files, refs):
        out = load_file(f + ".out")["v"]
        assert out.shape == ref.shape and _rel_err(out, ref) < REL_TOL


# ---- backends in the engine ----------------------------------------------------------------------
def _engine_run(model, backend, store, audio=True, dtype=torch.float32):
    rt = RuntimeConfig(steps=2, text_scale=2.0)  # two CFG passes: the text mask is all False in one
    den = make_backend(backend, model, torch.device("cpu"), dtype, cache=store.root)
    eng = Engine(model, rt, torch.device("cpu"), dtype, denoiser=den)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(4, 24, 40, 3), dtype=np.uint8)
    pix = eng.to_pixels(frames)
    lat = eng.encode(pix)
    g = torch.Generator().manual_seed(1)
    cond = Conditions(text=torch.randn(1, 5, model.cfg.text_dim, generator=g), text_mask=torch.ones(1, 5, dtype=torch.bool),
                      image=lat[3:4][None])
    jobs = [
        DenoiseJob(key=i, lat0=lat[i], lat1=lat[i + 1], diff=eng.difference(pix[i : i + 1], pix[i + 1 : i + 2])[0],
                   taus=[0.3, 0.7], audio=torch.randn(2, model.cfg.audio_tokens, model.cfg.audio_mels, generator=g) if audio else None,
                   context=[(lat[i + 2], 2.0), (None, -1.0)])
        for i in range(2)
    ]
    out = torch.stack(eng.run(jobs, cond, 24, 40))
    return out, eng.decode(out.flatten(0, 1), 24, 40), den


@pytest.mark.parametrize("backend", ["onnx", "aoti"])
def test_backend_in_engine_matches_eager(model, store, onnx_all, aoti_all, backend):
    audio = backend == "onnx"  # the module's artifacts: ONNX has every branch, AOTI all but audio
    ref_lat, ref_frames, _ = _engine_run(model, "eager", store, audio)
    lat, frames, den = _engine_run(model, backend, store, audio)
    assert _rel_err(lat, ref_lat) < REL_TOL
    assert np.abs(frames.astype(int) - ref_frames.astype(int)).max() <= 1
    # the module's artifact was found in the cache, not rebuilt (the key does not depend on call shapes)
    desc = den.describe()
    assert [a["reused"] for a in desc["artifacts"]] == [True]
    assert desc["artifacts"][0]["path"] == str((onnx_all if backend == "onnx" else aoti_all).path)


def test_backend_onnx_fp16_in_engine_within_2x_of_eager_fp16(model, model16, store, onnx_fp16):
    """The engine at fp16 with the onnx backend: latents vs the fp32 engine within the 2x rule of the eager
    fp16 engine; decoded frames (same fp16 VAE) no further from the fp32 ones than 2x eager fp16's + 1 level."""
    ref_lat, ref_frames, _ = _engine_run(model, "eager", store, audio=False)
    low_lat, low_frames, _ = _engine_run(model16, "eager", store, audio=False, dtype=torch.float16)
    lat, frames, den = _engine_run(model16, "onnx", store, audio=False, dtype=torch.float16)
    _within_2x(lat, low_lat, ref_lat)
    level = np.abs(frames.astype(int) - ref_frames.astype(int)).max()
    assert level <= 2 * np.abs(low_frames.astype(int) - ref_frames.astype(int)).max() + 1
    desc = den.describe()
    assert desc["precision"] == "fp16" and [a["reused"] for a in desc["artifacts"]] == [True]
    assert desc["artifacts"][0]["path"] == str(onnx_fp16.path)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_cli_interpolate_backend_onnx_matches_eager(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BBF_RT_CACHE", str(tmp_path / "cache"))
    ckpt, src = tmp_path / "tiny.safetensors", tmp_path / "clip.mp4"
    assert main(["init-checkpoint", "--preset", "tiny", "-o", str(ckpt)]) == 0
    make_clip(src, n_frames=6, size=(64, 48), fps=Fraction(24), audio=False)
    reports = {}
    for backend in ("eager", "onnx", "onnx"):
        out = tmp_path / f"{backend}.mp4"
        capsys.readouterr()
        args = ["interpolate", str(src), "-o", str(out), "--factor", "2", "--model", str(ckpt), "--allow-untrained",
                "--no-progress", "--json", "--backend", backend]
        assert main(args) == 0
        reports.setdefault(backend, []).append(json.loads(capsys.readouterr().out))
    eager = [f for _, f in iter_frames(tmp_path / "eager.mp4")]
    onnx_frames = [f for _, f in iter_frames(tmp_path / "onnx.mp4")]
    assert len(eager) == len(onnx_frames) == 12
    assert min(_psnr(a, b) for a, b in zip(eager, onnx_frames)) >= 40.0
    first, second = (r["backend"] for r in reports["onnx"])
    assert first["name"] == "onnx" and [a["reused"] for a in first["artifacts"]] == [False]
    assert [a["reused"] for a in second["artifacts"]] == [True]
    assert first["artifacts"][0]["path"].startswith(str(tmp_path / "cache"))


# ---- the cache -----------------------------------------------------------------------------------
def test_cache_key_changes_with_every_input_and_nothing_else(model, monkeypatch):
    dit, cpu = model.dit, torch.device("cpu")
    w = cache_mod.weights_sha256(dit)
    ecfg = ExportConfig(target="aoti", modalities=("text",))
    base = export_api.denoiser_key(dit, ecfg, cpu, w)
    assert export_api.denoiser_key(dit, ExportConfig(target="aoti", modalities=("text", "text")), cpu, w) == base
    assert cache_mod.weights_sha256(copy.deepcopy(dit)) == w
    other_dit = copy.deepcopy(dit)
    with torch.no_grad():
        other_dit.head.bias[0] += 1e-3
    variants = {
        "model config": export_api.denoiser_key(BBFModel(dataclasses.replace(dit.cfg, rope_theta=5000.0)).dit, ecfg, cpu, w),
        "condition set": export_api.denoiser_key(dit, ecfg.replace(modalities=("text", "audio")), cpu, w),
        "shape profile": export_api.denoiser_key(dit, ecfg.with_dims(batch=(1, 4, 65)), cpu, w),
        "precision": export_api.denoiser_key(dit, ecfg.replace(precision="bf16"), cpu, w),
        "weights": export_api.denoiser_key(other_dit, ecfg, cpu),
        "target": export_api.denoiser_key(dit, ecfg.replace(target="onnx"), cpu, w),
    }
    real_versions = cache_mod.versions()
    for lib in ("torch", "onnx", "onnxruntime", "tensorrt"):
        monkeypatch.setattr(cache_mod, "versions", lambda lib=lib: {**real_versions, lib: "0.0.0-other"})
        variants[f"{lib} version"] = export_api.denoiser_key(dit, ecfg, cpu, w)
    monkeypatch.setattr(cache_mod, "versions", lambda: real_versions)
    monkeypatch.setattr(export_api, "device_info", lambda d: {"name": "NVIDIA H100 80GB HBM3", "capability": "sm_90"})
    variants["device"] = export_api.denoiser_key(dit, ecfg, torch.device("cuda"), w)
    names = {k: cache_mod.artifact_name(v) for k, v in variants.items()}
    for what, key in variants.items():
        assert key != base, what
        assert names[what] != cache_mod.artifact_name(base), what
    assert len(set(names.values())) == len(names)
    # ONNX graphs are portable: the device does not change their key
    onnx_cfg = ecfg.replace(target="onnx")
    assert export_api.denoiser_key(dit, onnx_cfg, torch.device("cuda"), w) == export_api.denoiser_key(dit, onnx_cfg, cpu, w)


def _fake_build(calls: list, payload: bytes = b"x" * 1000):
    def build(path):
        calls.append(path.name)
        path.write_bytes(payload)
        (path.parent / (path.name + ".data")).write_bytes(payload[::-1])
        return {"exporter": "fake"}

    return build


def test_cache_reuses_rebuilds_mismatch_and_corruption(tmp_path, caplog):
    store = ArtifactCache(tmp_path)
    key = {"part": "dit", "target": "onnx", "precision": "fp32", "model_config": {"name": "tiny"}, "condition_set": []}
    calls: list = []
    a = store.get_or_build(key, ".onnx", _fake_build(calls))
    assert not a.reused and a.path.read_bytes() == b"x" * 1000 and a.manifest_path.is_file()
    assert set(a.manifest["files"]) == {a.path.name, a.path.name + ".data"}
    assert store.get_or_build(key, ".onnx", _fake_build(calls)).reused and len(calls) == 1
    other = store.get_or_build({**key, "precision": "fp16"}, ".onnx", _fake_build(calls))
    assert not other.reused and other.path != a.path and len(calls) == 2

    def damage(how):
        data = a.path.read_bytes()
        if how == "flip":  # same size, one byte changed
            a.path.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
        elif how == "truncate":
            a.path.write_bytes(data[:500])
        elif how == "sidecar":
            (a.path.parent / (a.path.name + ".data")).unlink()
        else:  # a manifest written for another key under this name
            m = json.loads(a.manifest_path.read_text())
            m["key"]["precision"] = "bf16"
            a.manifest_path.write_text(json.dumps(m))

    for how, reason in (("flip", "checksum"), ("truncate", "truncated"), ("sidecar", "missing"), ("manifest", "different key")):
        damage(how)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bbf_rt.export.cache"):
            again = store.get_or_build(key, ".onnx", _fake_build(calls))
        assert not again.reused and again.path.read_bytes() == b"x" * 1000, how
        assert any(reason in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records), how
        assert store.get_or_build(key, ".onnx", _fake_build(calls)).reused
    assert len(calls) == 6

    def broken(path):
        path.write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        store.get_or_build({**key, "precision": "bf16"}, ".onnx", broken)
    assert not [p for p in tmp_path.iterdir() if "bf16" in p.name and not p.name.endswith(".lock")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_corrupted_real_artifact_is_rebuilt_and_runs(model, tmp_path):
    ecfg = ExportConfig(target="onnx", shapes=parse_shapes("batch=1:2:4,height=16:32:64,width=16:32:64"))
    first = export_vae(model, "vae_decoder", ecfg, cache=tmp_path)
    data = bytearray(first.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.path.write_bytes(bytes(data))
    again = export_vae(model, "vae_decoder", ecfg, cache=tmp_path)
    assert not again.reused and again.path == first.path
    lat = torch.randn(2, 4, 6, 10)
    with torch.no_grad():
        assert _rel_err(load_artifact(again)(lat), model.vae.decode_frames(lat)) < REL_TOL


# ---- TensorRT and bad input ----------------------------------------------------------------------
@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; this tests the message where it is absent")
def test_tensorrt_absent_is_a_clear_error(model, tmp_path, capsys):
    out = tmp_path / "trt"
    assert main(["export", "--model", "tiny", "--target", "tensorrt", "--precision", "fp16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "--target onnx" in err
    assert not out.exists()  # nothing was exported before the check
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        export_denoiser(model, ExportConfig(target="tensorrt"), cache=out)
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        make_backend("tensorrt", model, torch.device("cpu"), torch.float32)


def test_cli_export_onnx_prints_artifact_and_manifest(tmp_path, capsys):
    out = tmp_path / "art"
    args = ["export", "--model", "tiny", "--target", "onnx", "--modalities", "text", "--shapes", "batch=1:2:4", "--vae",
            "--out", str(out), "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["manifest"]["key"]["part"] for r in rows] == ["dit", "vae_encoder", "vae_decoder"]
    assert [r["manifest"]["build"]["exporter"] for r in rows] == ["dynamo"] * 3
    dit = rows[0]
    assert dit["manifest"]["key"]["condition_set"] == ["text"] and dit["manifest"]["key"]["shapes"][0] == ["batch", 1, 2, 4]
    assert json.loads(Path(dit["manifest_path"]).read_text()) == dit["manifest"]
    assert dit["manifest"]["files"][Path(dit["path"]).name]["sha256"] == cache_mod.file_sha256(Path(dit["path"]))


def test_bad_export_requests_name_the_problem(model, tmp_path):
    with pytest.raises(BBFInputError, match="multiple of 8"):
        export_denoiser(model, ExportConfig(shapes=parse_shapes("height=20")), cache=tmp_path)
    with pytest.raises(BBFInputError, match="not one of"):
        ExportConfig(target="tflite")
    with pytest.raises(BBFInputError, match="--shapes item"):
        parse_shapes("batch=1:2")
    with pytest.raises(BBFInputError, match="min <= opt <= max"):
        ExportConfig(shapes=(("batch", 4, 2, 8),))
    assert main(["export", "--model", "tiny", "--target", "aoti", "--vae", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):  # argparse rejects an unknown backend before any work
        main(["interpolate", "x.mp4", "-o", "y.mp4", "--factor", "2", "--backend", "nope"])

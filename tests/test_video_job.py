"""`bbf-rt interpolate` end to end on clips made here with PyAV (tiny preset, random weights)."""
from __future__ import annotations

import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest
from media import make_clip

from bbf_rt.cli import main
from bbf_rt.io.video import iter_frames, probe


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    assert main(["init-checkpoint", "--preset", "tiny", "-o", str(path)]) == 0
    return str(path)


def _run(*args) -> int:
    return main(["interpolate", *map(str, args), "--allow-untrained", "--no-progress"])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _audio_samples(path: str) -> tuple[np.ndarray, int]:
    with av.open(path) as c:
        frames = [f.to_ndarray() for f in c.decode(audio=0)]
        sr = c.streams.audio[0].sample_rate
    return np.concatenate(frames, axis=-1), sr


def test_factor_2_frames_timestamps_and_audio(tmp_path, ckpt):
    src, out = tmp_path / "clip.mp4", tmp_path / "out.mp4"
    make_clip(src, n_frames=10, size=(64, 48), fps=Fraction(24), audio=True)
    assert _run(src, "-o", out, "--factor", 2, "--model", ckpt, "--batch", 3) == 0
    info_in, info_out = probe(src), probe(out)
    assert info_out.n_frames == 20 and info_out.fps == 48
    assert (info_out.width, info_out.height) == (64, 48)
    got = list(iter_frames(out))
    assert [t for t, _ in got] == [Fraction(k, 48) for k in range(20)]
    # every input frame is kept, at its own time
    src_frames = [f for _, f in iter_frames(src)]
    for i, f in enumerate(src_frames):
        assert _psnr(got[2 * i][1], f) > 30, i
    # the soundtrack is copied unchanged: same samples, same duration
    a_in, sr_in = _audio_samples(str(src))
    a_out, sr_out = _audio_samples(str(out))
    assert sr_in == sr_out and a_in.shape == a_out.shape and np.array_equal(a_in, a_out)
    assert abs(info_out.duration_s - info_in.duration_s) < 1 / 48
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_crf_trades_size_for_fidelity(tmp_path, ckpt):
    """--crf 0 (lossless H.264) keeps the input frames closer and writes a larger file than --crf 40."""
    src = tmp_path / "clip.mp4"
    make_clip(src, n_frames=4, size=(64, 48), fps=Fraction(24), audio=False)
    src_frames = [f for _, f in iter_frames(src)]
    psnr, size = {}, {}
    for crf in (0, 40):
        out = tmp_path / f"crf{crf}.mp4"
        assert _run(src, "-o", out, "--factor", 2, "--model", ckpt, "--crf", crf) == 0
        got = [f for _, f in iter_frames(out)]
        psnr[crf] = min(_psnr(got[2 * i], f) for i, f in enumerate(src_frames))
        size[crf] = out.stat().st_size
    assert psnr[0] > psnr[40] + 5 and size[0] > size[40], (psnr, size)


def test_rational_factor_and_target_fps(tmp_path, ckpt):
    src = tmp_path / "clip.mp4"
    make_clip(src, n_frames=8, size=(48, 32), fps=Fraction(24), audio=False)
    assert _run(src, "-o", tmp_path / "a.mp4", "--factor", "5/2", "--model", ckpt) == 0
    assert probe(tmp_path / "a.mp4").n_frames == 20 and probe(tmp_path / "a.mp4").fps == 60
    assert _run(src, "-o", tmp_path / "b.mkv", "--fps", 60, "--model", ckpt, "--steps", 1) == 0
    assert probe(tmp_path / "b.mkv").n_frames == 20


def test_scene_cut_repeats_a_frame_instead_of_morphing(tmp_path, ckpt):
    src, out = tmp_path / "cut.mp4", tmp_path / "out.mp4"
    make_clip(src, n_frames=8, size=(64, 48), audio=False, cut_at=4)
    assert main(["interpolate", str(src), "-o", str(out), "--factor", "2", "--model", ckpt, "--allow-untrained", "--no-progress", "--json"]) == 0
    src_frames = [f for _, f in iter_frames(src)]
    got = [f for _, f in iter_frames(out)]
    # interval (3, 4) is the cut; its middle frame (tau = 1/2) repeats frame 4, the nearest in time
    assert _psnr(got[7], src_frames[4]) > 30
    assert _psnr(got[7], src_frames[3]) < 20
    # a normal interval is generated (random weights: not a copy of either boundary)
    assert _psnr(got[3], src_frames[1]) < 30 and _psnr(got[3], src_frames[2]) < 30


def test_untrained_model_refused_without_flag(tmp_path, ckpt, capsys):
    src = tmp_path / "clip.mp4"
    make_clip(src, n_frames=4, audio=False)
    assert main(["interpolate", str(src), "-o", str(tmp_path / "o.mp4"), "--factor", "2", "--model", ckpt]) == 2
    assert "untrained" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    make_clip(d / "ok.mp4", n_frames=4, audio=False)
    make_clip(d / "one.mp4", n_frames=1, audio=False)
    (d / "text.mp4").write_text("this is not a video")
    data = (d / "ok.mp4").read_bytes()
    (d / "cut.mp4").write_bytes(data[: len(data) // 3])
    with av.open(str(d / "audio.m4a"), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        fr.sample_rate = 16000
        for p in s.encode(fr):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return d


@pytest.mark.parametrize(
    "src, extra, message",
    [
        ("missing.mp4", ["--factor", "2"], "does not exist"),
        ("text.mp4", ["--factor", "2"], "text.mp4"),
        ("cut.mp4", ["--factor", "2"], "cut.mp4"),
        ("audio.m4a", ["--factor", "2"], "no video stream"),
        ("one.mp4", ["--factor", "2"], "at least 2"),
        ("ok.mp4", ["--factor", "2", "--audio", "on"], "no audio stream"),
        ("ok.mp4", ["--factor", "0"], "factor"),
        ("ok.mp4", ["--factor", "1/2"], "factor"),
        ("ok.mp4", ["--factor", "64"], "at most 32"),
        ("ok.mp4", ["--fps", "10"], "below the input"),
        ("ok.mp4", ["--factor", "2", "--steps", "0"], "--steps"),
        ("ok.mp4", ["--factor", "2", "--batch", "0"], "--batch"),
        ("ok.mp4", ["--factor", "2", "--audio", "nofile.wav"], "nofile.wav"),
        ("ok.mp4", ["--factor", "2", "--model", "nope"], "unknown model preset"),
        ("ok.mp4", ["--factor", "2", "--reference", "nothere.png"], "nothere.png"),
        ("ok.mp4", ["--factor", "2", "--crf", "52"], "--crf"),
    ],
)
def test_bad_input_clear_error_and_nothing_written(clips, ckpt, tmp_path, capsys, src, extra, message):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous content")
    args = ["interpolate", str(clips / src), "-o", str(out)] + extra
    if "--model" not in extra:
        args += ["--model", ckpt]
    rc = main(args + ["--allow-untrained", "--no-progress"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert out.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_bad_output_paths(clips, ckpt, tmp_path, capsys):
    ok = str(clips / "ok.mp4")
    assert _run(ok, "-o", tmp_path / "out.gif", "--factor", 2, "--model", ckpt) == 2
    assert "extension" in capsys.readouterr().err
    assert _run(ok, "-o", tmp_path / "no" / "out.mp4", "--factor", 2, "--model", ckpt) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run(ok, "-o", ok, "--factor", 2, "--model", ckpt) == 2
    assert "is the input" in capsys.readouterr().err


def test_failure_midway_leaves_nothing(tmp_path, ckpt, monkeypatch):
    from bbf_rt.runtime import engine

    src, out = tmp_path / "clip.mp4", tmp_path / "out.mp4"
    make_clip(src, n_frames=8, audio=True)
    out.write_bytes(b"keep me")
    calls = {"n": 0}
    real = engine.Engine.run

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated GPU failure")
        return real(self, *a, **k)

    monkeypatch.setattr(engine.Engine, "run", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        _run(src, "-o", out, "--factor", 2, "--model", ckpt, "--batch", 2)
    assert out.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "out.mp4"]


def test_odd_frame_size_is_padded_and_cropped_back(tmp_path, ckpt):
    src, out = tmp_path / "odd.mkv", tmp_path / "odd_out.mkv"
    make_clip(src, n_frames=4, size=(45, 31), audio=False, codec="ffv1", pix_fmt="yuv444p")
    assert _run(src, "-o", out, "--factor", 3, "--model", ckpt, "--context", 0) == 0
    info = probe(out)
    assert (info.width, info.height, info.n_frames) == (45, 31, 12)


def test_prompt_reference_and_external_audio_guidance(tmp_path, ckpt, capsys):
    src, out = tmp_path / "clip.mp4", tmp_path / "out.mp4"
    frames, _ = make_clip(src, n_frames=4, size=(48, 32), audio=False)
    ref = tmp_path / "ref.png"
    with av.open(str(ref), "w") as c:  # a PNG written by PyAV's image encoder
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 48, 32, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(frames[1], format="rgb24")):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    make_clip(tmp_path / "sound.mkv", n_frames=4, size=(48, 32), audio=True)
    args = ["interpolate", str(src), "-o", str(out), "--factor", "2", "--model", ckpt, "--allow-untrained",
            "--no-progress", "--json", "--prompt", "the square moves right", "--reference", str(ref),
            "--audio", str(tmp_path / "sound.mkv"), "--text-scale", "2"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text_guidance"] and report["audio_guidance"] and report["interpolated"] == 3
    assert probe(out).n_frames == 8 and not probe(out).has_audio  # guidance audio is not muxed in


def test_unknown_solver_fails_before_any_work(clips, ckpt, tmp_path, capsys):
    assert _run(clips / "ok.mp4", "-o", tmp_path / "o.mp4", "--factor", 2, "--model", ckpt, "--solver", "rk4") == 2
    assert "solver='rk4' is not one of" in capsys.readouterr().err

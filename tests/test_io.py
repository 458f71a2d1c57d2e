"""bbf_rt.io: probe, iter_frames, read_audio, VideoWriter and scene cuts on real (tiny) encoded clips."""
from __future__ import annotations

import logging
import os
from fractions import Fraction
from fractions import Fraction as F

import av
import numpy as np
import pytest
from media import make_clip

from bbf_rt.errors import BBFInputError
from bbf_rt.io import (SceneCuts, VideoWriter, check_frame_size, is_scene_cut, iter_frames, probe, read_audio,
                       scene_cut_score)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def leftovers(directory) -> list[str]:
    """Hidden temporary files VideoWriter may have left behind."""
    return [n for n in os.listdir(directory) if ".tmp-" in n]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    frames, audio = make_clip(path)
    return str(path), frames, audio


def decoded_audio(path: str) -> np.ndarray:
    """All decoded samples of the first audio stream at the native rate, (S * channels,)."""
    with av.open(path) as c:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])


# ---------------------------------------------------------------- probe / iter_frames

def test_probe_reports_the_clip(clip):
    path, frames, _ = clip
    info = probe(path)
    assert (info.width, info.height) == (64, 48)
    assert info.fps == Fraction(24) and isinstance(info.fps, Fraction)
    assert info.n_frames == len(frames) == 12
    assert info.duration_s == pytest.approx(0.5)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert info.has_audio and info.audio_sample_rate == 48000 and info.audio_channels == 1


def test_iter_frames_match_what_was_written(clip):
    path, frames, _ = clip
    got = list(iter_frames(path))
    assert len(got) == len(frames)
    assert [t for t, _ in got] == [Fraction(k, 24) for k in range(12)]
    for (t, img), ref in zip(got, frames):
        assert isinstance(t, Fraction)
        assert img.shape == (48, 64, 3) and img.dtype == np.uint8
        assert psnr(img, ref) > 30


def test_iter_frames_variable_frame_rate(tmp_path):
    times = [Fraction(x, 100) for x in (0, 4, 8, 10, 20, 25, 30, 40, 45, 50, 60, 70)]
    make_clip(tmp_path / "vfr.mp4", frame_times=times, audio=False)
    assert [t for t, _ in iter_frames(tmp_path / "vfr.mp4")] == times


def test_probe_counts_frames_the_container_does_not_declare(tmp_path):
    path = tmp_path / "clip.mkv"
    make_clip(path, n_frames=9)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # Matroska has no frame count: probe must count
    info = probe(path)
    assert info.n_frames == 9 and info.duration_s == pytest.approx(9 / 24)


@pytest.mark.parametrize("pix_fmt", ["gray", "yuv444p", "bgr0"])
def test_unusual_pixel_formats_decode_to_rgb(tmp_path, pix_fmt):
    path = tmp_path / f"{pix_fmt}.mkv"
    frames, _ = make_clip(path, n_frames=4, codec="ffv1", pix_fmt=pix_fmt, audio=False)
    info = probe(path)
    assert info.pix_fmt == pix_fmt and info.codec == "ffv1"
    got = np.stack([img for _, img in iter_frames(path)])
    assert got.shape == frames.shape and got.dtype == np.uint8
    if pix_fmt == "bgr0":
        np.testing.assert_array_equal(got, frames)  # lossless and RGB all the way
    elif pix_fmt == "yuv444p":
        assert psnr(got, frames) > 40
    else:
        assert np.ptp(got.astype(int), axis=-1).max() <= 1  # grey: R = G = B
        luma = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        assert np.abs(got[..., 0] - luma).mean() < 3


def test_truncated_end_decodes_the_frames_that_exist(tmp_path, caplog):
    path = tmp_path / "fs.mp4"
    make_clip(path, n_frames=48, faststart=True)  # index first: half a file still opens
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="bbf_rt.io.video"):
        info = probe(cut)
        frames = list(iter_frames(cut))
    assert 2 <= info.n_frames < 48
    assert len(frames) == info.n_frames
    assert "truncated" in caplog.text


# ---------------------------------------------------------------- bad inputs

def test_missing_file(tmp_path):
    with pytest.raises(BBFInputError, match="does not exist"):
        probe(tmp_path / "nope.mp4")
    with pytest.raises(BBFInputError, match="does not exist"):
        next(iter_frames(tmp_path / "nope.mp4"))


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    with pytest.raises(BBFInputError, match="not a readable media file"):
        probe(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(BBFInputError, match="empty"):
        probe(path)


def test_mp4_cut_in_half_without_index(clip, tmp_path):
    data = open(clip[0], "rb").read()
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BBFInputError, match="moov"):
        probe(path)


def test_audio_only_file(tmp_path):
    path = tmp_path / "tone.m4a"
    make_clip(path, n_frames=0)
    with pytest.raises(BBFInputError, match="no video stream"):
        probe(path)
    assert len(read_audio(path)) == 8000  # still readable as audio: half a second at 16 kHz


def test_one_frame_video(tmp_path):
    path = tmp_path / "one.mp4"
    make_clip(path, n_frames=1)
    with pytest.raises(BBFInputError, match="1 decodable video frame"):
        probe(path)


def test_too_small_video(tmp_path):
    path = tmp_path / "tiny.mkv"
    make_clip(path, n_frames=3, size=(8, 8), codec="ffv1", audio=False)
    with pytest.raises(BBFInputError, match="too small"):
        probe(path)


@pytest.mark.parametrize("w,h,msg", [(8193, 100, "enormous"), (8192, 8192, "enormous"), (15, 100, "too small"),
                                     (100, 2, "too small")])
def test_frame_size_limits(w, h, msg):
    with pytest.raises(BBFInputError, match=msg) as e:
        check_frame_size(w, h, what="video 'x.mp4'")
    assert f"{w}x{h}" in str(e.value) and "x.mp4" in str(e.value)


@pytest.mark.parametrize("w,h", [(16, 16), (8192, 4320), (4320, 8192), (1921, 1081)])
def test_frame_size_limits_accept(w, h):
    check_frame_size(w, h, what="video")


# ---------------------------------------------------------------- read_audio

def test_read_audio_duration_and_pitch(tmp_path):
    for hz in (440.0, 1000.0):
        path = tmp_path / f"tone{int(hz)}.mp4"
        make_clip(path, tone_hz=hz)
        a = read_audio(path)
        assert a.dtype == np.float32 and a.ndim == 1
        assert len(a) == 8000  # 12 frames at 24 fps = 0.5 s at 16 kHz
        peak = np.argmax(np.abs(np.fft.rfft(a))) * 16000 / len(a)
        assert abs(peak - hz) <= 2.0
        assert np.abs(a).max() <= 1.0


def test_read_audio_is_sample_exact_without_resampling(tmp_path):
    path = tmp_path / "pcm.mkv"
    _, audio = make_clip(path, channels=2)
    a = read_audio(path, sample_rate=48000)
    np.testing.assert_allclose(a, audio.mean(axis=0), atol=1e-6)  # stereo -> mean of channels


def test_read_audio_aligns_to_the_first_video_frame(tmp_path):
    path = tmp_path / "late.mkv"
    _, audio = make_clip(path, audio_offset_s=Fraction(1, 10))
    a = read_audio(path, sample_rate=48000)
    assert len(a) == 4800 + audio.shape[1]
    assert not a[:4800].any()
    np.testing.assert_allclose(a[4800:], audio[0], atol=1e-6)
    fixed = read_audio(path, sample_rate=48000, duration_s=0.25)
    assert len(fixed) == 12000
    longer = read_audio(path, sample_rate=48000, duration_s=1.0)
    assert len(longer) == 48000 and not longer[4800 + audio.shape[1]:].any()


def test_read_audio_without_audio(tmp_path):
    path = tmp_path / "silent.mp4"
    make_clip(path, audio=False)
    with pytest.raises(BBFInputError, match="no audio stream"):
        read_audio(path)
    with pytest.raises(BBFInputError, match="sample_rate"):
        read_audio(path, sample_rate=0)


# ---------------------------------------------------------------- VideoWriter

def _write(path, frames, fps, **kw) -> None:
    with VideoWriter(path, frames.shape[2], frames.shape[1], fps, **kw) as w:
        for f in frames:
            w.write(f)


def test_writer_copies_audio_packets_unchanged(clip, tmp_path):
    src, frames, _ = clip
    out = str(tmp_path / "out.mp4")
    doubled = np.repeat(frames, 2, axis=0)  # 24 frames at 48 fps: same 0.5 s
    _write(out, doubled, Fraction(48), audio_from=src)
    with av.open(src) as a, av.open(out) as b:
        pa = [bytes(p) for p in a.demux(a.streams.audio[0]) if p.size]
        pb = [bytes(p) for p in b.demux(b.streams.audio[0]) if p.size]
        sa, sb = a.streams.audio[0], b.streams.audio[0]
        assert sa.duration * sa.time_base == sb.duration * sb.time_base
        vb = b.streams.video[0]
        assert vb.duration * vb.time_base == Fraction(24, 48)
    assert pa == pb and len(pa) > 10
    np.testing.assert_array_equal(decoded_audio(src), decoded_audio(out))
    info = probe(out)
    assert info.n_frames == 24 and info.fps == 48 and info.duration_s == pytest.approx(0.5)
    got = np.stack([img for _, img in iter_frames(out)])
    assert psnr(got, doubled) > 30
    assert leftovers(tmp_path) == []


def test_writer_keeps_audio_offset_across_time_bases(tmp_path):
    src = tmp_path / "late.mkv"  # Matroska: 1/1000 s time base; mp4 audio gets 1/48000
    frames, _ = make_clip(src, audio_offset_s=Fraction(1, 10))
    out = str(tmp_path / "out.mp4")
    _write(out, frames, Fraction(24), audio_from=src)
    with av.open(out) as c:
        s = c.streams.audio[0]
        assert s.start_time * s.time_base == Fraction(1, 10)
    np.testing.assert_array_equal(decoded_audio(str(src)), decoded_audio(out))
    np.testing.assert_array_equal(read_audio(src), read_audio(out))


def test_writer_and_read_audio_when_the_video_starts_late(tmp_path):
    # Video from 0.2 s, audio from 0.3 s: the audio is 0.1 s after the first frame, wherever that lies.
    src = tmp_path / "late.mkv"
    times = [F(1, 5) + F(k, 25) for k in range(12)]  # whole milliseconds: exact in Matroska
    frames, audio = make_clip(src, fps=F(25), frame_times=times, audio_offset_s=F(3, 10))
    assert [t for t, _ in iter_frames(src)] == [t - times[0] for t in times]
    a = read_audio(src, sample_rate=48000)
    assert len(a) == 4800 + audio.shape[1] and not a[:4800].any()
    out = str(tmp_path / "out.mkv")
    _write(out, frames, F(25), audio_from=src)
    with av.open(out) as c:
        s = c.streams.audio[0]
        assert s.start_time * s.time_base == F(1, 10)
    np.testing.assert_array_equal(read_audio(out, sample_rate=48000), a)


def test_writer_without_audio_source_and_odd_size(tmp_path, caplog):
    frames = np.stack([np.full((47, 63, 3), 20 * k, np.uint8) for k in range(5)])
    out = tmp_path / "odd.mp4"
    with caplog.at_level(logging.WARNING, logger="bbf_rt.io.video"):
        _write(out, frames, Fraction(30000, 1001))
    assert "yuv444p" in caplog.text
    info = probe(out)
    assert (info.width, info.height, info.pix_fmt, info.n_frames) == (63, 47, "yuv444p", 5)
    assert info.fps == Fraction(30000, 1001) and not info.has_audio


def test_writer_exception_leaves_nothing(clip, tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(out, 64, 48, Fraction(24), audio_from=clip[0]) as w:
            w.write(clip[1][0])
            assert len(leftovers(tmp_path)) == 1  # the work happens in a hidden temp file
            raise RuntimeError("boom")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_writer_failure_keeps_the_old_file(clip, tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old content")
    with pytest.raises(BBFInputError, match=r"expected uint8 \(48, 64, 3\)"):
        with VideoWriter(out, 64, 48, Fraction(24)) as w:
            w.write(clip[1][0])
            w.write(np.zeros((48, 64), np.uint8))
    assert out.read_bytes() == b"old content"
    assert leftovers(tmp_path) == []
    with pytest.raises(BBFInputError, match="no frames were written"):
        with VideoWriter(out, 64, 48, Fraction(24)):
            pass
    assert out.read_bytes() == b"old content" and leftovers(tmp_path) == []


def test_writer_bad_arguments(tmp_path):
    with pytest.raises(BBFInputError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "out.mp4", 64, 48, Fraction(24))
    with pytest.raises(BBFInputError, match="fps"):
        VideoWriter(tmp_path / "out.mp4", 64, 48, 0)
    with pytest.raises(BBFInputError, match="fps"):
        VideoWriter(tmp_path / "out.mp4", 64, 48, 29.97)
    with pytest.raises(BBFInputError, match="enormous"):
        VideoWriter(tmp_path / "out.mp4", 9000, 48, Fraction(24))
    with pytest.raises(BBFInputError, match="not an encoder"):
        VideoWriter(tmp_path / "out.mp4", 64, 48, Fraction(24), codec="no-such-codec")
    with pytest.raises(BBFInputError, match="audio_from"):
        VideoWriter(tmp_path / "out.mp4", 64, 48, Fraction(24), audio_from=tmp_path / "nope.mp4")
    with pytest.raises(BBFInputError, match="no container format"):
        VideoWriter(tmp_path / "out.unknownext", 64, 48, Fraction(24))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- scene cuts

def _texture(seed: int, h: int, w: int) -> np.ndarray:
    """Multi-scale random texture (uint8 RGB): detail at 2, 4, 8 and 16 px, like a busy natural scene."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3))
    for s in (2, 4, 8, 16):
        img += np.kron(rng.random((h // s + 1, w // s + 1, 3)), np.ones((s, s, 1)))[:h, :w] / 4
    return (img * 255).astype(np.uint8)


def test_small_pan_is_not_a_cut_and_unrelated_images_are():
    big = _texture(1, 140, 300)
    a = big[10:130, 10:210]
    for dx in (1, 2, 5, 12):
        b = big[10 + dx // 2:130 + dx // 2, 10 + dx:210 + dx]
        assert scene_cut_score(a, b) < 0.2 and not is_scene_cut(a, b)
    for seed in (2, 3):
        other = _texture(seed, 120, 200)  # same statistics, unrelated content
        assert scene_cut_score(a, other) > 0.45 and is_scene_cut(a, other)
    assert scene_cut_score(a, a) == 0.0


def test_cut_in_a_clip_is_found_exactly(tmp_path):
    path = tmp_path / "cut.mp4"
    make_clip(path, n_frames=10, cut_at=6, audio=False)
    frames = [img for _, img in iter_frames(path)]
    cuts = [i for i in range(len(frames) - 1) if is_scene_cut(frames[i], frames[i + 1])]
    assert cuts == [5]


def test_streamed_scene_cuts_equal_the_pairwise_test():
    """SceneCuts (each frame downsampled once, as the player and the video scan use it) flags exactly the
    pairs that is_scene_cut flags, at 720p; threshold 1 never cuts; a frame of another size is refused."""
    def coarse(seed, h, w):  # the texture's detail at 40-320 px, so it survives the detector's 20x downsampling
        return np.kron(_texture(seed, h // 20, w // 20), np.ones((20, 20, 1), np.uint8))

    big = coarse(4, 760, 1340)
    frames = [big[i * 4:i * 4 + 720, i * 6:i * 6 + 1280] for i in range(4)] + [coarse(5, 720, 1280)] * 2
    for thr, expect in ((0.05, None), (0.4, [3]), (1.0, [])):
        scene = SceneCuts(thr)
        got = [i - 1 for i, f in enumerate(frames) if scene.push(f)]
        assert got == [i for i in range(len(frames) - 1) if is_scene_cut(frames[i], frames[i + 1], thr)]
        assert expect is None or got == expect
    with pytest.raises(BBFInputError, match="shapes differ"):
        scene.push(frames[0][:, :640])
    scene.reset()
    assert not scene.push(frames[0][:, :640])


def test_scene_cut_bad_inputs():
    a = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(BBFInputError, match="shapes differ"):
        scene_cut_score(a, np.zeros((48, 66, 3), np.uint8))
    with pytest.raises(BBFInputError, match="uint8"):
        scene_cut_score(a, a.astype(np.float32))
    for bad in (1.5, 0.0, True, "0.4"):
        with pytest.raises(BBFInputError, match="threshold"):
            is_scene_cut(a, a, threshold=bad)
        with pytest.raises(BBFInputError, match="threshold"):
            SceneCuts(bad)

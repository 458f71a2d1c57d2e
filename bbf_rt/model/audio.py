"""Audio condition: log-mel tokens in a window centred on each target frame, in pure torch.

Features (Whisper-like, no torchaudio/librosa):
- STFT: Hann window of n_fft samples (400 = 25 ms at 16 kHz), hop 160 (10 ms), `center=True` with zero
  padding, so mel frame j is centred on sample j * hop (time j * hop / sample_rate).
- power spectrum |X|^2 -> mel with a Slaney filterbank (Slaney mel scale: linear below 1 kHz, logarithmic
  above; each triangle area-normalised, 2 / bandwidth in Hz), the librosa/Whisper default.
- log: log10(max(mel, 1e-8)), then the fixed affine (log_mel + 4) / 4. The floor makes digital silence
  exactly -1.0 (`SILENCE`), which is also the padding value outside the clip; a full-scale sine peaks
  near +1.6, speech at conversational level sits roughly in [-0.5, 1]. A fixed affine (not Whisper's
  per-clip "max - 8" clamp) keeps a token's value independent of the rest of the clip.

Tokens: for a target frame at time t the encoder returns La = window_s / hop_s consecutive mel frames,
indices round(t * sr / hop) - La // 2 + arange(La), i.e. frames whose centres span [t - window_s/2,
t + window_s/2) (the default 0.32 s gives La = 32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from bbf_rt.errors import BBFInputError

__all__ = [
    "AudioConfig",
    "AudioEncoder",
    "SILENCE",
    "hz_to_mel",
    "mel_to_hz",
    "mel_filterbank",
]

# Log-mel floor and normalisation: value = (log10(max(mel, _POWER_FLOOR)) + _LOG_OFFSET) / _LOG_SCALE.
_POWER_FLOOR = 1e-8
_LOG_OFFSET = 4.0
_LOG_SCALE = 4.0
SILENCE = (math.log10(_POWER_FLOOR) + _LOG_OFFSET) / _LOG_SCALE  # -1.0: the normalised log-mel of zeros

# Slaney mel scale constants (Auditory Toolbox; librosa's htk=False).
_F_SP = 200.0 / 3.0  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15 mel
_LOGSTEP = math.log(6.4) / 27.0


@dataclass(frozen=True)
class AudioConfig:
    """Audio front end: 16 kHz, 25 ms / 10 ms frames, `n_mels` bands, `window_s` seconds per target frame."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop: int = 160
    n_mels: int = 64
    window_s: float = 0.32
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2

    @property
    def hop_s(self) -> float:
        return self.hop / self.sample_rate

    @property
    def tokens_per_frame(self) -> int:
        """La = window_s / hop_s (32 with the defaults)."""
        return int(round(self.window_s / self.hop_s))


def hz_to_mel(freq_hz: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale: linear (3 per 200 Hz) below 1 kHz, logarithmic above."""
    f = np.asarray(freq_hz, dtype=np.float64)
    log_part = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log_part, f / _F_SP)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    m = np.asarray(mel, dtype=np.float64)
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log_part, m * _F_SP)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> tuple[Tensor, Tensor]:
    """Slaney-normalised triangular mel filters.

    Returns (filters (n_mels, n_fft // 2 + 1) fp32, edges_hz (n_mels + 2,) fp32): filter i rises from
    edges_hz[i] to its peak at edges_hz[i + 1] and falls to zero at edges_hz[i + 2]. Built in float64
    numpy once at init, stored in fp32.
    """
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
        raise BBFInputError(
            f"f_min={f_min}, f_max={f_max}: allowed is 0 <= f_min < f_max <= sample_rate/2 = {sample_rate / 2}"
        )
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)  # (n_bins,)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # (n_mels + 2,)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1)
    rising = (fft_hz[None, :] - lower) / (centre - lower)
    falling = (upper - fft_hz[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (n_mels, n_bins)
    weights *= 2.0 / (upper - lower)  # Slaney area normalisation
    return torch.from_numpy(weights).float(), torch.from_numpy(edges).float()


class AudioEncoder(nn.Module):
    """Log-mel tokens per target frame. No learned weights; buffers: Hann window, mel filterbank (fp32).

    forward(samples (B, S) float at cfg.sample_rate, frame_times (B, F) seconds)
        -> (B, F, La, n_mels) float32, La = cfg.tokens_per_frame.
    """

    def __init__(self, cfg: AudioConfig | None = None) -> None:
        super().__init__()
        cfg = AudioConfig() if cfg is None else cfg
        if not isinstance(cfg, AudioConfig):
            raise BBFInputError(f"cfg: expected an AudioConfig, got {type(cfg).__name__}")
        for name in ("sample_rate", "n_fft", "hop", "n_mels"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BBFInputError(f"{name}={value!r}: must be a positive int")
        if cfg.hop > cfg.n_fft:
            raise BBFInputError(f"hop={cfg.hop}: must be at most n_fft={cfg.n_fft} (no gaps between frames)")
        ratio = cfg.window_s / cfg.hop_s
        if not cfg.window_s > 0 or abs(ratio - round(ratio)) > 1e-6:
            raise BBFInputError(
                f"window_s={cfg.window_s}: must be a positive multiple of hop/sample_rate = {cfg.hop_s} s"
            )
        self.cfg = cfg
        self.tokens_per_frame = cfg.tokens_per_frame
        self.frames_per_second = cfg.sample_rate / cfg.hop  # mel frames per second (100 by default)
        filters, edges = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
        self.register_buffer("mel_filters", filters)  # (n_mels, n_fft // 2 + 1)
        self.register_buffer("mel_edges_hz", edges)  # (n_mels + 2,)
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float32))
        self.register_buffer("token_offsets", torch.arange(self.tokens_per_frame) - self.tokens_per_frame // 2)

    def log_mel(self, samples: Tensor) -> Tensor:
        """(B, S) float -> normalised log-mel (B, M, n_mels) fp32, M = S // hop + 1; frame j centred on j*hop."""
        # Features stay fp32 even if the module was cast with .to(bfloat16): the buffers are re-read as fp32.
        x = samples.to(torch.float32)
        spec = torch.stft(
            x,
            n_fft=self.cfg.n_fft,
            hop_length=self.cfg.hop,
            window=self.window.float(),
            center=True,
            pad_mode="constant",
            return_complex=True,
        )  # (B, n_bins, M) complex64
        power = torch.view_as_real(spec).square().sum(-1)  # (B, n_bins, M), |X|^2 without a sqrt
        mel = torch.matmul(self.mel_filters.float(), power)  # (B, n_mels, M), fp32 accumulation
        log_mel = torch.log10(mel.clamp_min(_POWER_FLOOR))
        return ((log_mel + _LOG_OFFSET) / _LOG_SCALE).transpose(1, 2)  # (B, M, n_mels)

    def token_indices(self, frame_times: Tensor) -> Tensor:
        """(B, F) seconds -> (B, F, La) int64 mel-frame indices (may fall outside the clip)."""
        centre = torch.round(frame_times.to(torch.float32) * self.frames_per_second).to(torch.long)
        return centre.unsqueeze(-1) + self.token_offsets  # (B, F, La)

    def forward(self, samples: Tensor, frame_times: Tensor) -> Tensor:
        """(B, S) samples in [-1, 1], (B, F) frame times in seconds -> (B, F, La, n_mels) fp32.

        Mel frames outside the clip read as `SILENCE` (-1.0). The spectrogram is computed once per clip;
        the per-frame windows are one gather, so F can be large.
        """
        self._check_inputs(samples, frame_times)
        return self.windows(self.log_mel(samples), frame_times)

    def windows(self, mel: Tensor, frame_times: Tensor) -> Tensor:
        """Gather each frame's window from a precomputed `log_mel` (B, M, n_mels) -> (B, F, La, n_mels).

        Lets a long video compute its spectrogram once and gather per batch of intervals.
        """
        b, m, n_mels = mel.shape
        idx = self.token_indices(frame_times)  # (B, F, La)
        f, la = idx.shape[1], idx.shape[2]
        inside = (idx >= 0) & (idx < m)
        flat = idx.clamp(0, m - 1).reshape(b, f * la, 1).expand(b, f * la, n_mels)
        tokens = torch.gather(mel, 1, flat).reshape(b, f, la, n_mels)
        silence = torch.full_like(tokens, SILENCE)
        return torch.where(inside.unsqueeze(-1), tokens, silence)

    @staticmethod
    def _check_inputs(samples: Tensor, frame_times: Tensor) -> None:
        if not isinstance(samples, Tensor) or samples.dim() != 2 or not samples.is_floating_point():
            got = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
            raise BBFInputError(f"samples: got {got}; allowed is a float tensor (B, S) of mono samples")
        if samples.shape[1] < 1:
            raise BBFInputError(f"samples has shape {tuple(samples.shape)}: need at least one sample per clip")
        if not isinstance(frame_times, Tensor) or frame_times.dim() != 2 or not frame_times.is_floating_point():
            got = tuple(frame_times.shape) if isinstance(frame_times, Tensor) else type(frame_times).__name__
            raise BBFInputError(f"frame_times: got {got}; allowed is a float tensor (B, F) of seconds")
        if frame_times.shape[0] != samples.shape[0]:
            raise BBFInputError(
                f"frame_times has batch {frame_times.shape[0]} but samples has {samples.shape[0]}: they must match"
            )

"""Analytic FLOP count of one BBF DiT call: the floor that benchmarks compare against.

Counts multiply-adds of matrix products as 2 FLOPs (linear layers, attention QK^T and PV); norms,
activations and RoPE are memory-bound and left out, as in the usual MFU accounting.
"""
from __future__ import annotations

from bbf_rt.config import ModelConfig


def dit_flops(cfg: ModelConfig, frames: int, tokens_per_frame: int, cond_tokens: dict[str, int] | None = None,
              batch: int = 1) -> int:
    """FLOPs of BBFDiT.forward for `batch` samples of `frames` target frames.

    cond_tokens: condition tokens per present modality, e.g. {"text": 512}; for "audio" give the tokens
    per frame window (audio attends per frame); absent modalities are skipped, as in the model.
    """
    d, f, b = cfg.dim, cfg.ffn_dim, cfg.branch_width
    p = cfg.patch[0] * cfg.patch[1]
    L = frames * tokens_per_frame
    lin = lambda n, i, o: 2 * n * i * o  # noqa: E731
    per_block = lin(L, d, 3 * d) + lin(L, d, d) + 4 * L * L * d + lin(L, d, f) + lin(L, f, d)
    top = lin(L, cfg.in_channels * p, d) + lin(L, d, cfg.latent_channels * p)
    for name, n in (cond_tokens or {}).items():
        if name not in cfg.modalities:
            continue
        keys = n * frames if name == "audio" else n  # audio: each frame's own window
        attn = 4 * L * n * b if name == "audio" else 4 * L * keys * b
        per_block += lin(L, d, b) + lin(L, b, d) + lin(keys, b, 2 * b) + attn
        din = {"text": cfg.text_dim, "audio": cfg.audio_mels}.get(name, cfg.latent_channels * p)
        top += lin(keys, din, b) + lin(keys, b, b)
    return batch * (top + cfg.depth * per_block)

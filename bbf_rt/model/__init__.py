"""The BBF model: the DiT denoiser plus the VAE whose latents it works in."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from bbf_rt.config import ModelConfig, get_preset
from bbf_rt.model.checkpoint import check_state_dict, load_state, save_checkpoint
from bbf_rt.model.dit import BBFDiT, build_dit
from bbf_rt.model.vae import CompactVAE, VAEConfig, VideoVAE

__all__ = ["BBFModel", "BBFDiT", "build_dit", "load_model", "save_checkpoint"]


class BBFModel(nn.Module):
    """DiT + VAE. `trained` is False for random weights, which are for tests only."""

    def __init__(self, cfg: ModelConfig, vae: VideoVAE | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dit = BBFDiT(cfg)
        if vae is None and cfg.vae_base_channels:
            vae = CompactVAE(
                VAEConfig(
                    latent_channels=cfg.latent_channels,
                    base_channels=cfg.vae_base_channels,
                    channel_mult=cfg.vae_channel_mult,
                    num_res_blocks=cfg.vae_res_blocks,
                    fusion_width=cfg.vae_fusion,
                )
            )
        self.vae = vae
        self.trained = False


def load_model(spec: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BBFModel:
    """A model from a checkpoint path (.safetensors) or a preset name (random weights: tests only)."""
    spec_s = str(spec)
    if not spec_s.endswith(".safetensors") and not Path(spec_s).exists():
        torch.manual_seed(0)
        model = BBFModel(get_preset(spec_s))
    else:
        cfg, tensors, meta = load_state(spec_s)
        model = BBFModel(cfg)
        check_state_dict(model, tensors, spec_s)
        model.load_state_dict(tensors)
        model.trained = meta.get("trained") == "true"
    return model.to(device=device, dtype=dtype).eval()

"""Model helpers shared by the tests (tests/ is on sys.path, as for media.py)."""
from __future__ import annotations

import torch


@torch.no_grad()
def trained_gates(dit: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every condition branch a non-zero gate, as training would; a fresh model's gates are zero,
    which would hide every condition (and every difference a test wants to see). Returns `dit`."""
    g = torch.Generator().manual_seed(seed)
    for blk in dit.blocks:
        for br in blk.branches.values():
            br.gate.copy_(torch.randn(br.gate.shape, generator=g))
    return dit

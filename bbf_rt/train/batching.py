"""Batches as the model consumes them: caption embeddings, mixing sources, the DiT's condition tensors.

Shared by training (loop.py) and prediction (metrics.py), so both build conditions the same way.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from bbf_rt.errors import BBFInputError
from bbf_rt.model import BBFModel


class TextBank:
    """Caption -> (L, text_dim) token embeddings, precomputed once (the GPU machine has no MiniLM weights)."""

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table

    @classmethod
    def from_encoder(cls, encoder, captions: list[str]) -> TextBank:
        return cls({c: encoder.encode([c])[0][0].float().cpu() for c in captions})

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        caps = sorted(self.table)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({f"c{i}": self.table[c].contiguous() for i, c in enumerate(caps)}, str(path), metadata={"captions": json.dumps(caps)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextBank:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            caps = json.loads(f.metadata()["captions"])
            return cls({c: f.get_tensor(f"c{i}") for i, c in enumerate(caps)})

    def lookup(self, captions: list[str | None], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) tokens and (B, L) mask; None -> all-False row."""
        missing = sorted({c for c in captions if c is not None and c not in self.table})
        if missing:
            raise BBFInputError(f"captions {missing[:3]} are not in the text bank; rebuild it with --make-text-bank")
        rows = [self.table[c] if c is not None else None for c in captions]
        dim = next(r.shape[1] for r in rows if r is not None)
        L = max(r.shape[0] for r in rows if r is not None)
        tok = torch.zeros(len(rows), L, dim)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r is not None:
                tok[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
        return tok.to(device), mask.to(device)


TRAIN_KEYS = ("frame0", "frame1", "targets", "taus", "context", "context_tau", "diff")


def collate(parts: list[dict]) -> dict:
    """Concatenate batches from several sources; absent modalities become zeros with a False presence flag."""
    out = {k: torch.cat([p[k] for p in parts]) for k in TRAIN_KEYS}
    sizes = [p["frame0"].shape[0] for p in parts]
    dev = out["frame0"].device
    out["caption"] = [c for p, n in zip(parts, sizes) for c in (p.get("caption") or [None] * n)]
    for key, like in (("audio", None), ("reference", out["frame0"])):
        have = [key in p for p in parts]
        out[f"{key}_present"] = torch.cat([torch.full((n,), h, device=dev) for n, h in zip(sizes, have)])
        if any(have):
            ref = next(p[key] for p in parts if key in p)
            out[key] = torch.cat([p[key] if key in p else torch.zeros((n, *ref.shape[1:]), device=dev) for p, n in zip(parts, sizes)])
    if "audio" in out:
        sec = next(p["audio_seconds"] for p in parts if "audio_seconds" in p)[0]
        out["audio_seconds"] = torch.cat([p["audio_seconds"] if "audio_seconds" in p else torch.full((n,), float(sec), device=dev)
                                          for p, n in zip(parts, sizes)])
    return out


def conditions(model: BBFModel, batch: dict, lat_ctx: torch.Tensor | None, keep: dict[str, torch.Tensor], text: TextBank | None,
               audio_encoder) -> dict:
    """The DiT's condition kwargs from a (collated) batch; `keep` (B,) bool per modality drops some."""
    B = batch["frame0"].shape[0]
    dev = batch["frame0"].device
    kw: dict = {}
    k = {m: keep[m].to(dev) for m in keep}
    if text is not None and any(c is not None for c in batch.get("caption", [])):
        tok, mask = text.lookup(batch["caption"], dev)
        kw["text"], kw["text_mask"] = tok, mask & k["text"][:, None]
    if "reference" in batch and bool(batch["reference_present"].any()):
        ref = model.vae.encode_frames(batch["reference"] * 2 - 1).float()
        kw["image"], kw["image_mask"] = ref[:, None], (batch["reference_present"] & k["image"])[:, None]
    if "audio" in batch and audio_encoder is not None and bool(batch["audio_present"].any()):
        times = batch["taus"] * batch["audio_seconds"][:, None]
        kw["audio"] = audio_encoder(batch["audio"].float(), times)
        kw["audio_mask"] = (batch["audio_present"] & k["audio"])[:, None].expand(B, batch["taus"].shape[1])
    if lat_ctx is not None and lat_ctx.shape[1] > 0 and "context" in k:
        kw["context"], kw["context_tau"] = lat_ctx, batch["context_tau"]
        kw["context_mask"] = k["context"][:, None].expand(B, lat_ctx.shape[1])
    return kw

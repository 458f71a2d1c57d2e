"""safetensors checkpoints of a BBF model: weights plus the ModelConfig in the file's metadata.

Never pickle. Metadata keys: `format` (bbf-rt/1), `config` (ModelConfig JSON), `trained` ("true" only
for weights that came out of training; the CLI refuses to present untrained output as a result),
and optional `info` (free JSON: training run, data, metrics).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bbf_rt.config import ModelConfig
from bbf_rt.errors import CheckpointError

FORMAT = "bbf-rt/1"


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, *, trained: bool, info: dict | None = None) -> Path:
    """Write `model` (a BBFModel) to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    meta = {"format": FORMAT, "config": model.cfg.to_json(), "trained": "true" if trained else "false"}
    if info:
        meta["info"] = json.dumps(info, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a bbf-rt checkpoint, with clear errors for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (expected a .safetensors file or a preset name)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file ({e}); bbf-rt never loads pickles") from e
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no bbf-rt metadata (format={meta.get('format')!r}); "
            f"expected format {FORMAT!r} with a 'config' entry, as written by bbf_rt.save_checkpoint"
        )
    return meta


def load_state(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, metadata) of a checkpoint, all on the CPU."""
    meta = read_metadata(path)
    cfg = ModelConfig.from_json(meta["config"])
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt: {e}") from e
    return cfg, tensors, meta


def check_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing/unexpected key and shape mismatch (first 10 of each)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:10])}{more}")
    if problems:
        raise CheckpointError(f"checkpoint {source!r} does not match model {model.cfg.name!r}: " + "; ".join(problems))

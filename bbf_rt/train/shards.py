"""Sharded safetensors state: any set of named tensors as files of at most `shard_bytes` each, plus index.json.

Layout of a state directory:

    index.json              {"format": "bbf-rt-shards/1", "meta": {...}, "shard_bytes": N,
                             "files": {"shard-00000.safetensors": bytes, ...},
                             "tensors": {name: {"dtype", "shape", "parts": [[file, key], ...]}}}
    shard-00000.safetensors ...

Never pickle: every tensor is a safetensors entry, the metadata is JSON. A tensor larger than a shard
is cut into flat parts (`name@@i`) and glued back on load. The directory is written under a temporary
name and renamed when complete, so a run killed mid-save leaves the previous state intact.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bbf_rt.errors import BBFInputError, CheckpointError

FORMAT = "bbf-rt-shards/1"
MIB = 1024 * 1024
_HEADER_PER_TENSOR = 160  # bytes of safetensors JSON header per entry, generous (names are shorter than 80)
_HEADER_BASE = 4096


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def plan_shards(tensors: dict[str, torch.Tensor], shard_bytes: int) -> list[list[tuple[str, str, torch.Tensor]]]:
    """Greedy packing, in name order, of (entry key, tensor name, flat piece) into shards that, header
    included, stay under shard_bytes."""
    if shard_bytes < 2 * _HEADER_BASE:
        raise BBFInputError(f"shard_bytes={shard_bytes}: allowed is at least {2 * _HEADER_BASE}")
    budget = shard_bytes - _HEADER_BASE
    shards: list[list[tuple[str, str, torch.Tensor]]] = [[]]
    used = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        item = t.element_size()
        nbytes = t.numel() * item
        if nbytes + _HEADER_PER_TENSOR <= budget:
            pieces = [(name, t)]
        else:  # larger than one shard: flat parts that each fill most of a shard
            per = max(1, (budget - _HEADER_PER_TENSOR) // item)
            flat = t.reshape(-1)
            pieces = [(f"{name}@@{i}", flat[i * per : (i + 1) * per]) for i in range(math.ceil(t.numel() / per))]
        for key, piece in pieces:
            cost = piece.numel() * item + _HEADER_PER_TENSOR
            if used + cost > budget and shards[-1]:
                shards.append([])
                used = 0
            shards[-1].append((key, name, piece))
            used += cost
    return shards


def save_shards(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, shard_bytes: int = 16 * MIB) -> Path:
    """Write tensors + JSON-able meta to `directory` (replaced atomically). Returns the directory."""
    final = Path(directory)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    index: dict = {"format": FORMAT, "meta": meta, "shard_bytes": int(shard_bytes), "files": {}, "tensors": {}}
    for name, t in tensors.items():
        index["tensors"][name] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "parts": []}
    for i, shard in enumerate(plan_shards(tensors, shard_bytes)):
        fname = f"shard-{i:05d}.safetensors"
        save_file({key: piece.clone() for key, _, piece in shard}, str(tmp / fname))
        size = (tmp / fname).stat().st_size
        assert size <= shard_bytes, f"{fname} is {size} bytes, over the {shard_bytes}-byte limit"
        index["files"][fname] = size
        for key, name, _ in shard:
            index["tensors"][name]["parts"].append([fname, key])
    (tmp / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def read_index(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} holds no index.json: not a bbf-rt sharded state or weights directory")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from e
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} has format {index.get('format')!r}; expected {FORMAT!r}")
    return index


def load_shards(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a directory written by `save_shards`; checks every file is present and whole."""
    directory = Path(directory)
    index = read_index(directory)
    handles = {}
    try:
        for fname, size in index["files"].items():
            path = directory / fname
            if not path.is_file() or path.stat().st_size != size:
                got = path.stat().st_size if path.is_file() else "missing"
                raise CheckpointError(f"shard {str(path)!r} is {got}, the index says {size} bytes: incomplete copy")
            handles[fname] = safe_open(str(path), framework="pt", device=str(device))
        out = {}
        for name, info in index["tensors"].items():
            parts = [handles[f].get_tensor(k) for f, k in info["parts"]]
            t = parts[0] if len(parts) == 1 and "@@" not in info["parts"][0][1] else torch.cat([p.reshape(-1) for p in parts])
            out[name] = t.reshape(info["shape"])
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"sharded state {str(directory)!r} is corrupt: {e}") from e
    return out, index["meta"]

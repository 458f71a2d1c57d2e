"""Artifact cache: every exported artifact is named by everything that changes it, and reused only on
an exact match.

Layout of a cache folder (default `$BBF_RT_CACHE`, else ~/.cache/bbf-rt):

    <name>.<ext>          the artifact (.onnx, .pt2, .plan), plus sidecars named <name>.<ext>.* (ONNX
                          external weights)
    <name>.json           its manifest: the key fields, each file's size and sha256, build facts
    <name>.build.log      TensorRT's build log (named in any build error)
    <name>.lock           held while the artifact is looked up or built, so two processes build once

<name> = <part>-<model>-<target>-<precision>-<condition set>-<first 16 hex of sha256(key)>. The key
holds the ModelConfig, condition set, shape profile, precision, sha256 of the weights, the versions
of torch/onnx/onnxruntime/TensorRT/bbf-rt and the device (GPU name + compute capability, or the CPU's
vector ISA for CPU code; "portable" for ONNX graphs, which no device changes). A manifest whose key
differs, or whose files are missing, truncated or fail their checksum, is rebuilt (one warning
names why). Files are written into a temporary folder and renamed into place, manifest last, so a
crash never leaves a half artifact that looks complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import bbf_rt
from bbf_rt.errors import BBFInputError

log = logging.getLogger(__name__)

FORMAT = "bbf-rt-artifact/1"
_CHUNK = 8 << 20


def default_cache_dir() -> Path:
    """$BBF_RT_CACHE, else ~/.cache/bbf-rt."""
    env = os.environ.get("BBF_RT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bbf-rt"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of everything that shapes an artifact (None = not installed). Read from package
    metadata, so nothing heavy (TensorRT) is imported."""
    trt = None
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"):
        trt = trt or _version(dist)
    ort = _version("onnxruntime") or _version("onnxruntime-gpu")
    return {
        "bbf_rt": bbf_rt.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
        "onnx": _version("onnx"), "onnxscript": _version("onnxscript"), "onnxruntime": ort, "tensorrt": trt,
    }


def device_info(device: torch.device | str) -> dict[str, str]:
    """{"name", "capability"} of the device code is compiled for: the GPU's name and sm_XY, or "cpu"
    and the CPU's vector ISA (AOTInductor bakes AVX2/AVX512 code into CPU packages)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return {"name": torch.cuda.get_device_name(dev), "capability": f"sm_{major}{minor}"}
    return {"name": "cpu", "capability": torch.backends.cpu.get_cpu_capability()}


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict: every name, dtype, shape and the raw bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.contiguous().reshape(-1).view(torch.uint8).cpu()
        for i in range(0, flat.numel(), _CHUNK):
            h.update(flat[i : i + _CHUNK].numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def artifact_name(key: dict) -> str:
    """<part>-<model>-<target>-<precision>-<condition set>-<16 hex of the key's sha256>."""
    conds = "+".join(key.get("condition_set") or ()) or "nocond"
    model = key["model_config"]["name"].replace("/", "_")
    return f"{key['part']}-{model}-{key['target']}-{key['precision']}-{conds}-{key_digest(key)[:16]}"


@dataclass
class Artifact:
    """A verified artifact: its main file, its manifest, and whether it was reused or just built."""

    path: Path
    manifest: dict
    reused: bool

    @property
    def manifest_path(self) -> Path:
        return self.path.parent / f"{self.manifest['name']}.json"


class ArtifactCache:
    """A folder of artifacts with manifests; see the module docstring."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.root / f"{name}.json", self.root / f"{name}.lock"

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BBFInputError(f"artifact cache folder {str(self.root)!r} cannot be created: {e}") from e
        with open(self._paths(name)[1], "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def check(self, name: str, key: dict) -> tuple[Artifact | None, str]:
        """(artifact, "") if a complete, matching, intact artifact exists; else (None, why not)."""
        mpath = self._paths(name)[0]
        if not mpath.is_file():
            return None, "not built yet"
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return None, f"manifest {mpath} is unreadable ({e})"
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            return None, f"manifest {mpath} has a different key (another export of the same name)"
        for fname, meta in manifest.get("files", {}).items():
            p = self.root / fname
            if not p.is_file():
                return None, f"{p} is missing"
            size = p.stat().st_size
            if size != meta["size"]:
                return None, f"{p} is {size} bytes, the manifest says {meta['size']} (truncated or overwritten)"
            if file_sha256(p) != meta["sha256"]:
                return None, f"{p} fails its sha256 checksum (corrupted)"
        return Artifact(self.root / manifest["artifact"], manifest, reused=True), ""

    def get_or_build(self, key: dict, ext: str, build: Callable[[Path], dict]) -> Artifact:
        """The artifact for `key`, reused if intact, else built by `build(path)`.

        `build` writes the artifact at `path` (inside a temporary folder; sidecars must start with
        path's name) and returns facts for the manifest's "build" entry. Its exceptions propagate and
        leave nothing behind.
        """
        name = artifact_name(key)
        with self._locked(name):
            art, why = self.check(name, key)
            if art is not None:
                log.info("reusing artifact %s", art.path)
                return art
            if why != "not built yet":
                log.warning("artifact %s is unusable: %s; rebuilding it", name, why)
            return self._build(name, key, ext, build)

    def _build(self, name: str, key: dict, ext: str, build: Callable[[Path], dict]) -> Artifact:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            t0 = time.perf_counter()
            facts = build(tmp / f"{name}{ext}")
            seconds = time.perf_counter() - t0
            files = {}
            for p in sorted(tmp.iterdir()):
                if not p.name.startswith(name) or not p.is_file():
                    raise RuntimeError(f"internal error: exporter wrote {p.name!r}, not named after {name!r}")
                files[p.name] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
            if f"{name}{ext}" not in files:
                raise RuntimeError(f"internal error: exporter wrote no {name}{ext}")
            manifest = {
                "format": FORMAT, "name": name, "artifact": f"{name}{ext}", "key": key, "key_sha256": key_digest(key),
                "files": files, "build": {"seconds": round(seconds, 3), **facts},
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            stale = self._paths(name)[0]
            stale.unlink(missing_ok=True)  # no manifest may describe files that are being replaced
            for fname in files:
                os.replace(tmp / fname, self.root / fname)
            mtmp = tmp / "manifest.json"
            mtmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            os.replace(mtmp, stale)  # the manifest commits the artifact
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return Artifact(self.root / manifest["artifact"], manifest, reused=False)


def make_key(
    *, part: str, target: str, precision: str, model_cfg, modalities: tuple[str, ...], shapes, weights: str,
    device: dict[str, str], extra: dict | None = None,
) -> dict:
    """The cache key of one artifact: a JSON-able dict of everything that changes it."""
    key = {
        "part": part, "target": target, "precision": precision, "model_config": asdict(model_cfg),
        "condition_set": list(modalities), "shapes": [list(s) for s in shapes], "weights_sha256": weights,
        "versions": versions(), "device": device, **(extra or {}),
    }
    return json.loads(json.dumps(key, sort_keys=True))  # tuples -> lists: equal to its manifest copy

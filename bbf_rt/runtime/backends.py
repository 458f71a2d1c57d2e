"""Runtime denoiser backends behind one interface: `backend(x, sigma, **conds) -> velocity`.

Every backend is called exactly like `BBFDiT` is in `Engine.run` (x (B, F, C, H, W) in the engine's
dtype, sigma (B,) fp32, the condition tensors as keywords; a modality is present when its mask is)
and returns the velocity in x's dtype:

- eager:    the PyTorch module (Triton kernels on GPU, references on CPU);
- compile:  torch.compile of it (dynamic shapes; its first call compiles, timed apart);
- aoti:     an AOTInductor .pt2 package per condition set, built on first use, cached;
- onnx:     an ONNX graph per condition set run by ONNX Runtime (CUDA provider on a GPU when present);
- tensorrt: a TensorRT engine per condition set (needs TensorRT and a GPU).

Artifact backends build (or reuse, from the artifact cache) one artifact per condition set and shape
profile: onnx and aoti use the default profile of `ExportConfig`, widened when a call falls outside
it; tensorrt builds its profile around the shapes it sees (opt = the first call's shape). All agree
with eager within the tolerances stated in docs/export.md.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bbf_rt.config import BACKENDS, ExportConfig
from bbf_rt.errors import BBFInputError

log = logging.getLogger(__name__)

_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Backend:
    """The denoiser interface; subclasses implement __call__."""

    name = "base"

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ran: the backend name and, for artifact backends, the artifacts used."""
        return {"name": self.name}


class EagerBackend(Backend):
    name = "eager"

    def __init__(self, dit: torch.nn.Module) -> None:
        self.dit = dit

    def __call__(self, x, sigma, **conds):
        return self.dit(x, sigma, **conds)


class CompileBackend(Backend):
    """torch.compile(dit, dynamic=True); compile seconds (first call per condition set) reported apart."""

    name = "compile"

    def __init__(self, dit: torch.nn.Module) -> None:
        self.fn = torch.compile(dit, dynamic=True)
        self.compile_seconds: dict[str, float] = {}

    def __call__(self, x, sigma, **conds):
        key = "+".join(sorted(conds)) or "nocond"
        if key in self.compile_seconds:
            return self.fn(x, sigma, **conds)
        t0 = time.perf_counter()
        out = self.fn(x, sigma, **conds)
        self.compile_seconds[key] = time.perf_counter() - t0
        return out

    def describe(self):
        return {"name": self.name, "compile_seconds": self.compile_seconds}


@dataclass
class _Entry:
    ecfg: ExportConfig
    run: Callable[..., torch.Tensor]
    artifact: Any
    static: dict[str, int]


class ArtifactBackend(Backend):
    """Runs exported artifacts, one per condition set (and shape profile), built on first use."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, *, cache=None, precision: str | None = None) -> None:
        from bbf_rt.export import signature as sig

        self.sig = sig
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.cfg = model.cfg
        self.precision = precision or self._precision(dtype)
        self.cache = cache
        self.entries: list[_Entry] = []
        self._weights: str | None = None

    def _precision(self, dtype: torch.dtype) -> str:
        return _PRECISION[dtype]

    def _profile(self, base: ExportConfig, dims: dict[str, int]) -> ExportConfig:
        return self.sig.widen(base, dims)

    def _entry(self, conds: tuple[str, ...], dims: dict[str, int]) -> _Entry:
        for e in self.entries:
            if e.ecfg.modalities == conds and not self.sig.covers(e.ecfg, dims) and all(dims[d] == v for d, v in e.static.items()):
                return e
        from bbf_rt.export import export_denoiser, load_artifact
        from bbf_rt.export.cache import weights_sha256

        if self._weights is None:
            self._weights = weights_sha256(self.model.dit)
        ecfg = self._profile(ExportConfig(target=self.name, precision=self.precision, modalities=conds), dims)
        for _ in range(2):
            art = export_denoiser(self.model, ecfg, cache=self.cache, device=self.device, weights=self._weights)
            static = art.manifest["build"].get("static_dims") or {}
            if all(dims[d] == v for d, v in static.items()):
                break
            # a graph with a static dim (TorchScript exporter fallback): build one for this size
            ecfg = ecfg.with_dims(**{d: (dims[d],) * 3 for d in static})
        log.info("%s backend: %s artifact %s", self.name, "reused" if art.reused else "built", art.path)
        entry = _Entry(ecfg, load_artifact(art, self.device), art, static)
        self.entries.append(entry)
        return entry

    def __call__(self, x, sigma, **conds):
        sig = self.sig
        args = {"x": x, "sigma": sigma, **conds}
        present = sig.condition_set_of(conds)
        names = sig.input_names(present)
        extra = sorted(set(args) - set(names))
        if extra:
            raise BBFInputError(f"{self.name} backend: inputs {extra} have no mask, or no branch in the artifact signature")
        entry = self._entry(present, sig.observed_dims(self.cfg, args))
        inputs = [args[n].to(self.device, sig.input_dtype(n, self.precision)).contiguous() for n in names]
        return entry.run(*inputs).to(x.dtype)

    def describe(self):
        return {
            "name": self.name, "precision": self.precision,
            "artifacts": [{"path": str(e.artifact.path), "reused": e.artifact.reused,
                           "build_seconds": e.artifact.manifest["build"].get("seconds")} for e in self.entries],
        }


class OnnxBackend(ArtifactBackend):
    name = "onnx"

    def _precision(self, dtype):
        if dtype == torch.bfloat16:
            log.warning("onnx backend: ONNX Runtime lacks bf16 kernels for this graph; running an fp16 artifact")
            return "fp16"
        return _PRECISION[dtype]


class AOTIBackend(ArtifactBackend):
    name = "aoti"


class TensorRTBackend(ArtifactBackend):
    name = "tensorrt"

    def __init__(self, model, device, dtype, **kw) -> None:
        from bbf_rt.export.tensorrt_build import import_tensorrt

        import_tensorrt()  # fail at construction, before any frame is decoded
        super().__init__(model, device, dtype, **kw)

    def _profile(self, base, dims):
        """Engines are fastest at their opt shape: opt = this call's, min = the default min, max =
        max(this call's, the default opt); a later call outside it builds another engine."""
        return base.with_dims(**{d: (min(base.dim(d)[0], v), v, max(v, base.dim(d)[1])) for d, v in dims.items()})


def make_backend(
    name: str, model, device: torch.device, dtype: torch.dtype, *, cache: str | Path | None = None,
    cuda_graphs: bool = False,
) -> Backend:
    """The backend `name` (one of BACKENDS) for `model` on device/dtype; artifacts go to `cache`
    (default $BBF_RT_CACHE or ~/.cache/bbf-rt). cuda_graphs: on a CUDA device, replay the eager,
    compile or aoti call as one CUDA graph per shape bucket (bbf_rt.runtime.graphs)."""
    if name not in BACKENDS:
        raise BBFInputError(f"--backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "eager":
        backend: Backend = EagerBackend(model.dit)
    elif name == "compile":
        backend = CompileBackend(model.dit)
    else:
        cls = {"onnx": OnnxBackend, "aoti": AOTIBackend, "tensorrt": TensorRTBackend}[name]
        backend = cls(model, device, dtype, cache=cache)
    if cuda_graphs and device.type == "cuda" and name in ("eager", "compile", "aoti"):
        from bbf_rt.runtime.graphs import CUDAGraphDenoiser

        return CUDAGraphDenoiser(backend)
    return backend

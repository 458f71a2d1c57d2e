"""AOTInductor: torch.export of the denoiser with dynamic dims, compiled into a .pt2 package.

The package holds the generated C++/CUDA code, the compiled Triton kernels and the weights (mmapped
from the shared library above 2 GB), so `load_package` needs only torch: not bbf_rt.model, not the
Python source of the DiT. On CUDA the model is exported with the ops' default implementation, so the
Triton kernels registered with `torch.library.triton_op` are compiled into the package; if torch.export
cannot trace them the export falls back to the eager references (one warning naming the reason).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from bbf_rt import ops

log = logging.getLogger(__name__)


def size_oblivious():
    """torch.export's size-oblivious reasoning: guards assume a dynamic size is not 0 or 1 instead of
    proving it. The DiT's reshapes by frame count (L // F tokens per frame) otherwise send sympy into
    minutes of case analysis (28 s for the tiny audio branch alone, 6 s with this); every size of 1 is
    then covered by the parity tests, which run batch = frames = 1."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(backed_size_oblivious=True)


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes: tuple, mode: str):
    with ops.implementation(mode), torch.no_grad(), size_oblivious():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def compile_package(module: torch.nn.Module, args: tuple[torch.Tensor, ...], dynamic_shapes: tuple, path: Path) -> dict:
    """torch.export(module, args) -> AOTInductor package at `path`; returns facts for the manifest
    (ops implementation used, export and compile seconds)."""
    import time

    module = module.eval()
    on_gpu = args[0].is_cuda
    mode = "auto" if on_gpu else "reference"
    facts: dict = {"ops": mode}
    t0 = time.perf_counter()
    try:
        ep = _export(module, args, dynamic_shapes, mode)
    except Exception as e:  # custom-op tracing can fail in many ways; the references always export
        if mode == "reference":
            raise
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
        log.warning("torch.export with the Triton ops failed (%s); exporting the eager reference ops instead", reason)
        facts.update(ops="reference", ops_fallback_reason=reason)
        ep = _export(module, args, dynamic_shapes, "reference")
    t1 = time.perf_counter()
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    facts.update(export_seconds=round(t1 - t0, 3), compile_seconds=round(time.perf_counter() - t1, 3))
    return facts


def load_package(path: str | Path, device: torch.device | str = "cpu"):
    """The compiled denoiser from a .pt2: a callable on positional tensors returning the velocity."""
    dev = torch.device(device)
    index = (dev.index or 0) if dev.type == "cuda" else -1
    return torch._inductor.aoti_load_package(str(path), device_index=index)

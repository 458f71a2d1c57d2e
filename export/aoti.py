"""AOTInductor: torch.export of the denoiser with dynamic dims, compiled into a .pt2 package.

The package holds the generated C++/CUDA code, the compiled Triton kernels and the weights (mmapped
from the shared library above 2 GB), so `load_package` needs only torch: not bbf_rt.model, not the
Python source of the DiT. By default the eager reference ops are exported and Inductor generates
the kernels (attention stays aten SDPA: flash attention on the GPU). With ExportConfig.aoti_ops="auto" on
CUDA, our Triton kernels (registered with `torch.library.triton_op`) are compiled in instead; if
torch.export cannot trace them the export falls back to the references (one warning naming why).
That path built on the H100 (torch 2.11) but the process died at load or first call, so it is opt-in.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from bbf_rt import ops

log = logging.getLogger(__name__)


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes: tuple, mode: str):
    with ops.implementation(mode), torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def compile_package(module: torch.nn.Module, args: tuple[torch.Tensor, ...], dynamic_shapes: tuple, path: Path,
                    mode: str = "reference") -> dict:
    """torch.export(module, args) -> AOTInductor package at `path`; returns facts for the manifest
    (ops implementation used, export and compile seconds). mode: "reference" or "auto" (Triton ops)."""
    import time

    module = module.eval()
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

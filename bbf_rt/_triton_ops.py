"""Registry of the Triton kernels usable on this machine (imported only when a CUDA tensor asks)."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

log = logging.getLogger(__name__)
_cache: dict[str, ModuleType | None] = {}


def get(name: str) -> ModuleType | None:
    """kernels/<name>/triton.py as a module, or None (with one logged warning) if it cannot be used."""
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(f"bbf_rt.kernels.{name}.triton")
        except ImportError as e:  # no Triton, or no kernel written for this op yet
            log.warning("Triton kernel for %s unavailable (%s); using the PyTorch reference", name, e)
            _cache[name] = None
    return _cache[name]


# Import every kernel now, on this module's first import (outside any compiled region): torch.compile
# cannot trace importlib, so a first lookup from inside torch.compile(fullgraph=True) would break the graph.
for _name in ("attention", "rope", "norm_modulate", "gated_residual", "group_norm", "conv_epilogue", "thin_conv",
              "pixels", "fp8_linear", "int8_attention", "fusion"):
    get(_name)

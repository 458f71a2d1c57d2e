"""bbf-rt: an optimized inference runtime for BBF-style generative video frame interpolation."""
from __future__ import annotations

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout (python -m bbf_rt.cli or torchrun from the repo root), kernels/, export/ and bench/ sit
# beside this package rather than inside it, where pyproject's wheel.packages puts them on install.
_src = _Path(__file__).resolve().parent
if not (_src / "kernels").is_dir() and (_src.parent / "kernels" / "__init__.py").is_file():
    __path__.append(str(_src.parent))  # noqa: F821 (the package's own __path__)


def interpolate(*args, **kwargs):
    """Frames between two boundary frames; see `bbf_rt.runtime.api.interpolate` for the arguments."""
    from bbf_rt.runtime.api import interpolate as _interpolate

    return _interpolate(*args, **kwargs)


interpolate.__doc__ = "Frames between two boundary frames at the given timestamps (see bbf_rt.runtime.api.interpolate)."

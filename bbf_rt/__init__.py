"""bbf-rt: an optimized inference runtime for BBF-style generative video frame interpolation."""
from __future__ import annotations

__version__ = "0.1.0"


def interpolate(*args, **kwargs):
    """Frames between two boundary frames; see `bbf_rt.runtime.api.interpolate` for the arguments."""
    from bbf_rt.runtime.api import interpolate as _interpolate

    return _interpolate(*args, **kwargs)


interpolate.__doc__ = "Frames between two boundary frames at the given timestamps (see bbf_rt.runtime.api.interpolate)."

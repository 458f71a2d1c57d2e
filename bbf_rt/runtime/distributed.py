"""One interpolation on several processes (launched by torchrun): process groups, the model's parallel
hooks, and the video job's parallel entry point behind `bbf-rt interpolate --sp N --cfg-parallel`.

Every rank runs the same job on the same inputs with the same seeds; the DiT's tokens are sharded over
the sequence-parallel group, its batch rows (guidance passes x intervals) over the CFG group, and the
VAE decode over all ranks by frames (see bbf_rt.parallel). Every collective returns the whole result
on every rank, so the sampler state stays identical everywhere; rank 0 writes the output.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from bbf_rt import parallel
from bbf_rt.config import RuntimeConfig
from bbf_rt.errors import BBFInputError
from bbf_rt.model import BBFModel
from bbf_rt.model.vae import CompactVAE
from bbf_rt.runtime.engine import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from the variables torchrun sets, or None outside torchrun."""
    if not all(v in os.environ for v in _TORCHRUN_VARS):
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def check_degrees(world: int, sp: int, cfg_parallel: bool) -> tuple[int, int]:
    """(cfg_degree, sp_degree) for `--sp sp [--cfg-parallel]` over `world` processes.

    Without --cfg-parallel every process is a sequence-parallel rank (world == sp); with it the
    world is cfg_degree x sp groups. Raises BBFInputError naming the flag and what is allowed.
    """
    if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1:
        raise BBFInputError(f"--sp {sp!r} must be an integer >= 1")
    if cfg_parallel:
        if world % sp:
            raise BBFInputError(
                f"--sp {sp} --cfg-parallel on {world} processes: the process count must be a multiple of --sp "
                f"(world = cfg groups x --sp); use --sp in {[d for d in range(1, world + 1) if world % d == 0]}"
            )
        return world // sp, sp
    if sp == 1 and world > 1:
        raise BBFInputError(
            f"{world} processes but neither --sp nor --cfg-parallel says how to split the job over them; "
            f"pass --sp {world}, --cfg-parallel, or both"
        )
    if world != sp:
        raise BBFInputError(
            f"--sp {sp} on {world} processes: without --cfg-parallel --sp must equal the process count "
            f"(torchrun --nproc-per-node {sp}); with --cfg-parallel the count must be a multiple of --sp"
        )
    return 1, sp


def rank_device(device: str | None, local_rank: int) -> torch.device:
    """This process's device: cuda:LOCAL_RANK under a CUDA request (the default where CUDA exists), else the CPU."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is not None and dev.index != local_rank:
        raise BBFInputError(
            f"--device {device!r} under torchrun: each process uses cuda:LOCAL_RANK (here cuda:{local_rank}); "
            "pass --device cuda"
        )
    if local_rank >= torch.cuda.device_count():
        raise BBFInputError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    device: torch.device
    mesh: parallel.Mesh
    owns_group: bool  # True when init_distributed created the default process group (and so destroys it)


def init_distributed(sp: int, cfg_parallel: bool, device: str | None = None, timeout_s: float = 600.0) -> DistContext:
    """Join the job: the default process group (NCCL on CUDA, gloo on the CPU, from torchrun's
    environment unless one exists already) and the cfg x sp mesh. Collective: every rank calls it."""
    owns = not dist.is_initialized()
    if owns:
        env = torchrun_env()
        if env is None:
            missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
            flags = " ".join(([f"--sp {sp}"] if sp != 1 else []) + (["--cfg-parallel"] if cfg_parallel else []))
            raise BBFInputError(
                f"{flags or 'parallel interpolation'} splits one job over several processes and must be launched by "
                f"torchrun (torch.distributed is not initialised and {', '.join(missing)} are not set), e.g. "
                f"torchrun --nproc-per-node {max(sp, 2)} -m bbf_rt.cli interpolate IN -o OUT --factor 2 {flags}"
            )
        rank, world, local_rank = env
    else:
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cfg_degree, sp_degree = check_degrees(world, sp, cfg_parallel)
    dev = rank_device(device, local_rank)
    if owns:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, dev, parallel.make_mesh(cfg_degree, sp_degree), owns)


class Parallelized:
    """The hooks `parallelize` installed on a model; `remove()` restores single-device behaviour."""

    def __init__(self, model: BBFModel) -> None:
        self.model, self.handles = model, []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        parallel.disable_sequence_parallel(self.model.dit)


def parallelize(model: BBFModel, mesh: parallel.Mesh) -> Parallelized:
    """Hook `model` for the mesh: DiT tokens over the SP group, DiT batch rows over the CFG group, and
    the VAE decode by frames over every rank (frame-wise VAEs only). Raises BBFInputError when the
    SP degree does not divide the heads. Callers keep calling model.dit / model.vae as before."""
    p = Parallelized(model)
    if mesh.sp_degree > 1:
        parallel.enable_sequence_parallel(model.dit, mesh.sp_group)
    if mesh.cfg_degree > 1:
        p.handles += parallel.BatchSplit(mesh.cfg_group).attach(model.dit)
    if mesh.world > 1 and model.vae is not None:
        if isinstance(model.vae, CompactVAE):  # frame-wise: each frame decodes on its own
            p.handles += parallel.BatchSplit(None).attach(model.vae.decoder)
            if getattr(model.vae, "fusion", None) is not None:  # the boundary-fusion head is frame-wise too
                p.handles += parallel.BatchSplit(None).attach(model.vae.fusion)
        else:
            log.warning("VAE %s is not frame-wise; its decode runs whole on every rank", type(model.vae).__name__)
    return p


def interpolate_video_parallel(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    sp: int = 1,
    cfg_parallel: bool = False,
    model=None,
    runtime: RuntimeConfig | None = None,
    device: str | None = None,
    progress: bool = True,
    **kwargs,
) -> dict | None:
    """`interpolate_video` split over the torchrun job's processes. Rank 0 writes `out_path` and gets
    the report (with "ranks", "sp" and "cfg_degree" added); the other ranks return None."""
    from bbf_rt.runtime.api import get_model
    from bbf_rt.runtime.video import _check_paths, interpolate_video

    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    backend = kwargs.get("backend", "eager")
    if backend != "eager":
        raise BBFInputError(
            f"--backend {backend!r} with --sp/--cfg-parallel: the parallel DiT runs on the eager backend only "
            "(its collectives sit inside the PyTorch module); use --backend eager"
        )
    _check_paths(in_path, out_path)  # on every rank, so that a bad path fails everywhere, before any collective
    ctx = init_distributed(sp, cfg_parallel, device)
    try:
        # collectives and the CFG batch-split hooks are not captured into CUDA graphs (untested there)
        rt = (runtime or RuntimeConfig()).replace(cuda_graphs=False)
        m = get_model(model, ctx.device, resolve_dtype(rt.dtype, ctx.device))
        hooks = parallelize(m, ctx.mesh)
        try:
            common = dict(model=m, runtime=rt, device=str(ctx.device), **kwargs)
            if ctx.rank == 0:
                report = interpolate_video(in_path, out_path, progress=progress, **common)
                return {**report, "ranks": ctx.world, "sp": ctx.mesh.sp_degree, "cfg_degree": ctx.mesh.cfg_degree}
            # the other ranks take part in every collective and write a copy that is thrown away
            with tempfile.TemporaryDirectory(prefix="bbf-rt-rank") as tmp:
                interpolate_video(in_path, str(Path(tmp) / f"rank{ctx.rank}{Path(out_path).suffix}"), progress=False, **common)
            return None
        finally:
            hooks.remove()
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()

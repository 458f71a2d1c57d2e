"""Multi-GPU latency of one DiT step: sequence parallel (Ulysses) and CFG parallel, under torchrun + NCCL.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 4 bench/bench_parallel.py --presets wan-1.3b \
        --out bench/results/parallel-h200x4.jsonl
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 4 bench/bench_parallel.py --presets wan-14b \
        --out bench/results/parallel-h200x4.jsonl

One launch measures every GPU count up to the launch's (1, 2, 4 by default): a run on n GPUs uses
ranks 0..n-1 while the others wait, so all runs see the same machine, weights and inputs. Per
preset: one step (one DiT call) at 1 row on n GPUs with --sp n (sequence parallel), and, unless
--no-cfg, 2 rows (two guidance passes) on 1 GPU, CFG-parallel on 2 and SP 2 x CFG 2 on 4. Scaling
efficiency = t(1 GPU, same rows) / (n * t(n GPUs)). Peak memory is per GPU (max and per rank).
Accuracy: each run's velocity vs the 1-GPU bf16 one, and the flash-attention rule on a model cut to
--acc-depth blocks (fp32 oracle on one GPU; sharded bf16 error at most 2x the 1-GPU bf16 error).
NVLink multicast (NVLS) is off: NCCL_NVLS_ENABLE=0 is set here before NCCL starts.
Random weights: these rows measure speed, not quality. `--device cpu` runs the same on gloo (tiny preset;
a smoke test of this script, not a measurement).
"""
from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before any NCCL communicator exists (the rule)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bbf_rt import ops, parallel  # noqa: E402
from bbf_rt.config import get_preset  # noqa: E402
from bbf_rt.model.dit import build_dit  # noqa: E402
from bbf_rt.model.flops import dit_flops  # noqa: E402

#: (latent frames, latent height, latent width): Wan's 81 frames are 21 latent frames (temporal stride 4)
SHAPES = {"720p": (21, 90, 160), "480p": (21, 60, 104), "tiny": (3, 10, 14)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _random_init(model: torch.nn.Module, seed: int) -> None:
    """Identical random weights on every rank, drawn in the model's dtype on its device (no fp32 copy of
    a 27B model): matrices ~ N(0, 1/fan_in), vectors as their modules' defaults; gates small but non-zero."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
            elif name.endswith("gate"):
                p.normal_(0.0, 0.1, generator=g)
            elif name.endswith(("norm_q", "norm_k")) or ".norm.weight" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


def build(cfg, dev: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    model = build_dit(cfg, device="meta", dtype=dtype).to_empty(device=dev)  # allocated once, in `dtype`
    assert not list(model.buffers()), "buffers would stay uninitialised by to_empty"
    _random_init(model, seed)
    return model.eval()


def make_inputs(cfg, frames: int, h: int, w: int, rows: int, text_len: int, dev: torch.device, dtype: torch.dtype) -> dict:
    """One DiT call's inputs with `rows` batch rows (guidance passes); identical on every rank."""
    g = torch.Generator(device=dev).manual_seed(1)
    C = cfg.latent_channels
    r = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=g)  # noqa: E731
    text_mask = torch.ones(rows, text_len, dtype=torch.bool, device=dev)
    if rows > 1:
        text_mask[0] = False  # pass 0 is the unconditional one
    return dict(
        x=r(rows, frames, C, h, w), sigma=torch.full((rows,), 0.7, device=dev),
        tau=torch.linspace(0.05, 0.95, frames, device=dev)[None].expand(rows, -1).contiguous(),
        z0=r(rows, C, h, w), z1=r(rows, C, h, w), valid=torch.ones(rows, 1, h, w, device=dev, dtype=dtype),
        diff=torch.zeros(rows, device=dev), text=r(rows, text_len, cfg.text_dim), text_mask=text_mask,
    )


def _times(fn, dev, group, warmup: int, reps: int) -> tuple[list[float], torch.Tensor]:
    """(ms per call, sorted; the last call's output). Each rep's time is the max over the group's ranks
    (a step ends when its slowest rank does)."""
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(reps):
        _sync(dev)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        ms.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(ms, device=dev, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return sorted(t.tolist()), out


def _pct(ts: list[float], q: float) -> float:
    return ts[min(len(ts) - 1, int(q * len(ts)))]


def _peak_gib(dev: torch.device, group) -> list[float]:
    mine = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    return [t.item() for t in parallel.all_gather_dim0(torch.tensor([mine], device=dev, dtype=torch.float64), group)]


def matmul_ceiling(dev: torch.device) -> float | None:
    """bf16 8192^3 matmul TFLOP/s on this GPU (the ceiling for % of peak)."""
    if dev.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(dev)
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12


def run_config(model, kw, n: int, sp: int, cfg_degree: int, dev, warmup: int, reps: int) -> dict | None:
    """Time one DiT call on ranks 0..n-1 (sp x cfg_degree = n). Collective over the default group."""
    mesh = parallel.make_mesh(cfg_degree, sp, ranks=list(range(n)))
    group = dist.new_group(list(range(n)))
    res = None
    if mesh is not None:
        hooks = []
        if sp > 1:
            parallel.enable_sequence_parallel(model, mesh.sp_group)
        if cfg_degree > 1:
            hooks = parallel.BatchSplit(mesh.cfg_group).attach(model)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.no_grad():
            ts, out = _times(lambda: model(**kw), dev, group, warmup, reps)
        res = {"times": ts, "peak": _peak_gib(dev, group), "out": out}
        for h in hooks:
            h.remove()
        parallel.disable_sequence_parallel(model)
    dist.barrier()
    return res


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def base_row(name: str, dev: torch.device) -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = "unknown"
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    nccl = None
    if dev.type == "cuda":
        v = torch.cuda.nccl.version()  # a tuple in recent releases, an int in older ones
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return {
        "name": name, "gpu": gpu, "torch": torch.__version__, "nccl": nccl, "git": sha,
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def bench_preset(preset: str, shape: str, a, dev, dtype, ceiling: float | None) -> list[dict]:
    cfg = get_preset(preset)
    world = dist.get_world_size()
    frames, h, w = SHAPES[shape]
    tokens = frames * (h // cfg.patch[0]) * (w // cfg.patch[1])
    model = build(cfg, dev, dtype)
    gpus = [n for n in a.gpus if n <= world]
    # (gpus, sp, cfg degree, rows): rows = guidance passes in the call
    configs = [(n, n, 1, 1) for n in gpus]
    if a.cfg:
        configs += [(1, 1, 1, 2)] + [(n, n // 2, 2, 2) for n in gpus if n >= 2]
    base = {}
    rows_out = []
    for n, sp, cd, rows in configs:
        if cfg.heads % sp:
            continue
        kw = make_inputs(cfg, frames, h, w, rows, a.text_len, dev, dtype)
        res = run_config(model, kw, n, sp, cd, dev, a.warmup, a.reps)
        if dist.get_rank() != 0:
            continue
        p50 = _pct(res["times"], 0.5)
        if n == 1:
            base[rows] = (p50, res["out"])
        t1, ref = base[rows]
        flops = dit_flops(cfg, frames, tokens // frames, {"text": a.text_len}, batch=rows)
        row = {
            **base_row("dit_step_parallel", dev), "backend": "eager", "preset": preset, "dtype": str(dtype)[6:],
            "shape": {"name": shape, "frames": frames, "latent_hw": [h, w], "tokens": tokens, "text_len": a.text_len, "rows": rows},
            "gpus": n, "sp": sp, "cfg_degree": cd,
            "p20_ms": _pct(res["times"], 0.2), "p50_ms": p50, "p80_ms": _pct(res["times"], 0.8),
            "t1_ms": t1, "speedup": t1 / p50, "scaling_eff": t1 / (n * p50),
            "gflop": flops / 1e9, "tflops_per_gpu": flops / (p50 * 1e-3) / 1e12 / n, "ceiling_tflops": ceiling,
            "pct_ceiling": (100 * flops / (p50 * 1e-3) / 1e12 / n / ceiling) if ceiling else None,
            "peak_mem_gib": max(res["peak"]), "peak_mem_gib_per_rank": res["peak"],
            "rel_err_vs_1gpu": _err(res["out"], ref), "reps": a.reps, "warmup": a.warmup,
            "model_config": asdict(cfg),
        }
        rows_out.append(row)
        print(json.dumps(row, sort_keys=True), flush=True)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if a.acc_depth > 0:
        rows_out += accuracy(cfg, shape, a, dev, dtype, gpus)
    return rows_out


def accuracy(cfg, shape: str, a, dev, dtype, gpus: list[int]) -> list[dict]:
    """Flash-attention rule for the sharded model, at full token count on a model cut to --acc-depth blocks:
    err(sharded low precision vs fp32 oracle) <= 2 * err(1-GPU low precision vs the oracle)."""
    small = replace(cfg, depth=a.acc_depth)
    frames, h, w = SHAPES[shape]
    model = build(small, dev, torch.float32)
    kw = make_inputs(small, frames, h, w, 1, a.text_len, dev, dtype)
    kw32 = {k: (v.float() if v.is_floating_point() else v) for k, v in kw.items()}
    with torch.no_grad(), ops.implementation("reference"):  # the oracle: eager references in fp32
        oracle = model(**kw32) if dist.get_rank() == 0 else None
    model.to(dtype)
    out = []
    for n in gpus:
        if small.heads % n:
            continue
        res = run_config(model, kw, n, n, 1, dev, 0, 1)
        if dist.get_rank() != 0:
            continue
        err = (res["out"].float() - oracle).abs().max().item()
        if n == 1:
            plain = err
        row = {
            **base_row("dit_parallel_accuracy", dev), "preset": cfg.name, "depth": small.depth, "dtype": str(dtype)[6:],
            "shape": {"name": shape, "frames": frames, "latent_hw": [h, w]}, "gpus": n, "sp": n,
            "max_err_vs_fp32": err, "max_err_1gpu_vs_fp32": plain, "ratio": err / plain if plain else None,
            "passes_2x_rule": err <= 2 * plain,
        }
        out.append(row)
        print(json.dumps(row, sort_keys=True), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSONL file the rows are appended to (rank 0 writes)")
    ap.add_argument("--presets", default="wan-1.3b,wan-14b")
    ap.add_argument("--shape", default="720p", choices=sorted(SHAPES))
    ap.add_argument("--gpus", default="1,2,4", help="GPU counts to measure (each <= the launch's processes)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--no-cfg", dest="cfg", action="store_false", help="skip the 2-pass CFG-parallel runs")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--acc-depth", type=int, default=2, help="blocks of the accuracy model (0: skip)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    a = ap.parse_args()
    a.gpus = sorted({1} | {int(x) for x in a.gpus.split(",")})  # 1 GPU is every efficiency's baseline
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun, e.g. torchrun --standalone --nproc-per-node 4 bench/bench_parallel.py --out ...")
    local = int(os.environ["LOCAL_RANK"])
    if a.device == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev, timeout=timedelta(minutes=10))
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    ceiling = matmul_ceiling(dev) if dist.get_rank() == 0 else None
    rows = []
    try:
        for p in a.presets.split(","):
            rows += bench_preset(p, a.shape, a, dev, dtype, ceiling)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if dist.get_rank() == 0 and rows:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                for r in rows:
                    f.write(json.dumps(r, sort_keys=True) + "\n")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

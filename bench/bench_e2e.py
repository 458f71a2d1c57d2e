"""End-to-end ablation ladder: eager fp32 -> bf16 -> kernels -> CUDA graphs -> step caching -> FP8, plus peers.

    python bench/bench_e2e.py --out bench/results/e2e-h100.jsonl [--model CKPT] [--scenarios player,wan]
    bbf-rt bench --out ...            (the same script, from a source checkout)
    python bench/plot_e2e.py bench/results/e2e-h100.jsonl   (PNG of the ladder)

Each rung adds one thing to the one before: fp32 (eager, reference ops = aten + SDPA: plain PyTorch),
bf16 (the "PyTorch eager" peer), kernels (bbf_rt.ops Triton), graphs (one CUDA graph per step),
step-cache (TeaCache-style skipping, --step-cache T), fp8 (bbf_rt.runtime.quant when present).

player: bbf-s, --player-size (1280x720) 2x at --batches (1, 4): per clip = VAE-encode batch+1 frames, denoise
  `batch` intervals at tau 1/2, VAE-decode, copy to the host (what a player waits for); per step = the
  sampling loop / steps; frames/s = generated frames / clip time; PSNR (8-bit RGB) vs eager fp32 on the
  same frames and seed. At the product's 2 steps step caching cannot skip (the first and last step always
  run), so its rung runs at --cache-steps (20) next to the graphs rung at those steps; its row also gives
  the probe + host-sync overhead per step (a threshold that never skips). A `Player.push` latency row
  follows. Peers: torch.compile (mode default) of the bf16 DiT, and RIFE (bbf_rt.peers) when installed.
wan: the wan-1.3b DiT at --wan-latent (21x60x104 = 480p x 81 frames, 32,760 tokens) with text (--wan-text
  tokens) + audio guidance = 3 batched passes, --wan-steps (50) steps. Per step = one guided call timed;
  clip = steps x per step, extrapolated (stated in each row; the Wan VAE is external, not timed). Quality:
  PSNR of one guided step's velocity vs fp32 (--wan-fp32; an fp32 step is an estimated ~20 s) or else bf16 eager.
  Step caching: DiT calls and latent PSNR come from a full --wan-steps run at --wan-cache-frames latent
  frames (same weights, threshold, solver); its clip = calls x the graphs step + probes, extrapolated.

Random weights unless --model (player only; no trained Wan-shape model exists): those rows measure speed,
and their PSNR measures the runtime's numerical error, not the model's quality. Every measurement is
guarded: a failure writes an error row and the run goes on (exit status 1 if any). --budget-s: a
measurement that would start after the budget writes a skipped row instead. Timing: median of --reps
after --warmup, CUDA events on the GPU (perf_counter on the CPU).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from bbf_rt.bench.e2e_common import LADDER, PEERS, Rows, Rung, matmul_ceiling
from bbf_rt.bench.e2e_player import PlayerCase
from bbf_rt.bench.e2e_wan import WanCase
from bbf_rt.runtime.engine import resolve_device

__all__ = ["LADDER", "PEERS", "PlayerCase", "Rows", "Rung", "WanCase", "build_parser", "main", "matmul_ceiling"]

REPO = Path(__file__).resolve().parent.parent


# -------------------------------------------------------------------------------------------------- main


def _size(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1280x720 or 21x60x104") from None


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        got = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
        bad = [t for t in got if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not among {allowed}")
        return got
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bbf-rt bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file the rows are appended to")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--model", default=None, help="trained checkpoint for the player case (quality rows); default random weights")
    p.add_argument("--scenarios", type=_names(("player", "wan")), default=["player", "wan"])
    p.add_argument("--rungs", type=_names(tuple(LADDER)), default=list(LADDER), help=f"comma list of {', '.join(LADDER)}")
    p.add_argument("--peers", type=_names(PEERS), default=list(PEERS), help="comma list of rife, compile (or none)")
    p.add_argument("--step-cache", type=float, default=0.1, help="step-cache threshold of the step-cache rung")
    p.add_argument("--fp8-attention", default="exact", help="attention precision of the fp8 rung: exact, int8 or int8-fp8")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=240.0, help="start no measurement after this many seconds")
    p.add_argument("--player-preset", default="bbf-s")
    p.add_argument("--player-size", type=_size, default=(1280, 720), help="WxH")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    p.add_argument("--player-steps", type=int, default=2)
    p.add_argument("--no-fusion", action="store_true", help="player: decode with the plain VAE decoder, not the fusion head")
    p.add_argument("--cache-steps", type=int, default=20, help="steps of the player's step-cache rung and its baseline")
    p.add_argument("--wan-preset", default="wan-1.3b")
    p.add_argument("--wan-latent", type=_size, default=(21, 60, 104), help="FxHxW latent (480p x 81 frames: 21x60x104)")
    p.add_argument("--wan-text", type=int, default=512, help="text tokens")
    p.add_argument("--wan-steps", type=int, default=50)
    p.add_argument("--wan-solver", default="unipc")
    p.add_argument("--wan-shift", type=float, default=5.0)
    p.add_argument("--wan-cache-frames", type=int, default=3, help="latent frames of the full step-cache run")
    p.add_argument("--wan-warmup", type=int, default=1)
    p.add_argument("--wan-reps", type=int, default=3)
    p.add_argument("--wan-fp32", action="store_true", help="also run the fp32 rung (the quality reference) at the wan shape")
    p.add_argument("--text-scale", type=float, default=5.0)
    p.add_argument("--audio-scale", type=float, default=3.0)
    p.add_argument("--git-sha", default=None, help="recorded instead of the package folder's git HEAD (device copies)")
    return p


def _versions(dev: torch.device, git_sha: str | None = None) -> dict:
    """Versions for every row; `git_sha` (a device copy has no .git) stands in for the checkout's HEAD."""
    sha = git_sha
    if not sha:
        try:
            sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip()
        except OSError:
            sha = "unknown"
    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = None
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return {"gpu": gpu, "device": str(dev), "torch": torch.__version__, "triton": tri, "cuda": torch.version.cuda, "git": sha or "unknown"}


def main(argv: list[str] | None = None) -> int:
    """Run the ladder; returns 0, or 1 when any measurement wrote an error row."""
    a = build_parser().parse_args(argv)
    if len(a.player_size) != 2 or len(a.wan_latent) != 3:
        raise SystemExit(f"--player-size must be WxH and --wan-latent FxHxW; got {a.player_size}, {a.wan_latent}")
    dev = resolve_device(a.device)
    try:
        ceiling = matmul_ceiling(dev)
    except RuntimeError as e:  # rows then carry no % of peak
        print(f"bench_e2e: matmul ceiling not measured: {e}", file=sys.stderr)
        ceiling = None
    rows = Rows(a.out, {**_versions(dev, a.git_sha),
                        "args": {k: v for k, v in vars(a).items() if k not in ("out", "git_sha")}}, a.budget_s)
    cases: dict = {}
    # the ladders first, then the peers (compiling is the slowest part and the budget cuts from the end)
    for scen, cls in (("player", PlayerCase), ("wan", WanCase)):
        if scen in a.scenarios:
            base = {"name": "e2e", "scenario": scen, "rung": "setup"}
            rows.guard(base, lambda: cases.__setitem__(scen, cls(a, dev, rows, ceiling)) or [], None)
            if scen in cases:
                rows.guard(base, lambda: cases[scen].ladder() or [], None)
    for scen, case in cases.items():
        rows.guard({"name": "e2e", "scenario": scen, "rung": "peers"}, lambda: case.peers() or [], None)
    print(f"bench_e2e: {rows.count} rows ({rows.errors} errors) -> {a.out} in {time.perf_counter() - rows.t0:.0f} s", file=sys.stderr)
    return 1 if rows.errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the held-out generic PSNR of a checkpoint is lost: the DiT, the decoder or the fusion head.

    python bench/quality_budget.py --model CKPT --out bench/results/quality-budget-cpu.jsonl [--steps 1,2]

One JSONL row per source of in-between latents, each decoded both ways (`decoder`: `plain` VAE decoder,
or `fusion` through the boundary-fusion head), all on the held-out clips of `bbf_rt.train.metrics`
(paired means, linear blending in every row as `psnr_linear`):
- `truth-latents`: the VAE's latents of the true in-between frames. The ceiling of any DiT: what a
  perfect latent prediction would score through this decoder (and this head);
- `latent-blend`: (1 - tau) z0 + tau z1 of the boundary latents, no DiT: the floor a DiT must beat;
- `dit`: the DiT's sample with N Euler steps (N from `--steps`), as `bbf-rt` runs it.
The gaps between rows say which component to train next.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import time
from pathlib import Path

import torch

from bbf_rt.bench.bench_e2e import _versions
from bbf_rt.bench.e2e_common import Rows
from bbf_rt.model import load_model
from bbf_rt.runtime.api import DEFAULT_WEIGHTS
from bbf_rt.train import metrics


@contextlib.contextmanager
def plain_decoder(model, plain: bool):
    """Within the block the VAE decodes without its fusion head when `plain` (restored on exit)."""
    head = model.vae.fusion
    if plain:
        model.vae.fusion = None
    try:
        yield
    finally:
        model.vae.fusion = head


def _decode(model, z: torch.Tensor, b: dict) -> torch.Tensor:
    f0, f1 = b["frame0"] * 2 - 1, b["frame1"] * 2 - 1
    out = model.vae.decode_between(z, f0.to(z.device), f1.to(z.device), b["taus"].to(z.device))
    return ((out.float().clamp(-1, 1) + 1) / 2).to(b["targets"].device)


def predictor(model, source: str, steps: int | None = None):
    """(batch, withheld) -> frames in [0, 1] for one source of in-between latents (see the module docstring);
    `steps`: the DiT's Euler steps (source `dit` only)."""
    dev = next(model.parameters()).device

    def truth(b: dict, withhold) -> torch.Tensor:
        return _decode(model, model.vae.encode((b["targets"] * 2 - 1).to(dev)), b)

    def blend(b: dict, withhold) -> torch.Tensor:
        z = model.vae.encode((torch.stack([b["frame0"], b["frame1"]], 1) * 2 - 1).to(dev))
        t = b["taus"].to(dev)[..., None, None, None]
        return _decode(model, (1 - t) * z[:, :1] + t * z[:, 1:], b)

    def dit(b: dict, withhold) -> torch.Tensor:
        return metrics.predict(model, b, withhold, steps=steps)

    return {"truth-latents": truth, "latent-blend": blend, "dit": dit}[source]


@torch.no_grad()
def budget(model, steps=(1, 2), size: int = 128, batches: int = 4, device: str | torch.device = "cpu") -> list[dict]:
    """Rows (source, steps, decoder, psnr, ssim, psnr_linear, samples) for every source and decoder."""
    model.eval()
    plans = [("truth-latents", None), ("latent-blend", None)] + [("dit", n) for n in steps]
    decoders = ("plain", "fusion") if model.vae.fusion is not None else ("plain",)
    rows = []
    for source, n in plans:
        for dec in decoders:
            t0 = time.perf_counter()
            with plain_decoder(model, dec == "plain"):
                g = metrics.evaluate(predictor(model, source, n), size, size, batches, suites=(), device=device)["generic"]
            rows.append({"source": source, "steps": n, "decoder": dec, "psnr": g["psnr_model"], "ssim": g["ssim_model"],
                         "psnr_linear": g["psnr_linear"], "ssim_linear": g["ssim_linear"], "samples": g["samples"],
                         "size": [size, size], "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/quality_budget.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file the rows are appended to")
    p.add_argument("--model", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--steps", default="1,2", help="comma list of Euler step counts for the DiT rows")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batches", type=int, default=4, help="held-out batches of 8 clips")
    p.add_argument("--device", default="cpu")
    p.add_argument("--git-sha", default=None)
    a = p.parse_args(argv)
    try:
        steps = [int(v) for v in a.steps.split(",") if v.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        print(f"quality_budget: --steps {a.steps!r}: allowed is a comma list of integers >= 1", file=sys.stderr)
        return 2
    path = Path(a.model)
    if not path.is_file():
        print(f"quality_budget: --model {a.model}: no such checkpoint file", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    model = load_model(path, device=dev)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    rows = Rows(a.out, {"name": "quality_budget", "model": path.name, "model_sha256": sha, **_versions(dev, a.git_sha)},
                budget_s=1e9)
    for r in budget(model, steps, a.size, a.batches, dev):
        rows.write(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())

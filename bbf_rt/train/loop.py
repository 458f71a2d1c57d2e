"""Training loop: flow matching for the DiT, reconstruction for the VAE, EMA, time-boxed resumable runs.

DiT loss (rectified flow, as the sampler): x0 = VAE latents of the target frames, eps ~ N(0, I),
sigma = shift(sigmoid(m + s n)), n ~ N(0, 1) (logit-normal), and sigma = 1 exactly for a fraction
`sigma_one` of samples (the first step of every few-step sampler); x = (1 - sigma) x0 + sigma eps,
target v = eps - x0, per-sample L_i = mean (v_theta - v)^2, loss = mean_i w_i L_i with the
curriculum's difference weights w_i (mean 1).
VAE loss: |x_hat - x|_1 + edge_weight * |grad x_hat - grad x|_1 (finite differences, no perceptual
net) + 1e-5 * mean z^2; then the latent shift/scale buffers are set from data (per-channel mean, 1/std).
Fusion loss (stage `fusion`, the boundary-fusion head alone): the same L1 + edge terms on the fused
in-between frames, per sample weighted by the curriculum's w_i; the head sees what it will see at run
time, the decoded output of the 2-step sampler (for a fraction `fusion_sampled` of the samples, default
all; the rest decode the true targets' latents).

Every random draw is a pure function of (seed, stage, step): batches come from the generators by
index, noise/sigma/dropout from generators seeded by the global step. A saved state (model, EMA,
AdamW moments, step counters, RNG) therefore resumes bit-exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bbf_rt import ops
from bbf_rt.config import ModelConfig, get_preset
from bbf_rt.errors import BBFError, BBFInputError, CheckpointError
from bbf_rt.model import BBFModel, save_checkpoint
from bbf_rt.model.vae import per_frame
from bbf_rt.runtime.engine import resolve_device
from bbf_rt.train import curriculum
from bbf_rt.train.ambiguity import all_captions, make_suite
from bbf_rt.train.batching import TextBank, collate, conditions
from bbf_rt.train.data import GenericMotion, batch_seed
from bbf_rt.train.shards import MIB, load_shards, save_shards

NOISE_SALT = 0x0015E
EXPORT_PARTS = ("all", "backbone", "branches")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the stage; stored in every state's index."""

    preset: str = "bbf-s"
    height: int = 128
    width: int = 128
    batch: int = 64
    lr_scale: float = 1.0  # multiplies the stage's learning rate
    backbone_lr_mult: float | None = None  # stage 3: None = the stage's (0: frozen); e.g. 0.1 = low learning rate
    weight_decay: float = 0.01
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    sigma_mean: float = 0.0
    sigma_std: float = 1.0
    sigma_shift: float = 1.0
    sigma_one: float = 0.05
    vae_edge_weight: float = 0.5
    shard_mib: float = 16.0
    save_minutes: float = 4.0
    keep: int = 2
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    fps: float = 25.0
    fusion_sampled: float = 1.0  # stage fusion: share of samples decoded from the 2-step sampler's latents
    fusion_steps: int = 2  # the sampler steps of those latents (RuntimeConfig.steps at run time)


def _is_branch(name: str) -> bool:
    return ".branches." in name or name.startswith("dit.embed.") or name == "dit.audio_pos"


def _l1_edge(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame reconstruction terms of (N, 3, H, W) frames: mean |out - target| and the summed mean
    |d/dx| and |d/dy| differences of their finite-difference gradients, each (N,)."""
    dims = (1, 2, 3)
    l1 = (out - target).abs().mean(dims)
    edge = ((out.diff(dim=-1) - target.diff(dim=-1)).abs().mean(dims)
            + (out.diff(dim=-2) - target.diff(dim=-2)).abs().mean(dims))
    return l1, edge


def _is_fusion(name: str) -> bool:
    return name.startswith("vae.fusion.")


def _without_fusion(cfg: ModelConfig) -> ModelConfig:
    return replace(cfg, vae_fusion=None)


class Trainer:
    """One stage of training of a BBFModel; `step()` is one optimizer step."""

    def __init__(self, cfg: TrainConfig, stage: str, text: TextBank | None = None) -> None:
        self.cfg, self.stage = cfg, curriculum.get_stage(stage)
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = BBFModel(get_preset(cfg.preset)).to(self.device)
        if self.model.vae is None:
            raise BBFInputError(f"preset {cfg.preset!r} has no built-in VAE; training needs one")
        self.ema = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.global_step, self.stage_step, self.vae_calibrated = 0, 0, False
        self.text = text
        st = self.stage
        data_seed = cfg.seed * 16 + list(curriculum.STAGES).index(st.name)
        self.generic = {  # one source per target count; the same scenes seed, different tau sets
            n: GenericMotion(cfg.height, cfg.width, n_targets=n, tau_mode=st.tau_mode, pool=st.pool,
                             context_per_side=1 if st.trains == "branches" else 0, seed=data_seed, device=self.device,
                             diff_stats=(self.model.cfg.diff_mu, self.model.cfg.diff_sigma))
            for n in st.n_targets
        }
        self.stills = self.generic[st.n_targets[0]]
        self.suites, self.audio_encoder = {}, None
        if st.trains == "branches":
            for name in curriculum.source_counts(st.mix, cfg.batch):
                if name != "generic":
                    self.suites[name] = make_suite(name, cfg.height, cfg.width, n_targets=st.n_targets[0], seed=data_seed,
                                                   fps=cfg.fps, device=self.device)
            from bbf_rt.runtime.api import make_audio_encoder

            self.audio_encoder = make_audio_encoder(self.model, self.device)
        self._build_optimizer()

    # ---- parameters ---------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        st, lr = self.stage, self.stage.lr * self.cfg.lr_scale
        groups: dict[tuple[str, bool], list] = {}
        self.names = {}
        for name, p in self.model.named_parameters():
            if st.trains == "vae":
                mult = 1.0 if name.startswith("vae.") else 0.0
            elif st.trains == "decoder":
                mult = 1.0 if name.startswith("vae.decoder.") else 0.0
            elif st.trains == "fusion":
                mult = 1.0 if _is_fusion(name) else 0.0
            elif name.startswith("vae."):
                mult = 0.0
            elif st.trains == "branches":
                low = st.backbone_lr_mult if self.cfg.backbone_lr_mult is None else self.cfg.backbone_lr_mult
                mult = 1.0 if _is_branch(name) else low
            else:
                mult = 1.0
            p.requires_grad_(mult > 0)
            if mult > 0:
                groups.setdefault((f"{mult}", p.ndim >= 2), []).append(p)
                self.names[p] = name
        param_groups = [
            {"params": ps, "base_lr": lr * float(m), "lr": lr * float(m), "weight_decay": self.cfg.weight_decay if decay else 0.0}
            for (m, decay), ps in sorted(groups.items())
        ]
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(param_groups, betas=(0.9, self.cfg.beta2), eps=1e-8, fused=fused or None)

    def finalize_vae(self, batches: int = 8) -> None:
        """Freeze the VAE as the DiT will see it: EMA weights in, latent shift/scale from data statistics."""
        vae = self.model.vae
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n.startswith("vae."):
                    p.copy_(self.ema[n])
            zs = [vae.encoder(self.stills.stills(10**6 + i, 16) * 2 - 1).float() for i in range(batches)]
            z = torch.cat(zs).transpose(0, 1).flatten(1)  # (C, N*h*w)
            vae.shift.copy_(z.mean(1))
            vae.scale.copy_(1.0 / z.std(1).clamp_min(1e-4))
        self.vae_calibrated = True

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        ps = self.params()
        torch._foreach_lerp_([self.ema[self.names[p]] for p in ps], [p.detach() for p in ps], 1.0 - decay)

    def params(self) -> list[torch.nn.Parameter]:
        """Trainable parameters in optimizer order."""
        return [p for g in self.opt.param_groups for p in g["params"]]

    # ---- data and losses ----------------------------------------------------------------------
    def batch(self, step: int) -> dict:
        st, B = self.stage, self.cfg.batch
        if st.trains in ("vae", "decoder"):
            return {"stills": self.stills.stills(step, B)}
        lam = curriculum.lam_at(st, step)
        counts = curriculum.source_counts(st.mix, B)
        parts = []
        for name, n in counts.items():
            gen = self.generic[curriculum.targets_at(st, step)]
            parts.append(gen.batch(step, n, lam) if name == "generic" else self.suites[name].batch(step, n))
        return collate(parts)

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def vae_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x = batch["stills"] * 2 - 1
        vae = self.model.vae
        with torch.no_grad() if self.stage.trains == "decoder" else contextlib.nullcontext():
            z = vae.encoder(x)
        xr = vae.decoder(z).float()
        l1, edge = (v.mean() for v in _l1_edge(xr, x))
        loss = l1 + self.cfg.vae_edge_weight * edge + 1e-5 * z.float().pow(2).mean()
        return loss, {"l1": l1.detach(), "edge": edge.detach()}

    def fusion_loss(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        from bbf_rt.runtime import sampler

        B, Fr = batch["targets"].shape[:2]
        vae, dit = self.model.vae, self.model.dit
        if getattr(vae, "fusion", None) is None:
            raise BBFInputError(f"stage fusion: preset {self.cfg.preset!r} has no fusion head (ModelConfig.vae_fusion)")
        f0, f1, y = batch["frame0"] * 2 - 1, batch["frame1"] * 2 - 1, batch["targets"] * 2 - 1
        with torch.no_grad():
            use = torch.rand(B, generator=gen, device=self.device) < self.cfg.fusion_sampled
            bounds = vae.encode(torch.stack([f0, f1], 1)).float()
            z0, z1 = bounds[:, 0], bounds[:, 1]
            valid = torch.ones(B, 1, *z0.shape[-2:], device=self.device)
            noise = torch.randn((B, Fr, *z0.shape[1:]), generator=gen, device=self.device)
            den = lambda x, sig: dit(x, sig, batch["taus"], z0, z1, valid, batch["diff"]).float()  # noqa: E731
            z = sampler.sample(den, noise, sampler.make_sigmas(self.cfg.fusion_steps), solver="euler")
            if not bool(use.all()):  # the targets are encoded only for the samples that need them (CPU time)
                z[~use] = vae.encode(y[~use]).float()
            x = vae.decoder(vae.denormalize(z.flatten(0, 1)))
        out = vae.fusion(x, per_frame(f0, Fr), per_frame(f1, Fr), batch["taus"].flatten().float()).float()
        t = y.flatten(0, 1)
        l1, edge = _l1_edge(out, t)
        w = curriculum.loss_weights(batch["diff"], self.stage.alpha, self.stage.d_max)
        loss = (w * (l1 + self.cfg.vae_edge_weight * edge).view(B, Fr).mean(1)).mean()
        plain = (x.float() - t).abs().mean()
        return loss, {"l1": l1.mean().detach(), "l1_decoded": plain.detach(), "d_mean": batch["diff"].mean().detach()}

    def sample_sigma(self, B: int, gen: torch.Generator) -> torch.Tensor:
        c = self.cfg
        n = torch.randn(B, generator=gen, device=self.device)
        s = torch.sigmoid(c.sigma_mean + c.sigma_std * n)
        s = c.sigma_shift * s / (1 + (c.sigma_shift - 1) * s)
        one = torch.rand(B, generator=gen, device=self.device) < c.sigma_one
        return torch.where(one, torch.ones_like(s), s)

    def dit_loss(self, batch: dict, gen: torch.Generator, keep: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        B, Fr = batch["targets"].shape[:2]
        vae, dit = self.model.vae, self.model.dit
        with torch.no_grad():
            use_ctx = self.stage.trains == "branches"  # the context frames feed only the context branch
            frames = [batch["frame0"][:, None], batch["frame1"][:, None], batch["targets"]] + ([batch["context"]] if use_ctx else [])
            pix = torch.cat(frames, 1)
            lat = vae.encode(pix * 2 - 1).float()  # (B, 2 + F + Fc, C, h, w)
        z0, z1, x0, ctx = lat[:, 0], lat[:, 1], lat[:, 2 : 2 + Fr], lat[:, 2 + Fr :]
        sigma = self.sample_sigma(B, gen)
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        s = sigma.view(B, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        kw = {}
        if self.stage.trains == "branches":
            with torch.no_grad():
                kw = conditions(self.model, batch, ctx, keep, self.text, self.audio_encoder)
        valid = torch.ones(B, 1, *z0.shape[-2:], device=self.device)
        pred = dit(xt, sigma, batch["taus"], z0, z1, valid, batch["diff"], **kw)
        per = (pred.float() - (noise - x0)).pow(2).mean((1, 2, 3, 4))
        w = curriculum.loss_weights(batch["diff"], self.stage.alpha, self.stage.d_max)
        return (w * per).mean(), {"mse": per.mean().detach(), "d_mean": batch["diff"].mean().detach()}

    def step(self) -> dict:
        """One optimizer step; returns float stats."""
        st = self.stage
        factor = min(1.0, (self.stage_step + 1) / max(1, st.warmup))
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        batch = self.batch(self.stage_step)
        seed = batch_seed(self.cfg.seed, NOISE_SALT, self.global_step)
        gen = torch.Generator(self.device).manual_seed(seed)
        keep = curriculum.dropout_keep(torch.Generator().manual_seed(seed), self.cfg.batch, st.cond_dropout)
        self.model.train()
        with self._autocast(), ops.implementation("reference"):  # reference ops: differentiable everywhere
            if st.trains in ("vae", "decoder"):
                loss, stats = self.vae_loss(batch)
            elif st.trains == "fusion":
                loss, stats = self.fusion_loss(batch, gen)
            else:
                loss, stats = self.dit_loss(batch, gen, keep)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._update_ema()
        self.global_step += 1
        self.stage_step += 1
        stats.update(loss=loss.detach(), grad_norm=gnorm.detach(), lr=torch.tensor(self.opt.param_groups[0]["lr"]))
        return {k: float(v) for k, v in stats.items()}

    # ---- states ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        t.update({f"ema/{k}": v for k, v in self.ema.items()})
        for p, st in self.opt.state.items():
            for key, val in st.items():
                t[f"optim/{self.names[p]}/{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
        t["rng/cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            t["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        return t

    def meta(self, kind: str) -> dict:
        return {"kind": kind, "stage": self.stage.name, "global_step": self.global_step, "stage_step": self.stage_step,
                "vae_calibrated": self.vae_calibrated, "model_config": json.loads(self.model.cfg.to_json()),
                "train_config": asdict(self.cfg)}

    def save(self, out: str | os.PathLike) -> Path:
        """Full resumable state in out/state-<step>/, out/latest.json pointing at it; older states pruned."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        d = save_shards(out / f"state-{self.global_step:08d}", self.state_tensors(), self.meta("state"),
                        int(self.cfg.shard_mib * MIB))
        tmp = out / ".latest.json.tmp"
        tmp.write_text(json.dumps({"dir": d.name, "stage": self.stage.name, "global_step": self.global_step}))
        os.replace(tmp, out / "latest.json")
        for old in sorted(out.glob("state-*"))[: -max(1, self.cfg.keep)]:
            shutil.rmtree(old)
        return d

    def export(self, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, part: str = "all") -> Path:
        """EMA weights (and buffers) only, in `dtype` (latent scale/shift stay fp32), sharded.

        part: "all"; "backbone" = everything but the condition branches (what stages vae/1/2 train);
        "branches" = the branches only (what stage 3 trains with the backbone frozen).
        """
        if part not in EXPORT_PARTS:
            raise BBFInputError(f"part={part!r}: allowed are {EXPORT_PARTS}")
        sd = self.model.state_dict()
        sd.update(self.ema)
        keep = {k: (v.to(dtype) if v.is_floating_point() and k not in ("vae.scale", "vae.shift") else v)
                for k, v in sd.items() if part == "all" or (part == "branches") == _is_branch(k)}
        return save_shards(out, keep, {**self.meta("weights"), "part": part}, int(self.cfg.shard_mib * MIB))

    def load(self, directory: str | os.PathLike) -> None:
        """Resume from a state or weights directory (or a run folder with latest.json), or start from a
        bbf-rt checkpoint (.safetensors, fresh optimizer). Weights saved without a fusion head load into a
        model with one (the head keeps its initialisation: it returns the plain decoder's frames)."""
        directory = Path(directory)
        if (directory / "latest.json").is_file():
            directory = directory / json.loads((directory / "latest.json").read_text())["dir"]
        if directory.suffix == ".safetensors":
            from bbf_rt.model.checkpoint import load_state

            saved, tensors, cmeta = load_state(directory)
            info = json.loads(cmeta.get("info", "{}"))
            meta = {"kind": "weights", "stage": info.get("stage", ""), "global_step": int(info.get("global_step", 0)),
                    "vae_calibrated": True}
            tensors = {k: v.to(self.device) for k, v in tensors.items()}
        else:
            tensors, meta = load_shards(directory, self.device)
            saved = ModelConfig.from_dict({k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["model_config"].items()})
        gains_fusion = saved.vae_fusion is None and self.model.cfg.vae_fusion is not None
        if saved != self.model.cfg and not (gains_fusion and saved == _without_fusion(self.model.cfg)):
            raise CheckpointError(f"{str(directory)!r} holds a {saved.name!r} model of another shape; this run trains "
                                  f"{self.model.cfg.name!r}")
        if meta["kind"] == "state" and gains_fusion:
            meta = {**meta, "kind": "weights"}  # the optimizer has no moments for the head: start it fresh
            tensors = {**{k[6:]: v for k, v in tensors.items() if k.startswith("model/")},
                       **{k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}}
        if meta["kind"] == "state":
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
            for k in self.ema:
                self.ema[k].copy_(tensors[f"ema/{k}"])
        else:
            missing, unexpected = self.model.load_state_dict(tensors, strict=False)
            bad = [k for k in missing if not (_is_branch(k) or (gains_fusion and _is_fusion(k)))] + list(unexpected)
            if bad:
                raise CheckpointError(f"{str(directory)!r} does not match the model: {bad[:5]}")
            for k, p in self.model.named_parameters():
                self.ema[k].copy_(p.detach())
        self.global_step, self.vae_calibrated = int(meta["global_step"]), bool(meta["vae_calibrated"])
        same_stage = meta["kind"] == "state" and meta["stage"] == self.stage.name
        if not same_stage and self.stage.trains == "branches":
            with torch.no_grad():  # the branches learn on top of the backbone that ships: the EMA one
                for k, p in self.model.named_parameters():
                    p.copy_(self.ema[k])
        if same_stage:
            self.stage_step = int(meta["stage_step"])
            sd = self.opt.state_dict()
            sd["state"] = {}
            for i, p in enumerate(self.params()):
                pre = f"optim/{self.names[p]}/"
                st = {key[len(pre):]: v for key, v in tensors.items() if key.startswith(pre)}
                if st:
                    sd["state"][i] = st
            self.opt.load_state_dict(sd)
            torch.set_rng_state(tensors["rng/cpu"].cpu())
            if "rng/cuda" in tensors and self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng/cuda"].cpu(), self.device)
        if self.stage.trains != "vae" and not self.vae_calibrated:
            self.finalize_vae()


def make_trainer(cfg: TrainConfig, stage: str, resume: str | os.PathLike | None = None, text: TextBank | None = None) -> Trainer:
    tr = Trainer(cfg, stage, text)
    if resume is not None and not Path(resume).exists():
        log.warning("resume=%r does not exist: starting stage %s from scratch", str(resume), stage)
    if resume is not None and Path(resume).exists():
        tr.load(resume)
    elif tr.stage.trains != "vae":
        tr.finalize_vae()  # DiT training from scratch still needs a calibrated (if untrained) VAE
    if tr.stage.trains == "branches" and tr.text is None:
        raise BBFInputError("stage 3 needs caption embeddings: pass text=TextBank(...) or --text-bank FILE")
    return tr


def train(stage: str, minutes: float, out: str | os.PathLike, resume: str | os.PathLike | None = None,
          cfg: TrainConfig = TrainConfig(), text: TextBank | None = None, max_steps: int | None = None,
          export: str | os.PathLike | None = None, progress=None, export_part: str = "all",
          trainer: Trainer | None = None) -> dict:
    """Train `stage` until `minutes` of wall clock (a save included) or `max_steps`; save a state to `out`.

    Stops before the next step would overrun: the budget is checked against the slowest recent step
    plus the measured (or, before the first, estimated) save time; the budget counts from the call, set-up
    included. `trainer` continues an existing Trainer instead of building one. Returns a summary dict.
    """
    if not minutes > 0:
        raise BBFInputError(f"minutes={minutes!r}: allowed is a number > 0")
    t0 = time.monotonic()
    deadline = t0 + 60.0 * minutes
    tr = trainer if trainer is not None else make_trainer(cfg, stage, resume, text)
    cfg = tr.cfg
    # state bytes (weights, EMA, 2 moments: 16 per parameter) at ~200 MB/s until measured; an export adds ~1/4
    save_s = 0.5 + sum(p.numel() for p in tr.model.parameters()) * 16 / 200e6 * (1.25 if export is not None else 1.0)
    last_save, step_s, stats, first = time.monotonic(), 0.0, {}, tr.global_step
    while max_steps is None or tr.global_step - first < max_steps:
        now = time.monotonic()
        if now + 1.5 * step_s + save_s > deadline:
            break
        s0 = time.monotonic()
        stats = tr.step()
        dt = time.monotonic() - s0
        step_s = dt if tr.global_step - first <= 2 else max(dt, 0.9 * step_s)
        if progress is not None and (tr.global_step % 50 == 0 or tr.global_step - first <= 3):
            progress(json.dumps({"step": tr.global_step, "stage": stage, **{k: round(v, 5) for k, v in stats.items()}}))
        if not math.isfinite(stats.get("loss", 0.0)):  # stop at once: no state is saved, the last good one stays
            raise BBFError(f"stage {stage}: non-finite loss {stats.get('loss')} at global step {tr.global_step}; "
                           f"stopped without saving (the newest state in {out} is the last good one)")
        if time.monotonic() - last_save > 60.0 * cfg.save_minutes:
            a = time.monotonic()
            tr.save(out)
            save_s, last_save = (time.monotonic() - a) * (1.25 if export is not None else 1.0) + 1.0, time.monotonic()
    state = tr.save(out)
    if export is not None:
        tr.export(export, part=export_part)
    n = tr.global_step - first
    elapsed = time.monotonic() - t0
    return {"stage": stage, "steps": n, "global_step": tr.global_step, "seconds": round(elapsed, 1),
            "samples_per_s": round(n * cfg.batch / max(elapsed, 1e-9), 1), "state": str(state), **stats}


def weights_to_checkpoint(directories, path: str | os.PathLike, info: dict | None = None) -> Path:
    """Merge exported weights directories (later ones win: e.g. stage-2 backbone, then stage-3 branches) into
    one bbf-rt checkpoint (trained=True) loadable by load_model. Branches absent from all stay at their
    zero-gated initialisation, i.e. the model runs as the backbone alone."""
    dirs = [directories] if isinstance(directories, (str, os.PathLike)) else list(directories)
    tensors, meta, directory = {}, {}, dirs[-1]
    for d in dirs:
        t, meta = load_shards(d)
        tensors.update(t)
    cfg = ModelConfig.from_dict({k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["model_config"].items()})
    torch.manual_seed(0)
    model = BBFModel(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or any(not _is_branch(k) for k in missing):
        raise CheckpointError(f"{str(directory)!r} does not match preset {cfg.name!r}: {(list(unexpected) + missing)[:5]}")
    dtype = next(v.dtype for k, v in tensors.items() if k.startswith("dit."))
    model = model.to(dtype)
    for name in ("scale", "shift"):  # the latent normalisation stays fp32, as exported
        model.vae.register_buffer(name, tensors[f"vae.{name}"].float())
    return save_checkpoint(model, path, trained=True, info={"stage": meta["stage"], "global_step": meta["global_step"], **(info or {})})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bbf_rt.train.loop", description="Train bbf-s one time-boxed stage at a time.")
    ap.add_argument("--stage", choices=list(curriculum.STAGES))
    ap.add_argument("--minutes", type=float, default=9.0)
    ap.add_argument("--out", help="run folder: states go to OUT/state-*, OUT/latest.json")
    ap.add_argument("--resume", help="run folder, state or exported weights to start from (missing: start fresh)")
    ap.add_argument("--export", help="also write EMA weights (bf16 shards) here")
    ap.add_argument("--export-part", choices=EXPORT_PARTS, default="all", help="backbone after vae/1/2, branches after 3")
    ap.add_argument("--text-bank", help="caption embeddings (.safetensors) for stage 3")
    ap.add_argument("--make-text-bank", metavar="FILE", help="embed every suite caption with MiniLM (CPU) and exit")
    ap.add_argument("--to-checkpoint", nargs="+", metavar="DIR", help="WEIGHTS_DIR... FILE: merge exports into one checkpoint")
    ap.add_argument("--max-steps", type=int)
    flags = ("preset", "height", "width", "batch", "lr_scale", "seed", "device", "sigma_one", "ema_decay", "fusion_steps")
    for f in flags:  # TrainConfig fields, typed and defaulted by the dataclass
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(getattr(TrainConfig, f)), default=getattr(TrainConfig, f))
    ap.add_argument("--backbone-lr-mult", type=float, help="stage 3: backbone learning rate / branch learning rate (default 0: frozen)")
    a = ap.parse_args(argv)
    if a.make_text_bank:
        from bbf_rt.model.text import MiniLMTextEncoder

        TextBank.from_encoder(MiniLMTextEncoder(), all_captions()).save(a.make_text_bank)
        print(json.dumps({"text_bank": a.make_text_bank, "captions": len(all_captions())}))
        return 0
    if a.to_checkpoint:
        if len(a.to_checkpoint) < 2:
            ap.error("--to-checkpoint needs at least one weights directory and the output file")
        print(json.dumps({"checkpoint": str(weights_to_checkpoint(a.to_checkpoint[:-1], a.to_checkpoint[-1]))}))
        return 0
    if not a.stage or not a.out:
        ap.error("--stage and --out are required to train")
    if not 0 <= a.sigma_one <= 1 or not 0 <= a.ema_decay < 1 or a.fusion_steps < 1:
        ap.error(f"--sigma-one {a.sigma_one} (allowed 0..1), --ema-decay {a.ema_decay} (0 to below 1), "
                 f"--fusion-steps {a.fusion_steps} (1 or more)")
    cfg = replace(TrainConfig(), **{f: getattr(a, f) for f in (*flags, "backbone_lr_mult")})
    text = TextBank.load(a.text_bank) if a.text_bank else None
    res = train(a.stage, a.minutes, a.out, a.resume, cfg, text, a.max_steps, a.export, progress=lambda s: print(s, flush=True),
                export_part=a.export_part)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The BBF diffusion transformer: boundary-frame interpolation with decoupled condition branches.

Per block (paper's "decoupled multimodal fusion ... sequentially injects"; our reconstruction):

    x = x + g1 * SelfAttn(adaLN(x))                 # 3D RoPE, QK RMSNorm
    x = x + gate_text    * XAttn_text(LN(x), text)     # each branch: own norm, q/k/v/o, zero-init gate
    x = x + gate_image   * XAttn_image(LN(x), ref)
    x = x + gate_audio   * XAttn_audio(LN(x), audio)   # per target frame, its own audio window
    x = x + gate_context * XAttn_ctx(LN(x), context)   # 3D RoPE on q and k: relative space-time offsets
    x = x + g2 * FFN(adaLN(x))

adaLN is driven per frame by timestep + start-end difference embedding + the frame's timestamp.
A modality that is absent for the whole batch skips its branch (no compute); absent for some samples
(a batched classifier-free-guidance pass), its gate is zeroed for those samples, which is the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bbf_rt import ops
from bbf_rt.config import ModelConfig
from bbf_rt.model.embed import Rope3D, TimeMLP


def patchify(z: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """(B, F, C, H, W) -> (B, F*h*w, C*ph*pw), tokens frame-major then row-major."""
    B, Fr, C, H, W = z.shape
    h, w = H // ph, W // pw
    z = z.reshape(B, Fr, C, h, ph, w, pw).permute(0, 1, 3, 5, 2, 4, 6)
    return z.reshape(B, Fr * h * w, C * ph * pw)


def unpatchify(t: torch.Tensor, frames: int, h: int, w: int, ph: int, pw: int) -> torch.Tensor:
    """(B, F*h*w, C*ph*pw) -> (B, F, C, h*ph, w*pw); inverse of `patchify`."""
    B = t.shape[0]
    C = t.shape[-1] // (ph * pw)
    t = t.reshape(B, frames, h, w, C, ph, pw).permute(0, 1, 4, 2, 5, 3, 6)
    return t.reshape(B, frames, C, h * ph, w * pw)


class MLPEmbed(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear: projects condition tokens to the model width (as Wan's text)."""

    def __init__(self, din: int, dim: int) -> None:
        super().__init__(nn.Linear(din, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads, self.eps = heads, eps
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.Parameter(torch.ones(dim))
        self.norm_k = nn.Parameter(torch.ones(dim))
        # sequence parallelism (a bbf_rt.parallel.SequenceShard): None = the whole sequence is here
        self.sharding = None

    def forward(self, x: torch.Tensor | ops.FP8Rows, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, L, C) normalised tokens, or their FP8Rows when qkv is an FP8 linear."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, L, C) each
        q = ops.rms_norm_rope(q, self.norm_q, cos, sin, self.heads, self.eps)  # (B, L, H, D)
        k = ops.rms_norm_rope(k, self.norm_k, cos, sin, self.heads, self.eps)
        v = v.reshape(B, L, self.heads, C // self.heads)
        if self.sharding is not None:  # a token shard: all-to-all to whole heads, attend, and back
            return self.o(self.sharding.attention(q, k, v).reshape(B, L, C))
        return self.o(ops.attention(q, k, v).reshape(B, L, C))


class CrossAttentionBranch(nn.Module):
    """One decoupled condition branch: its own norm, projections, QK norms and a zero-initialised gate."""

    def __init__(self, dim: int, inner: int, heads: int, eps: float) -> None:
        """dim: the token width; inner: the branch's attention width (heads x head_dim); condition
        tokens arrive already embedded to `inner`."""
        super().__init__()
        self.heads, self.eps = heads, eps
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.q = nn.Linear(dim, inner)
        self.kv = nn.Linear(inner, 2 * inner)
        self.o = nn.Linear(inner, dim)
        self.norm_q = nn.Parameter(torch.ones(inner))
        self.norm_k = nn.Parameter(torch.ones(inner))
        # zero gate: a fresh branch leaves the backbone's output unchanged (keeps what it learnt)
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        key_mask: torch.Tensor,
        present: torch.Tensor,
        rope_q: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope_k: tuple[torch.Tensor, torch.Tensor] | None = None,
        frames: int = 1,
    ) -> torch.Tensor:
        """x: (B, L, C) tokens; cond: (B*frames, Lk, inner) embedded condition tokens; key_mask:
        (B*frames, Lk) bool; present: (B, frames) float, 0 where the sample (frame) has no such
        condition. With frames > 1 each frame's L/frames tokens attend only to their own Lk tokens.
        Returns x + gate * branch output (Block fuses that residual into the next norm instead)."""
        y, gate = self.attend(self.norm(x), cond, key_mask, present, rope_q, rope_k, frames)
        return ops.gated_residual(x, y, gate)

    def norm_as_modulation(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The branch's LayerNorm affine as (shift, scale) for ops.norm_modulate: (batch, 1, dim) each, fp32
        (weight - 1 is exact there, so norm * (1 + scale) + shift is the LayerNorm's norm * weight + bias)."""
        w, b = self.norm.weight.float(), self.norm.bias.float()
        return b[None, None].expand(batch, 1, -1), (w - 1)[None, None].expand(batch, 1, -1)

    def attend(
        self,
        hn: torch.Tensor | ops.FP8Rows,
        cond: torch.Tensor,
        key_mask: torch.Tensor,
        present: torch.Tensor,
        rope_q: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope_k: tuple[torch.Tensor, torch.Tensor] | None = None,
        frames: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hn: (B, L, C) tokens after this branch's norm -> (the branch output (B, L, C), its gate
        (B, frames, C)), the residual left to the caller."""
        B, L, _ = hn.shape
        H = self.heads
        q = self.q(hn)
        C = q.shape[-1]
        D = C // H
        k, v = self.kv(cond).chunk(2, dim=-1)
        if rope_q is not None and rope_k is not None:
            q = ops.rms_norm_rope(q, self.norm_q, rope_q[0], rope_q[1], H, self.eps)
            k = ops.rms_norm_rope(k, self.norm_k, rope_k[0], rope_k[1], H, self.eps)
        else:
            q = ops.rms_norm(q, self.norm_q, self.eps).reshape(B, L, H, D)
            k = ops.rms_norm(k, self.norm_k, self.eps).reshape(k.shape[0], k.shape[1], H, D)
        v = v.reshape(v.shape[0], v.shape[1], H, D)
        q = q.reshape(B * frames, L // frames, H, D)
        out = ops.attention(q, k, v, key_mask).reshape(B, L, C)
        gate = self.gate[None, None, :] * present[:, :, None].to(self.gate.dtype)  # (B, frames, C)
        return self.o(out), gate


def _fp8_rows(linear: nn.Module) -> bool:
    """True where `linear` takes ops.FP8Rows (an FP8Linear), so the norm before it quantises."""
    return bool(getattr(linear, "accepts_fp8_rows", False))


def _residual_norm(linear: nn.Module):
    """The fused residual + norm whose output `linear` reads: FP8 rows or the model dtype."""
    return ops.residual_norm_modulate_fp8 if _fp8_rows(linear) else ops.residual_norm_modulate


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.self_attn = SelfAttention(d, cfg.heads, cfg.eps)
        self.branches = nn.ModuleDict(
            {m: CrossAttentionBranch(d, cfg.branch_width, cfg.branch_heads, cfg.eps) for m in cfg.modalities}
        )
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(6, d) / d**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conds: dict) -> torch.Tensor:
        """x: (B, L, C); e: (B, F, 6, C) per-frame modulation; conds: name -> branch kwargs."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(2)  # (B, F, C) each
        # a linear that quantises its input to FP8 (bbf_rt.runtime.quant) gets it from the norm before it
        if _fp8_rows(self.self_attn.qkv):
            h = ops.norm_modulate_to_fp8(x, shift1, scale1, self.eps)
        else:
            h = ops.norm_modulate(x, shift1, scale1, self.eps)
        y, gate = self.self_attn(h, cos, sin), gate1
        # each pending residual add is fused with the norm that reads its result (the next present branch's
        # LayerNorm, then the FFN's adaLN): one pass over the stream per sub-layer instead of two
        for name, branch in self.branches.items():
            if name in conds:
                shift, scale = branch.norm_as_modulation(x.shape[0])
                x, h = _residual_norm(branch.q)(x, y, gate, shift, scale, branch.norm.eps)
                y, gate = branch.attend(h, **conds[name])
        x, h = _residual_norm(self.ffn[0])(x, y, gate, shift2, scale2, self.eps)
        return ops.gated_residual(x, self._ffn(h), gate2)

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        up, act, down = self.ffn
        if type(up) is nn.Linear and isinstance(act, nn.GELU):  # not once bbf_rt.runtime.quant swapped them
            return down(ops.linear_gelu(h, up.weight, up.bias))  # GELU in the GEMM's epilogue on CUDA
        return self.ffn(h)


class BBFDiT(nn.Module):
    """The denoiser: predicts the flow velocity of the target frames' latents.

    Export-friendly: tensors in, tensor out, no host syncs; optional conditions are None.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, C = cfg.dim, cfg.latent_channels
        ph, pw = cfg.patch
        p = ph * pw
        self.patch_in = nn.Linear(cfg.in_channels * p, d)
        self.time_embed = TimeMLP(cfg.freq_dim, d)
        self.tau_embed = TimeMLP(cfg.freq_dim, d)
        self.diff_embed = nn.Linear(1, d)
        nn.init.normal_(self.diff_embed.weight, std=0.02)
        nn.init.zeros_(self.diff_embed.bias)
        self.time_proj = nn.Linear(d, 6 * d)
        self.rope = Rope3D(cfg.rope_split(), cfg.rope_theta, cfg.rope_time_scale)
        embed_in = {"text": cfg.text_dim, "image": C * p, "audio": cfg.audio_mels, "context": C * p}
        bw = cfg.branch_width
        self.embed = nn.ModuleDict({m: MLPEmbed(embed_in[m], bw) for m in cfg.modalities})
        if "audio" in cfg.modalities:
            self.audio_pos = nn.Parameter(torch.randn(cfg.audio_tokens, bw) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_modulation = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.head = nn.Linear(d, C * p)
        # sequence parallelism (a bbf_rt.parallel.SequenceShard, set by bbf_rt.parallel.enable_sequence_parallel):
        # None = every token on this device; set, each rank keeps a slice of every frame's tokens
        self.sharding = None

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        tau: torch.Tensor,
        z0: torch.Tensor,
        z1: torch.Tensor,
        valid: torch.Tensor,
        diff: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_tau: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity of the target frames' latents.

        x: (B, F, C, H, W) noisy target latents; sigma: (B,) flow time in [0, 1]; tau: (B, F)
        timestamps in (0, 1) between the boundaries; z0, z1: (B, C, H, W) boundary latents; valid:
        (B, 1, H, W) 1 on real pixels, 0 on padding; diff: (B,) normalised start-end difference.
        text: (B, Lt, text_dim) + text_mask (B, Lt) bool; image: (B, Ni, C, Hi, Wi) reference
        latents + image_mask (B, Ni); audio: (B, F, La, n_mels) log-mel windows + audio_mask (B, F);
        context: (B, Fc, C, H, W) neighbouring frames' latents at context_tau (B, Fc) (e.g. -1, 2),
        context_mask (B, Fc). A mask that is all False for a sample means the modality is absent there.
        Returns (B, F, C, H, W) in x's dtype.
        """
        cfg = self.cfg
        ph, pw = cfg.patch
        B, Fr, C, H, W = x.shape
        h, w = H // ph, W // pw
        dt = self.patch_in.weight.dtype
        inp = torch.cat(
            [x, z0[:, None].expand(B, Fr, C, H, W), z1[:, None].expand(B, Fr, C, H, W), valid[:, None].expand(B, Fr, 1, H, W)],
            dim=2,
        ).to(dt)
        tokens = patchify(inp, ph, pw)  # (B, L, in_channels*ph*pw)
        cos, sin = self.rope(tau, h, w)  # (B, L, D/2)
        sp = self.sharding
        if sp is not None:  # this rank's tokens of every frame: L becomes F * ceil(h*w / ranks)
            tokens, cos, sin = sp.shard(Fr, h * w, tokens, cos, sin)
        tokens = self.patch_in(tokens)  # (B, L, dim)

        c = (self.time_embed(sigma) + self.diff_embed(diff[:, None].to(dt)))[:, None] + self.tau_embed(tau)  # (B, F, dim)
        e = self.time_proj(F.silu(c)).unflatten(-1, (6, cfg.dim))  # (B, F, 6, dim)

        conds: dict[str, dict] = {}
        if text is not None and text_mask is not None and "text" in self.embed:
            conds["text"] = dict(cond=self.embed["text"](text.to(dt)), key_mask=text_mask, present=text_mask.any(-1, keepdim=True))
        if image is not None and image_mask is not None and "image" in self.embed:
            hi, wi = image.shape[3] // ph, image.shape[4] // pw
            conds["image"] = dict(
                cond=self.embed["image"](patchify(image.to(dt), ph, pw)),
                key_mask=image_mask.repeat_interleave(hi * wi, dim=1),
                present=image_mask.any(-1, keepdim=True),
            )
        if audio is not None and audio_mask is not None and "audio" in self.embed:
            la = audio.shape[2]
            a = self.embed["audio"](audio.to(dt)) + self.audio_pos[:la]  # (B, F, La, branch width)
            conds["audio"] = dict(
                cond=a.reshape(B * Fr, la, cfg.branch_width),
                key_mask=audio_mask.reshape(B * Fr, 1).expand(B * Fr, la),
                present=audio_mask,
                frames=Fr,
            )
        if context is not None and context_tau is not None and context_mask is not None and "context" in self.embed:
            conds["context"] = dict(
                cond=self.embed["context"](patchify(context.to(dt), ph, pw)),
                key_mask=context_mask.repeat_interleave(h * w, dim=1),
                present=context_mask.any(-1, keepdim=True),
                rope_q=(cos, sin),
                rope_k=self.rope(context_tau, h, w),
            )
        for blk in self.blocks:
            tokens = blk(tokens, e, cos, sin, conds)

        shift, scale = (self.head_modulation + c[:, :, None, :]).unbind(2)  # (B, F, dim)
        out = self.head(ops.norm_modulate(tokens, shift, scale, cfg.eps))
        if sp is not None:
            out = sp.gather(out)  # (B, F*h*w, C*ph*pw), the whole output on every rank
        return unpatchify(out, Fr, h, w, ph, pw).to(x.dtype)


def build_dit(cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BBFDiT:
    """Build the DiT; device="meta" allocates nothing (for parameter counts of the Wan presets)."""
    with torch.device(device or "cpu"):
        model = BBFDiT(cfg)
    return model.to(dtype) if dtype is not None else model

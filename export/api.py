"""The export API: a model + ExportConfig -> a cached, verified artifact; an artifact -> a callable.

    art = export_denoiser(model, ExportConfig(target="onnx", modalities=("text",)))
    run = load_artifact(art, "cpu")          # run(*inputs) -> velocity, inputs in signature order
    enc = export_vae(model, "vae_encoder", ExportConfig(target="onnx"))

Targets: onnx (any device; ONNX Runtime), aoti (a .pt2 for the device it is built on), tensorrt (a
serialized engine for this GPU and TensorRT version; built from the ONNX graph).
"""
from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from bbf_rt.export import signature as sig
from bbf_rt.export.cache import (
    Artifact,
    ArtifactCache,
    device_info,
    make_key,
    versions,
    weights_sha256,
)

from bbf_rt.config import ExportConfig
from bbf_rt.errors import BackendUnavailableError, BBFInputError

log = logging.getLogger(__name__)

EXTENSIONS = {"onnx": ".onnx", "aoti": ".pt2", "tensorrt": ".plan"}
VAE_PARTS = ("vae_encoder", "vae_decoder")


def _cache(cache: ArtifactCache | str | Path | None) -> ArtifactCache:
    return cache if isinstance(cache, ArtifactCache) else ArtifactCache(cache)


def _dit(model) -> torch.nn.Module:
    dit = getattr(model, "dit", model)
    if not hasattr(dit, "cfg") or not hasattr(dit, "blocks"):
        raise BBFInputError(f"model: expected a BBFModel or BBFDiT, got {type(model).__name__}")
    return dit


def _at(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """`module` itself if already in dtype on device, else a converted copy (the caller's stays as is)."""
    floats = [t for t in module.state_dict().values() if t.is_floating_point()]
    if all(t.dtype == dtype and t.device == device for t in floats):
        return module
    return copy.deepcopy(module).to(device=device, dtype=dtype)


def _device(module: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next(module.parameters()).device


def denoiser_key(dit: torch.nn.Module, ecfg: ExportConfig, device: torch.device, weights: str | None = None) -> dict:
    """The cache key of the denoiser artifact `ecfg` describes, built on `device`."""
    extra: dict = {"opset": ecfg.opset}
    dev = {"name": "portable", "capability": "onnx"}
    if ecfg.target == "aoti":
        dev, extra = device_info(device), {"ops": ecfg.aoti_ops if device.type == "cuda" else "reference"}
    elif ecfg.target == "tensorrt":
        dev = device_info(device)
        extra["tensorrt"] = {"strongly_typed": ecfg.trt_strongly_typed, "workspace_gib": ecfg.trt_workspace_gib}
    return make_key(
        part="dit", target=ecfg.target, precision=ecfg.precision, model_cfg=dit.cfg, modalities=ecfg.modalities,
        shapes=ecfg.shapes, weights=weights or weights_sha256(dit), device=dev, extra=extra,
    )


def _onnx_denoiser_build(dit, ecfg: ExportConfig, device: torch.device) -> Callable[[Path], dict]:
    cfg = dit.cfg

    def build(path: Path) -> dict:
        module = sig.Denoiser(_at(dit, sig.DTYPES[ecfg.precision], device), ecfg.modalities)
        names = list(module.names)
        k_frames = sig.latent_dims(cfg, ecfg)["frames"].opt

        def fallback():
            sizes = sig.example_sizes(cfg, ecfg, fixed={"frames": k_frames})
            static = {"frames": k_frames}
            return sig.example_inputs(cfg, ecfg, device, sizes), sig.onnx_dynamic_axes(cfg, ecfg, static), static

        return sig_facts(ecfg) | _onnx().export_module(
            module, sig.example_inputs(cfg, ecfg, device), path, input_names=names, output_names=[sig.OUTPUT],
            dynamic_shapes=sig.torch_export_dynamic_shapes(cfg, ecfg), fallback=fallback, opset=ecfg.opset,
        )

    return build


def sig_facts(ecfg: ExportConfig) -> dict:
    return {"condition_set": list(ecfg.modalities), "precision": ecfg.precision, "target": ecfg.target}


def _onnx():
    from bbf_rt.export import onnx_export

    return onnx_export


def export_denoiser(
    model, ecfg: ExportConfig, *, cache: ArtifactCache | str | Path | None = None, device=None, weights: str | None = None,
) -> Artifact:
    """The denoiser artifact for `ecfg` (condition set, shapes, precision, target): reused from the
    cache on an exact key match, else exported. `device` defaults to the model's; `weights` may pass a
    precomputed `weights_sha256` of the DiT. Raises BackendUnavailableError for a target this machine
    cannot build (TensorRT absent, AOTInductor for CUDA without a GPU)."""
    dit = _dit(model).eval()
    dev = _device(dit, device)
    sig.latent_dims(dit.cfg, ecfg)  # validates the shape profile before any work
    sig.Denoiser(dit, ecfg.modalities)  # validates the condition set against the model's branches
    store = _cache(cache)
    if ecfg.target == "tensorrt":
        return _export_tensorrt(dit, ecfg, store, dev, weights)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {dev} asked for but no CUDA GPU is available")
    if ecfg.target == "onnx":
        if ecfg.precision == "bf16":
            log.warning(
                "ONNX Runtime's CPU provider has no bf16 kernels for this graph (onnxruntime 1.32: Expand is the first "
                "missing); the bf16 graph runs only where a provider has them (or through --target tensorrt). To run it "
                "with ONNX Runtime, export --precision fp16"
            )
        return _onnx_denoiser(dit, ecfg, store, dev, weights)
    key = denoiser_key(dit, ecfg, dev, weights)

    def build_aoti(path: Path) -> dict:
        from bbf_rt.export.aoti import compile_package

        module = sig.Denoiser(_at(dit, sig.DTYPES[ecfg.precision], dev), ecfg.modalities)
        # on a GPU, trace at the profile's opt shape: Inductor picks kernel configs from these size hints
        sizes = sig.example_sizes(dit.cfg, ecfg, at_opt=dev.type == "cuda")
        args = sig.example_inputs(dit.cfg, ecfg, dev, sizes)
        dyn = sig.torch_export_dynamic_shapes(dit.cfg, ecfg)
        mode = ecfg.aoti_ops if dev.type == "cuda" else "reference"
        facts = compile_package(module, args, dyn, path, mode)
        return sig_facts(ecfg) | {"inputs": list(module.names), "outputs": [sig.OUTPUT], "example_sizes": sizes} | facts

    return store.get_or_build(key, ".pt2", build_aoti)


def _onnx_denoiser(dit, ecfg: ExportConfig, store: ArtifactCache, dev: torch.device, weights: str | None) -> Artifact:
    return store.get_or_build(denoiser_key(dit, ecfg, dev, weights), ".onnx", _onnx_denoiser_build(dit, ecfg, dev))


def _export_tensorrt(dit, ecfg: ExportConfig, store: ArtifactCache, dev: torch.device, weights: str | None) -> Artifact:
    from bbf_rt.export import tensorrt_build as trtb

    trtb.import_tensorrt()  # before any work: says clearly when TensorRT or a GPU is missing
    if dev.type != "cuda":
        raise BBFInputError(f"the tensorrt target builds for a CUDA GPU; device {dev} is not one")
    weights = weights or weights_sha256(dit)
    graph_precision = ecfg.precision if ecfg.trt_strongly_typed else "fp32"
    onnx_art = _onnx_denoiser(dit, ecfg.replace(target="onnx", precision=graph_precision), store, dev, weights)
    static = onnx_art.manifest["build"].get("static_dims", {})
    ecfg_trt = ecfg.with_dims(**{d: (v, v, v) for d, v in static.items()}) if static else ecfg
    key = denoiser_key(dit, ecfg_trt, dev, weights)
    key["onnx_sha256"] = onnx_art.manifest["key_sha256"]
    ver = versions()["tensorrt"]
    info = device_info(dev)
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", info["name"]).strip("_")
    timing = store.root / f"timing-{gpu}-{info['capability']}-trt{ver}.cache"

    def build(path: Path) -> dict:
        log_path = store.root / f"{path.stem}.build.log"
        profile = {n: s for n, s in sig.profile_shapes(dit.cfg, ecfg_trt).items()}
        facts = trtb.build_engine(
            onnx_art.path, path, profile=profile, precision=ecfg.precision, strongly_typed=ecfg.trt_strongly_typed,
            workspace_gib=ecfg.trt_workspace_gib, timing_cache=timing, log_path=log_path,
        )
        return sig_facts(ecfg) | {"onnx": str(onnx_art.path), "static_dims": static} | facts

    return store.get_or_build(key, ".plan", build)


def export_vae(model, part: str, ecfg: ExportConfig, *, cache: ArtifactCache | str | Path | None = None, device=None) -> Artifact:
    """ONNX graph of the VAE encoder (frames -> latents) or decoder (latents -> frames), with dynamic
    batch, height and width (`ecfg.shapes` batch/height/width, pixels). Only the onnx target. A decoder
    with a boundary-fusion head takes (latents, frame0, frame1, tau), as VAE.decode_frames."""
    if part not in VAE_PARTS:
        raise BBFInputError(f"VAE part {part!r} is not one of {VAE_PARTS}")
    if ecfg.target != "onnx":
        raise BBFInputError(f"VAE export supports --target onnx only; got {ecfg.target!r}")
    vae = getattr(model, "vae", None)
    if vae is None:
        raise BBFInputError(f"model {getattr(model, 'cfg', None) and model.cfg.name!r} has no built-in VAE to export")
    if ecfg.precision == "bf16" and ecfg.opset < 22:
        raise BBFInputError(
            f"VAE export at precision 'bf16', opset {ecfg.opset}: ONNX Conv takes bf16 only from opset "
            "22, and ONNX Runtime's CPU provider has no bf16 Conv kernel; export the VAE with --precision fp16 or fp32"
        )
    cfg = model.cfg
    s = vae.spatial_stride
    dev = _device(vae, device)
    sig.latent_dims(cfg, ecfg)
    key = make_key(part=part, target="onnx", precision=ecfg.precision, model_cfg=cfg, modalities=(),
                   shapes=[e for e in ecfg.shapes if e[0] in ("batch", "height", "width")],
                   weights=weights_sha256(vae), device={"name": "portable", "capability": "onnx"}, extra={"opset": ecfg.opset})

    def build(path: Path) -> dict:
        from torch.export import Dim

        dt = sig.DTYPES[ecfg.precision]
        net = _at(vae, dt, dev)
        (blo, _, bhi), (hlo, _, hhi), (wlo, _, whi) = (ecfg.dim(d) for d in ("batch", "height", "width"))
        # VAE graphs are always fully dynamic in batch/height/width (bounds from the profile)
        n = Dim("batch", min=blo, max=max(bhi, blo + 1))
        hk, wk = Dim("hk", min=hlo // s, max=max(hhi, hlo + s) // s), Dim("wk", min=wlo // s, max=max(whi, wlo + s) // s)
        eh, ew = max(hlo // s, min(3, hhi // s)), max(wlo // s, min(5, whi // s))
        if part == "vae_encoder":
            module, names, out = sig.VAEEncoder(net), ["frames"], "latents"
            x = torch.rand(2, 3, eh * s, ew * s, device=dev, dtype=dt) * 2 - 1
            dyn = ({0: n, 2: s * hk, 3: s * wk},)
            axes = {"frames": {0: "batch", 2: "height", 3: "width"}, out: {0: "batch", 2: "h", 3: "w"}}
        else:
            module, names, out = sig.VAEDecoder(net), ["latents"], "frames"
            x = torch.randn(2, vae.latent_channels, eh, ew, device=dev, dtype=dt)
            dyn = ({0: n, 2: hk, 3: wk},)
            axes = {"latents": {0: "batch", 2: "h", 3: "w"}, out: {0: "batch", 2: "height", 3: "width"}}
        args = (x,)
        if part == "vae_decoder" and getattr(vae, "fusion", None) is not None:
            # the boundary-fusion head: the graph also takes both boundary frames and each frame's time
            frame = torch.rand(2, 3, eh * s, ew * s, device=dev, dtype=dt) * 2 - 1
            args = (x, frame, -frame, torch.tensor([0.25, 0.75], device=dev))
            names = names + ["frame0", "frame1", "tau"]
            dyn = dyn + ({0: n, 2: s * hk, 3: s * wk},) * 2 + ({0: n},)
            axes = axes | {"frame0": {0: "batch", 2: "height", 3: "width"},
                           "frame1": {0: "batch", 2: "height", 3: "width"}, "tau": {0: "batch"}}
        facts = _onnx().export_module(module, args, path, input_names=names, output_names=[out], dynamic_shapes=dyn,
                                      fallback=lambda: (args, axes, {}), opset=ecfg.opset)
        return {"part": part, "precision": ecfg.precision, "target": "onnx"} | facts

    return _cache(cache).get_or_build(key, ".onnx", build)


def load_artifact(art: Artifact, device: torch.device | str = "cpu") -> Callable[..., torch.Tensor]:
    """A callable running the artifact: f(*inputs) -> output tensor, inputs in the graph's order."""
    target = art.manifest["key"]["target"]
    dev = torch.device(device)
    if target == "onnx":
        runner = _onnx().OrtRunner(art.path, dev)
        return lambda *xs: runner(*xs, out_shape=tuple(xs[0].shape) if art.manifest["key"]["part"] == "dit" else None)
    if target == "aoti":
        from bbf_rt.export.aoti import load_package

        return load_package(art.path, dev)
    from bbf_rt.export.tensorrt_build import TrtRunner

    return TrtRunner(art.path, dev)

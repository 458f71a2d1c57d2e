"""The `bbf-rt` command: interpolate videos, inspect models, write checkpoints."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from fractions import Fraction
from typing import Sequence

from bbf_rt.config import ATTENTION_MODES, BACKENDS, EXPORT_TARGETS, PRECISIONS, SHAPE_DIMS
from bbf_rt.errors import BBFError, BBFInputError

log = logging.getLogger("bbf_rt")


def _fraction(text: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 5/2") from None
    return value


def _float_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bbf-rt", description="Generative video frame interpolation (BBF DiT).")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = p.add_subparsers(dest="command", required=True)

    ip = sub.add_parser("interpolate", help="interpolate a video file")
    ip.add_argument("input", help="input video (any container/codec FFmpeg reads)")
    ip.add_argument("-o", "--output", required=True, help="output video (.mp4, .mkv or .mov); written atomically")
    rate = ip.add_mutually_exclusive_group(required=True)
    rate.add_argument("--factor", type=_fraction, help="frame-rate multiplier, integer or rational (2, 5/2, 1.5)")
    rate.add_argument("--fps", type=_fraction, help="target frame rate (e.g. 60 or 60000/1001)")
    ip.add_argument("--prompt", help="text describing the motion (text guidance)")
    ip.add_argument("--audio", default="auto", help="audio guidance: auto (the file's soundtrack if any), on, off, or an audio FILE")
    ip.add_argument("--reference", help="reference image (PNG/JPEG) of content that appears between the frames")
    ip.add_argument("--model", default=None, help="trained checkpoint (.safetensors) or preset name; default: the embedded model")
    ip.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    ip.add_argument("--solver", default="euler", help="euler, dpmpp2m or unipc")
    ip.add_argument("--shift", type=_float_arg, default=1.0, help="timestep shift (>= 1 spends more steps at high noise)")
    ip.add_argument("--text-scale", type=_float_arg, default=1.0, help="classifier-free guidance scale for text")
    ip.add_argument("--audio-scale", type=_float_arg, default=1.0, help="classifier-free guidance scale for audio")
    ip.add_argument("--context", type=int, default=1, help="neighbouring frames given as context on each side (0-4)")
    ip.add_argument("--batch", type=int, default=4, help="intervals per denoiser call")
    ip.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    ip.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16")
    ip.add_argument("--seed", type=int, default=0)
    ip.add_argument("--disable-cuda-graphs", action="store_true", help="run each step eagerly instead of replaying a CUDA graph")
    ip.add_argument("--no-fusion", action="store_true",
                    help="decode with the plain VAE decoder, not the boundary-fusion head (less work per frame, blurrier)")
    ip.add_argument("--step-cache", type=_float_arg, default=0.0, metavar="T",
                    help="skip a step whose DiT input changed less than T (accumulated relative L1) since the last computed one; 0 = off")
    ip.add_argument("--fp8", action="store_true", help="FP8 (e4m3) block linear layers (eager/compile backends; GPU with compute capability >= 8.9)")
    ip.add_argument("--attention", default="exact", choices=ATTENTION_MODES,
                    help="attention precision: exact, int8 (int8 QK, P V in the model dtype) or int8-fp8 (e4m3 P V)")
    ip.add_argument("--backend", default="eager", choices=BACKENDS,
                    help="denoiser implementation; aoti/onnx/tensorrt build or reuse cached artifacts (default eager)")
    ip.add_argument("--scene-threshold", type=_float_arg, default=0.4, help="scene-cut score above which an interval is not interpolated")
    ip.add_argument("--crf", type=int, default=16, help="H.264 quality of the output: 0 lossless, 16 default, higher = smaller")
    ip.add_argument("--allow-untrained", action="store_true", help="accept a model with random weights (plumbing tests only)")
    ip.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ip.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    ip.add_argument("--sp", type=int, default=1, help="sequence-parallel processes per clip (under torchrun; must divide the heads)")
    ip.add_argument("--cfg-parallel", action="store_true", help="split guidance passes and intervals over the remaining torchrun processes")

    ex = sub.add_parser("export", help="export the denoiser as an ONNX graph, TensorRT engine or AOTInductor package")
    ex.add_argument("--model", required=True, help="checkpoint (.safetensors) or preset name (random weights)")
    ex.add_argument("--target", required=True, choices=EXPORT_TARGETS)
    ex.add_argument("--precision", default="fp32", choices=PRECISIONS)
    ex.add_argument("--shapes", default="", help="shape profile, DIM=MIN:OPT:MAX or DIM=N items, comma-separated "
                    f"(dims: {', '.join(SHAPE_DIMS)}; pixel sizes; unlisted dims keep their defaults)")
    ex.add_argument("--modalities", default="", help="condition set, e.g. text,audio (default: none)")
    ex.add_argument("--vae", action="store_true", help="also export the VAE encoder and decoder (onnx target)")
    ex.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    ex.add_argument("--out", default=None, help="artifact folder (default: $BBF_RT_CACHE or ~/.cache/bbf-rt)")
    ex.add_argument("--json", action="store_true", help="print the artifacts and manifests as JSON")

    inf = sub.add_parser("info", help="model presets, parameter counts, checkpoint metadata")
    inf.add_argument("--model", default=None, help="checkpoint or preset to describe (default: all presets)")
    inf.add_argument("--json", action="store_true")

    ck = sub.add_parser("init-checkpoint", help="write a checkpoint with random weights (untrained; for tests)")
    ck.add_argument("--preset", required=True)
    ck.add_argument("-o", "--output", required=True)
    ck.add_argument("--seed", type=int, default=0)

    # its options are bench/bench_e2e.py's own (`bbf-rt bench --help` lists them): main() passes them through
    sub.add_parser("bench", add_help=False, help="end-to-end ablation benchmark, JSONL rows (bench/bench_e2e.py; source checkout)")
    return p


def _cmd_interpolate(a: argparse.Namespace) -> int:
    from bbf_rt.config import RuntimeConfig
    from bbf_rt.runtime.video import interpolate_video

    rt = RuntimeConfig(
        steps=a.steps, solver=a.solver, shift=a.shift, text_scale=a.text_scale, audio_scale=a.audio_scale,
        context_frames=a.context, seed=a.seed, batch=a.batch, scene_cut_threshold=a.scene_threshold, dtype=a.dtype,
        cuda_graphs=not a.disable_cuda_graphs, step_cache=a.step_cache, fusion=not a.no_fusion,
        fp8_linear=a.fp8, attention=a.attention,
    )
    job = dict(
        factor=a.factor, fps=a.fps, prompt=a.prompt, audio=a.audio, reference=a.reference,
        model=a.model, runtime=rt, device=a.device, allow_untrained=a.allow_untrained, progress=not a.no_progress,
        backend=a.backend, crf=a.crf,
    )
    if a.sp != 1 or a.cfg_parallel or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from bbf_rt.runtime.distributed import interpolate_video_parallel

        report = interpolate_video_parallel(a.input, a.output, sp=a.sp, cfg_parallel=a.cfg_parallel, **job)
        if report is None:  # not rank 0: rank 0 wrote the output and reports
            return 0
    else:
        report = interpolate_video(a.input, a.output, **job)
    if a.json:
        print(json.dumps(report, sort_keys=True, default=str))
    else:
        print(
            f"wrote {report['output']}: {report['frames_out']} frames at {report['fps_out']} fps "
            f"({report['interpolated']} interpolated, {report['scene_cuts']} scene cuts) in {report['seconds']:.1f} s"
        )
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from bbf_rt.config import ExportConfig, parse_shapes
    from bbf_rt.export import export_denoiser, export_vae
    from bbf_rt.export.signature import DTYPES
    from bbf_rt.model import load_model
    from bbf_rt.runtime.engine import resolve_device

    mods = tuple(m.strip() for m in a.modalities.split(",") if m.strip() and m.strip() != "none")
    ecfg = ExportConfig(target=a.target, precision=a.precision, modalities=mods, shapes=parse_shapes(a.shapes))
    if a.target == "tensorrt":
        from bbf_rt.export.tensorrt_build import import_tensorrt

        import_tensorrt()  # says so before loading any weights
    if a.vae and a.target != "onnx":
        raise BBFInputError(f"--vae exports ONNX graphs; use it with --target onnx, not {a.target!r}")
    dev = resolve_device(a.device)
    model = load_model(a.model, device=dev, dtype=DTYPES[a.precision])
    if not model.trained:
        log.warning("model %r has untrained (random) weights: the artifact is for plumbing tests only", a.model)
    arts = [export_denoiser(model, ecfg, cache=a.out, device=dev)]
    if a.vae:
        arts += [export_vae(model, part, ecfg, cache=a.out, device=dev) for part in ("vae_encoder", "vae_decoder")]
    rows = [{"path": str(x.path), "manifest_path": str(x.manifest_path), "reused": x.reused, "manifest": x.manifest} for x in arts]
    if a.json:
        print(json.dumps(rows, indent=1, sort_keys=True))
    else:
        for x in arts:
            print(f"{'reused' if x.reused else 'built'} {x.path}")
            print(f"manifest {x.manifest_path}")
            print(json.dumps(x.manifest, indent=1, sort_keys=True))
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from bbf_rt.config import PRESETS, get_preset
    from bbf_rt.model import BBFModel
    from bbf_rt.model.checkpoint import read_metadata

    rows = []
    if a.model and a.model.endswith(".safetensors"):
        meta = read_metadata(a.model)
        rows.append({"checkpoint": a.model, **{k: (json.loads(v) if k in ("config", "info") else v) for k, v in meta.items()}})
    else:
        import torch

        names = [a.model] if a.model else list(PRESETS)
        for name in names:
            cfg = get_preset(name)
            with torch.device("meta"):
                m = BBFModel(cfg)
            n_dit = sum(p.numel() for p in m.dit.parameters())
            n_vae = sum(p.numel() for p in m.vae.parameters()) if m.vae is not None else 0
            rows.append({"preset": name, "dit_params": n_dit, "vae_params": n_vae, "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads})
    if a.json:
        print(json.dumps(rows, indent=1, sort_keys=True))
    else:
        for r in rows:
            print("  ".join(f"{k}={v}" for k, v in r.items() if k != "config"))
    return 0


def _cmd_init_checkpoint(a: argparse.Namespace) -> int:
    import torch

    from bbf_rt.config import get_preset
    from bbf_rt.model import BBFModel, save_checkpoint

    torch.manual_seed(a.seed)
    model = BBFModel(get_preset(a.preset))
    path = save_checkpoint(model, a.output, trained=False, info={"note": "random weights, for tests only", "seed": a.seed})
    print(f"wrote untrained {a.preset} checkpoint {path}")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    import importlib

    # bench/ is installed as bbf_rt.bench (pyproject wheel.packages); a source checkout resolves it
    # through bbf_rt.__path__, as it does kernels/ and export/
    try:
        mod = importlib.import_module("bbf_rt.bench.bench_e2e")
    except ModuleNotFoundError as e:
        raise BBFInputError(f"bbf-rt bench needs bench/bench_e2e.py, which this installation lacks ({e})") from e
    return mod.main(a.bench_args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bbf-rt` console script; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.bench_args = rest
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="bbf-rt: %(levelname)s: %(message)s")
    handlers = {"interpolate": _cmd_interpolate, "export": _cmd_export, "info": _cmd_info, "init-checkpoint": _cmd_init_checkpoint,
                "bench": _cmd_bench}
    try:
        return handlers[args.command](args)
    except BBFError as e:
        print(f"bbf-rt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bbf-rt: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

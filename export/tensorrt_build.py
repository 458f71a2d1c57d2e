"""TensorRT engines from the exported ONNX graph, and a runner for them.

Written against the TensorRT 10 Python API: trt.Builder, a network parsed from the ONNX file by
trt.OnnxParser, one optimization profile with explicit min/opt/max shapes for every dynamic input,
a persistent timing cache file, and a build log file whose path every error names. Precision: by
default the network is STRONGLY_TYPED and follows the ONNX graph's own types (the graph is exported
at the requested precision, so the norms' fp32 casts and the attention mask's finite fill survive);
with `strongly_typed=False` an fp32 graph is built with the FP16/BF16 builder flags instead.

TensorRT is imported lazily; where it is absent everything here raises BackendUnavailableError.
This module has not been run on a machine with TensorRT (none was available); see docs/export.md.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from bbf_rt.errors import BackendUnavailableError, BBFError

log = logging.getLogger(__name__)


class TensorRTBuildError(BBFError, RuntimeError):
    """The engine build failed; the message names the build log."""


def import_tensorrt():
    """The tensorrt module, or BackendUnavailableError saying what is missing and what to use instead."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(
            f"TensorRT is not installed here (import tensorrt failed: {e}). The tensorrt target needs NVIDIA "
            "TensorRT's Python package (pip install tensorrt) and a CUDA GPU; use --target onnx or --target aoti, "
            "or --backend onnx/aoti, instead"
        ) from e
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT is installed but no CUDA GPU is available; TensorRT engines run only on NVIDIA GPUs")
    return trt


def _file_logger(trt, log_path: Path):
    class FileLogger(trt.ILogger):
        """Every TensorRT message goes to the build log; errors also to Python logging."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.fh = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the builder)

        def log(self, severity, msg) -> None:
            self.fh.write(f"[{severity.name}] {msg}\n")
            self.fh.flush()
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                log.error("TensorRT: %s", msg)

    return FileLogger()


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    precision: str,
    strongly_typed: bool,
    workspace_gib: float,
    timing_cache: Path,
    log_path: Path,
) -> dict:
    """Build a serialized engine from `onnx_path` into `engine_path`; returns facts for the manifest.

    profile: input name -> (min, opt, max) shape. The timing cache is read if present and written back
    (atomically) after a successful build, so later builds on this GPU skip kernel timing."""
    trt = import_tensorrt()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger = _file_logger(trt, log_path)

    def fail(what: str) -> TensorRTBuildError:
        return TensorRTBuildError(f"TensorRT engine build failed: {what}; build log: {log_path}")

    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise fail(f"the ONNX parser rejected {onnx_path} ({errors})")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed:
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    prof = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = [n for n in names if n not in profile]
    if missing:
        raise fail(f"no min/opt/max shapes for network inputs {missing}")
    for n in names:
        lo, opt, hi = profile[n]
        prof.set_shape(n, lo, opt, hi)
    config.add_optimization_profile(prof)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise fail("builder.build_serialized_network returned None")
    engine_path.write_bytes(bytes(serialized))

    fd, tmp = tempfile.mkstemp(prefix=f".{timing_cache.name}.", dir=timing_cache.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp, timing_cache)
    return {"tensorrt_inputs": names, "timing_cache": str(timing_cache), "build_log": str(log_path),
            "strongly_typed": strongly_typed}


_TORCH_DTYPE = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "BOOL": torch.bool,
                "INT32": torch.int32, "INT64": torch.int64}


class TrtRunner:
    """A deserialized engine called with CUDA torch tensors in the engine's input order."""

    def __init__(self, engine_path: str | Path, device: torch.device | str = "cuda") -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(f"TensorRT could not deserialize {engine_path} (built by another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) != mode)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        keep = []
        for n, t in zip(self.input_names, inputs):
            want = _TORCH_DTYPE[self.engine.get_tensor_dtype(n).name]
            t = t.to(self.device, want).contiguous()
            keep.append(t)
            ctx.set_input_shape(n, tuple(t.shape))
            ctx.set_tensor_address(n, t.data_ptr())
        shape = tuple(ctx.get_tensor_shape(self.output_name))
        out_dt = _TORCH_DTYPE[self.engine.get_tensor_dtype(self.output_name).name]
        out = torch.empty(shape, dtype=out_dt, device=self.device)
        ctx.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return out

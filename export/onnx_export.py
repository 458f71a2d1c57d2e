"""ONNX export (dynamo exporter first, TorchScript exporter as the logged fallback) and an ONNX Runtime
runner that takes and returns torch tensors.

The fused ops are exported through their eager references (`ops.implementation("reference")`): ONNX
has no Triton. Attention becomes MatMul/Softmax (opset 18), norms keep their fp32 casts.

The TorchScript exporter folds the per-frame adaLN modulation's frame count into constants (its shape
inference loses the symbol through the `unbind` of the modulation), so a fallback graph is exported
with a static frame count, recorded in the manifest's `build.static_dims`; the runtime builds one
graph per frame count in that case. The dynamo exporter keeps every dim symbolic.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bbf_rt import ops
from bbf_rt.errors import BackendUnavailableError, BBFInputError

log = logging.getLogger(__name__)

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bool: np.bool_, torch.int64: np.int64}
# element types for binding device memory: numpy has no bf16, so it goes as onnx.TensorProto.BFLOAT16 (16)
_BIND = {**_NP, torch.bfloat16: 16}
_TWO_GB = 2_000_000_000


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(f"ONNX export needs the onnx package ({e}); pip install 'bbf-rt[export]'") from e


def _first_line(e: BaseException) -> str:
    """The root cause's type and first line (the exporter wraps the real error in generic ones)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.state_dict().values())


def _translations() -> dict:
    """Fixes for the dynamo exporter's op library (see export/_onnx_fixes.py); {} without onnxscript."""
    try:
        from bbf_rt.export import _onnx_fixes
    except ImportError:
        return {}
    return _onnx_fixes.TABLE


def export_module(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple,
    fallback: Callable[[], tuple] | None = None,
    opset: int = 18,
) -> dict:
    """Export `module(*args)` to `path`; returns facts for the manifest.

    Tries torch.onnx.export(dynamo=True) with `dynamic_shapes` (torch.export form). If that fails,
    logs one warning naming why and calls `fallback()` -> (args, dynamic_axes, static_dims) for the
    TorchScript exporter. Weights over 2 GB go to one external-data file `<path>.data`. The graph
    is checked with onnx.checker before this returns."""
    _require_onnx()
    with warnings.catch_warnings():
        # the exporters' chatter (axis renames, tracer notes, deprecations) is not the user's to act on
        for pattern in (r".*axis name", r".*LeafSpec", r".*dynamo=False", r".*[Tt]racer", r".*Converting a tensor"):
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return _export(module, args, path, input_names, output_names, dynamic_shapes, fallback, opset)


def _export(module, args, path, input_names, output_names, dynamic_shapes, fallback, opset) -> dict:
    import onnx

    big = _param_bytes(module) > _TWO_GB
    facts: dict = {"exporter": "dynamo", "opset": opset, "static_dims": {}}
    module = module.eval()
    try:
        with ops.implementation("reference"), torch.no_grad():
            prog = torch.onnx.export(
                module, args, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False, optimize=True,
                custom_translation_table=_translations(),
            )
            prog.save(str(path), external_data=big)
    except Exception as e:  # the dynamo exporter raises many types (missing onnxscript, unsupported ops, ...)
        if fallback is None:
            raise
        reason = _first_line(e)
        log.warning("dynamo ONNX exporter failed (%s); falling back to the TorchScript exporter", reason)
        for p in path.parent.glob(f"{path.name}*"):
            p.unlink()
        fb_args, axes, static = fallback()
        facts.update(exporter="torchscript", fallback_reason=reason, static_dims=static, opset=min(opset, 20))
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp, ops.implementation("reference"), torch.no_grad():
            raw = Path(tmp) / "model.onnx"  # the TorchScript exporter names external files after tensors
            torch.onnx.export(
                module, fb_args, str(raw), dynamo=False, input_names=input_names, output_names=output_names,
                dynamic_axes=axes, opset_version=facts["opset"],
            )
            model = onnx.load(str(raw))
            onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                            location=f"{path.name}.data")
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    facts["inputs"] = [i.name for i in model.graph.input]
    facts["outputs"] = [o.name for o in model.graph.output]
    return facts


def ort_providers(device: torch.device) -> list[str]:
    """ONNX Runtime execution providers for `device`: CUDA (TensorRT EP first when
    BBF_RT_ORT_TENSORRT=1) on a GPU, else CPU. A missing GPU provider is a logged fallback."""
    import os

    import onnxruntime as ort

    avail = ort.get_available_providers()
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    want = ["CUDAExecutionProvider"]
    if os.environ.get("BBF_RT_ORT_TENSORRT") == "1":
        want.insert(0, "TensorrtExecutionProvider")
    have = [p for p in want if p in avail]
    if not have:
        log.warning("ONNX Runtime has none of %s here (available: %s); running on the CPU provider", want, avail)
    return have + ["CPUExecutionProvider"]


def _has_bf16_inputs(path: str | Path) -> bool:
    """Whether the graph at `path` takes a bf16 tensor (read without its weights)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(i.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for i in graph.input)


class OrtRunner:
    """An ONNX Runtime session called with torch tensors in the graph's input order; returns the first
    output as a torch tensor on `device`. CUDA inputs are bound in place (no host copies)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailableError(f"the onnx backend needs onnxruntime ({e}); pip install 'bbf-rt[export]'") from e
        self.device = torch.device(device)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.providers = ort_providers(self.device)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:  # ORT's pybind errors (InvalidGraph, NotImplemented, Fail) share no base but Exception
            if _has_bf16_inputs(path):
                raise BackendUnavailableError(
                    f"ONNX Runtime ({', '.join(self.providers)}) cannot run the bf16 graph {path}: {_first_line(e)}. "
                    "Export it with --precision fp16 (ExportConfig(precision='fp16'); the onnx backend does this itself "
                    "when the engine runs bf16), or build a TensorRT engine from it (--target tensorrt, on a GPU)"
                ) from e
            raise
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.on_gpu = self.session.get_providers()[0] != "CPUExecutionProvider"

    def __call__(self, *inputs: torch.Tensor, out_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise BBFInputError(f"ONNX graph takes {len(self.input_names)} inputs {self.input_names}; got {len(inputs)}")
        bound = self.on_gpu and out_shape is not None and all(t.is_cuda for t in inputs)
        for t in inputs:
            if t.dtype not in (_BIND if bound else _NP):
                raise BBFInputError(
                    f"ONNX Runtime input dtype {t.dtype} is not supported here (host inputs: fp32, fp16, bool, int64; "
                    "bf16 only as CUDA tensors on a GPU provider); use an fp32 or fp16 artifact"
                )
        if bound:
            return self._run_bound(inputs, out_shape)
        feed = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        out = self.session.run([self.output_name], feed)[0]
        return torch.from_numpy(out).to(self.device)

    def _run_bound(self, inputs: tuple[torch.Tensor, ...], out_shape: tuple[int, ...]) -> torch.Tensor:
        binding = self.session.io_binding()
        idx = inputs[0].device.index or 0
        keep = [t.contiguous() for t in inputs]
        for n, t in zip(self.input_names, keep):
            binding.bind_input(n, "cuda", idx, _BIND[t.dtype], tuple(t.shape), t.data_ptr())
        out = torch.empty(out_shape, dtype=inputs[0].dtype, device=inputs[0].device)
        binding.bind_output(self.output_name, "cuda", idx, _BIND[out.dtype], tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(out.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out

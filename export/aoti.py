"""AOTInductor: torch.export of the denoiser with dynamic dims, compiled into a .pt2 package.

The package holds the generated C++/CUDA code, the compiled Triton kernels and the weights (mmapped
from the shared library above 2 GB), so `load_package` needs only torch: not bbf_rt.model, not the
Python source of the DiT. By default the eager reference ops are exported and Inductor generates
the kernels (attention stays aten SDPA: flash attention on the GPU). With ExportConfig.aoti_ops="auto" on
CUDA, our Triton kernels (registered with `torch.library.triton_op`) are compiled in instead; if
torch.export cannot trace them the export falls back to the references (one warning naming why).
Packages of the reference ops build, load and pass parity on the H100 (docs/export.md); the Triton-op
path built there before the libstdc++ fix below and has not run since, so it stays opt-in.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from bbf_rt import ops

log = logging.getLogger(__name__)


def _cxx() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        return get_cpp_compiler()
    except Exception:  # the builder's API moves between torch versions; the default is what it picks
        return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _print_file_name(cxx: str, name: str) -> str | None:
    """The file `cxx` would link for `name`, or None where its search paths hold none."""
    try:
        found = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found if found and os.path.isabs(found) and os.path.exists(found) else None


def shared_libstdcxx_libs(cxx: str) -> list[str] | None:
    """Extra libraries that make the C++ compiler link the AOTI wrapper against the shared libstdc++.

    Some toolchains ship only the static archive in the compiler's own folder (the `libstdc++.so`
    dev link is missing: `g++ -print-file-name=libstdc++.so` names no file). The wrapper .so then
    carries a private copy of libstdc++ whose locale objects the process never initialised, and the
    first std::regex it builds (AOTInductorModel parsing its device string) crashes: a segfault in
    `aoti_load_package` with torch 2.11 on the GPU image, "create_func_ ... API call failed" with
    torch 2.13. Linking `-l:libstdc++.so.6` (the runtime library, which such toolchains still have)
    first resolves every libstdc++ symbol from the shared library, so the static archive the driver
    adds afterwards contributes nothing. It is applied on every Linux GCC-like toolchain that can find
    libstdc++.so.6 (where the toolchain is fine it only says what the driver would do anyway), so a
    static copy cannot sneak in some other way; None where `cxx` finds no libstdc++.so.6."""
    if not _print_file_name(cxx, "libstdc++.so.6"):
        if not _print_file_name(cxx, "libstdc++.so"):
            log.warning("%s finds no shared libstdc++: the AOTI package may not load (install the libstdc++ "
                        "development package)", cxx)
        return None
    return [":libstdc++.so.6"]


def static_only_libstdcxx(cxx: str) -> bool:
    """True where `cxx` would link libstdc++ statically (archive present, dev link missing)."""
    return not _print_file_name(cxx, "libstdc++.so") and bool(_print_file_name(cxx, "libstdc++.a"))


@contextlib.contextmanager
def _toolchain():
    """Inductor config for the build: the shared-libstdc++ link (a warning where the toolchain needed it)."""
    cxx = _cxx() if sys.platform.startswith("linux") else None
    libs = shared_libstdcxx_libs(cxx) if cxx else None
    if not libs:
        yield None
        return
    static = static_only_libstdcxx(cxx)
    (log.warning if static else log.debug)("%s: linking the AOTI wrapper with -l%s (the toolchain has %s libstdc++)",
                                           cxx, libs[0], "only a static" if static else "a shared")
    cfg = torch._inductor.config.aot_inductor
    old = list(cfg.custom_op_libs or [])
    with torch._inductor.config.patch({"aot_inductor.custom_op_libs": old + [x for x in libs if x not in old]}):
        yield libs


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes: tuple, mode: str):
    with ops.implementation(mode), torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def compile_package(module: torch.nn.Module, args: tuple[torch.Tensor, ...], dynamic_shapes: tuple, path: Path,
                    mode: str = "reference") -> dict:
    """torch.export(module, args) -> AOTInductor package at `path`; returns facts for the manifest
    (ops implementation used, export and compile seconds). mode: "reference" or "auto" (Triton ops)."""
    import time

    module = module.eval()
    facts: dict = {"ops": mode}
    t0 = time.perf_counter()
    try:
        ep = _export(module, args, dynamic_shapes, mode)
    except Exception as e:  # custom-op tracing can fail in many ways; the references always export
        if mode == "reference":
            raise
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
        log.warning("torch.export with the Triton ops failed (%s); exporting the eager reference ops instead", reason)
        facts.update(ops="reference", ops_fallback_reason=reason)
        ep = _export(module, args, dynamic_shapes, "reference")
    t1 = time.perf_counter()
    with torch.no_grad(), _toolchain() as libs:
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    if libs:
        facts["extra_link_libs"] = libs
    facts.update(export_seconds=round(t1 - t0, 3), compile_seconds=round(time.perf_counter() - t1, 3))
    return facts


class _Package:
    """A loaded .pt2 called like the exported module: positional tensors in, its outputs back."""

    def __init__(self, loader) -> None:
        import torch.utils._pytree as pytree

        self.loader = loader
        self._out_spec = pytree.treespec_loads(loader.get_call_spec()[1])
        self._run = getattr(loader, "boxed_run", None) or loader.run
        self._unflatten = pytree.tree_unflatten

    def __call__(self, *args: torch.Tensor):
        return self._unflatten(self._run([a for a in args if isinstance(a, torch.Tensor)]), self._out_spec)

    def get_metadata(self) -> dict[str, str]:
        return self.loader.get_metadata()


def load_package(path: str | Path, device: torch.device | str = "cpu"):
    """The compiled denoiser from a .pt2: a callable on positional tensors returning the velocity.

    It builds torch's C++ package loader directly: `torch._inductor.aoti_load_package` first imports
    torch._inductor and torch._dynamo (about 2 s on the CI machine) and compiles Inductor's CPU-ISA probes
    to compare device facts, none of which a deployment needs. Where this torch's loader takes other
    arguments, the public function is used."""
    dev = torch.device(device)
    index = (dev.index or 0) if dev.type == "cuda" else -1
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
    except TypeError:
        return torch._inductor.aoti_load_package(str(path), device_index=index)
    return _Package(loader)

"""Where an AOTInductor package's cold start goes: one fresh process, each phase timed on its own.

    python3 bench/aoti_cold_probe.py PACKAGE.pt2 [--inputs IN.safetensors] [--loader torch|direct]
        [--spy SECONDS --spy-log FILE] [--out ROWS.jsonl --git-sha SHA]

Phases: import torch; CUDA context (one tiny kernel + sync); import torch._inductor (what
`torch._inductor.aoti_load_package` pulls in first); the package load itself; a second load of the same
file (what is left once every per-process cost is paid); the first call and a second call on the saved
inputs. `--loader direct` builds the C++ loader (`torch._C._aoti.AOTIModelPackageLoader`) without
importing torch._inductor, as bbf_rt's runtime does (export/aoti.py). With `--spy N` a thread runs
`py-spy dump --native` on this process every N seconds and appends the stacks to `--spy-log`, so a slow
phase inside C++ says where it is. Prints one JSON row (and appends it to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

T = {}
_t = time.perf_counter()


def mark(name: str) -> None:
    global _t
    now = time.perf_counter()
    T[name] = round(now - _t, 3)
    _t = now


def spy(every: float, log: str, stop: threading.Event) -> None:
    exe = shutil.which("py-spy")
    if not exe:
        with open(log, "a") as f:
            f.write("py-spy not found\n")
        return
    t0 = time.perf_counter()
    while not stop.wait(every):
        out = subprocess.run([exe, "dump", "--native", "--pid", str(os.getpid())], capture_output=True, text=True,
                             timeout=60)
        with open(log, "a") as f:
            f.write(f"=== t={time.perf_counter() - t0:.1f}s phase-after={list(T)[-1] if T else 'start'}\n")
            f.write(out.stdout[-6000:] + out.stderr[-2000:] + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--inputs", default=None)
    ap.add_argument("--loader", default="torch", choices=("torch", "direct"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--spy", type=float, default=0.0)
    ap.add_argument("--spy-log", default="spy.txt")
    ap.add_argument("--out", default=None)
    ap.add_argument("--git-sha", default="")
    a = ap.parse_args()
    stop = threading.Event()
    if a.spy > 0:
        threading.Thread(target=spy, args=(a.spy, a.spy_log, stop), daemon=True).start()
    mark("start")
    import torch
    mark("import_torch_s")
    cuda = a.device == "cuda"
    if cuda:
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    mark("cuda_context_s")
    if a.loader == "torch":
        import torch._inductor  # noqa: F401
        mark("import_inductor_s")
        load = lambda: torch._inductor.aoti_load_package(a.package)  # noqa: E731
    else:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from export.aoti import load_package
        mark("import_bbf_export_s")
        load = lambda: load_package(a.package, a.device)  # noqa: E731
    run = load()
    mark("load_s")
    load()
    mark("second_load_s")
    if a.inputs:
        from safetensors.torch import load_file
        d = load_file(a.inputs, device=a.device)
        args = [d[str(i)] for i in range(len(d))]
        mark("read_inputs_s")
        for name in ("first_call_s", "second_call_s"):
            run(*args)
            torch.cuda.synchronize() if cuda else None
            mark(name)
    stop.set()
    row = {"name": "aoti_cold_probe", "loader": a.loader, "package": os.path.basename(a.package),
           "package_mib": round(os.path.getsize(a.package) / 2**20, 1), **{k: v for k, v in T.items() if k != "start"},
           "inductor_imported": "torch._inductor" in sys.modules, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if cuda else None, "git_sha": a.git_sha,
           "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING")}
    print(json.dumps(row))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

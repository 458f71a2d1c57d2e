"""Why does an AOTInductor package segfault at load on the GPU image? Native backtraces, one process each.

    python bench/aoti_probe.py --out $OUT/aoti-probe.jsonl [--device cpu]

Builds a Linear(64,64)+GELU package, then in fresh processes: dlopen of the package's .so alone
(ctypes, after `import torch`), the raw .so through AOTIModelContainerRunnerCpu/Cuda, the package loader,
each that fails also under cuda-gdb for the native backtrace; the toolchain's libstdc++ files and the
.so's NEEDED entries. One JSONL row per probe (stdout/stderr tails). Run 2026-12-05 on the H100 image
(bench/results/aoti-probe-h100.jsonl): the crash is in the wrapper's own static copy of libstdc++
(std::regex in parse_device_str); `--stdcxx-fix` (needs bbf_rt on PYTHONPATH) checks the fix.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

BUILD = textwrap.dedent("""
    import sys, torch
    dev, path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).to(dev).eval()
    x = torch.randn(8, 64, device=dev)
    ep = torch.export.export(m, (x,))
    if len(sys.argv) > 3:  # "fix": link the shared libstdc++ where the toolchain has only the static one
        from bbf_rt.export.aoti import _toolchain
        with _toolchain() as libs:
            print("extra link libs:", libs, flush=True)
            torch._inductor.aoti_compile_and_package(ep, package_path=path)
    else:
        torch._inductor.aoti_compile_and_package(ep, package_path=path)
    torch.save({"x": x.cpu(), "y": m(x).detach().cpu()}, path + ".ref")
""")

LOAD = textwrap.dedent("""
    import faulthandler, sys, os, glob, zipfile, ctypes
    faulthandler.enable()
    import torch
    path, how = sys.argv[1], sys.argv[2]
    dev = "cuda" if "cuda" in path else "cpu"
    ref = torch.load(path + ".ref")
    d = path + ".x"
    if not os.path.isdir(d):
        zipfile.ZipFile(path).extractall(d)
    so = glob.glob(d + "/**/*.so", recursive=True)[0]
    print("so:", so, flush=True)
    if how == "dlopen":
        ctypes.CDLL(so, mode=ctypes.RTLD_GLOBAL); print("dlopen ok", flush=True); sys.exit(0)
    if how == "raw_so":
        if dev == "cuda":
            r = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda", os.path.dirname(so))
        else:
            r = torch._C._aoti.AOTIModelContainerRunnerCpu(so, 1)
        print("runner made", flush=True)
        run = lambda x: r.run([x])
    else:
        run = torch._inductor.aoti_load_package(path)
        print("package loaded", flush=True)
    y = run(ref["x"].to(dev))
    y = y[0] if isinstance(y, (list, tuple)) else y
    print("called; max err", (y.cpu() - ref["y"]).abs().max().item(), flush=True)
""")


def sh(argv, timeout=200, env=None):
    t = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        return {"rc": p.returncode, "s": round(time.perf_counter() - t, 1), "stdout": p.stdout[-6000:], "stderr": p.stderr[-4000:]}
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout)
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr)
        return {"rc": "timeout", "s": timeout, "stdout": out[-6000:], "stderr": err[-3000:]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dir", default="/tmp/aoti-probe")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stdcxx-fix", action="store_true",
                    help="build with bbf_rt.export.aoti's shared-libstdc++ link fix")
    a = ap.parse_args()
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    fh = open(a.out, "a")

    def row(r):
        r = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **r}
        fh.write(json.dumps(r) + "\n"); fh.flush()
        print(json.dumps({k: (v if not isinstance(v, str) else v[-1500:]) for k, v in r.items()}), flush=True)

    import torch
    row({"name": "env", "torch": torch.__version__, "python": sys.executable,
         "uname": os.uname().release, "ulimit": sh(["bash", "-c", "ulimit -a"])["stdout"][-800:]})
    tc = "g++ -print-file-name=libstdc++.so; g++ -print-file-name=libstdc++.a; ls -l /usr/lib/gcc/x86_64-linux-gnu/*/libstdc++* /usr/lib/x86_64-linux-gnu/libstdc++*"
    row({"name": "toolchain", **sh(["bash", "-c", tc])})
    path = f"{a.dir}/m-{a.device}{'-fix' if a.stdcxx_fix else ''}.pt2"
    if not os.path.exists(path):
        row({"name": "build", "device": a.device, **sh([sys.executable, "-c", BUILD, a.device, path] + (["fix"] if a.stdcxx_fix else []), timeout=300)})
    so = sh(["bash", "-c", f"mkdir -p {path}.x && cd {path}.x && python3 -m zipfile -e {path} . && "
             "for f in $(find . -name '*.so'); do readelf -d $f | grep NEEDED; nm -D --defined-only $f | grep -c codecvt; done"])
    row({"name": "so_needed", **so})
    Path(f"{a.dir}/load.py").write_text(LOAD)
    load = [sys.executable, f"{a.dir}/load.py", path]
    row({"name": "load", "how": "dlopen", **sh(load + ["dlopen"])})
    raw = sh(load + ["raw_so"])
    row({"name": "load", "how": "raw_so", **raw})
    pkg = sh(load + ["package"])
    row({"name": "load", "how": "package", **pkg})
    gdb = shutil.which("cuda-gdb")
    for how, r in (("raw_so", raw), ("package", pkg)):
        if gdb and r["rc"] != 0:
            r = sh([gdb, "-batch", "-ex", "set pagination off", "-ex", "set confirm off", "-ex", "run", "-ex", "bt 30",
                    "-ex", "info registers rip", "-ex", "x/6i $pc", "--args"] + load + [how], timeout=240)
            row({"name": "cuda_gdb", "how": how, **r})
    return 0


if __name__ == "__main__":
    sys.exit(main())

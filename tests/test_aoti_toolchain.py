"""AOTInductor packages must load on toolchains that have only a static libstdc++.

The GPU image's g++ has `libstdc++.a` but no `libstdc++.so` link in its own folder, so Inductor's
wrapper .so carried a private libstdc++ and crashed in its first std::regex at `aoti_load_package`
(native backtrace: parse_device_str -> std::regex -> codecvt, all inside the wrapper .so). These tests
build with a compiler wrapper that behaves like that toolchain and check that the package loads.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from bbf_rt.export import aoti

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                                reason="needs Linux and g++ (the toolchain under test)")

# Answers `-print-file-name=libstdc++.so` the way a toolchain without the dev link does, and links
# libstdc++ statically into every shared library, as that toolchain's driver ends up doing.
STATIC_ONLY = """#!/bin/sh
link=""
for a in "$@"; do
  [ "$a" = "-print-file-name=libstdc++.so" ] && { echo libstdc++.so; exit 0; }
  [ "$a" = "-shared" ] && link="-static-libstdc++"
done
exec g++ $link "$@"
"""

LOADER = textwrap.dedent("""
    import sys, torch
    ref = torch.load(sys.argv[1] + ".ref")
    f = torch._inductor.aoti_load_package(sys.argv[1])
    y = f(ref["x"])
    y = y[0] if isinstance(y, (list, tuple)) else y
    print((y - ref["y"]).abs().max().item())
""")


@pytest.fixture
def static_only_cxx(tmp_path):
    cxx = tmp_path / "static-only-g++"
    cxx.write_text(STATIC_ONLY)
    cxx.chmod(0o755)
    with torch._inductor.config.patch({"cpp.cxx": (str(cxx),)}):
        yield str(cxx)


def test_static_only_toolchain_detected_and_shared_link_requested(static_only_cxx):
    assert aoti._cxx() == static_only_cxx
    assert aoti.static_only_libstdcxx(static_only_cxx)
    assert aoti.shared_libstdcxx_libs(static_only_cxx) == [":libstdc++.so.6"]
    with torch._inductor.config.patch({"cpp.cxx": ("g++",)}):
        if aoti._print_file_name("g++", "libstdc++.so"):  # this machine's g++ has the dev link
            assert not aoti.static_only_libstdcxx("g++")
    with aoti._toolchain() as libs:  # the fix is a scoped Inductor config patch
        assert torch._inductor.config.aot_inductor.custom_op_libs == [":libstdc++.so.6"] == libs
    assert not torch._inductor.config.aot_inductor.custom_op_libs


def test_package_built_with_static_only_toolchain_loads(static_only_cxx, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a fresh build, not a cached .so
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU())
    x = torch.randn(4, 32)
    path = tmp_path / "m.pt2"
    facts = aoti.compile_package(m, (x,), None, path)
    assert facts["extra_link_libs"] == [":libstdc++.so.6"]
    torch.save({"x": x, "y": m(x).detach()}, str(path) + ".ref")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", LOADER, str(path)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    # without the fix this process dies (SIGSEGV on torch 2.11) or raises "create_func_ ... API call failed"
    assert p.returncode == 0, p.stderr[-2000:]
    assert float(p.stdout.strip().splitlines()[-1]) < 1e-5

"""What the boundary-fusion head costs per 720p frame, in each form, and where its time goes.

    python bench/bench_fusion.py --out bench/results/fusion-h100.jsonl [--model CKPT] [--batches 1,4]

The head of the shipped checkpoint in bf16, channels-last (as the Engine runs it), replayed from a CUDA
graph (as the Engine's graphed decoder does), per variant:
- `torch-convs`: every convolution as its nn.Conv2d (cuDNN, torch's separate bias pass) and the pooled
  input taken from one full-size concat: the head's forward before it went through bbf_rt.ops.conv2d;
- `torch-full-res`: convolutions through bbf_rt.ops.conv2d (bias and residual in one Triton pass after
  cuDNN), the full-resolution flows, warps, packing and mix as their torch references;
- `ops`: the head as it ships: as `torch-full-res` with kernels/fusion's two passes;
- `compile`: torch.compile of the shipped forward inside the graph.
Each row: median ms per call, ms per frame, and the largest difference from the fp32 eager head on the same
inputs. Then a torch.profiler table (device time per kernel) of `ops` at the largest batch.
`--device cpu` is a dry run of every row but `compile` (no graphs; timings meaningless).
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F


def _torch_convs(head, x, frame0, frame1, tau):
    """The head's forward with plain nn.Conv2d calls (the form before ops.conv2d), same weights."""
    from bbf_rt.model.fusion import warp

    n, _, h, w = x.shape
    small = F.avg_pool2d(torch.cat((x, frame0, frame1), 1), 4)
    t = tau.to(small.dtype).view(n, 1, 1, 1).expand(n, 1, h // 4, w // 4)
    c = F.leaky_relu(head.coarse_in(torch.cat((small, t), 1)), 0.1)
    for b in head.coarse:
        c = c + b.conv2(F.leaky_relu(b.conv1(c), 0.1))
    fl = F.interpolate(head.coarse_out(c) * 4.0, scale_factor=4, mode="bilinear", align_corners=False)
    w0, w1 = warp(frame0, fl[:, :2]), warp(frame1, fl[:, 2:])
    f = F.leaky_relu(head.fine_in(torch.cat((x, w0, w1, frame0, frame1), 1)), 0.1)
    f = F.leaky_relu(head.fine_mid(f), 0.1)
    o = head.fine_out(f)
    a = torch.softmax(o[:, :3].float(), 1).to(x.dtype)
    return a[:, :1] * w0 + a[:, 1:2] * w1 + a[:, 2:3] * x + o[:, 3:]


def _torch_full_res(head, x, frame0, frame1, tau):
    """The shipped forward with its two full-resolution passes as the torch references (kernels/fusion)."""
    from bbf_rt import ops
    from bbf_rt.kernels.fusion import reference as fref
    from bbf_rt.model import fusion as fmod

    packed = fref.pack(head.coarse_flows(x, frame0, frame1, tau), x, frame0, frame1)
    w16 = F.pad(head.fine_in.weight, (0, 0, 0, 0, 0, 1))
    f = F.leaky_relu(ops.conv2d(packed, w16, head.fine_in.bias, 1, 1), 0.1)
    f = F.leaky_relu(fmod._conv(head.fine_mid, f), 0.1)
    return fref.mix(fmod._conv(head.fine_out, f), packed)


def _graphed(fn, args):
    """fn(*args) captured in a CUDA graph after 3 warm-up calls on a side stream; returns replay()."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*args)
    return g, out


def main(argv: list[str] | None = None) -> int:
    from bbf_rt import ops
    from bbf_rt.bench.bench_e2e import _size, _versions
    from bbf_rt.bench.e2e_common import Rows, stats, times_ms
    from bbf_rt.model import load_model
    from bbf_rt.runtime.api import DEFAULT_WEIGHTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--size", type=_size, default=(1280, 720), help="WxH")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--variants", default="torch-convs,torch-full-res,ops,compile")
    p.add_argument("--git-sha", default=None)
    p.add_argument("--device", default="cuda", help="cpu: a dry run (no graphs, no compile; timings meaningless)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_fusion: needs a CUDA GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    W, H = a.size
    model = load_model(a.model)
    ref = model.vae.fusion.float().to(dev).eval()
    head = copy.deepcopy(ref).to(torch.bfloat16).to(memory_format=torch.channels_last)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    rows = Rows(a.out, {"name": "bench_fusion", "device": gpu, "size": [W, H], **_versions(dev, a.git_sha)},
                budget_s=1e9)
    forms = {"torch-convs": lambda *t: _torch_convs(head, *t), "torch-full-res": lambda *t: _torch_full_res(head, *t),
             "ops": head}
    if dev.type == "cuda":
        forms["compile"] = torch.compile(head, dynamic=False)
    names = [v for v in a.variants.split(",") if v in forms]
    unknown = sorted(set(a.variants.split(",")) - set(forms) - {"compile"})
    if unknown:
        print(f"bench_fusion: unknown variants {unknown}; allowed are {sorted(forms)}", file=sys.stderr)
        return 2
    cl = torch.channels_last
    for batch in (int(v) for v in a.batches.split(",")):
        g = torch.Generator(device=dev).manual_seed(batch)
        f0, f1 = (torch.rand(batch, 3, H, W, device=dev, generator=g) * 2 - 1 for _ in range(2))
        x = (0.5 * (f0 + f1) + 0.05 * torch.randn(batch, 3, H, W, device=dev, generator=g)).clamp(-1, 1)
        tau = torch.full((batch,), 0.5, device=dev)
        with torch.no_grad(), ops.implementation("reference"):
            oracle = ref(x, f0, f1, tau)
        args = tuple(t.to(torch.bfloat16).contiguous(memory_format=cl) for t in (x, f0, f1)) + (tau,)
        for name in names:
            def one(name=name):
                with torch.no_grad():
                    if dev.type == "cuda":
                        graph, out = _graphed(forms[name], args)
                        ts = times_ms(graph.replay, dev, a.warmup, a.reps)
                    else:
                        out = forms[name](*args)
                        ts = times_ms(lambda: forms[name](*args), dev, a.warmup, a.reps)
                err = float((out.float() - oracle).abs().max())
                return {"variant": name, "batch": batch, **stats(ts), "ms_per_frame": stats(ts)["p50_ms"] / batch,
                        "max_abs_err_vs_fp32": err,
                        "timed": "CUDA graph replay of the head" if dev.type == "cuda" else "eager (dry run)"}
            rows.guard({"variant": name, "batch": batch}, one, None)
    from torch.profiler import ProfilerActivity, profile
    cuda = dev.type == "cuda"
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            head(*args)
        if cuda:
            torch.cuda.synchronize()
    us = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    table = sorted(((e.key, us(e) / 5, e.count // 5) for e in prof.key_averages() if us(e) > 0), key=lambda r: -r[1])
    rows.write({"variant": "ops", "batch": batch, "profile_us_per_call": [[k[:90], round(t, 1), c] for k, t, c in table[:16]],
                "profile_total_us": round(sum(t for _, t, _ in table), 1), "timed": "torch.profiler, eager, 5 calls"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

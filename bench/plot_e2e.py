"""PNG of the bench_e2e ladder: one panel per scenario and batch, a bar per rung (and peer), PSNR on each bar.

    python bench/plot_e2e.py bench/results/e2e-h100.jsonl [-o bench/results/e2e-h100.png]

Bars: player panels show generated frames/s (higher is better), wan panels the 50-step clip in seconds
(lower is better, extrapolated as its rows say). The last measurement of each (scenario, batch, rung,
steps) wins; rows of A/B variants that did not ship (`"adopted": false`) are left out. Uses matplotlib
when importable, else Pillow; with neither it says so and draws nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def panels(rows: list[dict]) -> dict[str, list[tuple[str, float, float | None]]]:
    """{panel title: [(bar label, value, psnr_db)]} from the e2e rows that measured something."""
    last: dict[tuple, dict] = {}
    for r in rows:
        if r.get("name") != "e2e" or r.get("error") or r.get("skipped") or r.get("rung") in (None, "setup"):
            continue
        if r.get("adopted") is False:  # the variant of an A/B that did not ship
            continue
        shape = r.get("shape") or {}
        last[(r["scenario"], shape.get("batch"), r["rung"], shape.get("steps"), r.get("role"))] = r
    out: dict[str, list] = {}
    for (scen, batch, rung, steps, role), r in last.items():
        if scen == "player":
            if r.get("frames_per_s") is None:
                continue
            size = "x".join(map(str, (r.get("shape") or {}).get("size") or []))
            title = f"{r.get('preset')} {size} 2x, batch {batch}: generated frames/s"
            label, value = f"{rung} @{steps} steps", r["frames_per_s"]
        else:
            if r.get("clip_ms") is None:
                continue
            title = f"{r.get('preset')} {r['shape'].get('tokens')} tokens, {steps} steps: clip s"
            label, value = rung, r["clip_ms"] / 1e3
        out.setdefault(title, []).append((label, float(value), r.get("psnr_db")))
    return out


def _text(label: str, value: float, psnr: float | None) -> str:
    q = "" if psnr is None else f"  {psnr:.1f} dB"
    return f"{value:.3g}{q}"


def draw_matplotlib(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(data), 1, figsize=(9, 1.2 + 0.45 * sum(len(v) for v in data.values())), squeeze=False)
    for ax, (title, bars) in zip(axes[:, 0], data.items()):
        labels = [b[0] for b in bars]
        ax.barh(range(len(bars)), [b[1] for b in bars], color="#4a7ab5")
        ax.set_yticks(range(len(bars)), labels)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        for i, (lab, v, p) in enumerate(bars):
            ax.text(v, i, " " + _text(lab, v, p), va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def draw_pillow(data: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    row_h, label_w, bar_w, pad = 18, 220, 420, 8
    n = sum(len(v) + 2 for v in data.values())
    img = Image.new("RGB", (label_w + bar_w + 160, n * row_h + pad * 2), "white")
    d = ImageDraw.Draw(img)
    y = pad
    for title, bars in data.items():
        d.text((pad, y), title, fill="black")
        y += row_h
        top = max(v for _, v, _ in bars) or 1.0
        for label, v, p in bars:
            d.text((pad, y + 3), label, fill="black")
            w = int(bar_w * v / top)
            d.rectangle([label_w, y + 2, label_w + max(w, 1), y + row_h - 3], fill=(74, 122, 181))
            d.text((label_w + w + 4, y + 3), _text(label, v, p), fill="black")
            y += row_h
        y += row_h
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", help="JSONL written by bench/bench_e2e.py")
    ap.add_argument("-o", "--out", default=None, help="PNG path (default: the rows' path with .png)")
    a = ap.parse_args(argv)
    rows = [json.loads(line) for line in Path(a.rows).read_text().splitlines() if line.strip()]
    data = panels(rows)
    if not data:
        print(f"plot_e2e: no measured e2e rows in {a.rows}; nothing drawn", file=sys.stderr)
        return 0
    out = Path(a.out or Path(a.rows).with_suffix(".png"))
    for name, draw in (("matplotlib", draw_matplotlib), ("PIL", draw_pillow)):
        try:
            draw(data, out)
        except ImportError:
            continue
        print(f"plot_e2e: wrote {out} ({name})", file=sys.stderr)
        return 0
    print("plot_e2e: neither matplotlib nor Pillow is importable; no PNG drawn", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

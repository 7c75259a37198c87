"""Pictures a person can look at: grids of images with captions (eval, search, train_world's validation) and the
report's best-of-N line chart (reproduce). PIL only; harness, not the paper's method.
"""

from __future__ import annotations

import math
import os

import torch
from PIL import Image, ImageDraw

from data import preprocess_image, to_pil


def _as_pil(x, scale: int) -> Image.Image:
    img = x.convert("RGB") if isinstance(x, Image.Image) else to_pil(x)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(rows: list[list], labels: list[list[str]] | None, path: str, title: str | None = None,
              row_titles: list[str] | None = None, scale: int = 0):
    """Write a PNG grid: rows of images (PIL or (3, H, W) tensors in [-1, 1]) with a caption under each image and an
    optional text line above each row (e.g. the action). Small images are enlarged (nearest) to be readable."""
    first = rows[0][0]
    h = first.height if isinstance(first, Image.Image) else first.shape[-2]
    scale = scale or max(1, 128 // h)
    cells = [[_as_pil(x, scale) for x in row] for row in rows]
    cw, ch = max(c.width for r in cells for c in r), max(c.height for r in cells for c in r)
    cap, head, pad = 14, (14 if row_titles else 0), 4
    top = 18 if title else 0
    W = pad + max(len(r) for r in cells) * (cw + pad)
    H = top + len(cells) * (head + ch + cap + pad) + pad
    canvas = Image.new("RGB", (max(W, 200), H), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 3), title[:160], fill="black")
    y = top + pad
    for r, row in enumerate(cells):
        if row_titles:
            draw.text((pad, y), row_titles[r][:160], fill="black")
        for c, img in enumerate(row):
            x = pad + c * (cw + pad)
            canvas.paste(img, (x, y + head))
            if labels and labels[r][c]:
                draw.text((x, y + head + ch + 1), labels[r][c][: max(4, cw // 6)], fill="black")
        y += head + ch + cap + pad
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def save_triplet_grid(items, samples: torch.Tensor, path: str, extra: dict[str, torch.Tensor] | None = None):
    """One row per item: source | generated sample(s) | target, with the instruction above the row."""
    size = samples.shape[-1]
    rows, labels = [], []
    for i, it in enumerate(items):
        row = [preprocess_image(it.input_path, size), samples[i]]
        lab = ["source", "sample"]
        for name, imgs in (extra or {}).items():
            row.append(imgs[i])
            lab.append(name)
        if it.output_path:
            row.append(preprocess_image(it.output_path, size))
            lab.append("target")
        rows.append(row)
        labels.append(lab)
    save_grid(rows, labels, path, row_titles=[it.instruction for it in items])


def curve_png(series: dict[str, list[tuple[int, float, float]]], path: str, ylabel: str, xlog: bool = True,
              title: str | None = None):
    """A small line chart (PIL only): series name -> [(x, mean, std)]; x on a log2 axis (best-of-N sizes) or a linear
    one (training steps)."""
    W, H, m = 420, 260, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    xs = sorted({p[0] for p in pts})
    lo = min(p[1] - p[2] for p in pts)
    hi = max(p[1] + p[2] for p in pts)
    lo, hi = math.floor(lo), math.ceil(hi) if hi > lo else lo + 1
    if xlog:
        fx = lambda n: m + (W - 2 * m) * (math.log2(n) / max(1, math.log2(xs[-1])))
    else:
        fx = lambda n: m + (W - 2 * m) * (n - xs[0]) / max(1, xs[-1] - xs[0])
    fy = lambda v: H - m - (H - 2 * m) * (v - lo) / max(1e-9, hi - lo)
    d.line([(m, H - m), (W - m, H - m)], fill="black")
    d.line([(m, m), (m, H - m)], fill="black")
    for n in xs:
        d.text((fx(n) - 3, H - m + 5), str(n), fill="black")
    for v in (lo, (lo + hi) / 2, hi):
        d.text((4, fy(v) - 5), f"{v:.1f}", fill="black")
    d.text((m, 8), title or f"{ylabel} vs N (best-of-N, DM verifier)", fill="black")
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    for k, (name, s) in enumerate(series.items()):
        c = colours[k % len(colours)]
        line = [(fx(n), fy(v)) for n, v, _ in s]
        d.line(line, fill=c, width=2)
        for (_, v, sd), (x, y) in zip(s, line):
            d.line([(x, fy(v - sd)), (x, fy(v + sd))], fill=c)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        d.text((W - m - 110, m + 14 * k), name, fill=c)
    img.save(path)

"""Pictures of a run, drawn with PIL alone (no plotting dependency): sample grids and curves."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ddpo_rl.atomic import save_image

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] (or [1, H, W]) float in [0, 1] -> PIL RGB."""
    x = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB")


def save_image_grid(
    images: torch.Tensor,
    path: str,
    ncol: int,
    cell: int = 64,
    row_labels: Sequence[str] | None = None,
    cell_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """Save images [N, C, H, W] in [0, 1] as a grid PNG, nearest-neighbour upscaled to ``cell`` px.

    Args:
        ncol: images per row.
        row_labels: text left of each row (e.g. the prompt).
        cell_labels: text under each image (e.g. its reward).
        title: a line above the grid.
    """
    n = images.shape[0]
    nrow = math.ceil(n / ncol)
    font = _font(11)
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0 if not row_labels else 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in row_labels)
    under = 14 if cell_labels else 0
    top = 18 if title else 0
    pad = 2
    W = label_w + ncol * (cell + pad) + pad
    if title:
        W = max(W, int(draw_probe.textlength(title, font=_font(12))) + 8)
    H = top + nrow * (cell + under + pad) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=_font(12))
    for i in range(n):
        r, c = divmod(i, ncol)
        x = label_w + pad + c * (cell + pad)
        y = top + pad + r * (cell + under + pad)
        canvas.paste(to_pil(images[i]).resize((cell, cell), Image.NEAREST), (x, y))
        if cell_labels:
            draw.text((x + 2, y + cell), cell_labels[i], fill="black", font=font)
    if row_labels:
        for r, text in enumerate(row_labels[:nrow]):
            draw.text((4, top + pad + r * (cell + under + pad) + cell // 2 - 6), text, fill="black", font=font)
    return save_image(canvas, path)


def save_side_by_side(paths: Sequence[str], path: str, gap: int = 12) -> str:
    """The PNGs ``paths`` side by side (top-aligned, white between and below) as one PNG at ``path``:
    e.g. a run's sample grids before and after training."""
    images = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), max(im.height for im in images)),
                       "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return save_image(canvas, path)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        if t >= lo - 1e-9 * step:
            ticks.append(round(t, 10))
        t += step
    return ticks


def save_curve_png(
    path: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "epoch",
    ylabel: str = "reward",
    bands: Mapping[str, Sequence[float]] | None = None,
    size: tuple[int, int] = (900, 420),
) -> str:
    """Line plot of named (xs, ys) series, with optional +-std bands (same xs), to a PNG."""
    canvas = curve_image(series, title, xlabel, ylabel, bands, size)
    return save_image(canvas, path)


def save_curve_panels(path: str, panels: Sequence[Mapping], size: tuple[int, int] = (900, 420)) -> str:
    """Several curve plots stacked vertically in one PNG; each panel holds :func:`curve_image`'s arguments."""
    images = [curve_image(size=size, **panel) for panel in panels]
    canvas = Image.new("RGB", (size[0], size[1] * len(images)), "white")
    for k, image in enumerate(images):
        canvas.paste(image, (0, k * size[1]))
    return save_image(canvas, path)


def curve_image(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "epoch",
    ylabel: str = "reward",
    bands: Mapping[str, Sequence[float]] | None = None,
    size: tuple[int, int] = (900, 420),
) -> Image.Image:
    """The picture :func:`save_curve_png` saves."""
    W, H = size
    left, right, top, bottom = 70, 200, 50, 50  # the legend sits right of the axes
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if bands:
        for name, sd in bands.items():
            xs, ys = series[name]
            ok = [(x, y, s) for x, y, s in zip(xs, ys, sd)
                  if y is not None and s is not None and math.isfinite(y) and math.isfinite(s)]
            pts += [(x, y + s) for x, y, s in ok] + [(x, y - s) for x, y, s in ok]
    if not pts:
        pts = [(0.0, 0.0), (1.0, 1.0)]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    margin = 0.05 * (y1 - y0)
    y0, y1 = y0 - margin, y1 + margin

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    for t in _nice_ticks(y0, y1):
        _, yy = px(x0, t)
        draw.line([(left, yy), (W - right, yy)], fill=(230, 230, 230))
        draw.text((4, yy - 7), f"{t:.4g}", fill="black", font=font)
    for t in _nice_ticks(x0, x1):
        xx, _ = px(t, y0)
        draw.line([(xx, top), (xx, H - bottom)], fill=(240, 240, 240))
        draw.text((xx - 8, H - bottom + 4), f"{t:g}", fill="black", font=font)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        line = [px(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if bands and name in bands:
            sd = bands[name]
            upper = [px(x, y + s) for x, y, s in zip(xs, ys, sd) if y is not None]
            lower = [px(x, y - s) for x, y, s in zip(xs, ys, sd) if y is not None]
            if len(upper) > 1:
                light = tuple(int(c + (255 - c) * 0.8) for c in color)
                draw.polygon(upper + lower[::-1], fill=light)
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for p in line if len(line) < 40 else []:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        lx = W - right + 12
        draw.line([(lx, top + 8 + 16 * k + 6), (lx + 20, top + 8 + 16 * k + 6)], fill=color, width=3)
        draw.text((lx + 25, top + 8 + 16 * k), name, fill="black", font=font)
    draw.text((left, 6), title, fill="black", font=_font(14))
    draw.text(((W - left) // 2 + left - 20, H - 22), xlabel, fill="black", font=font)
    draw.text((4, top - 18), ylabel, fill="black", font=font)
    return canvas


def save_scatter_png(
    path: str,
    groups: Mapping[str, Sequence[tuple[float, float]]],
    title: str = "",
    xlabel: str = "x",
    ylabel: str = "y",
    hlines: Sequence[float] = (),
    vlines: Sequence[float] = (),
    size: tuple[int, int] = (760, 480),
    colors: Mapping[str, int] | None = None,
    hollow: Sequence[str] = (),
) -> str:
    """Scatter plot of named groups of (x, y) points (one colour each, or ``colors[name]`` as a palette
    index; groups in ``hollow`` drawn as rings), with dashed threshold lines."""
    W, H = size
    left, right, top, bottom = 70, 170, 40, 50
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    pts = [p for ps in groups.values() for p in ps if all(v is not None and math.isfinite(v) for v in p)]
    xs = [p[0] for p in pts] + list(vlines) or [0.0, 1.0]
    ys = [p[1] for p in pts] + list(hlines) or [0.0, 1.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x0, x1 = (x0 - 0.5, x1 + 0.5) if x1 == x0 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 == y0 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    for t in _nice_ticks(y0, y1):
        draw.line([px(x0, t), px(x1, t)], fill=(230, 230, 230))
        draw.text((4, px(x0, t)[1] - 7), f"{t:.4g}", fill="black", font=font)
    for t in _nice_ticks(x0, x1):
        draw.line([px(t, y0), px(t, y1)], fill=(240, 240, 240))
        draw.text((px(t, y0)[0] - 8, H - bottom + 4), f"{t:g}", fill="black", font=font)
    for y in hlines:
        a, b = px(x0, y), px(x1, y)
        for k in range(int(a[0]), int(b[0]), 12):
            draw.line([(k, a[1]), (min(k + 6, b[0]), a[1])], fill=(120, 120, 120), width=1)
    for x in vlines:
        a, b = px(x, y1), px(x, y0)
        for k in range(int(a[1]), int(b[1]), 12):
            draw.line([(a[0], k), (a[0], min(k + 6, b[1]))], fill=(120, 120, 120), width=1)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for k, (name, ps) in enumerate(groups.items()):
        color = PALETTE[(colors or {}).get(name, k) % len(PALETTE)]
        fill, outline = (None, color) if name in hollow else (color, "black")
        for p in ps:
            if all(v is not None and math.isfinite(v) for v in p):
                cx, cy = px(*p)
                draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=fill, outline=outline, width=2 if fill is None else 1)
        lx, ly = W - right + 12, top + 8 + 16 * k
        draw.ellipse([lx, ly + 2, lx + 8, ly + 10], fill=fill, outline=outline, width=2 if fill is None else 1)
        draw.text((lx + 14, ly), name, fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=_font(14))
    draw.text(((W - left) // 2 + left - 60, H - 22), xlabel, fill="black", font=font)
    draw.text((4, top - 18), ylabel, fill="black", font=font)
    return save_image(canvas, path)

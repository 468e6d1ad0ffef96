"""A line chart as a PNG with PIL only (matplotlib is not installed in this project's environment).

Private stopgap for ``recipes/dppo_gym.py``; to be replaced by ``ddpo_rl.plotting`` when it exists.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw

_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def save_line_plot(
    path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (640, 420),
) -> None:
    """Draw ``{label: (xs, ys)}`` as lines with markers, axes, 5 ticks per axis and a legend."""
    w, h = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs_all = [float(x) for xs, _ in series.values() for x in xs]
    ys_all = [float(y) for _, ys in series.values() for y in ys]
    if not xs_all:
        raise ValueError("nothing to plot")
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if x1 == x0:
        x1 = x0 + 1
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _ticks(x0, x1):
        p = px(t, y0)
        d.line([p[0], h - bottom, p[0], h - bottom + 4], fill="black")
        d.text((p[0] - 10, h - bottom + 6), f"{t:.0f}", fill="black")
    for t in _ticks(y0, y1):
        p = px(x0, t)
        d.line([left - 4, p[1], w - right, p[1]], fill=(225, 225, 225))
        d.text((4, p[1] - 6), f"{t:.4g}", fill="black")
    d.text((w / 2 - 30, h - 18), xlabel, fill="black")
    d.text((4, 8), ylabel, fill="black")
    d.text((w / 2 - 3 * len(title), 8), title, fill="black")
    for i, (label, (xs, ys)) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = [px(float(x), float(y)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        d.text((left + 10, top + 8 + 14 * i), label, fill=color)
    img.save(path)

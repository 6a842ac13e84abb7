"""The multi-click mIoU curve as a PNG: matplotlib when installed, else drawn with PIL."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import write_bytes_atomic

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot_curves(path, curves: Dict[str, Sequence[float]], refs: Dict[str, float] | None = None,
                title: str = "mIoU vs clicks") -> Path:
    """Write a line plot: one line per name in ``curves`` (mIoU after click 1..N) and a dashed
    horizontal line per name in ``refs`` (e.g. the box mIoU). Written atomically."""
    refs = refs or {}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return write_bytes_atomic(path, _pil_plot(curves, refs, title))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for i, (name, ys) in enumerate(curves.items()):
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name, color=np.array(_COLORS[i % 5]) / 255)
    for j, (name, y) in enumerate(refs.items()):
        ax.axhline(y, linestyle="--", color=np.array(_COLORS[(len(curves) + j) % 5]) / 255, label=name)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def _pil_plot(curves: Dict[str, Sequence[float]], refs: Dict[str, float], title: str) -> bytes:
    w, h = 640, 420
    left, right, top, bottom = 60, 20, 40, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    n = max([len(v) for v in curves.values()] + [1])
    pw, ph = w - left - right, h - top - bottom

    def to_px(x: float, y: float):
        fx = (x - 1) / max(n - 1, 1)
        return left + fx * pw, top + (1 - min(max(y, 0.0), 1.0)) * ph

    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    for k in range(11):  # y grid and labels
        y = k / 10
        _, py = to_px(1, y)
        draw.line([left, py, left + pw, py], fill=(225, 225, 225))
        draw.text((left - 35, py - 6), f"{y:.1f}", fill="black")
    for x in range(1, n + 1):
        px, _ = to_px(x, 0)
        draw.line([px, top + ph, px, top + ph + 4], fill="black")
        draw.text((px - 3, top + ph + 8), str(x), fill="black")
    draw.text((left + pw / 2 - 20, h - 22), "clicks", fill="black")
    draw.text((8, top - 25), "mIoU", fill="black")
    draw.text((left + 10, 10), title, fill="black")
    legend: List[tuple] = []
    for i, (name, ys) in enumerate(curves.items()):
        color = _COLORS[i % 5]
        pts = [to_px(k + 1, float(v)) for k, v in enumerate(ys)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        legend.append((name, color))
    for j, (name, y) in enumerate(refs.items()):
        color = _COLORS[(len(curves) + j) % 5]
        _, py = to_px(1, float(y))
        for x0 in range(left, left + pw, 12):
            draw.line([x0, py, min(x0 + 6, left + pw), py], fill=color, width=2)
        legend.append((f"{name} (dashed)", color))
    for k, (name, color) in enumerate(legend):
        y0 = top + ph - 18 * (len(legend) - k) - 4
        draw.rectangle([left + pw - 200, y0 + 3, left + pw - 190, y0 + 13], fill=color)
        draw.text((left + pw - 185, y0 + 2), name, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

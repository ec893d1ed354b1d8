"""A line chart as a standalone SVG file (no plotting library needed to draw a trade-off)."""

from __future__ import annotations

from html import escape

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def line_chart_svg(title: str, xlabel: str, ylabel: str,
                   series: dict[str, list[tuple[float, float]]],
                   marks: dict[str, float] | None = None, width: int = 640,
                   height: int = 400) -> str:
    """``series`` {name: [(x, y), ...]} drawn as lines with points (sorted by x); ``marks``
    {label: x} as dashed vertical lines."""
    marks = marks or {}
    xs = [x for pts in series.values() for x, _ in pts] + list(marks.values())
    ys = [y for pts in series.values() for _, y in pts]
    if not xs or not ys:
        raise ValueError("nothing to plot")
    x0, x1 = min(0.0, min(xs)), max(xs) * 1.05 or 1.0
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.01 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 70, 180, 40, 50
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in _ticks(x0, x1):
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle">'
                   f'{t:.3g}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>')
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                   f'stroke="#eee"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">'
               f'{escape(xlabel)}</text>')
    out.append(f'<text x="16" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + ph / 2})">{escape(ylabel)}</text>')
    legend_y = top + 10
    for i, (label, x) in enumerate(marks.items()):
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + ph}" '
                   f'stroke="#555" stroke-dasharray="{4 + 3 * i},4"/>')
        out.append(f'<text x="{left + pw + 10}" y="{legend_y}">- - {escape(label)} '
                   f'({x:.3g})</text>')
        legend_y += 18
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = sorted(pts)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>'
                for x, y in pts]
        out.append(f'<text x="{left + pw + 10}" y="{legend_y}" fill="{color}">'
                   f'&#9632; {escape(name)}</text>')
        legend_y += 18
    out.append("</svg>")
    return "\n".join(out) + "\n"

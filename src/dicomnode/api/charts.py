"""Small server-rendered SVG charts for the dashboard (no JavaScript, no plotting library)."""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Mapping, Sequence

__all__ = ["PALETTE", "bar_chart", "line_chart"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>'
            + "".join(body) + "</svg>")


def _y_axis(x0: int, y_of: object, width: int, ticks: Sequence[float]) -> list[str]:
    out = []
    for t in ticks:
        y = y_of(t)  # type: ignore[operator]
        out.append(f'<line x1="{x0}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{t:.2f}</text>')
    return out


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str,
               width: int = 640, height: int = 220, y_range: tuple[float, float] = (0.0, 1.0),
               ) -> str:
    """An SVG line chart: one polyline with points per series (x: epoch seconds, y: value).

    Parameters
    ----------
    series
        Name -> (x, y) points; names are escaped.
    title
        Accessible title.
    y_range
        Fixed y axis (Dice: 0 to 1).
    """
    x0, top, bottom = 40, 10, height - 38
    points = [p for s in series.values() for p in s]
    body: list[str] = []
    lo, hi = y_range

    def y_of(v: float) -> float:
        return bottom - (min(max(v, lo), hi) - lo) / ((hi - lo) or 1) * (bottom - top)

    body += _y_axis(x0, y_of, width, [lo + (hi - lo) * f for f in (0, 0.25, 0.5, 0.75, 1)])
    if not points:
        body.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">'
                    "no data yet</text>")
        return _svg(width, height, body, title)
    xmin = min(p[0] for p in points)
    xmax = max(p[0] for p in points)
    span = (xmax - xmin) or 1.0

    def x_of(v: float) -> float:
        return x0 + 8 + (v - xmin) / span * (width - x0 - 24)

    for v, anchor in ((xmin, "start"), (xmax, "end")):
        when = _dt.datetime.fromtimestamp(v, _dt.UTC).strftime("%Y-%m-%d %H:%M")
        body.append(f'<text x="{x_of(v):.1f}" y="{bottom + 14}" text-anchor="{anchor}">'
                    f"{when}</text>")

    for n, (name, pts) in enumerate(series.items()):
        colour = PALETTE[n % len(PALETTE)]
        coords = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in pts)
        body.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                    'stroke-width="1.5"/>')
        for x, y in pts:
            body.append(f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="3" fill="{colour}">'
                        f"<title>{html.escape(name)}: {y:.3f}</title></circle>")
        body.append(f'<text x="{x0 + 12 + 110 * n}" y="{height - 6}" fill="{colour}">'
                    f"{html.escape(name)}</text>")
    return _svg(width, height, body, title)


def bar_chart(bars: Sequence[tuple[str, float | None]], *, title: str, width: int = 640,
              height: int = 200, y_range: tuple[float, float] = (0.0, 1.0)) -> str:
    """An SVG bar chart of (label, value) with value labels; None draws no bar."""
    x0, top, bottom = 40, 10, height - 24
    lo, hi = y_range

    def y_of(v: float) -> float:
        return bottom - (min(max(v, lo), hi) - lo) / ((hi - lo) or 1) * (bottom - top)

    body = _y_axis(x0, y_of, width, [lo + (hi - lo) * f for f in (0, 0.5, 1)])
    n = max(1, len(bars))
    slot = (width - x0 - 16) / n
    for i, (label, value) in enumerate(bars):
        x = x0 + 8 + i * slot
        if value is not None:
            y = y_of(value)
            body.append(f'<rect x="{x + slot * 0.15:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" '
                        f'height="{bottom - y:.1f}" fill="{PALETTE[i % len(PALETTE)]}">'
                        f"<title>{html.escape(label)}: {value:.3f}</title></rect>")
            body.append(f'<text x="{x + slot / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle">'
                        f"{value:.3f}</text>")
        body.append(f'<text x="{x + slot / 2:.1f}" y="{height - 6}" text-anchor="middle">'
                    f"{html.escape(label)}</text>")
    return _svg(width, height, body, title)

"""Charts drawn as SVG on the server: no JavaScript, no third-party chart code, readable without CSS.

Every point carries its value (`data-value` and a `<title>` tooltip), so what the chart shows can be
read back exactly, by a person hovering or by a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT, LEFT, BOTTOM, TOP, RIGHT = 680, 220, 44, 28, 12, 26


@dataclass(frozen=True)
class Series:
    name: str  # e.g. "unique opens"
    values: Sequence[int]
    style: str  # css class: s1..s4 (raw solid, human dashed)


def _nice_max(value: int) -> int:
    top = max(value, 1)
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000):
        if top <= step * 4:
            return step * 4
    return top


def line_chart(title: str, days: Sequence[str], series: Sequence[Series]) -> str:
    """An SVG line chart of `series` over `days` (one point per day), with axes, gridlines and a legend."""
    peak = _nice_max(max((v for s in series for v in s.values), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(len(days) - 1, 1)

    def x(i: int) -> float:
        return LEFT + (i * step if len(days) > 1 else plot_w / 2)

    def y(v: int) -> float:
        return TOP + plot_h - v / peak * plot_h

    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT + 24}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for k in range(5):
        value = peak * k // 4
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>'
                     f'<text class="axis" x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value}</text>')
    label_every = max(1, len(days) // 7)
    for i, day in enumerate(days):
        if i % label_every == 0 or i == len(days) - 1:
            parts.append(f'<text class="axis" x="{x(i):.1f}" y="{HEIGHT - 8}" text-anchor="middle">{escape(day[5:])}</text>')
    for s in series:
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(s.values))
        parts.append(f'<g class="series {s.style}" data-series="{escape(s.name)}">')
        if len(s.values) > 1:
            parts.append(f'<polyline points="{points}"/>')
        for i, v in enumerate(s.values):
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" data-day="{escape(days[i])}" data-value="{v}">'
                         f"<title>{escape(s.name)} {escape(days[i])}: {v}</title></circle>")
        parts.append("</g>")
    for i, s in enumerate(series):
        lx = LEFT + i * 160
        parts.append(f'<g class="legend {s.style}"><line x1="{lx}" x2="{lx + 18}" y1="{HEIGHT + 14}" y2="{HEIGHT + 14}"/>'
                     f'<text x="{lx + 22}" y="{HEIGHT + 18}">{escape(s.name)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)

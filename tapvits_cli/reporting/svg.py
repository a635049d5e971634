"""Charts as inline SVG text: the HTML report needs no plotting library and loads nothing.

Each function returns one ``<svg>`` element (no XML declaration, no external reference)
sized in CSS pixels, with a ``<title>`` on every mark so hovering shows the exact value.
"""

from __future__ import annotations

import math
from html import escape
from typing import Mapping, Sequence

# Colour-blind-safe series colours (Okabe–Ito), in order of use.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
_FONT = 'font-family="sans-serif" font-size="12"'


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        high = low + max(1.0, abs(low))   # + 1.0 alone is lost to rounding beyond 2**53
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _label(value: float, percent: bool) -> str:
    """An axis tick."""
    return f"{value:.0%}" if percent else f"{value:g}"


def _exact(value: float, percent: bool) -> str:
    """A mark's value in its tooltip."""
    return f"{value:.1%}" if percent else f"{value:.4g}"


def bar_chart(categories: Sequence[str], series: Mapping[str, Sequence[float]], title: str, y_label: str,
              percent: bool = True, y_max: float | None = None, width: int = 640, height: int = 260) -> str:
    """Grouped vertical bars: one group per category (a block), one bar per series (attn, mlp)."""
    left, right, top, bottom = 52, 12, 30, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for vs in series.values() for v in vs]
    top_value = y_max if y_max is not None else max(values + [0.0]) or 1.0
    ticks = [t for t in _ticks(0.0, top_value) if t <= top_value * 1.0001] or [0.0]
    top_value = max(top_value, ticks[-1])

    def y(value: float) -> float:
        return top + plot_h - plot_h * max(0.0, min(value, top_value)) / top_value

    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="{left}" y="18" {_FONT} font-weight="bold">{escape(title)}</text>']
    for tick in ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" {_FONT} text-anchor="end">'
                     f'{_label(tick, percent)}</text>')
    group_w = plot_w / max(len(categories), 1)
    bar_w = group_w * 0.8 / max(len(series), 1)
    for index, category in enumerate(categories):
        x0 = left + index * group_w + group_w * 0.1
        for position, (name, values) in enumerate(series.items()):
            value = values[index]
            x = x0 + position * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{max(bar_w - 1, 1):.1f}" '
                         f'height="{y(0) - y(value):.1f}" fill="{PALETTE[position % len(PALETTE)]}">'
                         f'<title>{escape(category)} {escape(name)}: {_exact(value, percent)}</title></rect>')
        parts.append(f'<text x="{x0 + group_w * 0.4:.1f}" y="{top + plot_h + 16}" {_FONT} text-anchor="middle">'
                     f'{escape(category)}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#333"/>')
    parts.append(f'<text x="14" y="{top + plot_h / 2:.1f}" {_FONT} text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{escape(y_label)}</text>')
    parts.extend(_legend(list(series), left, height - 10))
    parts.append("</svg>")
    return "".join(parts)


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    parts = []
    for position, name in enumerate(names):
        colour = PALETTE[position % len(PALETTE)]
        parts.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{x + 14:.1f}" y="{y:.1f}" {_FONT}>{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return parts


def scatter_chart(points: Mapping[str, Sequence[tuple[float, float, str]]], title: str, x_label: str, y_label: str,
                  width: int = 640, height: int = 320) -> str:
    """Points by series (a run): ``(x, y, label)``, both axes fractions shown as percentages."""
    left, right, top, bottom = 56, 16, 30, 62
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [p[0] for ps in points.values() for p in ps] or [0.0, 1.0]
    ys = [p[1] for ps in points.values() for p in ps] or [0.0, 1.0]
    x_ticks = _ticks(max(0.0, min(xs) - 0.05), min(1.0, max(xs) + 0.05))
    y_ticks = _ticks(max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.02))
    x_low, x_high, y_low, y_high = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(value: float) -> float:
        return left + plot_w * (value - x_low) / ((x_high - x_low) or 1.0)

    def sy(value: float) -> float:
        return top + plot_h - plot_h * (value - y_low) / ((y_high - y_low) or 1.0)

    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="{left}" y="18" {_FONT} font-weight="bold">{escape(title)}</text>']
    for tick in y_ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(tick) + 4:.1f}" {_FONT} text-anchor="end">{tick:.0%}</text>')
    for tick in x_ticks:
        parts.append(f'<line x1="{sx(tick):.1f}" x2="{sx(tick):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#eee"/>')
        parts.append(f'<text x="{sx(tick):.1f}" y="{top + plot_h + 16}" {_FONT} text-anchor="middle">{tick:.0%}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    for position, (name, series) in enumerate(points.items()):
        colour = PALETTE[position % len(PALETTE)]
        for x, y, label in series:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{colour}">'
                         f'<title>{escape(name)} {escape(label)}: {y:.2%} at {x:.1%} of the parameters</title></circle>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 34}" {_FONT} text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2:.1f}" {_FONT} text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{escape(y_label)}</text>')
    parts.extend(_legend(list(points), left, height - 8))
    parts.append("</svg>")
    return "".join(parts)

"""Line charts as self-contained SVG, for reports that must open anywhere without a plotting library.

    svg = line_chart(
        {"ours": [(1, 3.1), (8, 12.0)], "LAVIS": [(1, 1.9), (8, 5.8)]},
        title="VQA, beam 5",
        x_label="batch size",
        y_label="images/s",
        log_x=True,
    )

Each series is a polyline (its points marked when there are few) named in a legend; the axes carry a few
ticks (the x values themselves on a log axis).  :func:`panels` puts several charts side by side in
one SVG document.
"""

from __future__ import annotations

import html
import math

#: Series colours, in order (colour-blind safe, Okabe-Ito).
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
#: Series with at most this many points have each point marked (with its value as a tooltip).
MARKED_POINTS = 40


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round numbers covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.2g}"


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    log_x: bool = False,
    width: int = 420,
    height: int = 300,
) -> str:
    """One chart as an ``<svg>`` element; ``series``: name -> [(x, y), ...] (y from 0 up).

    Series with no points are left out; with none at all the chart says so instead of failing."""
    series = {name: sorted(points) for name, points in series.items() if points}
    left, right, top, bottom = 56, 12, 28, 70
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
    ]
    if not series:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    xs = sorted({x for points in series.values() for x, _ in points})
    y_max = max(y for points in series.values() for _, y in points) or 1.0
    y_ticks = _ticks(0.0, y_max)
    y_top = y_ticks[-1]

    def px(x: float) -> float:
        if len(xs) == 1:
            return left + plot_w / 2
        if log_x:
            return left + (math.log(x) - math.log(xs[0])) / (math.log(xs[-1]) - math.log(xs[0])) * plot_w
        return left + (x - xs[0]) / (xs[-1] - xs[0]) * plot_w

    def py(y: float) -> float:
        return top + (1 - y / y_top) * plot_h

    x_ticks = xs if log_x or len(xs) <= 8 else _ticks(xs[0], xs[-1])
    for y in y_ticks:
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>'
            f'<text x="{left - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{_label(y)}</text>'
        )
    for x in x_ticks:
        parts.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#333"/>'
            f'<text x="{px(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_label(x)}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#333"/>'
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#333"/>'
        f'<text x="{left + plot_w / 2}" y="{top + plot_h + 32}" text-anchor="middle">{html.escape(x_label)}</text>'
        f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        f"{html.escape(y_label)}</text>"
    )
    for index, (name, points) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
        if len(points) <= MARKED_POINTS:  # a dense curve (a loss per step) reads better as a line alone
            parts.extend(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"><title>{html.escape(name)}: '
                f"{_label(x)}, {y:.3g}</title></circle>"
                for x, y in points
            )
        legend_y = top + plot_h + 46 + 12 * (index // 2)
        legend_x = left + (index % 2) * plot_w / 2
        parts.append(
            f'<rect x="{legend_x:.1f}" y="{legend_y - 8}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14:.1f}" y="{legend_y + 1}">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def panels(charts: list[str], title: str, width: int = 420, height: int = 300) -> str:
    """Charts made by :func:`line_chart` (of that ``width`` and ``height``) side by side, one SVG document."""
    total = width * len(charts)
    body = "".join(f'<g transform="translate({index * width} 24)">{chart}</g>' for index, chart in enumerate(charts))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{height + 24}" font-family="sans-serif">'
        f'<text x="8" y="16" font-size="14">{html.escape(title)}</text>{body}</svg>\n'
    )


__all__ = ["line_chart", "panels"]

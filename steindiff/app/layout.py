"""Plotly figures as plain dicts: a grid of subplots, traces placed in a panel, lines across one, log ticks.

Figures are built as dicts and validated once, since plotly's object API validates the whole figure at every
``add_trace`` and ``update_layout`` and took ten times as long for the diagnostics figure
(docs/app-performance.md).
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

from plotly.subplots import make_subplots

__all__ = ["COLORS", "axis_key", "hline", "in_panel", "log_ticks", "subplots", "vline"]

#: each run's colour, in every figure
COLORS = {"vanilla": "#1f77b4", "stein": "#d62728"}


def subplots(rows: int, cols: int, titles: list[str], **options: Any) -> dict[str, Any]:
    """The layout of a figure with a grid of subplots as a plain dict, each panel titled: what
    ``make_subplots`` lays out (the axes' domains, anchors and matches, one title annotation a panel) less
    its template, which the figure applies anyway. A trace in panel p (1-based, row-major) names the axes
    ``x{p}`` and ``y{p}`` (:func:`in_panel`). ``options``: make_subplots' spacing and axis sharing."""
    layout = copy.deepcopy(_grid_layout(rows, cols, len(titles), tuple(sorted(options.items()))))
    for annotation, title in zip(layout["annotations"], titles, strict=True):
        annotation["text"] = title
    return layout


@functools.lru_cache(maxsize=8)
def _grid_layout(rows: int, cols: int, titles: int, options: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """``make_subplots``' layout for a grid, once a grid."""
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=["-"] * titles, **dict(options))
    layout = fig.to_dict()["layout"]
    layout.pop("template")
    return layout


def axis_key(panel: int) -> str:
    """The suffix of panel ``panel``'s axes: "" for the first ("xaxis", "x"), else its number."""
    return "" if panel == 1 else str(panel)


def in_panel(trace: dict[str, Any], panel: int) -> dict[str, Any]:
    """``trace`` drawn in subplot ``panel`` (1-based, row-major)."""
    return {**trace, "xaxis": f"x{axis_key(panel)}", "yaxis": f"y{axis_key(panel)}"}


def vline(x: float, panel: int, line: dict) -> dict:
    """A vertical line across subplot ``panel``."""
    return _across(panel, line, x=x)


def hline(y: float, panel: int, line: dict) -> dict:
    """A horizontal line across subplot ``panel``."""
    return _across(panel, line, y=y)


def _across(panel: int, line: dict, x: float | None = None, y: float | None = None) -> dict:
    """A line shape across subplot ``panel`` at ``x`` (vertical) or ``y`` (horizontal): the other axis spans the
    panel's domain."""
    key = axis_key(panel)
    xs = ("domain", 0, 1) if x is None else ("", x, x)
    ys = ("domain", 0, 1) if y is None else ("", y, y)
    return {
        "type": "line",
        "xref": f"x{key} {xs[0]}".strip(),
        "yref": f"y{key} {ys[0]}".strip(),
        "x0": xs[1],
        "x1": xs[2],
        "y0": ys[1],
        "y1": ys[2],
        "line": line,
    }


def log_ticks(values: list[float]) -> tuple[list[float], list[str]] | None:
    """Log-axis ticks labelled in full (0.5, where plotly writes a bare digit "5" beside the 1) for data over
    one to three decades: at 1, 2 and 5 times each power of ten up to two decades, at 1 and 3 beyond. None
    otherwise: within a decade plotly labels plain numbers, over more it labels powers of ten."""
    if not values:
        return None
    span = math.log10(max(values) / min(values))
    if not 1 < span <= 3:
        return None
    mantissas = (1, 2, 5) if span <= 2 else (1, 3)
    decades = range(math.floor(math.log10(min(values))), math.ceil(math.log10(max(values))) + 1)
    ticks = [m * 10.0**e for e in decades for m in mantissas]
    return ticks, [f"{v:g}" for v in ticks]

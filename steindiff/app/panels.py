"""The per-step diagnostics figure, from a spec: each panel lists the record fields it draws.

A new diagnostic is a :class:`~steindiff.records.StepRecord` field, the code that writes it, and one
:class:`Series` in :data:`PANELS`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

from steindiff.app.layout import COLORS, axis_key, hline, in_panel, log_ticks, subplots, vline
from steindiff.experiment import ExperimentResult
from steindiff.records import RunResult

__all__ = ["PANELS", "Panel", "Series", "diagnostics_figure", "record_values"]

#: where a log axis draws values at or below zero (their true value is in the hover text)
LOG_FLOOR = 1e-4


@dataclass(frozen=True)
class Series:
    """One curve of a panel: the record field ``field`` of each run in ``runs``.

    ``color`` None draws it in the run's colour; ``hollow`` runs draw open markers (what the rule would have
    proposed along a run that does not apply it); ``legend`` names it in the legend ("run": by the run's name
    alone, the run's first entry). ``cumulative`` draws the running product over the steps.
    """

    field: str
    label: str
    runs: tuple[str, ...] = ("vanilla", "stein")
    mode: str = "lines+markers"
    dash: str | None = None
    color: str | None = None
    hollow: tuple[str, ...] = ()
    legend: str | None = None
    cumulative: bool = False


@dataclass(frozen=True)
class Panel:
    """One subplot: its title, its curves, its axis, and what it marks (a line at 1, the L > 1 band, the step
    where a run turned non-finite)."""

    title: str
    series: tuple[Series, ...]
    log: bool = True
    unity: dict[str, Any] | None = None
    band: bool = False
    divergence: bool = False


_SOLID = {"color": "black", "width": 1}
PANELS: tuple[Panel, ...] = (
    Panel(
        "gamma: raw (markers), applied (line)",
        (
            Series("gamma_raw", "gamma raw", mode="markers", hollow=("vanilla",), legend="label"),
            Series("gamma", "gamma applied", runs=("stein",), mode="lines", legend="label"),
        ),
        unity={**_SOLID, "dash": "dot"},
        divergence=True,
    ),
    Panel("residual energy s_uu", (Series("s_uu", "s_uu", legend="run"),)),
    Panel("divergence s_div", (Series("s_div", "s_div"),), log=False),
    Panel(
        "step Lipschitz L: max, median (dots)",
        (
            Series("lipschitz_max", "L max"),
            Series("lipschitz_median", "L median", dash="dot"),
            Series(
                "bound_paper",
                "paper's first-order bound",
                runs=("vanilla",),
                mode="lines",
                dash="dash",
                color="gray",
                legend="label",
            ),
            Series(
                "lipschitz_flow_max",
                "exact flow L (max)",
                runs=("vanilla",),
                mode="lines",
                dash="dashdot",
                color="green",
                legend="label",
            ),
        ),
        unity=_SOLID,
        band=True,
        divergence=True,
    ),
    Panel("error to the reference", (Series("err_ref", "error to reference"),), divergence=True),
    Panel(
        "cumulative product of max L",
        (Series("lipschitz_max", "prod L max", cumulative=True),),
        unity=_SOLID,
        band=True,
    ),
)


def record_values(run: RunResult, field: str) -> list[float | None]:
    """``field`` of each step's record (``StepRecord.value``), None where missing or not finite."""
    values = [record.value(field) for record in run.trace]
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in values]


def _cumulative(values: list[float | None]) -> list[float | None]:
    out, product = [], 1.0
    for v in values:
        product = product * v if v is not None and product is not None else None
        out.append(product)
    return out


def _trace(series: Series, name: str, run: RunResult, steps: list[int], hover: list[str], log: bool) -> dict | None:
    """The curve of ``series`` along run ``name``; None where the run recorded none of it."""
    values = record_values(run, series.field)
    if series.cumulative:
        values = _cumulative(values)
    if all(v is None for v in values):
        return None
    color = series.color or COLORS[name]
    shown = [None if v is None or not log else max(v, LOG_FLOOR) for v in values] if log else values
    trace = {
        "type": "scatter",
        "x": steps,
        "y": shown,
        "mode": series.mode,
        "name": name if series.legend == "run" else f"{name} {series.label}" if series.color is None else series.label,
        "text": [
            f"{h}<br>{name} {series.label}: {v:.4g}" if v is not None else h for h, v in zip(hover, values, strict=True)
        ],
        "hoverinfo": "text",
        "legendgroup": name if series.color is None else series.label,
        "showlegend": series.legend is not None,
    }
    if "lines" in series.mode:
        trace["line"] = {"color": color, **({"dash": series.dash} if series.dash else {})}
    if "markers" in series.mode:
        trace["marker"] = {"color": color, "symbol": "circle-open" if name in series.hollow else "circle"}
    return trace


def diagnostics_figure(result: ExperimentResult, step: int | None = None) -> go.Figure:
    """Every panel of :data:`PANELS` on a shared step axis, vanilla (blue) and Stein (red), a cursor at
    ``step``; the L > 1 band shaded where a panel asks for it."""
    runs = result.runs()
    rows = math.ceil(len(PANELS) / 2)
    layout = subplots(
        rows, 2, [p.title for p in PANELS], shared_xaxes=True, vertical_spacing=0.09, horizontal_spacing=0.08
    )
    sigmas = result.comparison.sigmas
    steps = list(range(len(sigmas) - 1))
    hover = [f"step {k}: sigma {a:.3g} -> {b:.3g}" for k, (a, b) in enumerate(itertools.pairwise(sigmas))]
    traces: list[dict[str, Any]] = []
    shapes: list[dict] = []
    annotations: list[dict] = []
    for panel, spec in enumerate(PANELS, start=1):
        for series in spec.series:
            for name, run in runs.items():
                if name in series.runs and (trace := _trace(series, name, run, steps, hover, spec.log)) is not None:
                    traces.append(in_panel(trace, panel))
    panel_values = {
        panel: [y for t in traces if t["yaxis"] == f"y{axis_key(panel)}" for y in t["y"] if y is not None and y > 0]
        for panel in range(1, len(PANELS) + 1)
    }
    band_top = 3 * max([10.0, *(v for p, s in enumerate(PANELS, 1) if s.band for v in panel_values[p])])
    for panel, spec in enumerate(PANELS, start=1):
        axis = layout[f"yaxis{axis_key(panel)}"]
        if spec.log:
            axis["type"] = "log"
            ticks = log_ticks([*panel_values[panel], *((1.0, band_top) if spec.band else ())])
            if ticks:
                axis["tickvals"], axis["ticktext"] = ticks
        if spec.unity is not None:
            shapes.append(hline(1, panel, spec.unity))
        if spec.band:
            key = axis_key(panel)
            shapes.append(
                {
                    "type": "rect",
                    "xref": f"x{key} domain",
                    "yref": f"y{key}",
                    "x0": 0,
                    "x1": 1,
                    "y0": 1,
                    "y1": band_top,
                    "fillcolor": "orange",
                    "opacity": 0.12,
                    "line": {"width": 0},
                    "layer": "below",
                }
            )
        for name, run in runs.items():
            diverged = run.first_nonfinite_step
            if spec.divergence and diverged is not None:
                shapes.append(vline(diverged, panel, {"color": COLORS[name], "dash": "dot"}))
        if step is not None and steps:
            shapes.append(vline(min(step, steps[-1]), panel, {"color": "#555", "width": 1}))
    for name, run in runs.items():
        if run.first_nonfinite_step is not None:
            annotations.append(
                {
                    "x": run.first_nonfinite_step,
                    "y": 1,
                    "xref": "x",
                    "yref": "y domain",
                    "showarrow": False,
                    "text": f"{name} non-finite from step {run.first_nonfinite_step}",
                    "font": {"color": COLORS[name]},
                }
            )
    for panel in range(1, len(PANELS) + 1):
        layout[f"xaxis{axis_key(panel)}"]["dtick"] = 1
    for panel in range(len(PANELS) - 1, len(PANELS) + 1):
        layout[f"xaxis{axis_key(panel)}"]["title"] = {"text": "step k"}
    layout.update(
        shapes=shapes,
        annotations=[*layout["annotations"], *annotations],
        height=760,
        margin={"l": 40, "r": 10, "t": 40, "b": 40},
        legend={"orientation": "h", "y": -0.08},
        hovermode="closest",
    )
    return go.Figure({"data": traces, "layout": layout})

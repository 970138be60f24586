"""The per-step diagnostics figure, from a spec: each panel lists the record fields it draws.

A new diagnostic is a :class:`~steindiff.records.StepRecord` field, the code that writes it, and one
:class:`Series` in :data:`PANELS`. Every panel shares one axis, the state index: x_0 is the starting noise and
step k takes x_(k-1) to x_k, so a step's quantities stand at k and the scrubber's cursor at the state shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import plotly.graph_objects as go

from steindiff.app.layout import COLORS, axis_key, hline, in_panel, log_ticks, subplots, vline
from steindiff.experiment import ExperimentResult
from steindiff.records import RunResult

__all__ = ["CAPTION", "PANELS", "TRAP_COLOR", "Panel", "Series", "diagnostics_figure", "record_values"]

#: where a log axis draws values at or below zero (their true value is in the hover text)
LOG_FLOOR = 1e-4
#: the shading of the trap (where the solver amplifies errors more than the true flow) and of L > 1
TRAP_COLOR = "rgba(255, 140, 0, 0.22)"
#: symlog's linear range: |gamma| below it is drawn linearly, above it logarithmically
SYMLOG_LINEAR = 0.1
Axis = Literal["log", "linear", "symlog"]
#: how the legend names each run
RUN_NAMES = {"vanilla": "vanilla solver", "stein": "Stein-corrected, same noise"}
#: what the colours and the shading mean (the page shows it above the figure, where it wraps with the window)
CAPTION = (
    "Blue: the plain solver; red: Stein-corrected, from the same noise. Shaded orange: the trap, where the solver "
    "grows an error more than the true flow does (top left), and L > 1, where one step expands errors (top right)."
)


@dataclass(frozen=True)
class Series:
    """One curve of a panel: the record field ``field`` of each run in ``runs``.

    ``at`` places a record's value at the state its step leads to ("step": k + 1 for record k) or at the state it
    starts from ("state": k, for what happens to an error already in x_k). ``color`` None draws it in the run's
    colour; ``hollow`` runs draw open markers (what the rule would have proposed along a run that does not apply
    it); ``legend`` names it in the legend ("run": by the run's name alone, the run's first entry). ``clip``
    keeps the panel's range to the other curves': a value above three times their top stands at that height as
    a triangle, its true value in the hover text.
    """

    field: str
    label: str
    runs: tuple[str, ...] = ("vanilla", "stein")
    mode: str = "lines+markers"
    dash: str | None = None
    color: str | None = None
    hollow: tuple[str, ...] = ()
    legend: str | None = None
    at: Literal["step", "state"] = "step"
    clip: bool = False


@dataclass(frozen=True)
class Panel:
    """One subplot: its title, its y axis' title (with units) and scale, its curves, and what it marks: a
    labelled line at 1, the band above 1 (``band``), the steps where vanilla's ``trap`` pair of fields (the
    solver's value, the flow's) has the solver above the flow, the step where a run turned non-finite."""

    title: str
    y_title: str
    series: tuple[Series, ...]
    axis: Axis = "log"
    unity: str | None = None
    band: bool = False
    trap: tuple[str, str] | None = None
    divergence: bool = False


_FLOW = {"runs": ("vanilla",), "mode": "lines", "color": "black", "legend": "label"}
PANELS: tuple[Panel, ...] = (
    Panel(
        "the trap: error growth",
        "growth to x_N: ||dx_N / dx_k||",
        (
            Series("amplification_median", "amplification (median)", at="state"),
            Series("amplification_max", "amplification (max)", dash="dot", at="state"),
            Series("flow_amplification_median", "true flow (median)", dash="dash", at="state", **_FLOW),
        ),
        unity="1: errors keep their size",
        trap=("amplification_median", "flow_amplification_median"),
        divergence=True,
    ),
    Panel(
        "one step's growth L",
        "||dx_k / dx_(k-1)|| (ratio)",
        (
            Series("lipschitz_max", "L (max)"),
            Series("lipschitz_median", "L (median)", dash="dot"),
            Series("lipschitz_flow_max", "true flow's L (max)", dash="dash", **_FLOW),
            Series(
                "bound_paper", "paper's first-order bound", runs=("vanilla",), mode="markers", color="gray", clip=True
            ),
        ),
        unity="L = 1",
        band=True,
    ),
    Panel(
        "Stein coefficient gamma",
        "gamma (symlog)",
        (
            Series("gamma_raw", "gamma raw", mode="markers", hollow=("vanilla",), legend="label"),
            Series("gamma", "gamma applied", runs=("stein",), mode="lines", legend="label"),
        ),
        axis="symlog",
        unity="gamma = 1: the solver's own step",
        divergence=True,
    ),
    Panel(
        "error to the reference",
        "mean ||x_k - x_k_ref|| (data units)",
        (Series("err_ref", "error to reference"),),
        divergence=True,
    ),
    Panel("residual energy s_uu", "mean ||x - T(x)||^2", (Series("s_uu", "s_uu"),)),
    Panel("divergence s_div", "mean div u (dimensionless)", (Series("s_div", "s_div"),), axis="linear"),
)


def record_values(run: RunResult, field: str) -> list[float | None]:
    """``field`` of each step's record, None where missing or not finite."""
    values = [record.value(field) for record in run.trace]
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in values]


def _symlog(value: float) -> float:
    """sign(v) log10(1 + |v| / c): linear near 0, logarithmic beyond c, defined for negative values."""
    return math.copysign(math.log10(1 + abs(value) / SYMLOG_LINEAR), value)


def _shown(values: list[float | None], axis: Axis) -> list[float | None]:
    if axis == "log":
        return [None if v is None else max(v, LOG_FLOOR) for v in values]
    if axis == "symlog":
        return [None if v is None else _symlog(v) for v in values]
    return values


def _trace(series: Series, name: str, run: RunResult, hover: list[str], axis: Axis) -> dict | None:
    """The curve of ``series`` along run ``name``; None where the run recorded none of it."""
    values = record_values(run, series.field)
    if all(v is None for v in values):
        return None
    color = series.color or COLORS[name]
    offset = 1 if series.at == "step" else 0
    label = f"{name} {series.label}" if series.color is None else series.label
    trace = {
        "type": "scatter",
        "x": [k + offset for k in range(len(values))],
        "y": _shown(values, axis),
        "mode": series.mode,
        "name": name if series.legend == "run" else label,
        "text": [
            f"{hover[k + offset]}<br>{label}: {v:.4g}" if v is not None else hover[k + offset]
            for k, v in enumerate(values)
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


def _symlog_ticks(traces: list[dict[str, Any]]) -> tuple[list[float], list[str]]:
    """Ticks at 0, +-0.1, +-1, +-10, ... over the range the traces' values span (at least -0.1 to 10)."""
    shown = [abs(y) for t in traces for y in t["y"] if y is not None]
    top = max([_symlog(10.0), *shown])
    values = [0.0]
    for exponent in range(-1, 20):
        tick = 10.0**exponent
        if _symlog(tick) > top * 1.05:
            break
        values = [-tick, *values, tick] if _symlog(tick) <= _symlog(1.0) else [*values, tick]
    negatives = any(y < 0 for t in traces for y in t["y"] if y is not None)
    if negatives:
        values = sorted({*values, *(-v for v in values if v > 0 and _symlog(v) <= max(shown, default=0) * 1.05)})
    return [_symlog(v) for v in values], [f"{v:g}" for v in values]


def _trap_steps(runs: dict[str, RunResult], fields: tuple[str, str]) -> list[int]:
    """The states where vanilla's solver amplification exceeds the true flow's."""
    solver, flow = (record_values(runs["vanilla"], field) for field in fields)
    return [k for k, (a, b) in enumerate(zip(solver, flow, strict=True)) if a is not None and b is not None and a > b]


def diagnostics_figure(result: ExperimentResult, step: int | None = None) -> go.Figure:
    """Every panel of :data:`PANELS` on the shared state axis, vanilla (blue) and Stein (red), the trap and
    L > 1 shaded, a cursor at state ``step``."""
    runs = result.runs()
    rows = math.ceil(len(PANELS) / 2)
    titles = [p.title for p in PANELS]
    layout = subplots(rows, 2, titles, shared_xaxes=True, vertical_spacing=0.1, horizontal_spacing=0.1)
    sigmas = result.comparison.sigmas
    n = len(sigmas) - 1
    hover = [f"x_{k}: sigma {s:.3g}" for k, s in enumerate(sigmas)]
    traces: list[dict[str, Any]] = []
    shapes: list[dict] = []
    annotations: list[dict] = []
    for panel, spec in enumerate(PANELS, start=1):
        key = axis_key(panel)
        drawn = [
            (in_panel(trace, panel), series)
            for series in spec.series
            for name, run in runs.items()
            if name in series.runs and (trace := _trace(series, name, run, hover, spec.axis)) is not None
        ]
        clipped = [trace for trace, series in drawn if series.clip]
        drawn = [trace for trace, _ in drawn]
        values = [
            y for t in drawn if t not in clipped for y in t["y"] if y is not None and (spec.axis != "log" or y > 0)
        ]
        for trace in clipped:  # off the chart: at its top edge, marked
            cap = 3 * max(values, default=1.0)
            trace["marker"]["symbol"] = ["triangle-up" if y is not None and y > cap else "circle" for y in trace["y"]]
            trace["y"] = [None if y is None else min(y, cap) for y in trace["y"]]
        traces += drawn
        axis = layout[f"yaxis{key}"]
        axis["title"] = {"text": spec.y_title, "font": {"size": 11}}
        if spec.axis == "log":
            axis["type"] = "log"
            top = max([*values, 10.0 if spec.band else 1.0])
            if spec.band:  # the band reaches past the data; the rest of the panel is the data's
                shapes.append(_band(panel, 1, 3 * top))
            ticks = log_ticks([*values, *((1.0, 3 * top) if spec.band else ())])
            if ticks:
                axis["tickvals"], axis["ticktext"] = ticks
            axis["minor"] = {"showgrid": False}
        elif spec.axis == "symlog":
            axis["tickvals"], axis["ticktext"] = _symlog_ticks(drawn)
        if spec.unity is not None:
            level = _symlog(1.0) if spec.axis == "symlog" else 1.0
            shapes.append(hline(level, panel, {"color": "black", "width": 1, "dash": "dot"}))
            annotations.append(_note(spec.unity, panel, level))
        if spec.trap is not None:
            for k in _trap_steps(runs, spec.trap):
                shapes.append(_column(panel, k))
        for name, run in runs.items():
            if spec.divergence and run.first_nonfinite_step is not None:
                shapes.append(vline(run.first_nonfinite_step + 1, panel, {"color": COLORS[name], "dash": "dot"}))
        if step is not None:
            shapes.append(vline(min(step, n), panel, {"color": "#555", "width": 1}))
        layout[f"xaxis{key}"].update(_step_axis(n), range=[-0.5, n + 0.5])
    for name, run in runs.items():
        if run.first_nonfinite_step is not None:
            k = run.first_nonfinite_step + 1
            annotations.append(
                {
                    "x": k,
                    "y": 1,
                    "xref": "x",
                    "yref": "y domain",
                    "showarrow": False,
                    "text": f"{name} non-finite from x_{k} (step {k})",
                    "font": {"color": COLORS[name]},
                }
            )
    for panel in range(len(PANELS) - 1, len(PANELS) + 1):
        layout[f"xaxis{axis_key(panel)}"]["title"] = {"text": "state x_k (k steps done)", "font": {"size": 11}}
    for name in runs:  # the runs' colours, in the legend whichever curves they drew
        traces.append(
            {
                "type": "scatter",
                "x": [None],
                "y": [None],
                "mode": "lines",
                "name": RUN_NAMES[name],
                "line": {"color": COLORS[name]},
                "legendgroup": name,
                "hoverinfo": "skip",
            }
        )
    layout.update(
        shapes=shapes,
        annotations=[*layout["annotations"], *annotations],
        height=900,
        template="plotly_white",
        margin={"l": 60, "r": 10, "t": 60, "b": 40},
        legend={"orientation": "h", "y": -0.08},
        hovermode="closest",
    )
    return go.Figure({"data": traces, "layout": layout})


def _step_axis(n: int) -> dict[str, Any]:
    """Ticks at every state up to 12 steps, else about ten whole-number ticks."""
    return {"dtick": 1} if n <= 12 else {"dtick": max(1, round(n / 10))}


def _band(panel: int, low: float, high: float) -> dict[str, Any]:
    key = axis_key(panel)
    return {
        "type": "rect",
        "xref": f"x{key} domain",
        "yref": f"y{key}",
        "x0": 0,
        "x1": 1,
        "y0": low,
        "y1": high,
        "fillcolor": TRAP_COLOR,
        "line": {"width": 0},
        "layer": "below",
    }


def _column(panel: int, k: int) -> dict[str, Any]:
    """The trap's shading at state k: a column across the panel."""
    key = axis_key(panel)
    return {
        "type": "rect",
        "xref": f"x{key}",
        "yref": f"y{key} domain",
        "x0": k - 0.5,
        "x1": k + 0.5,
        "y0": 0,
        "y1": 1,
        "fillcolor": TRAP_COLOR,
        "line": {"width": 0},
        "layer": "below",
    }


def _note(text: str, panel: int, y: float) -> dict[str, Any]:
    """A label at the right end of the line at ``y`` in ``panel``."""
    key = axis_key(panel)
    return {
        "x": 1,
        "y": math.log10(y) if PANELS[panel - 1].axis == "log" else y,
        "xref": f"x{key} domain",
        "yref": f"y{key}",
        "xanchor": "right",
        "yanchor": "bottom",
        "showarrow": False,
        "text": text,
        "font": {"size": 10, "color": "#333"},
    }

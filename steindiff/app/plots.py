"""Figures and image views of a finished experiment (plotly and numpy only; no model calls, no gradio)."""

from __future__ import annotations

import copy
import csv
import functools
import io
import math
import re
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from steindiff.experiment import ExperimentResult
from steindiff.images import image_grid
from steindiff.records import RunResult
from steindiff.solvers import SOLVERS, get_solver

__all__ = ["diagnostics_figure", "image_views", "particles_csv", "particles_figure", "steps_csv", "summary_markdown"]

COLORS = {"vanilla": "#1f77b4", "stein": "#d62728"}
LOG_FLOOR = 1e-4
PANELS = (
    "gamma: raw (markers), applied (line)",
    "residual energy s_uu",
    "divergence s_div",
    "step Lipschitz L: max, median (dots)",
    "error to the reference",
    "cumulative product of max L",
)


def _values(run: RunResult, key: str) -> list[float | None]:
    out = []
    for record in run.trace:
        value = getattr(record, key)
        out.append(value if isinstance(value, (int, float)) and math.isfinite(value) else None)
    return out


def _positive(values: list[float | None]) -> list[float | None]:
    """For log axes: non-positive values sit at the floor (their true value is in the hover text)."""
    return [None if v is None else max(v, LOG_FLOOR) for v in values]


def _cumulative(values: list[float | None]) -> list[float | None]:
    out, product = [], 1.0
    for v in values:
        product = product * v if v is not None and product is not None else None
        out.append(product)
    return out


def _subplots(rows: int, cols: int, titles: list[str], **options: Any) -> dict[str, Any]:
    """The layout of a figure with a grid of subplots as a plain dict, each panel titled: what
    ``make_subplots`` lays out (the axes' domains, anchors and matches, one title annotation a panel) less
    its template, which the figure applies anyway. A trace in panel p (1-based, row-major) names the axes
    ``x{p}`` and ``y{p}`` (:func:`_in_panel`). ``options``: make_subplots' spacing and axis sharing."""
    layout = copy.deepcopy(_grid_layout(rows, cols, len(titles), tuple(sorted(options.items()))))
    for annotation, title in zip(layout["annotations"], titles, strict=True):
        annotation["text"] = title
    return layout


@functools.lru_cache(maxsize=8)
def _grid_layout(rows: int, cols: int, titles: int, options: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """``make_subplots``' layout for a grid, once a grid. Figures are built as plain dicts and validated once:
    plotly's object API (make_subplots, then add_trace and update_layout, each validated against the whole
    figure) took 0.11-0.18 s for the six-panel figure on the 2-core CPU, the same figure as a dict 0.01 s."""
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=["-"] * titles, **dict(options))
    layout = fig.to_dict()["layout"]
    layout.pop("template")
    return layout


def _axes(layout: dict[str, Any], letter: str) -> list[dict[str, Any]]:
    """The layout's axes of one direction (``letter``: "x" or "y")."""
    return [axis for key, axis in layout.items() if re.fullmatch(rf"{letter}axis\d*", key)]


def _in_panel(trace: dict[str, Any], panel: int) -> dict[str, Any]:
    """``trace`` drawn in subplot ``panel`` (1-based, row-major)."""
    return {**trace, "xaxis": f"x{_axis(panel)}", "yaxis": f"y{_axis(panel)}"}


def _axis_values(traces: list[dict[str, Any]], panel: int) -> list[float]:
    """The finite positive y values of the traces drawn in subplot ``panel``."""
    return [
        float(y)
        for trace in traces
        if trace["yaxis"] == f"y{_axis(panel)}"
        for y in trace["y"]
        if y is not None and math.isfinite(y) and y > 0
    ]


def _log_ticks(values: list[float]) -> tuple[list[float], list[str]] | None:
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


def diagnostics_figure(result: ExperimentResult, step: int | None = None) -> go.Figure:
    """Six panels on a shared step axis, vanilla (blue) and Stein (red); L = 1 marked, above it shaded."""
    runs = result.runs()
    layout = _subplots(3, 2, list(PANELS), shared_xaxes=True, vertical_spacing=0.09, horizontal_spacing=0.08)
    traces: list[dict[str, Any]] = []
    peak = 10.0  # the largest L plotted (at least 10): the shaded L > 1 band reaches 3 times it
    shapes: list[dict] = []
    annotations: list[dict] = []
    steps = list(range(len(result.comparison.sigmas) - 1))
    sigmas = [
        f"sigma {a:.3g} -> {b:.3g}"
        for a, b in zip(result.comparison.sigmas[:-1], result.comparison.sigmas[1:], strict=True)
    ]
    for name, run in runs.items():
        color = COLORS[name]
        raw = _values(run, "gamma_raw")
        hover = [f"{s}<br>{name}: raw gamma {v:.4g}" if v is not None else s for s, v in zip(sigmas, raw, strict=True)]
        traces.append(
            _in_panel(
                {
                    "type": "scatter",
                    "x": steps,
                    "y": _positive(raw),
                    "mode": "markers",
                    "name": f"{name} gamma raw",
                    "marker": {"color": color, "symbol": "circle-open" if name == "vanilla" else "circle"},
                    "text": hover,
                    "hoverinfo": "text",
                    "legendgroup": name,
                },
                1,
            )
        )
        if name == "stein":
            traces.append(
                _in_panel(
                    {
                        "type": "scatter",
                        "x": steps,
                        "y": _positive(_values(run, "gamma")),
                        "mode": "lines",
                        "name": "gamma applied",
                        "line": {"color": color},
                        "legendgroup": name,
                    },
                    1,
                )
            )
        lines = [
            ("s_uu", 2, _positive(_values(run, "s_uu")), {}),
            ("s_div", 3, _values(run, "s_div"), {}),
            ("L max", 4, _positive(_values(run, "lipschitz_max")), {}),
            ("L median", 4, _positive(_values(run, "lipschitz_median")), {"dash": "dot"}),
            ("error to reference", 5, _positive(_values(run, "err_ref")), {}),
            ("prod L max", 6, _positive(_cumulative(_values(run, "lipschitz_max"))), {}),
        ]
        for label, panel, ys, style in lines:
            traces.append(
                _in_panel(
                    {
                        "type": "scatter",
                        "x": steps,
                        "y": ys,
                        "mode": "lines+markers",
                        "name": name,
                        "line": {"color": color, **style},
                        "legendgroup": name,
                        "showlegend": label == "s_uu",
                        "hovertemplate": f"{name} {label}: %{{y:.4g}}<extra>step %{{x}}</extra>",
                    },
                    panel,
                )
            )
            if panel in (4, 6):
                peak = max([peak, *(v for v in ys if v is not None)])
        if name == "vanilla":
            bound = {
                "type": "scatter",
                "x": steps,
                "y": _positive(_values(run, "bound_paper")),
                "mode": "lines",
                "name": "paper's first-order bound (vanilla)",
                "line": {"color": "gray", "dash": "dash"},
            }
            traces.append(_in_panel(bound, 4))
            flow = _values(run, "lipschitz_flow_max")
            if any(v is not None for v in flow):
                exact = {
                    "type": "scatter",
                    "x": steps,
                    "y": _positive(flow),
                    "mode": "lines",
                    "name": "exact flow L (max)",
                    "line": {"color": "green", "dash": "dashdot"},
                }
                traces.append(_in_panel(exact, 4))
        diverged = run.first_nonfinite_step
        if diverged is not None:
            shapes += [_vline(diverged, panel, {"color": color, "dash": "dot"}) for panel in (1, 4, 5)]
            annotations.append(
                {
                    "x": diverged,
                    "y": 1,
                    "xref": "x",
                    "yref": "y domain",
                    "showarrow": False,
                    "text": f"{name} non-finite from step {diverged}",
                    "font": {"color": color},
                }
            )
    band_top = 3 * peak
    for panel in (1, 2, 4, 5, 6):
        axis = layout[f"yaxis{_axis(panel)}"]
        axis["type"] = "log"
        shown = [*_axis_values(traces, panel), *((1.0, band_top) if panel in (4, 6) else ())]  # the band and L = 1
        ticks = _log_ticks(shown)
        if ticks:
            axis["tickvals"], axis["ticktext"] = ticks
    for panel in (4, 6):
        shapes.append(_hline(1, panel, {"color": "black", "width": 1}))
        shapes.append(
            {
                "type": "rect",
                "xref": f"x{_axis(panel)} domain",
                "yref": f"y{_axis(panel)}",
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
    shapes.append(_hline(1, 1, {"color": "black", "width": 1, "dash": "dot"}))
    if step is not None and steps:
        shapes += [_vline(min(step, steps[-1]), panel, {"color": "#555", "width": 1}) for panel in range(1, 7)]
    for axis in _axes(layout, "x"):
        axis["dtick"] = 1
    for panel in (5, 6):
        layout[f"xaxis{panel}"]["title"] = {"text": "step k"}
    layout.update(
        shapes=shapes,
        annotations=[*layout["annotations"], *annotations],
        height=760,
        margin={"l": 40, "r": 10, "t": 40, "b": 40},
        legend={"orientation": "h", "y": -0.08},
        hovermode="closest",
    )
    return go.Figure({"data": traces, "layout": layout})


def _axis(panel: int) -> str:
    return "" if panel == 1 else str(panel)


def _vline(x: float, panel: int, line: dict) -> dict:
    """A vertical line across subplot ``panel`` (1..6, row-major)."""
    return {
        "type": "line",
        "xref": f"x{_axis(panel)}",
        "yref": f"y{_axis(panel)} domain",
        "x0": x,
        "x1": x,
        "y0": 0,
        "y1": 1,
        "line": line,
    }


def _hline(y: float, panel: int, line: dict) -> dict:
    return {
        "type": "line",
        "xref": f"x{_axis(panel)} domain",
        "yref": f"y{_axis(panel)}",
        "x0": 0,
        "x1": 1,
        "y0": y,
        "y1": y,
        "line": line,
    }


def _finite_rows(x: torch.Tensor) -> np.ndarray:
    arr = x.detach().double().cpu().numpy()
    return arr[np.isfinite(arr).all(1)]


def particles_figure(result: ExperimentResult, step: int, trajectories: int = 24) -> go.Figure:
    """2-D models: particles at step k over the denoiser's pull, vanilla | Stein, with the first
    trajectories up to k (solid) and the reference trajectories from the same noise (dashed). Each panel is
    framed to 99% of its own particles, at least |x| <= 2.5: a run that scatters does not hide the other's."""
    runs = result.runs()
    layout = _subplots(1, len(runs), [f"{n} at step {step}" for n in runs], horizontal_spacing=0.06)
    traces: list[dict[str, Any]] = []
    reference = result.comparison.reference
    sigmas = result.comparison.sigmas
    frames: list[float] = []
    for col, (name, run) in enumerate(runs.items(), start=1):
        states = run.states
        k = min(step, len(states) - 1)
        points = _finite_rows(states[k])
        spread = float(np.percentile(np.abs(points), 99)) if len(points) else 0.0
        frames.append(min(1.05 * max(2.5, spread), 1e4))
        if result.field is not None and k < len(result.field.displacement):
            arrows = _arrows(result.field.points.numpy(), result.field.displacement[k].numpy())
            traces.append(_in_panel({**arrows, "showlegend": col == 1}, col))
        particles = {
            "type": "scattergl",
            "x": points[:, 0],
            "y": points[:, 1],
            "mode": "markers",
            "name": f"{name} particles",
            "marker": {"size": 3, "color": COLORS[name], "opacity": 0.6},
            "showlegend": col == 1,
        }
        traces.append(_in_panel(particles, col))
        path = torch.stack([s[:trajectories] for s in states[: k + 1]]).double().cpu().numpy()  # (k+1, T, 2)
        xs, ys = _polylines(path)
        paths = {
            "type": "scatter",
            "x": xs,
            "y": ys,
            "mode": "lines",
            "line": {"color": COLORS[name], "width": 1},
            "name": f"{name} trajectories",
            "showlegend": col == 1,
            "hoverinfo": "skip",
        }
        traces.append(_in_panel(paths, col))
        if reference is not None:
            ref = torch.stack([s[:trajectories] for s in reference[: k + 1]]).double().cpu().numpy()
            xs, ys = _polylines(ref)
            exact = {
                "type": "scatter",
                "x": xs,
                "y": ys,
                "mode": "lines",
                "line": {"color": "black", "width": 1, "dash": "dash"},
                "name": "exact ODE from the same noise",
                "showlegend": col == 1,
                "hoverinfo": "skip",
            }
            traces.append(_in_panel(exact, col))
        lost = len(states[k]) - len(points)
        if lost:
            layout["annotations"].append(
                {
                    "text": f"{lost} particles non-finite",
                    "x": 0.5,
                    "y": 1.0,
                    "xref": f"x{col} domain",
                    "yref": f"y{col} domain",
                    "showarrow": False,
                    "font": {"color": "red"},
                }
            )
    for col, frame in enumerate(frames, start=1):
        layout[f"xaxis{_axis(col)}"]["range"] = [-frame, frame]
        layout[f"yaxis{_axis(col)}"].update(range=[-frame, frame], scaleanchor=f"x{_axis(col)}")
    layout.update(
        height=460,
        margin={"l": 30, "r": 10, "t": 50, "b": 30},
        title={"text": f"sigma {sigmas[min(step, len(sigmas) - 1)]:.3g}"},
        legend={"orientation": "h", "y": -0.08},
    )
    return go.Figure({"data": traces, "layout": layout})


def _polylines(path: np.ndarray) -> tuple[list[float | None], list[float | None]]:
    """(steps, T, 2) -> x and y lists with None separating the T polylines (plotly's gap convention)."""
    xs: list[float | None] = []
    ys: list[float | None] = []
    for t in range(path.shape[1]):
        for point in path[:, t]:
            finite = bool(np.isfinite(point).all())
            xs.append(float(point[0]) if finite else None)
            ys.append(float(point[1]) if finite else None)
        xs.append(None)
        ys.append(None)
    return xs, ys


def _arrows(points: np.ndarray, pull: np.ndarray) -> dict[str, Any]:
    """A trace of short grey segments from ``points`` along the denoiser's pull (scaled to the view)."""
    lengths = np.linalg.norm(pull, axis=1, keepdims=True)
    scale = 0.15 / max(float(np.percentile(lengths, 90)), 1e-12)
    tips = points + np.clip(pull * scale, -0.3, 0.3)
    xs: list[float | None] = []
    ys: list[float | None] = []
    for start, end in zip(points, tips, strict=True):
        xs += [float(start[0]), float(end[0]), None]
        ys += [float(start[1]), float(end[1]), None]
    return {
        "type": "scatter",
        "x": xs,
        "y": ys,
        "mode": "lines",
        "line": {"color": "#bbbbbb", "width": 1},
        "name": "pull of D(x, sigma_k)",
        "hoverinfo": "skip",
    }


def image_views(result: ExperimentResult, step: int, count: int = 16) -> dict[str, Any]:
    """Image models: grids of the states x_k and of the predictions x0_hat made at step k, per run."""
    views: dict[str, Any] = {}
    for name, run in result.runs().items():
        k = min(step, len(run.states) - 1)
        decode = result.model.decode  # latent models: the autoencoder's images of the latents
        views[f"{name}_state"] = image_grid(decode(run.states[k][:count]), scale=3)
        views[f"{name}_x0"] = image_grid(decode(run.denoised[min(k, len(run.denoised) - 1)][:count]), scale=3)
    return views


def summary_markdown(result: ExperimentResult) -> str:
    """A short table of the outcome: NFE, final error, digit scores, gamma range, how often the applied
    gamma left 1 and where it went (a move of 1e-4 counts: the range says how far), divergence. Digit scores
    of a run with non-finite samples are marked: they score the images its NaN and infinite pixels make."""
    exp = result.experiment
    lines = [
        f"**{exp.model}**, {exp.solver}, {exp.schedule}, NFE {exp.nfe} "
        f"({len(result.comparison.sigmas) - 1} steps), batch {exp.batch}, seed {exp.seed}",
        "",
        "| run | NFE | final err_ref | FD-MNIST | confidence | gamma raw (min .. max) | gamma moved off 1 (range) "
        "| diverged at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    marked = False
    for name, run in result.runs().items():
        raw = [r.gamma_raw for r in run.trace if r.gamma_raw is not None and math.isfinite(r.gamma_raw)]
        score = result.scores.get(name, {})
        ruled, moved = run.gamma_moves
        applied = [g for g in run.moved_gammas if math.isfinite(g)]
        lost = run.nonfinite_samples
        mark = " †" if score and lost else ""
        marked = marked or bool(mark)
        cells = [
            name,
            str(run.nfe_total),
            _fmt(run.final_err_ref),
            _fmt(score.get("fd_mnist")) + mark,
            _fmt(score.get("confidence")) + mark,
            f"{min(raw):.3g} .. {max(raw):.3g}" if raw else "-",
            _moves(moved, ruled, applied) if name == "stein" and ruled else "-",
            "-"
            if run.first_nonfinite_step is None
            else f"step {run.first_nonfinite_step} ({lost} of {len(run.samples)} samples)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = _corrected_step(result) if "stein" in result.runs() else None
    if note:
        lines += ["", note]
    if marked:
        lines += [
            "",
            "†: scored with non-finite samples, whose NaN pixels count as background and infinite ones as ink "
            "or background: the scores measure those images, not a sampler that worked.",
        ]
    if getattr(result.model, "autoencoder", None) is not None:
        lines += [
            "",
            "Latent model: sampling, err_ref, divergences and Lipschitz constants are in latent space; "
            "the images are the autoencoder's decoding of the latents.",
        ]
    return "\n".join(lines)


def _corrected_step(result: ExperimentResult) -> str | None:
    """Where the corrected run's step is not simply the solver's combined with gamma: the look-ahead
    corrector's (which moves it even at gamma = 1), or the solver's own at every step (gamma never left 1)."""
    solver, stein = result.experiment.solver, result.experiment.stein
    if stein is not None and stein.lookahead and not get_solver(solver).looks_ahead:
        alone = f"{solver}+lookahead"
        return (
            "The corrected run steps with the look-ahead corrector (the next step's network call, no extra NFE; "
            "none at the last step), then the Stein coefficient: its steps differ from vanilla's even where "
            "gamma stays 1." + (f" The solver `{alone}` is the corrector alone." if alone in SOLVERS else "")
        )
    if result.comparison.stein.gamma_moves[1] == 0:
        return "The applied gamma stayed 1 at every step: the corrected run is vanilla's, step for step."
    return None


def _moves(moved: int, ruled: int, applied: list[float]) -> str:
    """'3 of 5 steps (0.27 .. 1.04)': the steps whose applied gamma left 1, and the range it went to (a single
    value where both ends read the same), each end with the digits that tell it from 1: 1.002, not 1."""
    if not applied:
        return f"{moved} of {ruled} steps"
    ends = dict.fromkeys([_off_one(min(applied)), _off_one(max(applied))])
    return f"{moved} of {ruled} steps ({' .. '.join(ends)})"


def _off_one(gamma: float) -> str:
    """``gamma`` (not 1) to 3 significant digits, or as many more as tell it from 1."""
    return next(text for digits in range(3, 18) if (text := f"{gamma:.{digits}g}") != "1")


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def particles_csv(result: ExperimentResult) -> str:
    """A 2-D run's final samples as CSV (run, sample, x, y): each run's, then the reference solution's for
    its first samples; float32 written to 9 significant digits, which give it back exactly."""
    finals = {name: run.samples for name, run in result.runs().items()}
    if result.comparison.reference is not None:
        finals["reference"] = result.comparison.reference[-1]
    rows = (
        f"{name},{index},{x:.9g},{y:.9g}\n"
        for name, samples in finals.items()
        for index, (x, y) in enumerate(samples.tolist())
    )
    return "run,sample,x,y\n" + "".join(rows)


def steps_csv(result: ExperimentResult) -> str:
    """The per-step trace of every run as CSV (one row per run and step)."""
    buffer = io.StringIO()
    writer = None
    for name, run in result.runs().items():
        for record in run.trace:
            row = {"run": name, **record.as_dict()}
            if writer is None:
                writer = csv.DictWriter(buffer, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
    return buffer.getvalue()

"""The 2-D models' view: particles at a step over the denoiser's pull, with trajectories, one panel a run."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from steindiff.app.layout import COLORS, axis_key, in_panel, subplots
from steindiff.experiment import ExperimentResult

__all__ = ["particles_figure"]


def _finite_rows(x: torch.Tensor) -> np.ndarray:
    arr = x.detach().double().cpu().numpy()
    return arr[np.isfinite(arr).all(1)]


def particles_figure(result: ExperimentResult, step: int, trajectories: int = 24) -> go.Figure:
    """2-D models: particles at step k over the denoiser's pull, vanilla | Stein, with the first
    trajectories up to k (solid) and the reference trajectories from the same noise (dashed). Each panel is
    framed to 99% of its own particles, at least |x| <= 2.5: a run that scatters does not hide the other's."""
    runs = result.runs()
    layout = subplots(1, len(runs), [f"{n} at step {step}" for n in runs], horizontal_spacing=0.06)
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
            traces.append(in_panel({**arrows, "showlegend": col == 1}, col))
        particles = {
            "type": "scattergl",
            "x": points[:, 0],
            "y": points[:, 1],
            "mode": "markers",
            "name": f"{name} particles",
            "marker": {"size": 3, "color": COLORS[name], "opacity": 0.6},
            "showlegend": col == 1,
        }
        traces.append(in_panel(particles, col))
        line = {"color": COLORS[name], "width": 1}
        traces.append(in_panel(_paths(states[: k + 1], trajectories, f"{name} trajectories", line, col == 1), col))
        if reference is not None:
            line = {"color": "black", "width": 1, "dash": "dash"}
            exact = _paths(reference[: k + 1], trajectories, "exact ODE from the same noise", line, col == 1)
            traces.append(in_panel(exact, col))
        lost = len(states[k]) - len(points)
        if lost:
            layout["annotations"].append(
                {
                    "text": f"{lost} particles non-finite",
                    "x": 0.5,
                    "y": 1.0,
                    "xref": f"x{axis_key(col)} domain",
                    "yref": f"y{axis_key(col)} domain",
                    "showarrow": False,
                    "font": {"color": "red"},
                }
            )
    for col, frame in enumerate(frames, start=1):
        layout[f"xaxis{axis_key(col)}"]["range"] = [-frame, frame]
        layout[f"yaxis{axis_key(col)}"].update(range=[-frame, frame], scaleanchor=f"x{axis_key(col)}")
    layout.update(
        height=460,
        margin={"l": 30, "r": 10, "t": 50, "b": 30},
        title={"text": f"sigma {sigmas[min(step, len(sigmas) - 1)]:.3g}"},
        legend={"orientation": "h", "y": -0.08},
    )
    return go.Figure({"data": traces, "layout": layout})


def _paths(states: list[torch.Tensor], count: int, name: str, line: dict, legend: bool) -> dict[str, Any]:
    """The first ``count`` trajectories through ``states`` (one (B, 2) tensor a step) as one trace of lines."""
    xs, ys = _polylines(torch.stack([s[:count] for s in states]).double().cpu().numpy())  # (steps, count, 2)
    return {
        "type": "scatter",
        "x": xs,
        "y": ys,
        "mode": "lines",
        "line": line,
        "name": name,
        "showlegend": legend,
        "hoverinfo": "skip",
    }


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

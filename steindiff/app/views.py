"""What the page shows of a finished run at one step, as plain values (arrays, figures, text; no gradio)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import plotly.graph_objects as go

from steindiff.app.panels import diagnostics_figure
from steindiff.app.particles import particles_figure
from steindiff.experiment import ExperimentResult
from steindiff.images import image_grid

__all__ = ["Shown", "Views", "image_views", "page_summary", "render"]


@dataclass
class Shown:
    """What a run left for the step scrubber: the result and the step being shown."""

    result: ExperimentResult
    step: int

    @classmethod
    def at(cls, result: ExperimentResult, step: int | None = None) -> Shown:
        """``result`` at ``step``, or at its last step where ``step`` is None or beyond it (a link's step)."""
        last = len(result.comparison.sigmas) - 1
        return cls(result, last if step is None else min(step, last))

    @property
    def last(self) -> int:
        """The run's last step (its final samples)."""
        return len(self.result.comparison.sigmas) - 1


@dataclass(frozen=True)
class Views:
    """Every view at the shown step, in the page's order; the views a model does not have are None (image
    models have no particle figure, 2-D models no images)."""

    vanilla_image: np.ndarray | None
    stein_image: np.ndarray | None
    compare: tuple[np.ndarray, np.ndarray] | None
    vanilla_x0: np.ndarray | None
    stein_x0: np.ndarray | None
    particles: go.Figure | None
    diagnostics: go.Figure
    label: str

    def values(self) -> tuple:
        """The views in the page's order (the fields')."""
        return tuple(getattr(self, f.name) for f in fields(self))


def render(shown: Shown) -> Views:
    """Every view of ``shown.result`` at ``shown.step``: image grids (image models) or particles (2-D), the
    diagnostics figure, and the step's label. Without a corrected run, its views repeat vanilla's."""
    result, step = shown.result, shown.step
    images: list[Any] = [None] * 5
    particles = None
    if result.model.kind == "image":
        views = image_views(result, step)
        stein_state = views.get("stein_state", views["vanilla_state"])
        images = [
            views["vanilla_state"],
            stein_state,
            (views["vanilla_state"], stein_state),
            views["vanilla_x0"],
            views.get("stein_x0", views["vanilla_x0"]),
        ]
    else:
        particles = particles_figure(result, step)
    sigma = result.comparison.sigmas[step]
    label = f"step {step} of {shown.last} done: x_{step} at sigma = {sigma:.4g}"
    return Views(*images, particles, diagnostics_figure(result, step), label)


def page_summary(result: ExperimentResult) -> dict[str, Any]:
    """The run's JSON as the page shows it: the config and each run's final figures, without the per-step
    traces and the grid (they are in the download)."""
    summary = result.to_json()
    summary.pop("sigmas")
    for name in result.runs():
        summary[name].pop("trace")
    return summary


def image_views(result: ExperimentResult, step: int, count: int = 16) -> dict[str, Any]:
    """Image models: grids of the states x_k and of the predictions x0_hat made at step k, per run."""
    views: dict[str, Any] = {}
    for name, run in result.runs().items():
        k = min(step, len(run.states) - 1)
        decode = result.model.decode  # latent models: the autoencoder's images of the latents
        views[f"{name}_state"] = image_grid(decode(run.states[k][:count]), scale=3)
        views[f"{name}_x0"] = image_grid(decode(run.denoised[min(k, len(run.denoised) - 1)][:count]), scale=3)
    return views

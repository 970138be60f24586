"""One server's runs: settings in, every output of a run out (plain values; gradio wraps them in app.py)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steindiff.app.download import write_download
from steindiff.app.progress import ProgressPlan
from steindiff.app.settings import LIMITS, Settings, batch_for_model
from steindiff.app.summary import summary_markdown
from steindiff.app.views import Shown, Views, page_summary, render
from steindiff.experiment import ModelCatalog, run_experiment

__all__ = ["ECHO_LIMIT", "Outcome", "Session", "refusal"]

#: the most characters of a refused request's message sent back and logged (a value it quotes can be huge)
ECHO_LIMIT = 200


@dataclass(frozen=True)
class Outcome:
    """What a run gives the page: the summary table, the views at the shown step, the JSON and the download."""

    summary: str
    views: Views
    shown: Shown
    summary_json: dict[str, Any]
    download: str


class Session:
    """Runs settings on a catalog's models, writing each run's download under a folder of its own."""

    def __init__(self, catalog: ModelCatalog):
        self.catalog = catalog
        self.downloads = Path(tempfile.mkdtemp(prefix="steindiff-downloads-"))
        atexit.register(shutil.rmtree, self.downloads, ignore_errors=True)  # the runs' zips go with the server

    def initial(self, model: str) -> dict[str, Any]:
        """The form's first settings on ``model``: /run's defaults, at the batch the form offers for the model."""
        defaults = Settings.defaults()
        return {**defaults, "model": model, "batch": batch_for_model(self.catalog, model, defaults["batch"])}

    def from_link(self, params: dict[str, str], initial: dict[str, Any]) -> dict[str, Any]:
        """The settings a link's query names (:meth:`Settings.from_link`); a link that names a model and no batch
        gets the model's batch, as choosing it in the form does."""
        state = Settings.from_link(params, self.catalog.names(), initial["model"])
        if "model" in state and "batch" not in state:
            state["batch"] = batch_for_model(self.catalog, state["model"], initial["batch"])
        return state

    def run(
        self, values: dict[str, Any], linked: int | None = None, progress: Callable[[float, str], None] | None = None
    ) -> Outcome:
        """Run the settings ``values`` (by name; missing ones default) at the server's :data:`LIMITS`; ValueError
        names a bad setting, or weights that do not load. ``linked``: the step to show (a link's; None or beyond
        the run: its last). ``progress(fraction, description)`` follows the run's parts."""
        experiment = Settings.from_values(**values).experiment(self.catalog)
        plan = ProgressPlan(experiment)
        report = progress or (lambda fraction, text: None)
        result = run_experiment(
            experiment,
            self.catalog,
            LIMITS,
            callback=lambda label, record: report(*plan.step(label, record)),
            on_phase=lambda phase: report(*plan.phase(phase)),
        )
        shown = Shown.at(result, linked)
        return Outcome(
            summary_markdown(result),
            render(shown),
            shown,
            page_summary(result),
            write_download(result, self.downloads),
        )


def refusal(err: Exception) -> str:
    """A refused request's message in one line of at most :data:`ECHO_LIMIT` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= ECHO_LIMIT else text[: ECHO_LIMIT - 1] + "…"

"""What the page's progress bar says while a run computes: the fraction done and the part under way."""

from __future__ import annotations

from steindiff.experiment import Experiment
from steindiff.records import StepRecord
from steindiff.sampling import Phase
from steindiff.solvers import get_solver

__all__ = ["PHASE_TEXT", "ProgressPlan"]

#: what the progress line says while a run is outside its steps (before the first, after the last)
PHASE_TEXT: dict[Phase, str] = {
    "reference": "solving the reference ODE from the same noise",
    "lipschitz": "estimating the step maps' Lipschitz constants",
    "amplification": "measuring how much each state's errors grow by the end",
}


class ProgressPlan:
    """The bar of one experiment: the reference solution (when solved) at 0, the runs' steps, then the Lipschitz
    estimates and the error amplification, each weighted as all the steps together (they take about as long:
    docs/app-performance.md). Each method returns (fraction done, description)."""

    def __init__(self, experiment: Experiment):
        self.steps = get_solver(experiment.solver).steps_for_nfe(experiment.nfe)
        self.sampled = (2 if experiment.stein else 1) * self.steps
        diagnostics = experiment.diagnostics
        self.after = {"lipschitz": diagnostics.lipschitz, "amplification": diagnostics.amplification}
        self.total = self.sampled * (1 + sum(self.after.values()))

    def step(self, label: str, record: StepRecord) -> tuple[float, str]:
        """After step ``record.step`` of the run ``label`` ('vanilla' runs first, then 'stein')."""
        done = record.step + 1 + (self.steps if label == "stein" else 0)
        return done / self.total, f"{label}: step {record.step + 1} of {self.steps}"

    def phase(self, phase: Phase) -> tuple[float, str]:
        """As ``phase`` starts."""
        if phase == "reference":
            return 0.0, PHASE_TEXT[phase]
        before = list(self.after).index(phase)  # the post-passes that ran before this one
        done = self.sampled * (1 + sum(list(self.after.values())[:before]))
        return done / self.total, PHASE_TEXT[phase]

"""What a run measures and records: the diagnostics settings, each step's record, a run, a comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from steindiff.correction.rule import SteinStats
from steindiff.diagnostics.jacobians import JacobianMode
from steindiff.diagnostics.reference import LATTICE_METHODS, FlowSolution, LatticeMethod

__all__ = ["STATS_FIELDS", "Comparison", "DiagnosticsConfig", "RunResult", "StepRecord"]


@dataclass(frozen=True)
class DiagnosticsConfig:
    """What to measure at each step besides the Stein statistics.

    lipschitz: local Lipschitz constant of the applied step map (Krylov estimate, a lower bound) on
        the first ``lipschitz_samples`` samples, plus, along runs that apply the solver's own step, that
        of the denoiser, for the paper's bound. ``lipschitz_batch``: the most samples one batched
        estimate takes (every step's maps at once, see ``step_lipschitz.measure_lipschitz``); memory
        grows with it.
    flow_lipschitz: also that of the exact ODE flow between the same noise levels (exact models only).
    amplification: how much an error in each state x_k grows by the run's end, ||dx_N / dx_k|| on the same
        samples (``steindiff.diagnostics.amplification``); ``flow_amplification`` also the true flow's from
        sigma_k to 0 at the reference's state (needs ``reference``; RK4 in steps of ``flow_log_step``).
    reference: error of every state to the reference ODE solution from the same noise, on the first
        ``reference_samples`` samples (all when None), integrated by ``reference_method`` ("rk4", or
        "dpmpp_3m": one network call a step instead of four, third order; ``steindiff.diagnostics.reference``).
        ``reference_log_step`` is its step in log sigma; None picks 0.025 for exact models (exact to
        ~1e-7) and 0.1 for trained networks. The segment into sigma = 0 is integrated down to
        ``reference_floor_ratio`` times the last positive sigma and finished by a denoising step; 1
        denoises at the last sigma directly, as the solvers do.
    """

    lipschitz: bool = True
    lipschitz_samples: int = 8
    lipschitz_iters: int = 20
    lipschitz_batch: int = 64
    flow_lipschitz: bool = True
    amplification: bool = False
    flow_amplification: bool = False
    flow_log_step: float = 0.1
    jacobian_mode: JacobianMode = "vjp2"
    reference: bool = True
    reference_samples: int | None = None
    reference_log_step: float | None = None
    reference_floor_ratio: float = 0.01
    reference_method: LatticeMethod = "rk4"

    def __post_init__(self) -> None:
        if self.lipschitz_samples < 1 or self.lipschitz_iters < 1 or self.lipschitz_batch < 1:
            raise ValueError("lipschitz_samples, lipschitz_iters and lipschitz_batch must be >= 1")
        if not self.flow_log_step > 0 or (self.reference_log_step is not None and not self.reference_log_step > 0):
            raise ValueError("flow_log_step and reference_log_step must be > 0")
        if self.reference_samples is not None and self.reference_samples < 1:
            raise ValueError("reference_samples must be >= 1")
        if not 0 < self.reference_floor_ratio <= 1:
            raise ValueError("reference_floor_ratio must be in (0, 1]")
        if self.reference_method not in LATTICE_METHODS:
            raise ValueError(f"reference_method must be one of {LATTICE_METHODS}, got {self.reference_method!r}")


#: the statistics of :class:`~steindiff.correction.rule.SteinStats` a step record shows, in their place among its
#: fields (after ``time_s``): what :meth:`StepRecord.as_dict` flattens and :meth:`StepRecord.value` reads
STATS_FIELDS = ("gamma_raw", "gamma", "s_xu", "s_uu", "s_div", "s_div_se", "gamma_se")


@dataclass
class StepRecord:
    """One step of one run: its noise levels, cost and diagnostics, and the Stein statistics ``stats`` (None
    when no statistics were computed). Read a field or a statistic by name with :meth:`value`."""

    step: int
    sigma: float
    sigma_next: float
    nfe: int
    time_s: float
    stats: SteinStats | None = None
    lipschitz_max: float | None = None
    lipschitz_median: float | None = None
    lipschitz_denoiser_max: float | None = None
    bound_paper: float | None = None
    lipschitz_flow_max: float | None = None
    #: ||dx_N / dx_k|| over the probed samples: how much an error in this step's input state x_k grows by the
    #: run's end (``diagnostics.amplification``), and the same for the true ODE flow from sigma_k to 0 at the
    #: reference solution's state
    amplification_median: float | None = None
    amplification_max: float | None = None
    flow_amplification_median: float | None = None
    flow_amplification_max: float | None = None
    err_ref: float | None = None
    finite: bool = True
    diagnostics_time_s: float = 0.0

    def value(self, name: str) -> float | None:
        """The record's field ``name`` or, for a name of :data:`STATS_FIELDS`, the statistic: None when no
        statistics were computed, except gamma, which is then 1 (the solver's own step)."""
        if name in STATS_FIELDS:
            if self.stats is None:
                return 1.0 if name == "gamma" else None
            return getattr(self.stats, name)
        if name == "stats" or name not in self.__dataclass_fields__:
            raise ValueError(f"a step record has no value {name!r}")
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, the statistics flattened in place of ``stats``: non-finite numbers become None (see
        ``finite`` and the raw gamma's sign)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            for name in STATS_FIELDS if f.name == "stats" else (f.name,):
                value = self.value(name)
                out[name] = None if isinstance(value, float) and not math.isfinite(value) else value
        return out


@dataclass
class RunResult:
    """A finished run: final samples, the per-step trace, NFE, and (optionally) all states."""

    label: str
    samples: torch.Tensor
    trace: list[StepRecord]
    nfe_total: int
    states: list[torch.Tensor] = field(default_factory=list)
    denoised: list[torch.Tensor] = field(default_factory=list)
    final_err_ref: float | None = None

    @property
    def first_nonfinite_step(self) -> int | None:
        """Index of the first step whose output had a NaN or infinite value, if any."""
        return next((r.step for r in self.trace if not r.finite), None)

    @property
    def nonfinite_samples(self) -> int:
        """How many final samples hold a NaN or infinite value."""
        return int((~torch.isfinite(self.samples.flatten(1))).any(1).sum())

    @property
    def gamma_moves(self) -> tuple[int, int]:
        """(steps where the rule ran, those of them whose gamma was not 1): where the Stein coefficient
        changed the solver's step (a run that only observes records gamma = 1 throughout)."""
        return sum(r.stats is not None for r in self.trace), len(self.moved_gammas)

    @property
    def moved_gammas(self) -> list[float]:
        """The applied gamma at each step where the rule ran and gamma was not 1, in step order."""
        return [r.value("gamma") for r in self.trace if r.stats is not None and r.value("gamma") != 1]

    def summary(self) -> dict[str, Any]:
        """The JSON form: ``trace``, ``final`` and ``nfe_total``."""
        final_err = self.final_err_ref
        return {
            "trace": [r.as_dict() for r in self.trace],
            "final": {
                "err_ref": final_err if final_err is not None and math.isfinite(final_err) else None,
                "nonfinite_samples": self.nonfinite_samples,
                "first_nonfinite_step": self.first_nonfinite_step,
            },
            "nfe_total": self.nfe_total,
        }


@dataclass
class Comparison:
    """Vanilla and corrected runs of one solver from the same noise, and the shared reference: its states
    on the grid, from the ODE solution ``flow`` (which serves any grid over the same noise)."""

    sigmas: list[float]
    vanilla: RunResult
    stein: RunResult | None
    reference: list[torch.Tensor] | None
    flow: FlowSolution | None = None

"""What a run measures and records: the diagnostics settings, each step's record, a run, a comparison."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from steindiff.diagnostics.jacobians import JacobianMode
from steindiff.diagnostics.reference import LATTICE_METHODS, FlowSolution, LatticeMethod

__all__ = ["Comparison", "DiagnosticsConfig", "RunResult", "StepRecord"]


@dataclass(frozen=True)
class DiagnosticsConfig:
    """What to measure at each step besides the Stein statistics.

    lipschitz: local Lipschitz constant of the applied step map (Krylov estimate, a lower bound) on
        the first ``lipschitz_samples`` samples, plus, along runs that apply the solver's own step, that
        of the denoiser, for the paper's bound. ``lipschitz_batch``: the most samples one batched
        estimate takes (every step's maps at once, see ``step_lipschitz.measure_lipschitz``); memory
        grows with it.
    flow_lipschitz: also that of the exact ODE flow between the same noise levels (exact models only).
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


@dataclass
class StepRecord:
    """One step of one run. Stein fields are None when no statistics were computed."""

    step: int
    sigma: float
    sigma_next: float
    nfe: int
    time_s: float
    gamma_raw: float | None = None
    gamma: float = 1.0
    s_xu: float | None = None
    s_uu: float | None = None
    s_div: float | None = None
    s_div_se: float | None = None
    gamma_se: float | None = None
    lipschitz_max: float | None = None
    lipschitz_median: float | None = None
    lipschitz_denoiser_max: float | None = None
    bound_paper: float | None = None
    lipschitz_flow_max: float | None = None
    err_ref: float | None = None
    finite: bool = True
    diagnostics_time_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite numbers become None (see ``finite`` and the raw gamma's sign)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


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
        return sum(r.gamma_raw is not None for r in self.trace), len(self.moved_gammas)

    @property
    def moved_gammas(self) -> list[float]:
        """The applied gamma at each step where the rule ran and gamma was not 1, in step order."""
        return [r.gamma for r in self.trace if r.gamma_raw is not None and r.gamma != 1]

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

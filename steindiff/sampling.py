"""The sampling loop: vanilla and Stein-corrected runs from the same noise, with a per-step trace."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .denoisers.base import CountingDenoiser, Denoiser
from .diagnostics import JacobianMode, lipschitz_bound, local_lipschitz, mean_distance
from .finite_difference import fd_step
from .reference import flow_map, reference_trajectory
from .solvers import SolverOptions, SolverSpec, StepResult, get_solver, with_lookahead
from .stein import (
    DivergenceEstimate,
    SteinConfig,
    SteinStats,
    combine,
    divergence,
    hutchinson,
    probe_stack,
    stein_update,
)

__all__ = [
    "Comparison",
    "DiagnosticsConfig",
    "RunResult",
    "StepRecord",
    "compare",
    "initial_noise",
    "sample",
    "sample_seed",
]


@dataclass(frozen=True)
class DiagnosticsConfig:
    """What to measure at each step besides the Stein statistics.

    lipschitz: local Lipschitz constant of the applied step map (Krylov estimate, a lower bound) on
        the first ``lipschitz_samples`` samples, plus, along runs that apply the solver's own step, that
        of the denoiser, for the paper's bound.
    flow_lipschitz: also that of the exact ODE flow between the same noise levels (exact models only).
    reference: error of every state to the reference ODE solution from the same noise, on the first
        ``reference_samples`` samples (all when None). ``reference_log_step`` is the RK4 step in
        log sigma; None picks 0.025 for exact models (exact to ~1e-7) and 0.1 for trained networks. The
        segment into sigma = 0 is integrated down to ``reference_floor_ratio`` times the last positive
        sigma and finished by a denoising step; 1 denoises at the last sigma directly, as the solvers do.
    """

    lipschitz: bool = True
    lipschitz_samples: int = 8
    lipschitz_iters: int = 20
    flow_lipschitz: bool = True
    flow_log_step: float = 0.1
    jacobian_mode: JacobianMode = "vjp2"
    reference: bool = True
    reference_samples: int | None = None
    reference_log_step: float | None = None
    reference_floor_ratio: float = 0.01

    def __post_init__(self) -> None:
        if self.lipschitz_samples < 1 or self.lipschitz_iters < 1:
            raise ValueError("lipschitz_samples and lipschitz_iters must be >= 1")
        if not self.flow_log_step > 0 or (self.reference_log_step is not None and not self.reference_log_step > 0):
            raise ValueError("flow_log_step and reference_log_step must be > 0")
        if self.reference_samples is not None and self.reference_samples < 1:
            raise ValueError("reference_samples must be >= 1")
        if not 0 < self.reference_floor_ratio <= 1:
            raise ValueError("reference_floor_ratio must be in (0, 1]")


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

    def summary(self) -> dict[str, Any]:
        """The JSON form: ``trace``, ``final`` and ``nfe_total``."""
        final_err = self.final_err_ref
        nonfinite = int((~torch.isfinite(self.samples.flatten(1))).any(1).sum())
        return {
            "trace": [r.as_dict() for r in self.trace],
            "final": {
                "err_ref": final_err if final_err is not None and math.isfinite(final_err) else None,
                "nonfinite_samples": nonfinite,
                "first_nonfinite_step": self.first_nonfinite_step,
            },
            "nfe_total": self.nfe_total,
        }


@dataclass
class Comparison:
    """Vanilla and corrected runs of one solver from the same noise, and the shared reference."""

    sigmas: list[float]
    vanilla: RunResult
    stein: RunResult | None
    reference: list[torch.Tensor] | None


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` in run ``seed``: each sample's noise depends only on (seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def initial_noise(
    batch: int,
    event_shape: Sequence[int],
    sigma: float,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    first_index: int = 0,
) -> torch.Tensor:
    """x_T = sigma * eps with eps drawn per sample on the CPU: the same whatever the batch size or device."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    gen = torch.Generator()
    shape = tuple(event_shape)
    eps = torch.stack(
        [
            torch.randn(shape, generator=gen.manual_seed(sample_seed(seed, first_index + i)), dtype=torch.float64)
            for i in range(batch)
        ]
    )
    return (sigma * eps).to(dtype=dtype, device=device)


def _generator(seed: int, *stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0]))


PROBE_STREAM, LIPSCHITZ_STREAM = 1, 2


def _grid(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    """The noise levels as Python floats, checked: strictly decreasing, at least two, none negative."""
    grid = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(grid) < 2 or any(b >= a for a, b in itertools.pairwise(grid)) or grid[-1] < 0:
        raise ValueError("sigmas must be a strictly decreasing grid of at least two non-negative levels")
    return grid


@dataclass(frozen=True)
class _MapAtStep:
    """What the Lipschitz estimate of one run's applied map at one step needs (first samples only)."""

    x: torch.Tensor
    history: tuple[torch.Tensor, ...]
    gamma: torch.Tensor | None  # the applied coefficient (0-d or per sample), None for the plain step
    scale: float


def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    solver: str | SolverSpec = "dpmpp_2m",
    *,
    options: SolverOptions | None = None,
    stein: SteinConfig | None = None,
    diagnostics: DiagnosticsConfig | None = None,
    reference: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
    keep_states: bool = True,
    label: str | None = None,
    callback: Callable[[StepRecord, torch.Tensor], None] | None = None,
) -> RunResult:
    """Integrate from ``x`` (at ``sigmas[0]``) over the grid with ``solver``, optionally Stein-corrected.

    ``stein`` = None runs the plain solver; a config with ``apply=False`` runs the plain solver and
    records the statistics the correction would have used. ``reference`` (states at every grid
    sigma, for the first samples of the batch or all of them) gives ``err_ref``.
    ``callback(record, x_next)`` is called after every step.
    """
    diagnostics = diagnostics or DiagnosticsConfig(lipschitz=False, reference=False)
    run, maps = _integrate(
        denoiser,
        x,
        sigmas,
        solver,
        options=options,
        stein=stein,
        diagnostics=diagnostics,
        reference=reference,
        seed=seed,
        keep_states=keep_states,
        label=label,
        callback=callback,
    )
    if diagnostics.lipschitz:
        _measure_lipschitz(denoiser, [(run, maps, _applied_spec(solver, stein))], sigmas, options, diagnostics, seed)
    return run


def _applied_spec(solver: str | SolverSpec, stein: SteinConfig | None) -> SolverSpec:
    """The solver whose step the run applies: with the look-ahead corrector when ``stein.lookahead``."""
    spec = get_solver(solver) if isinstance(solver, str) else solver
    return with_lookahead(spec) if stein is not None and stein.lookahead else spec


def _integrate(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    solver: str | SolverSpec,
    *,
    options: SolverOptions | None,
    stein: SteinConfig | None,
    diagnostics: DiagnosticsConfig,
    reference: Sequence[torch.Tensor] | None,
    seed: int,
    keep_states: bool = True,
    label: str | None = None,
    callback: Callable[[StepRecord, torch.Tensor], None] | None = None,
) -> tuple[RunResult, list[_MapAtStep | None]]:
    """The sampling loop; also returns, per step, what the Lipschitz post-pass needs."""
    spec = _applied_spec(solver, stein)
    options = options or SolverOptions()
    grid = _grid(sigmas)
    counter = CountingDenoiser(denoiser)
    probe_gen = _generator(seed, PROBE_STREAM)
    history: tuple[torch.Tensor, ...] = ()
    states, denoised_list, trace, maps = [x.detach()], [], [], []
    for k in range(len(grid) - 1):
        sigma, sigma_next = grid[k], grid[k + 1]
        nfe_before, start = counter.nfe, time.perf_counter()
        stats: SteinStats | None = None
        if stein is None:
            with torch.no_grad():
                result = spec.step(counter, x, grid, k, history, options)
            x_next = result.x_next
        else:
            # Every solver step has the exact linear part (sigma'/sigma) x (see solvers.py).
            if stein.products == "fd":
                result, div_t = _step_with_fd_probes(spec, counter, x, grid, k, history, options, stein, probe_gen)
            else:
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    result = spec.step(counter, x_in, grid, k, history, options)
                    batched = stein.products == "vjp-batched"
                    div_t = divergence(
                        result.x_next, x_in, stein.probe, stein.probes, probe_gen, sigma_next / sigma, batched
                    )
            x_next, stats = stein_update(x, result.x_next.detach(), div_t, sigma, sigma_next, stein)
        x_next = x_next.detach()
        record = StepRecord(k, sigma, sigma_next, counter.nfe - nfe_before, time.perf_counter() - start)
        if stats is not None:
            record.gamma_raw, record.gamma = stats.gamma_raw, stats.gamma
            record.s_xu, record.s_uu, record.s_div = stats.s_xu, stats.s_uu, stats.s_div
            record.s_div_se, record.gamma_se = stats.s_div_se, stats.gamma_se
        record.finite = bool(torch.isfinite(x_next).all())
        if reference is not None:
            record.err_ref = mean_distance(x_next[: len(reference[k + 1])], reference[k + 1])
        if diagnostics.lipschitz and record.finite and bool(torch.isfinite(x).all()):
            n = min(diagnostics.lipschitz_samples, x.shape[0])
            gamma = stats.applied if stats is not None and stein.apply else None
            maps.append(
                _MapAtStep(
                    x[:n].detach(),
                    tuple(h[:n] for h in history),
                    gamma[:n] if gamma is not None and gamma.ndim == 1 else gamma,
                    1.0 if stats is None else stats.scale,
                )
            )
        else:
            maps.append(None)
        history = tuple(h.detach() for h in result.history)
        if keep_states:
            states.append(x_next)
            denoised_list.append(result.denoised.detach())
        trace.append(record)
        if callback is not None:
            callback(record, x_next)
        x = x_next
    final_err = mean_distance(x[: len(reference[-1])], reference[-1]) if reference is not None else None
    run = RunResult(
        label=label or (spec.name + ("+stein" if stein is not None and stein.apply else "")),
        samples=x,
        trace=trace,
        nfe_total=counter.nfe,
        states=states if keep_states else [],
        denoised=denoised_list,
        final_err_ref=final_err,
    )
    return run, maps


def _step_with_fd_probes(
    spec: SolverSpec,
    denoise: CountingDenoiser,
    x: torch.Tensor,
    grid: list[float],
    k: int,
    history: tuple[torch.Tensor, ...],
    options: SolverOptions,
    stein: SteinConfig,
    generator: torch.Generator,
) -> tuple[StepResult, DivergenceEstimate]:
    """Step k and div_x T by forward-difference probes, in the step's own network calls.

    The step is a pure map of x_k with the history fixed and samples never interact, so x_k and the K
    perturbed states x_k + h v go through it as one batch of (K + 1) B samples, the history repeated.
    """
    batch = x.shape[0]
    v = probe_stack(x, stein.probe, stein.probes, generator)
    h = torch.stack([fd_step(x, probe) for probe in v])
    stacked = torch.cat([x, *(x + h * v)])
    repeated = tuple(torch.cat([part] * (stein.probes + 1)) for part in history)
    with torch.no_grad():
        joint = spec.step(denoise, stacked, grid, k, repeated, options)
    t = joint.x_next[:batch]
    jv = (joint.x_next[batch:].reshape(v.shape) - t) / h
    result = StepResult(t, joint.denoised[:batch], tuple(part[:batch] for part in joint.history))
    return result, hutchinson(v, jv, grid[k + 1] / grid[k])


def _measure_lipschitz(
    denoiser: Denoiser,
    runs: list[tuple[RunResult, list[_MapAtStep | None], SolverSpec]],
    sigmas: Sequence[float] | torch.Tensor,
    options: SolverOptions | None,
    config: DiagnosticsConfig,
    seed: int,
) -> None:
    """Fill the Lipschitz fields of every run's trace, batching what can share a network call.

    At step k the runs that apply the same solver step share the grid and the shapes of the history, so
    one batched Krylov estimate serves them; the exact flow's constant (exact models) is one batched call
    over every run's states. The paper's bound is on the solver's own step map, so the denoiser's constant
    it needs is measured along the runs that apply that map (not the corrected ones), at every step but
    the one into sigma = 0 (where the bound is infinite), in one more batched call with per-sample noise
    levels. Samples never interact, so batching changes nothing but the cost. The recorded
    ``diagnostics_time_s`` of a step is that of its shared batch.
    """
    options = options or SolverOptions()
    grid = _grid(sigmas)

    def lip(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *stream: int) -> torch.Tensor:
        gen = _generator(seed, LIPSCHITZ_STREAM, *stream)
        return local_lipschitz(fn, x, config.lipschitz_iters, gen, config.jacobian_mode)

    den_x, den_sigma, den_owner = [], [], []
    for k in range(len(grid) - 1):
        present = [(run, maps[k], spec) for run, maps, spec in runs if maps[k] is not None]
        for name in dict.fromkeys(spec.name for _, _, spec in present):
            _step_lipschitz(denoiser, [p for p in present if p[2].name == name], grid, k, options, lip)
        if present and config.flow_lipschitz and denoiser.exact:
            _flow_lipschitz(denoiser, present, grid, k, config, lip)
        for run, m, _ in present:
            if m.gamma is not None:
                continue
            if grid[k + 1] == 0:
                run.trace[k].bound_paper = math.inf
                continue
            den_x.append(m.x)
            den_sigma.append(torch.full((len(m.x),), grid[k], dtype=m.x.dtype, device=m.x.device))
            den_owner.append(run.trace[k])
    if not den_x:
        return
    sigma_all = torch.cat(den_sigma)
    den_l = lip(lambda z: denoiser(z, sigma_all), torch.cat(den_x), len(grid), 1)
    for record, part in zip(den_owner, _slices([len(x) for x in den_x]), strict=True):
        record.lipschitz_denoiser_max = float(den_l[part].max())
        record.bound_paper = lipschitz_bound(record.sigma, record.sigma_next, record.lipschitz_denoiser_max)


def _step_lipschitz(
    denoiser: Denoiser,
    present: list[tuple[RunResult, _MapAtStep, SolverSpec]],
    grid: list[float],
    k: int,
    options: SolverOptions,
    lip: Callable[..., torch.Tensor],
) -> None:
    """One batched Krylov estimate of step k's applied map for runs that apply the same solver step."""
    start = time.perf_counter()
    spec = present[0][2]
    x = torch.cat([m.x for _, m, _ in present])
    history = tuple(torch.cat(parts) for parts in zip(*(m.history for _, m, _ in present), strict=True))
    gamma = torch.cat([_per_sample(m.gamma, len(m.x), x) for _, m, _ in present])
    scale = next((m.scale for _, m, _ in present if m.gamma is not None), 1.0)

    def step_map(z: torch.Tensor) -> torch.Tensor:
        return combine(z, spec.step(denoiser, z, grid, k, history, options).x_next, gamma, scale)

    step_l = lip(step_map, x, k, 0)
    elapsed = time.perf_counter() - start
    for (run, _, _), part in zip(present, _parts(present), strict=True):
        record = run.trace[k]
        record.lipschitz_max, record.lipschitz_median = float(step_l[part].max()), float(step_l[part].median())
        record.diagnostics_time_s = elapsed


def _flow_lipschitz(
    denoiser: Denoiser,
    present: list[tuple[RunResult, _MapAtStep, SolverSpec]],
    grid: list[float],
    k: int,
    config: DiagnosticsConfig,
    lip: Callable[..., torch.Tensor],
) -> None:
    """The exact flow's Lipschitz constant between step k's noise levels, at every run's states in one batch."""
    start = time.perf_counter()

    def exact_flow(z: torch.Tensor) -> torch.Tensor:
        return flow_map(denoiser, z, grid[k], grid[k + 1], max_log_step=config.flow_log_step)

    flow_l = lip(exact_flow, torch.cat([m.x for _, m, _ in present]), k, 2)
    elapsed = time.perf_counter() - start
    for (run, _, _), part in zip(present, _parts(present), strict=True):
        run.trace[k].lipschitz_flow_max = float(flow_l[part].max())
        run.trace[k].diagnostics_time_s += elapsed


def _parts(present: list[tuple[RunResult, _MapAtStep, SolverSpec]]) -> list[slice]:
    """Each run's rows in the concatenation of the runs' sample subsets."""
    return _slices([len(m.x) for _, m, _ in present])


def _slices(lengths: list[int]) -> list[slice]:
    """The rows of each part in the concatenation of parts of these lengths."""
    ends = list(itertools.accumulate(lengths))
    return [slice(end - n, end) for n, end in zip(lengths, ends, strict=True)]


def _per_sample(gamma: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """The applied coefficient as an (n,) tensor (1 for the plain step: combine then returns T exactly)."""
    if gamma is None:
        return torch.ones(n, dtype=torch.float64, device=like.device)
    return gamma.to(torch.float64).expand(n) if gamma.ndim == 0 else gamma.to(torch.float64)


def compare(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    solver: str = "dpmpp_2m",
    stein: SteinConfig | None = None,
    *,
    options: SolverOptions | None = None,
    diagnostics: DiagnosticsConfig | None = None,
    seed: int = 0,
    observe_vanilla: bool = True,
    callback: Callable[[str, StepRecord], None] | None = None,
    reference: list[torch.Tensor] | None = None,
) -> Comparison:
    """Run the plain solver and (if ``stein`` is given) the corrected one from the same ``x``.

    ``reference`` may pass the reference states of an earlier comparison with the same noise and grid.
    With ``observe_vanilla`` the vanilla run also records the Stein statistics along its own
    trajectory (what the rule would have proposed there), at the cost of the probes.
    """
    diagnostics = diagnostics or DiagnosticsConfig()
    grid = _grid(sigmas)
    if diagnostics.reference and reference is None:
        log_step = diagnostics.reference_log_step or (0.025 if denoiser.exact else 0.1)
        reference = reference_trajectory(
            denoiser, x[: diagnostics.reference_samples], grid, log_step, diagnostics.reference_floor_ratio
        )
    elif not diagnostics.reference:
        reference = None
    observe = stein is not None and observe_vanilla
    observer = SteinConfig(**{**asdict(stein), "apply": False, "lookahead": False}) if observe else None

    def run(config: SteinConfig | None, label: str) -> tuple[RunResult, list[_MapAtStep | None], SolverSpec]:
        hook = (lambda record, _x: callback(label, record)) if callback else None
        return *_integrate(
            denoiser,
            x,
            grid,
            solver,
            options=options,
            stein=config,
            diagnostics=diagnostics,
            reference=reference,
            seed=seed,
            label=label,
            callback=hook,
        ), _applied_spec(solver, config)

    runs = [run(observer, "vanilla")] + ([run(stein, "stein")] if stein is not None else [])
    if diagnostics.lipschitz:
        _measure_lipschitz(denoiser, runs, grid, options, diagnostics, seed)
    vanilla, corrected = runs[0][0], (runs[1][0] if len(runs) > 1 else None)
    return Comparison(grid, vanilla, corrected, reference)

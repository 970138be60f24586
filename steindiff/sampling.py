"""The sampling loop: vanilla and Stein-corrected runs from the same noise, with a per-step trace."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Literal

import torch

from steindiff.correction.divergence import probed_step
from steindiff.correction.rule import SteinConfig, SteinStats, stein_update
from steindiff.denoisers.base import (
    Cond,
    CountingDenoiser,
    DenoiseFn,
    Denoiser,
    bind_cond,
    check_cond,
    cond_rows,
    same_cond,
)
from steindiff.diagnostics.amplification import measure_amplification
from steindiff.diagnostics.jacobians import JacobianMode, mean_distance
from steindiff.diagnostics.reference import FlowSolution, solve_for_grid
from steindiff.diagnostics.step_lipschitz import MapAtStep, measure_lipschitz
from steindiff.noise import PROBE_STREAM, stream_generator
from steindiff.records import Comparison, DiagnosticsConfig, RunResult, StepRecord
from steindiff.solvers import SolverOptions, SolverSpec, get_solver, with_lookahead

__all__ = ["Phase", "compare", "sample", "takes_functorch"]

#: the parts of a comparison outside its steps, each announced as it starts (``compare``'s ``on_phase``)
Phase = Literal["reference", "lipschitz", "amplification"]


def takes_functorch(products: str | None, jacobian_mode: JacobianMode = "vjp2") -> bool:
    """Whether a run with these probe products (None: no correction) and Lipschitz Jacobian mode takes
    functorch transforms (gradients batched by vmap, forward-mode AD): ``denoisers.prepare_for_device``'s
    ``functorch``, as both fail on channels-last activations."""
    return products == "vjp-batched" or jacobian_mode == "jvp"


def _grid(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    """The noise levels as Python floats, checked: strictly decreasing, at least two, none negative."""
    grid = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(grid) < 2 or any(b >= a for a, b in itertools.pairwise(grid)) or grid[-1] < 0:
        raise ValueError("sigmas must be a strictly decreasing grid of at least two non-negative levels")
    return grid


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
    cond: Mapping[str, torch.Tensor] | None = None,
) -> RunResult:
    """Integrate the probability-flow ODE (EDM, Karras et al. 2022, Eq. 4) from ``x`` at ``sigmas[0]`` over the
    grid with ``solver``, optionally Stein-corrected (the paper's Algorithm 1).

    Arguments:
        denoiser: the model D(x, sigma; cond).
        x: the initial state at ``sigmas[0]``, (B, *event_shape).
        sigmas: the noise levels sigma_0 > ... > sigma_N >= 0, (N + 1,).
        solver: a name of :data:`steindiff.solvers.SOLVERS` or a solver.
        options: the solver's options (defaults when None).
        stein: None runs the plain solver; a config with ``apply=False`` runs the plain solver and records the
            statistics the correction would have used.
        diagnostics: what else to measure at each step (nothing when None).
        reference: states at every grid sigma, each (n, *event_shape) for the first n <= B samples: they give
            each step's ``err_ref``.
        seed: the seed of the probes' and the Lipschitz estimates' random streams.
        keep_states: keep every state and x0 prediction in the result.
        label: the run's name (the solver's, with "+stein" when corrected, when None).
        callback: ``callback(record, x_next)`` after every step.
        cond: per-sample conditioning of the batch, each tensor (B, ...) (e.g. class labels (B,)), the names
            of ``denoiser.conditions``; it goes with its rows into every network call.

    Returns:
        The run: final samples (B, *event_shape), the per-step trace, NFE and, with ``keep_states``, the states.
    """
    cond = check_cond(cond, x.shape[0], getattr(denoiser, "conditions", None))
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
        cond=cond,
    )
    runs = [(run, maps, _applied_spec(solver, stein))]
    if diagnostics.lipschitz:
        measure_lipschitz(denoiser, runs, _grid(sigmas), options, diagnostics, seed)
    if diagnostics.amplification:
        measure_amplification(denoiser, runs, _grid(sigmas), options, diagnostics, seed, reference, cond)
    return run


def _applied_spec(solver: str | SolverSpec, stein: SteinConfig | None) -> SolverSpec:
    """The solver whose step the run applies: with the look-ahead corrector when ``stein.lookahead``."""
    spec = get_solver(solver) if isinstance(solver, str) else solver
    return with_lookahead(spec) if stein is not None and stein.lookahead else spec


def _integrate(
    denoiser: DenoiseFn,
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
    cond: Cond | None = None,
) -> tuple[RunResult, list[MapAtStep | None]]:
    """The sampling loop; also returns, per step, what the Lipschitz post-pass needs."""
    spec = _applied_spec(solver, stein)
    options = options or SolverOptions()
    grid = _grid(sigmas)
    counter = CountingDenoiser(denoiser)
    denoise = bind_cond(counter, cond)
    probe_gen = stream_generator(seed, PROBE_STREAM)
    history: tuple[torch.Tensor, ...] = ()
    ahead_point: torch.Tensor | None = None  # where history[0] was evaluated, for a look-ahead evaluation
    states, denoised_list, trace, maps = [x.detach()], [], [], []
    for k in range(len(grid) - 1):
        sigma, sigma_next = grid[k], grid[k + 1]
        nfe_before, start = counter.nfe, time.perf_counter()
        stats: SteinStats | None = None
        if stein is None:
            with torch.no_grad():
                result = spec.step(denoise, x, grid, k, history, options)
            x_next = result.x_next
        else:
            # Every solver step has the exact linear part (sigma'/sigma) x (see solvers.py).
            result, div_t = probed_step(spec, counter, x, grid, k, history, options, stein, probe_gen, cond)
            x_next, stats = stein_update(x, result.x_next.detach(), div_t, sigma, sigma_next, stein)
        x_next = x_next.detach()
        record = StepRecord(k, sigma, sigma_next, counter.nfe - nfe_before, time.perf_counter() - start, stats)
        record.finite = bool(torch.isfinite(x_next).all())
        if reference is not None:
            record.err_ref = mean_distance(x_next[: len(reference[k + 1])], reference[k + 1])
        if (diagnostics.lipschitz or diagnostics.amplification) and record.finite and bool(torch.isfinite(x).all()):
            n = min(diagnostics.lipschitz_samples, x.shape[0])
            gamma = stats.applied if stats is not None and stein.apply else None
            maps.append(
                MapAtStep(
                    x[:n].detach(),
                    tuple(h[:n] for h in history),
                    gamma[:n] if gamma is not None and gamma.ndim == 1 else gamma,
                    1.0 if stats is None else stats.scale,
                    None if ahead_point is None else ahead_point[:n],
                    x_next[:n],
                    result.denoised[:n].detach(),
                    cond_rows(cond, slice(0, n)),
                )
            )
        else:
            maps.append(None)
        history = tuple(h.detach() for h in result.history)
        ahead_point = None if result.ahead_point is None else result.ahead_point.detach()
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


class _SharedFirstCall:
    """Runs from the same noise begin with the same network call: D at sigma_0 of x_0 (and, with
    forward-difference probes, of the same probe states). A later run whose call is identical to the
    first call made (its states, noise level and conditioning compared exactly) takes its answer; with
    autograd recording, nothing is shared. NFE counts are unchanged: each run's counter still counts the
    call it asked for."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.first: tuple[torch.Tensor, torch.Tensor | float, Cond, torch.Tensor] | None = None
        self.called = False

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: torch.Tensor) -> torch.Tensor:
        recording = torch.is_grad_enabled() and x.requires_grad
        if self.first is not None and not recording:
            first_x, first_sigma, first_cond, answer = self.first
            same_sigma = torch.equal(torch.as_tensor(first_sigma), torch.as_tensor(sigma))
            if first_x.shape == x.shape and same_sigma and torch.equal(first_x, x) and same_cond(first_cond, cond):
                return answer
        out = self.denoiser(x, sigma, **cond)
        if not self.called and not recording:
            self.first = (x, sigma, cond, out)
        self.called = True
        return out


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
    flow: FlowSolution | None = None,
    on_phase: Callable[[Phase], None] | None = None,
    cond: Mapping[str, torch.Tensor] | None = None,
) -> Comparison:
    """Run the plain solver and (if ``stein`` is given) the corrected one from the same ``x``, with the reference
    ODE solution from the same noise and the Lipschitz estimates of both runs' steps.

    Arguments:
        denoiser: the model D(x, sigma; cond).
        x: the initial state at ``sigmas[0]``, (B, *event_shape).
        sigmas: the noise levels sigma_0 > ... > sigma_N >= 0, (N + 1,).
        solver: a name of :data:`steindiff.solvers.SOLVERS`.
        stein: the correction's settings; None runs the plain solver only.
        options: the solver's options (defaults when None).
        diagnostics: what to measure (:class:`DiagnosticsConfig`'s defaults when None).
        seed: the seed of the probes' and the Lipschitz estimates' random streams.
        observe_vanilla: the vanilla run also records the Stein statistics along its own trajectory (what the
            rule would have proposed there), at the cost of the probes.
        callback: ``callback(label, record)`` after each step of each run.
        flow: the reference solution of an earlier comparison from the same noise and conditioning, with the
            same reference settings and the same first and last positive noise levels, whatever the grid
            between.
        on_phase: called as the reference solution (when not passed in) and the Lipschitz estimates (after
            both runs) start.
        cond: per-sample conditioning of the batch, each tensor (B, ...), as for :func:`sample`; the reference
            solution and the Lipschitz estimates take the rows of their samples.

    Returns:
        The grid, the vanilla and corrected runs, the reference states at the grid (each (n, *event_shape)
        for the first n samples) and the reference solution.
    """
    cond = check_cond(cond, x.shape[0], getattr(denoiser, "conditions", None))
    diagnostics = diagnostics or DiagnosticsConfig()
    grid = _grid(sigmas)
    reference = None
    if diagnostics.reference:
        first = slice(0, diagnostics.reference_samples)
        if flow is None:
            log_step = diagnostics.reference_log_step or (0.025 if denoiser.exact else 0.1)
            floor_ratio, method = diagnostics.reference_floor_ratio, diagnostics.reference_method
            if on_phase is not None:
                on_phase("reference")
            flow = solve_for_grid(
                denoiser, x[first], grid, log_step, floor_ratio, method, cond_rows(cond, first), denoiser.sigma_min
            )
        elif not same_cond(flow.cond, cond_rows(cond, slice(0, len(flow.states[0])))):
            raise ValueError("the reference solution passed was solved under other conditioning")
        reference = flow.states_at(denoiser, grid)
    else:
        flow = None
    observe = stein is not None and observe_vanilla
    observer = SteinConfig(**{**asdict(stein), "apply": False, "lookahead": False}) if observe else None
    shared = _SharedFirstCall(denoiser)

    def run(config: SteinConfig | None, label: str) -> tuple[RunResult, list[MapAtStep | None], SolverSpec]:
        hook = (lambda record, _x: callback(label, record)) if callback else None
        return *_integrate(
            shared,
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
            cond=cond,
        ), _applied_spec(solver, config)

    runs = [run(observer, "vanilla")] + ([run(stein, "stein")] if stein is not None else [])
    if diagnostics.lipschitz:
        if on_phase is not None:
            on_phase("lipschitz")
        measure_lipschitz(denoiser, runs, grid, options, diagnostics, seed)
    if diagnostics.amplification:
        if on_phase is not None:
            on_phase("amplification")
        measure_amplification(denoiser, runs, grid, options, diagnostics, seed, reference, cond)
    vanilla, corrected = runs[0][0], (runs[1][0] if len(runs) > 1 else None)
    return Comparison(grid, vanilla, corrected, reference, flow)

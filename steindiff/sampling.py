"""The sampling loop: vanilla and Stein-corrected runs from the same noise, with a per-step trace."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .denoisers.base import CountingDenoiser, DenoiseFn, Denoiser
from .diagnostics import JacobianMode, krylov_start, lipschitz_bound, local_lipschitz, mean_distance
from .finite_difference import fd_step
from .lockstep import DenoiserMap, lockstep
from .reference import LATTICE_METHODS, FlowSolution, LatticeMethod, flow_map, solve_for_grid
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
    vjp_products,
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
    "takes_functorch",
]


@dataclass(frozen=True)
class DiagnosticsConfig:
    """What to measure at each step besides the Stein statistics.

    lipschitz: local Lipschitz constant of the applied step map (Krylov estimate, a lower bound) on
        the first ``lipschitz_samples`` samples, plus, along runs that apply the solver's own step, that
        of the denoiser, for the paper's bound. ``lipschitz_batch``: the most samples one batched
        estimate takes (every step's maps at once, see ``_measure_lipschitz``); memory grows with it.
    flow_lipschitz: also that of the exact ODE flow between the same noise levels (exact models only).
    reference: error of every state to the reference ODE solution from the same noise, on the first
        ``reference_samples`` samples (all when None), integrated by ``reference_method`` ("rk4", or
        "dpmpp_3m": one network call a step instead of four, third order; ``steindiff.reference``).
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
    """Vanilla and corrected runs of one solver from the same noise, and the shared reference: its states
    on the grid, from the ODE solution ``flow`` (which serves any grid over the same noise)."""

    sigmas: list[float]
    vanilla: RunResult
    stein: RunResult | None
    reference: list[torch.Tensor] | None
    flow: FlowSolution | None = None


def takes_functorch(products: str | None, jacobian_mode: JacobianMode = "vjp2") -> bool:
    """Whether a run with these probe products (None: no correction) and Lipschitz Jacobian mode takes
    functorch transforms (gradients batched by vmap, forward-mode AD): ``denoisers.set_layout``'s
    ``functorch``, as both fail on channels-last activations."""
    return products == "vjp-batched" or jacobian_mode == "jvp"


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
            probed = _step_with_fd_probes if stein.products == "fd" else _step_with_vjp_probes
            result, div_t = probed(spec, counter, x, grid, k, history, options, stein, probe_gen)
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


#: on the CPU, VJP probes take at most this many samples in one autograd graph: in one graph of 500 mnist
#: samples (the UNet's forward chunked by UNET_CPU_CHUNK all the same) a forward and a VJP cost 5.1
#: forwards, in graphs of 64 or 100 2.2 (2-core CPU)
VJP_CPU_CHUNK = 64


def _step_with_vjp_probes(
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
    """Step k and div_x T by VJPs through the step, on the CPU in chunks of :data:`VJP_CPU_CHUNK` samples.

    The step is a pure map of x_k with the history fixed and samples never interact, so each chunk is its
    own graph; the probes are drawn for the whole batch first, so the estimate does not depend on the
    chunking (to float rounding). A step's calls count once, as the chunks make the same calls.
    """
    batch, identity = x.shape[0], grid[k + 1] / grid[k]
    size = VJP_CPU_CHUNK if x.device.type == "cpu" else batch
    v = None if stein.probe == "exact" else probe_stack(x, stein.probe, stein.probes, generator)
    parts, products = [], []
    for first in range(0, batch, size):
        rows = slice(first, first + size)
        with torch.enable_grad():
            x_in = x[rows].detach().requires_grad_(True)
            call = denoise if first == 0 else denoise.denoiser
            part = spec.step(call, x_in, grid, k, tuple(h[rows] for h in history), options)
            if v is None:
                products.append(divergence(part.x_next, x_in, "exact", 0, generator).per_sample)
            else:
                products.append(vjp_products(part.x_next, x_in, v[:, rows], stein.products == "vjp-batched"))
        parts.append(StepResult(part.x_next.detach(), part.denoised.detach(), tuple(h.detach() for h in part.history)))
    result = StepResult(
        torch.cat([p.x_next for p in parts]),
        torch.cat([p.denoised for p in parts]),
        tuple(torch.cat(hs) for hs in zip(*(p.history for p in parts), strict=True)),
    )
    if v is None:
        return result, DivergenceEstimate(torch.cat(products), 0.0)
    return result, hutchinson(v, torch.cat(products, dim=1), identity)


@dataclass(frozen=True)
class _LipschitzJob:
    """One Jacobian norm to estimate: the map ``fn`` at the states ``x``, for a field of ``record``."""

    fn: DenoiserMap
    x: torch.Tensor
    stream: tuple[int, ...]  # of the Krylov start vectors
    record: StepRecord
    quantity: Literal["step", "denoiser", "flow"]


def _measure_lipschitz(
    denoiser: Denoiser,
    runs: list[tuple[RunResult, list[_MapAtStep | None], SolverSpec]],
    sigmas: Sequence[float] | torch.Tensor,
    options: SolverOptions | None,
    config: DiagnosticsConfig,
    seed: int,
) -> None:
    """Fill the Lipschitz fields of every run's trace: every estimate at once, in lockstep.

    At each step of each run: the applied step map; for exact models the exact flow between the same
    noise levels; and, along runs that apply the solver's own step map, the denoiser, for the paper's
    bound (not at the step into sigma = 0, where the bound is infinite). These maps are independent, so
    one Krylov estimate of their block-diagonal joint map, whose network calls run as one batched call a
    round (:func:`steindiff.lockstep.lockstep`), gives all of them, in groups of at most
    ``config.lipschitz_batch`` samples. Each map keeps its own start vectors, so the estimates do not
    depend on the grouping (to float rounding). Forward-mode AD is per thread: with ``jacobian_mode``
    "jvp" every map is estimated alone. A step's ``diagnostics_time_s`` is its maps' share (by samples)
    of the time of the groups they ran in.
    """
    options = options or SolverOptions()
    grid = _grid(sigmas)
    jobs = []
    for k in range(len(grid) - 1):
        for index, (run, maps, spec) in enumerate(runs):
            m, record = maps[k], run.trace[k]
            if m is None:
                continue
            jobs.append(_LipschitzJob(_step_map(spec, grid, k, m, options), m.x, (k, 0, index), record, "step"))
            if config.flow_lipschitz and denoiser.exact:
                flow = _flow_map(grid[k], grid[k + 1], config.flow_log_step)
                jobs.append(_LipschitzJob(flow, m.x, (k, 2, index), record, "flow"))
            if m.gamma is None and grid[k + 1] == 0:
                record.bound_paper = math.inf
            elif m.gamma is None:
                jobs.append(_LipschitzJob(_denoiser_map(grid[k]), m.x, (k, 1, index), record, "denoiser"))
    limit = 0 if config.jacobian_mode == "jvp" else config.lipschitz_batch
    for group in _groups(jobs, limit):
        start = time.perf_counter()
        x = torch.cat([job.x for job in group])
        w = torch.cat([krylov_start(job.x, _generator(seed, LIPSCHITZ_STREAM, *job.stream)) for job in group])
        joint = lockstep(denoiser, [job.fn for job in group], [len(job.x) for job in group])
        constants = local_lipschitz(joint, x, config.lipschitz_iters, mode=config.jacobian_mode, start=w)
        elapsed = time.perf_counter() - start
        for job, part in zip(group, _slices([len(job.x) for job in group]), strict=True):
            _record(job, constants[part])
            job.record.diagnostics_time_s += elapsed * len(job.x) / len(x)


def _step_map(spec: SolverSpec, grid: list[float], k: int, m: _MapAtStep, options: SolverOptions) -> DenoiserMap:
    """The applied map of step k, (1 - gamma) scale z + gamma T(z), with the run's history held fixed."""
    gamma = _per_sample(m.gamma, len(m.x), m.x)

    def step_map(denoise: DenoiseFn, z: torch.Tensor) -> torch.Tensor:
        return combine(z, spec.step(denoise, z, grid, k, m.history, options).x_next, gamma, m.scale)

    return step_map


def _flow_map(sigma: float, sigma_next: float, log_step: float) -> DenoiserMap:
    """The exact ODE flow from sigma to sigma_next (exact models)."""
    return lambda denoise, z: flow_map(denoise, z, sigma, sigma_next, max_log_step=log_step)


def _denoiser_map(sigma: float) -> DenoiserMap:
    """z -> D(z, sigma)."""
    return lambda denoise, z: denoise(z, torch.tensor(sigma, dtype=z.dtype, device=z.device))


def _groups(jobs: list[_LipschitzJob], max_samples: int) -> list[list[_LipschitzJob]]:
    """Consecutive jobs packed into groups of at most ``max_samples`` samples (each job alone when 0)."""
    groups: list[list[_LipschitzJob]] = []
    size = 0
    for job in jobs:
        if not groups or size + len(job.x) > max_samples:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += len(job.x)
    return groups


def _record(job: _LipschitzJob, constants: torch.Tensor) -> None:
    """Write a job's per-sample Lipschitz constants into its step record."""
    record = job.record
    if job.quantity == "step":
        record.lipschitz_max, record.lipschitz_median = float(constants.max()), float(constants.median())
    elif job.quantity == "flow":
        record.lipschitz_flow_max = float(constants.max())
    else:
        record.lipschitz_denoiser_max = float(constants.max())
        record.bound_paper = lipschitz_bound(record.sigma, record.sigma_next, record.lipschitz_denoiser_max)


def _slices(lengths: list[int]) -> list[slice]:
    """The rows of each part in the concatenation of parts of these lengths."""
    ends = list(itertools.accumulate(lengths))
    return [slice(end - n, end) for n, end in zip(lengths, ends, strict=True)]


def _per_sample(gamma: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """The applied coefficient as an (n,) tensor (1 for the plain step: combine then returns T exactly)."""
    if gamma is None:
        return torch.ones(n, dtype=torch.float64, device=like.device)
    return gamma.to(torch.float64).expand(n) if gamma.ndim == 0 else gamma.to(torch.float64)


class _SharedFirstCall:
    """Runs from the same noise begin with the same network call: D at sigma_0 of x_0 (and, with
    forward-difference probes, of the same probe states). A later run whose call is identical to the
    first call made (compared exactly) takes its answer; with autograd recording, nothing is shared.
    NFE counts are unchanged: each run's counter still counts the call it asked for."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.first: tuple[torch.Tensor, torch.Tensor | float, torch.Tensor] | None = None
        self.called = False

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        recording = torch.is_grad_enabled() and x.requires_grad
        if self.first is not None and not recording:
            first_x, first_sigma, answer = self.first
            same_sigma = torch.equal(torch.as_tensor(first_sigma), torch.as_tensor(sigma))
            if first_x.shape == x.shape and same_sigma and torch.equal(first_x, x):
                return answer
        out = self.denoiser(x, sigma)
        if not self.called and not recording:
            self.first = (x, sigma, out)
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
) -> Comparison:
    """Run the plain solver and (if ``stein`` is given) the corrected one from the same ``x``.

    ``flow`` may pass the reference solution of an earlier comparison from the same noise, with the same
    reference settings and the same first and last positive noise levels, whatever the grid between.
    With ``observe_vanilla`` the vanilla run also records the Stein statistics along its own trajectory
    (what the rule would have proposed there), at the cost of the probes.
    """
    diagnostics = diagnostics or DiagnosticsConfig()
    grid = _grid(sigmas)
    reference = None
    if diagnostics.reference:
        if flow is None:
            log_step = diagnostics.reference_log_step or (0.025 if denoiser.exact else 0.1)
            first = x[: diagnostics.reference_samples]
            floor_ratio, method = diagnostics.reference_floor_ratio, diagnostics.reference_method
            flow = solve_for_grid(denoiser, first, grid, log_step, floor_ratio, method)
        reference = flow.states_at(denoiser, grid)
    else:
        flow = None
    observe = stein is not None and observe_vanilla
    observer = SteinConfig(**{**asdict(stein), "apply": False, "lookahead": False}) if observe else None
    shared = _SharedFirstCall(denoiser)

    def run(config: SteinConfig | None, label: str) -> tuple[RunResult, list[_MapAtStep | None], SolverSpec]:
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
        ), _applied_spec(solver, config)

    runs = [run(observer, "vanilla")] + ([run(stein, "stein")] if stein is not None else [])
    if diagnostics.lipschitz:
        _measure_lipschitz(denoiser, runs, grid, options, diagnostics, seed)
    vanilla, corrected = runs[0][0], (runs[1][0] if len(runs) > 1 else None)
    return Comparison(grid, vanilla, corrected, reference, flow)

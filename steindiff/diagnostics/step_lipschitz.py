"""Local Lipschitz constants of the maps a run applied: every step of every run, estimated together.

At each step the applied step map (the solver's step, or its Stein combination, with the run's history
held fixed), the exact flow between the same noise levels (exact models), and the denoiser (for the
paper's bound): one Krylov estimate (:func:`steindiff.diagnostics.jacobians.jacobian_norms`) of their
block-diagonal joint map, whose network calls run batched (:mod:`steindiff.diagnostics.lockstep`; for the exact
flows :func:`steindiff.diagnostics.reference.flow_maps`). Where the step's one network call is the denoiser at the
step's input (DDIM, DPM-Solver++), the denoiser's estimate comes from that call, on the step's Krylov
space, instead of a map of its own.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from steindiff.correction.rule import combine
from steindiff.denoisers.base import Cond, DenoiseFn, Denoiser, bind_cond, cond_cat
from steindiff.diagnostics.jacobians import jacobian_norms, krylov_start, lipschitz_bound
from steindiff.diagnostics.lockstep import DenoiserMap, lockstep
from steindiff.diagnostics.reference import flow_maps
from steindiff.noise import LIPSCHITZ_STREAM, stream_generator
from steindiff.records import DiagnosticsConfig, RunResult, StepRecord
from steindiff.solvers import SolverOptions, SolverSpec

__all__ = ["MapAtStep", "measure_lipschitz"]


@dataclass(frozen=True)
class MapAtStep:
    """What the Lipschitz estimate of one run's applied map at one step needs (first samples only): the
    state, the history held fixed, the applied coefficient, the scale of the combination, where history[0]
    is a look-ahead evaluation the point it was evaluated at, where the run has them, the map's values
    at the state: the next state and the step's x0 prediction (which saves forward differences an
    evaluation), and the conditioning of the samples, which every call of the map takes."""

    x: torch.Tensor
    history: tuple[torch.Tensor, ...]
    gamma: torch.Tensor | None  # the applied coefficient (0-d or per sample), None for the plain step
    scale: float
    ahead_point: torch.Tensor | None = None
    x_next: torch.Tensor | None = None
    denoised: torch.Tensor | None = None
    cond: Cond | None = None


Quantity = Literal["step", "denoiser", "flow"]


@dataclass(frozen=True)
class _LipschitzJob:
    """Jacobian norms to estimate: of the outputs of the map ``fn`` (a tuple), or of the exact flow between the
    noise levels ``flow``, at the states ``x``, for the fields of ``record`` that ``quantities`` name (one an
    output; the first drives the Krylov space)."""

    fn: DenoiserMap | None  # None for an exact flow
    x: torch.Tensor
    stream: tuple[int, ...]  # of the Krylov start vectors
    record: StepRecord
    quantities: tuple[Quantity, ...]
    outputs: tuple[torch.Tensor, ...] | None = None  # fn's outputs at x, where the run computed them
    flow: tuple[float, float] | None = None  # (sigma, sigma_next) of an exact flow
    cond: Cond | None = None  # the conditioning of x's rows (which ``fn`` binds itself)


def measure_lipschitz(
    denoiser: Denoiser,
    runs: Sequence[tuple[RunResult, Sequence[MapAtStep | None], SolverSpec]],
    grid: list[float],
    options: SolverOptions | None,
    config: DiagnosticsConfig,
    seed: int,
) -> None:
    """Fill the Lipschitz fields of every run's trace (each run with its maps a step, None where a step is
    not measured, and the solver it applied) on the checked grid of noise levels: every estimate at once, in
    lockstep.

    At each step of each run: the applied step map; for exact models the exact flow between the same
    noise levels; and, along runs that apply the solver's own step map, the denoiser, for the paper's
    bound (not at the step into sigma = 0, where the bound is infinite). Where the solver's one network
    call is at the step's input (``SolverSpec.one_call_at_input``), the denoiser is the step map's second
    output, its estimate on the step's Krylov space (:func:`steindiff.diagnostics.jacobians.jacobian_norms`), for no
    network call: dT/dx = a I + b dD/dx, so the two share their leading directions where dD/dx is near
    symmetric, as a denoiser's is: the estimate stays close to one on a space of its own (measured: see
    docs/design.md). Else the denoiser is a map of its own. These maps are independent, so one Krylov
    estimate of their block-diagonal joint map, whose network calls run as one batched call a round
    (:func:`~steindiff.diagnostics.lockstep.lockstep`), gives all of them, in groups of at most
    ``config.lipschitz_batch`` samples. Each map keeps its own start vectors, so the estimates do not
    depend on the grouping (to float rounding). With forward differences, the step maps whose values the runs computed
    (``MapAtStep.x_next``) are grouped apart from the others: their estimates take one evaluation fewer
    (:func:`steindiff.diagnostics.jacobians.jacobian_norms`, ``outputs``). The exact flows are grouped apart too and
    walked side by side on this thread (:func:`steindiff.diagnostics.reference.flow_maps`). Forward-mode AD is per
    thread: with ``jacobian_mode`` "jvp" every map is estimated alone. A step's ``diagnostics_time_s`` is
    its maps' share (by samples) of the time of the groups they ran in.
    """
    options = options or SolverOptions()
    jobs = []
    for k in range(len(grid) - 1):
        for index, (run, maps, spec) in enumerate(runs):
            m, record = maps[k], run.trace[k]
            if m is None:
                continue
            bound = m.gamma is None and grid[k + 1] > 0  # the paper's bound, from the denoiser's constant
            along = bound and spec.one_call_at_input
            step = _step_map(spec, grid, k, m, options, with_denoiser=along)
            quantities: tuple[Quantity, ...] = ("step", "denoiser") if along else ("step",)
            values = None
            if config.jacobian_mode == "fd" and m.x_next is not None:
                values = (m.x_next, m.denoised) if along else (m.x_next,)
            jobs.append(_LipschitzJob(step, m.x, (k, 0, index), record, quantities, values, cond=m.cond))
            if config.flow_lipschitz and denoiser.exact:
                flow = (grid[k], grid[k + 1])
                jobs.append(_LipschitzJob(None, m.x, (k, 2, index), record, ("flow",), flow=flow, cond=m.cond))
            if m.gamma is None and grid[k + 1] == 0:
                record.bound_paper = math.inf
            elif bound and not along:
                job = _LipschitzJob(_denoiser_map(grid[k], m.cond), m.x, (k, 1, index), record, ("denoiser",))
                jobs.append(job)
    limit = 0 if config.jacobian_mode == "jvp" else config.lipschitz_batch
    known = [job for job in jobs if job.outputs is not None]  # grouped apart: their estimate takes another path
    flows = [job for job in jobs if job.flow is not None]  # walked side by side without threads
    rest = [job for job in jobs if job.outputs is None and job.flow is None]
    for group in _groups(known, limit) + _groups(flows, limit) + _groups(rest, limit):
        start = time.perf_counter()
        x = torch.cat([job.x for job in group])
        w = torch.cat([krylov_start(job.x, stream_generator(seed, LIPSCHITZ_STREAM, *job.stream)) for job in group])
        width = max(len(job.quantities) for job in group)
        joint = _joint_map(denoiser, group, width, config.flow_log_step)
        outputs = _joint_outputs(group, width)
        constants = jacobian_norms(joint, x, config.lipschitz_iters, config.jacobian_mode, start=w, outputs=outputs)
        elapsed = time.perf_counter() - start
        for job, part in zip(group, _slices([len(job.x) for job in group]), strict=True):
            for quantity, output_constants in zip(job.quantities, constants, strict=False):
                _record(job.record, quantity, output_constants[part])
            job.record.diagnostics_time_s += elapsed * len(job.x) / len(x)


def _step_map(
    spec: SolverSpec, grid: list[float], k: int, m: MapAtStep, options: SolverOptions, with_denoiser: bool
) -> DenoiserMap:
    """The applied map of step k, (1 - gamma) scale z + gamma T(z), with the run's history held fixed; with
    ``with_denoiser`` also D(z, sigma_k), the value of the step's one network call (its solver's
    ``one_call_at_input``).

    Where history[0] is a look-ahead evaluation m0 = D(p, sigma_k) made at a point p other than the state
    (UniPC's predictor point, the look-ahead corrector's), it moves with the state: m0(z) = D(p + z - x_k,
    sigma_k), the value at z = x_k and dm0/dz = dD/dx at p (the solver-math notes, section 2, on UniPC:
    option (a)). Held fixed, it would leave such a step only the dependence through its new evaluation,
    none at the last step, where T = P(x; m0) has dT/dx = (sigma_{k+1}/sigma_k) I = 0: L far below a
    one-evaluation step's a I + b dD/dx from the same states. This costs one network call more a map.
    """
    gamma = _per_sample(m.gamma, len(m.x), m.x)
    sigma_k = torch.tensor(grid[k], dtype=m.x.dtype, device=m.x.device)

    def step_map(denoise: DenoiseFn, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls: list[tuple[torch.Tensor, torch.Tensor]] = []

        def recorded(x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
            calls.append((x, denoise(x, sigma, **cond)))
            return calls[-1][1]

        bound = bind_cond(recorded if with_denoiser else denoise, m.cond)
        history = m.history
        if m.ahead_point is not None:
            history = (bind_cond(denoise, m.cond)(m.ahead_point + (z - m.x), sigma_k), *history[1:])
        step = spec.step(bound, z, grid, k, history, options)
        applied = combine(z, step.x_next, gamma, m.scale)
        if not with_denoiser:
            return (applied,)
        if len(calls) != 1 or calls[0][0] is not z:
            raise RuntimeError(f"step {k} of {spec.name} did not make its one network call at its input")
        return applied, calls[0][1]

    return step_map


def _joint_map(
    denoiser: Denoiser, group: list[_LipschitzJob], width: int, flow_log_step: float
) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """The block-diagonal map of a group's jobs: exact flows walked side by side (:func:`flow_maps`), other
    maps in lockstep, each padded to ``width`` outputs. The flows' walks are long (RK4 in steps of
    ``flow_log_step``) around a cheap exact network, so in lockstep the threads' hand-offs would cost more
    than the calls themselves; walked side by side they take none (measured: see docs/design.md)."""
    sizes = [len(job.x) for job in group]
    levels = [job.flow for job in group if job.flow is not None]
    maps = [_padded(job.fn, width) for job in group if job.fn is not None]
    if len(levels) == len(group):
        cond = cond_cat([job.cond for job in group])
        return lambda z: (flow_maps(denoiser, z, levels, sizes, max_log_step=flow_log_step, cond=cond),)
    if len(maps) == len(group):
        return lockstep(denoiser, maps, sizes)
    raise ValueError("a group mixes exact flows with other maps")


def _denoiser_map(sigma: float, cond: Cond | None) -> DenoiserMap:
    """z -> D(z, sigma; cond)."""
    return lambda denoise, z: (bind_cond(denoise, cond)(z, torch.tensor(sigma, dtype=z.dtype, device=z.device)),)


def _padded(fn: DenoiserMap, width: int) -> DenoiserMap:
    """``fn`` with zero outputs after its own, ``width`` in all: a group's maps return as many outputs."""

    def padded(denoise: DenoiseFn, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = fn(denoise, z)
        return (*outputs, *(torch.zeros_like(outputs[0]) for _ in range(width - len(outputs))))

    return padded


def _joint_outputs(group: list[_LipschitzJob], width: int) -> tuple[torch.Tensor, ...] | None:
    """The joint map's outputs at its input, as :func:`_padded` pads them, where the maps' are known."""
    if group[0].outputs is None:
        return None
    padded = []
    for job in group:
        zero = torch.zeros_like(job.outputs[0])
        padded.append((*job.outputs, *(zero for _ in range(width - len(job.outputs)))))
    return tuple(torch.cat(parts) for parts in zip(*padded, strict=True))


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


def _record(record: StepRecord, quantity: Quantity, constants: torch.Tensor) -> None:
    """Write per-sample Lipschitz constants of ``quantity`` into a step record."""
    if quantity == "step":
        record.lipschitz_max, record.lipschitz_median = float(constants.max()), float(constants.median())
    elif quantity == "flow":
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

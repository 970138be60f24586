"""How much an error in a run's state grows by the run's end, beside how much the true ODE flow grows it.

The contractivity trap as the question it asks: do few large steps amplify an error *more than the
probability-flow ODE does over the same noise interval*? A step's Lipschitz constant alone cannot say: the
exact flow expands near mode boundaries too, and a fine solver that follows it does the same, and the product
of per-step maxima bounds no sample's error. So for each probed sample and each state x_k of a run this
measures

    A_k = ||d x_N / d x_k||,

the operator norm of the Jacobian of the run's remaining steps composed (Krylov, as the step maps': a lower
bound that converges fast; exact for 2-D models), each step with the coefficient it applied and the history
at step k held fixed, as :mod:`steindiff.diagnostics.step_lipschitz` holds it for one step. Beside it, the
same norm of the true flow from sigma_k to 0 (RK4 on the model's own ODE, then the denoising step the
reference takes) at the reference solution's state at sigma_k: exact for the exact mixtures, the network's
own flow for trained models.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

from steindiff.correction.rule import combine
from steindiff.denoisers.base import Cond, DenoiseFn, Denoiser, bind_cond, cond_repeat, cond_rows
from steindiff.diagnostics.jacobians import krylov_start, local_lipschitz
from steindiff.diagnostics.reference import flow_maps, reference_floor
from steindiff.diagnostics.step_lipschitz import MapAtStep
from steindiff.noise import AMPLIFICATION_STREAM, stream_generator
from steindiff.records import DiagnosticsConfig, RunResult, StepRecord
from steindiff.solvers import SolverOptions, SolverSpec

__all__ = ["flow_tails", "measure_amplification", "run_tails"]


def run_tails(
    denoise: DenoiseFn,
    spec: SolverSpec,
    grid: list[float],
    starts: Sequence[int],
    maps: Sequence[MapAtStep],
    options: SolverOptions,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """z -> x_N for every start k at once: the run's steps k..N-1 from z_k in place of x_k, each combined with the
    coefficient it applied. The tails walk side by side, each step one batched call for every tail under way.

    Arguments:
        denoise: the model, called as (x, sigma, **cond).
        spec: the solver the run applied (with its look-ahead corrector where the run used it).
        grid: the run's noise levels, N + 1 of them.
        starts: the states k whose tails to walk, each with the same n probed samples.
        maps: what each step 0..N-1 applied on the probed samples (:class:`MapAtStep`); those from the first
            start on must all be there.
        options: the solver's options.

    Returns:
        A map of the states z_k stacked in the order of ``starts`` ((len(starts) n, *event_shape)) to their final
        samples, stacked the same way. Each tail holds the history at its step k fixed; where its newest entry is
        a look-ahead evaluation it moves with the state, as in the step maps.
    """
    n = len(maps[starts[0]].x)

    def tails(z: torch.Tensor) -> torch.Tensor:
        states: dict[int, torch.Tensor] = {}
        histories: dict[int, tuple[torch.Tensor, ...]] = {}
        for j in range(min(starts), len(grid) - 1):
            m = maps[j]
            if j in starts:
                states[j] = z[starts.index(j) * n : (starts.index(j) + 1) * n]
                histories[j] = m.history
                if m.ahead_point is not None:
                    sigma = torch.tensor(grid[j], dtype=z.dtype, device=z.device)
                    moved = bind_cond(denoise, m.cond)(m.ahead_point + (states[j] - m.x), sigma)
                    histories[j] = (moved, *m.history[1:])
            walking = list(states)
            x = torch.cat([states[k] for k in walking])
            history = tuple(torch.cat(parts) for parts in zip(*(histories[k] for k in walking), strict=True))
            step = spec.step(bind_cond(denoise, cond_repeat(m.cond, len(walking))), x, grid, j, history, options)
            if m.gamma is None:
                x = step.x_next
            else:
                gamma = m.gamma.repeat(len(walking)) if m.gamma.ndim == 1 else m.gamma
                x = combine(x, step.x_next, gamma, m.scale)
            for i, k in enumerate(walking):
                states[k] = x[i * n : (i + 1) * n]
                histories[k] = tuple(h[i * n : (i + 1) * n] for h in step.history)
        return torch.cat([states[k] for k in starts])

    return tails


def flow_tails(
    denoise: DenoiseFn, levels: Sequence[float], floor: float, max_log_step: float, n: int, cond: Cond | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """z -> the true flow's end from each block of n rows of z at its noise level of ``levels``: RK4 in steps of at
    most ``max_log_step`` in log sigma down to ``floor``, the blocks side by side, then the denoising step there
    (as the reference solution ends). ``cond``: the conditioning of one block's rows."""
    blocks = cond_repeat(cond, len(levels))

    def tails(z: torch.Tensor) -> torch.Tensor:
        x = flow_maps(denoise, z, [(s, floor) for s in levels], [n] * len(levels), max_log_step, cond=blocks)
        return bind_cond(denoise, blocks)(x, torch.tensor(floor, dtype=z.dtype, device=z.device))

    return tails


def measure_amplification(
    denoiser: Denoiser,
    runs: Sequence[tuple[RunResult, Sequence[MapAtStep | None], SolverSpec]],
    grid: list[float],
    options: SolverOptions | None,
    config: DiagnosticsConfig,
    seed: int,
    reference: Sequence[torch.Tensor] | None = None,
    cond: Cond | None = None,
) -> None:
    """Fill every run's amplification fields (median and max over the probed samples), and, with
    ``config.flow_amplification`` and a ``reference`` (its states at the grid's levels), the true flow's on the
    first run's records.

    A state from which a later step was not measured (its map None: the run turned non-finite) gets none.
    Each estimate starts from its own seeded Krylov vectors: the same seed gives the same values.
    """
    options = options or SolverOptions()
    steps = len(grid) - 1
    for index, (run, maps, spec) in enumerate(runs):
        starts = [k for k in range(steps) if all(m is not None for m in maps[k:])]
        if starts:
            fn = run_tails(denoiser, spec, grid, starts, maps, options)  # type: ignore[arg-type]
            z = torch.cat([maps[k].x for k in starts])  # type: ignore[union-attr]
            _fill([run.trace[k] for k in starts], "amplification", _norms(fn, z, config, seed, index))
    if not (config.flow_amplification and reference is not None and runs):
        return
    floor = reference_floor(grid, config.reference_floor_ratio, denoiser.sigma_min)
    n = min(config.lipschitz_samples, len(reference[0]))
    starts = [k for k in range(steps) if grid[k] > floor and bool(torch.isfinite(reference[k][:n]).all())]
    if starts:
        fn = flow_tails(
            denoiser, [grid[k] for k in starts], floor, config.flow_log_step, n, cond_rows(cond, slice(0, n))
        )
        z = torch.cat([reference[k][:n] for k in starts])
        _fill([runs[0][0].trace[k] for k in starts], "flow_amplification", _norms(fn, z, config, seed, len(runs)))


def _norms(
    fn: Callable, x: torch.Tensor, config: DiagnosticsConfig, seed: int, stream: tuple[int, ...]
) -> torch.Tensor:
    generator = stream_generator(seed, AMPLIFICATION_STREAM, stream)
    start = krylov_start(x, generator)
    return local_lipschitz(fn, x.detach(), config.lipschitz_iters, mode=config.jacobian_mode, start=start)


def _fill(records: Sequence[StepRecord], prefix: str, norms: torch.Tensor) -> None:
    """Each record's median and max of its block of the norms (NaN: a map that overflowed, left out)."""
    for record, block in zip(records, norms.chunk(len(records)), strict=True):
        values = [float(v) for v in block.tolist() if v == v]
        if values:
            setattr(record, f"{prefix}_median", statistics.median(values))
            setattr(record, f"{prefix}_max", max(values))

"""Reference solutions of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM Eq. 4).

Integrated in s = log sigma, where the ODE reads dx/ds = x - D(x, e^s), with classical RK4 (four network
calls a step) or, for a cheaper solution of a trained network, the third-order exponential multistep
DPM-Solver++(3M) (one call a step; its linear part is integrated exactly). A :class:`FlowSolution` holds
the states on a uniform lattice in s, steps of at most ``max_log_step``, from the starting noise level down
to the last one it needs. Any noise level in between is one step from the lattice node above it: an RK4
step (four batched network calls for all the levels of a grid), or, on a 3M lattice, the 3M step cut short
(its dense output, from the denoised values the walk kept: no network call). So one solution serves every
grid over the same noise: changing the solver, the schedule or the NFE costs at most four batched network
calls, not a new solve. The segment into sigma = 0 is
integrated down to ``floor_ratio`` times the last positive sigma and finished by one denoising step,
whose error is O(sigma_floor^2) (relative 1e-7 or less for the shipped mixtures). For an exact denoiser
this is the exact solution to integration tolerance; for a trained one it is a high-NFE reference from
the same noise. Conditioning (``cond``, each tensor with a leading dimension of the samples) goes with the
samples' rows into every call: a solution keeps its own, and repeats it where it stacks its states.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from steindiff.denoisers.base import Cond, DenoiseFn, bind_cond, cond_repeat, cond_rows
from steindiff.solvers import SolverOptions, dpmpp_3m_step

__all__ = [
    "LATTICE_METHODS",
    "FlowSolution",
    "LatticeMethod",
    "flow_map",
    "flow_maps",
    "reference_floor",
    "reference_trajectory",
    "solve_flow",
    "solve_for_grid",
]

#: how a solution steps along its lattice: "rk4" or "dpmpp_3m" (see the module docstring)
LatticeMethod = Literal["rk4", "dpmpp_3m"]
LATTICE_METHODS: tuple[str, ...] = get_args(LatticeMethod)
#: DPM-Solver++(3M) at its full third order (SolverOptions.dpmpp_3m_d2_weight), no lower order at the end
_THIRD_ORDER = SolverOptions(lower_order_final=False, dpmpp_3m_d2_weight=2.0)

#: the most numbers in one batched call stepping off the lattice (samples x levels x sample size)
OFF_LATTICE_ELEMENTS = 2**18
#: grids whose states a solution keeps (each a list of states of its reference samples)
KEPT_GRIDS = 8


def _rk4_step(denoise: DenoiseFn, x: torch.Tensor, s: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """One classical RK4 step of dx/ds = x - D(x, e^s); ``s`` and ``ds`` (float64) are 0-d or one per sample."""
    step = ds.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)) if ds.ndim else ds.to(x.dtype)

    def velocity(state: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        return state - denoise(state, log_sigma.exp().to(state.dtype))

    k1 = velocity(x, s)
    k2 = velocity(x + 0.5 * step * k1, s + 0.5 * ds)
    k3 = velocity(x + 0.5 * step * k2, s + 0.5 * ds)
    k4 = velocity(x + step * k3, s + ds)
    return x + (step / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def _log_lattice(sigma_from: float, sigma_to: float, max_log_step: float) -> list[float]:
    """log sigma from ``sigma_from`` to ``sigma_to`` in uniform steps of at most ``max_log_step``, ends exact."""
    start, end = math.log(sigma_from), math.log(sigma_to)
    n = max(1, math.ceil(abs(end - start) / max_log_step))
    return [start] + [start + i * (end - start) / n for i in range(1, n)] + [end]


def _walk(denoise: DenoiseFn, x: torch.Tensor, log_sigmas: list[float]) -> list[torch.Tensor]:
    """RK4 from ``x`` at the first of ``log_sigmas`` through the others: the state at each of them."""
    nodes = torch.tensor(log_sigmas, dtype=torch.float64, device=x.device)
    states = [x]
    for s, s_next in itertools.pairwise(nodes):
        states.append(_rk4_step(denoise, states[-1], s, s_next - s))
    return states


def _walk_multistep(
    denoise: DenoiseFn, x: torch.Tensor, sigmas: list[float]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """DPM-Solver++(3M) from ``x`` at ``sigmas[0]`` through the others (decreasing, positive): one network
    call a step, the first two steps of order 1 and 2 (the multistep warm-up). The states at every level
    and the denoised values at every level but the last."""
    states, denoised, history = [x], [], ()
    for k in range(len(sigmas) - 1):
        x_next, d, history, _ = dpmpp_3m_step(denoise, states[-1], sigmas, k, history, _THIRD_ORDER)
        states.append(x_next)
        denoised.append(d)
    return states, denoised


def flow_map(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigma_from: float,
    sigma_to: float,
    max_log_step: float = 0.025,
    floor_ratio: float = 0.01,
    cond: Cond | None = None,
) -> torch.Tensor:
    """The ODE flow from ``sigma_from`` to ``sigma_to`` (which may be 0) applied to ``x`` (with the conditioning
    ``cond`` of its rows): RK4 on :func:`_log_lattice`, into sigma = 0 down to ``floor_ratio`` times
    ``sigma_from``, then one denoising step."""
    return flow_maps(denoise, x, [(sigma_from, sigma_to)], [len(x)], max_log_step, floor_ratio, cond)


def flow_maps(
    denoise: DenoiseFn,
    x: torch.Tensor,
    levels: Sequence[tuple[float, float]],
    sizes: Sequence[int],
    max_log_step: float = 0.025,
    floor_ratio: float = 0.01,
    cond: Cond | None = None,
) -> torch.Tensor:
    """:func:`flow_map` of each block of rows of ``x`` (``sizes``) between its own noise levels (``levels``,
    one (sigma_from, sigma_to) a block), the blocks walked side by side: each takes the steps it would take
    alone, and each RK4 stage of a round is one batched network call, a noise level a row (and the
    conditioning ``cond`` of ``x``'s rows, the rows of the live blocks). A block whose walk has ended is left
    out of the later rounds. Autograd sees through it, forward-mode AD too (no threads)."""
    if len(levels) != len(sizes) or sum(sizes) != len(x):
        raise ValueError(f"{len(levels)} blocks of noise levels for blocks of {list(sizes)} of {len(x)} rows")
    floors = [a * floor_ratio if b == 0 else b for a, b in levels]
    lattices = [_log_lattice(a, floor, max_log_step) for (a, _), floor in zip(levels, floors, strict=True)]
    ends = itertools.accumulate(sizes)
    rows = [torch.arange(end - n, end, device=x.device) for n, end in zip(sizes, ends, strict=True)]
    for r in range(max(len(lattice) for lattice in lattices) - 1):
        live = [i for i, lattice in enumerate(lattices) if r + 1 < len(lattice)]
        live_sizes = [sizes[i] for i in live]
        s = _per_row([lattices[i][r] for i in live], live_sizes, x.device)
        ds = _per_row([lattices[i][r + 1] - lattices[i][r] for i in live], live_sizes, x.device)
        x = _update_rows(
            x, [rows[i] for i in live], cond, lambda part, d, s=s, ds=ds: _rk4_step(d, part, s, ds), denoise
        )
    to_zero = [i for i, (_, b) in enumerate(levels) if b == 0]
    if to_zero:
        sigma = _per_row([floors[i] for i in to_zero], [sizes[i] for i in to_zero], x.device).to(x.dtype)
        x = _update_rows(x, [rows[i] for i in to_zero], cond, lambda part, d: d(part, sigma), denoise)
    return x


def _per_row(values: list[float], sizes: list[int], device: torch.device) -> torch.Tensor:
    """Each block's value repeated for its rows (float64), or a 0-d value where the blocks share one."""
    if len(set(values)) == 1:
        return torch.tensor(values[0], dtype=torch.float64, device=device)
    counts = torch.tensor(sizes, device=device)
    return torch.tensor(values, dtype=torch.float64, device=device).repeat_interleave(counts)


def _update_rows(
    x: torch.Tensor,
    blocks: list[torch.Tensor],
    cond: Cond | None,
    update: Callable[[torch.Tensor, DenoiseFn], torch.Tensor],
    denoise: DenoiseFn,
) -> torch.Tensor:
    """``x`` with the rows of ``blocks`` (index tensors) replaced by ``update(rows, denoise)`` of them, out of
    place, ``denoise`` bound to the rows' conditioning (of ``cond``, the conditioning of ``x``'s rows)."""
    if sum(len(block) for block in blocks) == len(x):
        return update(x, bind_cond(denoise, cond))
    index = torch.cat(blocks)
    return x.index_copy(0, index, update(x[index], bind_cond(denoise, cond_rows(cond, index))))


@dataclass
class FlowSolution:
    """The solution from ``states[0]`` at ``sigmas[0]``: its states at the lattice noise levels
    ``sigmas`` (decreasing, uniform in log sigma), and the states at the grids asked of it so far.
    ``denoised``: on a DPM-Solver++(3M) lattice, D(x, sigma) at every node but the last (the walk's own
    calls), from which a level between two nodes is reached without a network call; None for RK4.
    ``cond``: the conditioning of the states' rows, which every later call on them takes."""

    sigmas: list[float]
    states: list[torch.Tensor]
    denoised: list[torch.Tensor] | None = None
    cond: Cond | None = None
    _grids: dict[tuple[float, ...], list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _at_zero: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def sigma_floor(self) -> float:
        """The lowest positive noise level: sigma = 0 is one denoising step from here."""
        return self.sigmas[-1]

    @torch.no_grad()
    def states_at(self, denoise: DenoiseFn, sigmas: Sequence[float]) -> list[torch.Tensor]:
        """The solution at each of ``sigmas``: a lattice state, one step from the node above it (RK4 in a few
        batched calls, so ``denoise`` must take one sigma per sample; on a 3M lattice the step's dense output,
        no call), or at sigma = 0 the denoised floor state (one call, kept). Levels above the start or
        between 0 and the floor are refused."""
        grid = tuple(float(s) for s in sigmas)
        if grid in self._grids:
            return self._grids[grid]
        top, floor = self.sigmas[0], self.sigma_floor
        outside = [s for s in grid if s > top * (1 + 1e-12) or 0 < s < floor * (1 - 1e-12)]
        if outside:
            raise ValueError(f"this solution covers sigma = 0 and [{floor:.4g}, {top:.4g}], not {outside}")
        states: dict[int, torch.Tensor] = {}
        off_lattice = []  # (grid index, node above, log-sigma offset from it)
        negated = [-s for s in self.sigmas]  # increasing, for bisect
        for i, s in enumerate(grid):
            if s == 0:
                states[i] = self._denoised_floor(denoise)
                continue
            node = min(max(bisect.bisect_right(negated, -s) - 1, 0), len(self.sigmas) - 1)
            offset = math.log(s) - math.log(self.sigmas[node])
            if abs(offset) < 1e-12:
                states[i] = self.states[node]
            else:
                off_lattice.append((i, node, offset))
        if self.denoised is None:
            states.update(self._step_off_lattice(denoise, off_lattice))
        else:
            states.update({i: self._dense_output(self.denoised, node, offset) for i, node, offset in off_lattice})
        result = [states[i] for i in range(len(grid))]
        self._grids[grid] = result
        while len(self._grids) > KEPT_GRIDS:
            self._grids.pop(next(iter(self._grids)))
        return result

    def _denoised_floor(self, denoise: DenoiseFn) -> torch.Tensor:
        """D at the floor state: the solution at sigma = 0 (computed once)."""
        if self._at_zero is None:
            x = self.states[-1]
            sigma = torch.tensor(self.sigma_floor, dtype=x.dtype, device=x.device)
            self._at_zero = bind_cond(denoise, self.cond)(x, sigma)
        return self._at_zero

    def _dense_output(self, denoised: list[torch.Tensor], node: int, offset: float) -> torch.Tensor:
        """The state ``offset`` (< 0) in log sigma below lattice node ``node``: the walk's 3M step from that
        node, with the same ``denoised`` values and order, cut short (the exponential integrator's polynomial in
        lambda integrated over the shorter interval; the local error of a shorter step of the same order)."""
        first = max(0, node - 2)  # the step from node n uses the outputs at nodes n-2 .. n
        levels = [*self.sigmas[first : node + 1], self.sigmas[node] * math.exp(offset)]
        history = tuple(reversed(denoised[first:node]))  # the latest first, as the solvers keep it

        def stored(_x: torch.Tensor, _sigma: torch.Tensor) -> torch.Tensor:
            return denoised[node]

        return dpmpp_3m_step(stored, self.states[node], levels, node - first, history, _THIRD_ORDER).x_next

    def _step_off_lattice(self, denoise: DenoiseFn, steps: list[tuple[int, int, float]]) -> dict[int, torch.Tensor]:
        """One RK4 step from a lattice node for each of ``steps``, batched over steps and samples."""
        out: dict[int, torch.Tensor] = {}
        n = len(self.states[0])
        per_call = max(1, OFF_LATTICE_ELEMENTS // self.states[0].numel())
        for first in range(0, len(steps), per_call):
            chunk = steps[first : first + per_call]
            x = torch.cat([self.states[node] for _, node, _ in chunk])
            s = torch.tensor([math.log(self.sigmas[node]) for _, node, _ in chunk], dtype=torch.float64)
            ds = torch.tensor([offset for *_, offset in chunk], dtype=torch.float64)
            stacked = bind_cond(
                denoise, cond_repeat(self.cond, len(chunk))
            )  # the states of each step, one after another
            stepped = _rk4_step(stacked, x, s.repeat_interleave(n).to(x.device), ds.repeat_interleave(n).to(x.device))
            out.update(zip([i for i, *_ in chunk], stepped.split(n), strict=True))
        return out


@torch.no_grad()
def solve_flow(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigma_from: float,
    sigma_to: float,
    max_log_step: float,
    method: LatticeMethod = "rk4",
    cond: Cond | None = None,
) -> FlowSolution:
    """The solution from ``x`` at ``sigma_from`` down to ``sigma_to`` (0 < sigma_to <= sigma_from) in
    uniform steps of at most ``max_log_step`` in log sigma by ``method``, keeping the state at every node;
    ``cond`` is the conditioning of ``x``'s rows."""
    if not 0 < sigma_to <= sigma_from:
        raise ValueError(f"need 0 < sigma_to <= sigma_from, got {sigma_to} and {sigma_from}")
    if method not in LATTICE_METHODS:
        raise ValueError(f"method must be one of {LATTICE_METHODS}, got {method!r}")
    cond = cond or None
    if sigma_to == sigma_from:
        return FlowSolution([sigma_from], [x], cond=cond)
    nodes = _log_lattice(sigma_from, sigma_to, max_log_step)
    sigmas = [sigma_from, *(math.exp(s) for s in nodes[1:-1]), sigma_to]
    bound = bind_cond(denoise, cond)
    if method == "rk4":
        return FlowSolution(sigmas, _walk(bound, x, nodes), cond=cond)
    return FlowSolution(sigmas, *_walk_multistep(bound, x, sigmas), cond=cond)


def reference_floor(sigmas: Sequence[float], floor_ratio: float, sigma_min: float | None = None) -> float:
    """The lowest level a reference for the grid ``sigmas`` solves down to: the grid's last positive level or,
    when the grid ends at 0, ``floor_ratio`` times the lower of that level and the model's ``sigma_min``. A
    one-step grid's last positive level is its first: its reference still integrates the ODE the whole way
    (else it would be the solver's own denoising step, at an error of 0)."""
    positive = [float(s) for s in sigmas if s > 0]
    if float(sigmas[-1]) != 0:
        return positive[-1]
    return floor_ratio * (positive[-1] if sigma_min is None else min(positive[-1], sigma_min))


def solve_for_grid(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: Sequence[float],
    max_log_step: float,
    floor_ratio: float,
    method: LatticeMethod = "rk4",
    cond: Cond | None = None,
    sigma_min: float | None = None,
) -> FlowSolution:
    """The solution from ``x`` (rows conditioned on ``cond``) at ``sigmas[0]`` that covers the grid ``sigmas``,
    down to :func:`reference_floor` (``sigma_min``: the model's lowest noise level)."""
    floor = reference_floor(sigmas, floor_ratio, sigma_min)
    return solve_flow(denoise, x, float(sigmas[0]), floor, max_log_step, method, cond)


def reference_trajectory(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: Sequence[float],
    max_log_step: float = 0.025,
    floor_ratio: float = 0.01,
    cond: Cond | None = None,
) -> list[torch.Tensor]:
    """States of the ODE solution from ``x`` (rows conditioned on ``cond``) at every grid sigma (``len(sigmas)``
    tensors, the first is ``x``)."""
    solution = solve_for_grid(denoise, x, sigmas, max_log_step, floor_ratio, cond=cond)
    return solution.states_at(denoise, sigmas)

"""Divergence estimation for the Stein correction: div_x T of a solver step T, per sample.

Hutchinson's estimator (Hutchinson 1990): for probes v with E[v v^T] = I, E[v^T J v] = tr J. The products
J^T v come from VJPs through the step (the paper's choice), or J v from forward differences

    J v ~ (T(x + h v) - T(x)) / h,

one forward evaluation a direction, which shares the network call of T(x) itself (x and x + h v stacked in
one batch): no backward pass and no extra NFE. :func:`probed_step` takes one solver step together with
the estimate, by the products its config names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch

from steindiff.denoisers.base import Cond, CountingDenoiser, DenoiseFn, bind_cond, cond_repeat, cond_rows
from steindiff.solvers import SolverOptions, SolverSpec, StepResult

if TYPE_CHECKING:
    from steindiff.correction.rule import SteinConfig

__all__ = [
    "EXACT_TRACE_MAX_DIM",
    "PROBE_PRODUCTS",
    "VJP_CPU_CHUNK",
    "DivergenceEstimate",
    "ProbeKind",
    "ProbeProducts",
    "divergence",
    "draw_probes",
    "fd_step",
    "hutchinson",
    "probe_stack",
    "probed_step",
    "vjp_products",
]

ProbeKind = Literal["rademacher", "gaussian", "exact"]
ProbeProducts = Literal["vjp", "vjp-batched", "fd"]
PROBE_PRODUCTS: tuple[str, ...] = get_args(ProbeProducts)
#: the most dimensions the exact trace (one VJP a coordinate) is taken over
EXACT_TRACE_MAX_DIM = 1024
#: on the CPU, VJP probes take at most this many samples in one autograd graph: a forward and a VJP cost
#: far more a sample in one large graph than in several small ones (measured: see docs/design.md)
VJP_CPU_CHUNK = 64


@dataclass(frozen=True)
class DivergenceEstimate:
    """div_x T per sample (float64, shape (B,)) and the Monte Carlo standard error of its batch mean."""

    per_sample: torch.Tensor
    batch_se: float


def fd_step(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Per-sample step h of a forward difference, shaped to broadcast against ``x``:
    ||h v_i|| = sqrt(eps) max(||x_i||, 1).

    The textbook choice (Press et al., Numerical Recipes, 3rd ed., sec. 5.7): with machine epsilon eps of
    x's dtype, truncation (O(h)) and rounding (O(eps / h)) errors balance at h ~ sqrt(eps) relative to the
    scale of x.

    Arguments:
        x: the point, (B, ...).
        direction: the direction v, shaped like ``x``.

    Returns:
        h, shape (B, 1, ..., 1).
    """
    event = [1] * (x.ndim - 1)
    x_norm = x.detach().flatten(1).norm(dim=1).clamp_min(1.0)
    v_norm = direction.detach().flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    return (torch.finfo(x.dtype).eps ** 0.5 * x_norm / v_norm).reshape(-1, *event)


def draw_probes(like: torch.Tensor, kind: ProbeKind, generator: torch.Generator) -> torch.Tensor:
    """A probe v shaped like ``like``: Rademacher (+-1) or standard Gaussian, drawn on the CPU for determinism."""
    if kind == "rademacher":
        v = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8).mul(2).sub(1)
    else:
        v = torch.randn(like.shape, generator=generator, dtype=torch.float64)
    return v.to(dtype=like.dtype, device=like.device)


def probe_stack(like: torch.Tensor, kind: ProbeKind, probes: int, generator: torch.Generator) -> torch.Tensor:
    """K probes shaped like ``like``, stacked: (K, *like.shape)."""
    return torch.stack([draw_probes(like, kind, generator) for _ in range(probes)])


def hutchinson(v: torch.Tensor, jv: torch.Tensor, identity: float = 0.0) -> DivergenceEstimate:
    """Hutchinson's estimate of tr J per sample from K probes and their products.

    E[v^T J v] = tr J for probes with E[v v^T] = I (Hutchinson 1990). ``identity`` is a known coefficient
    c of I in J: the estimator v^T J v - c (||v||^2 - d) stays unbiased for any c and, with the exact c,
    carries no variance from the identity part (Rademacher probes have ||v||^2 = d already).

    Arguments:
        v: the probes, (K, B, ...).
        jv: their products J v (or J^T v), (K, B, ...).
        identity: the coefficient c of I in J (every solver step has c = sigma_{k+1} / sigma_k).

    Returns:
        The estimate per sample, (B,) in float64, and the standard error of its batch mean over the
        K probes (NaN for K = 1).
    """
    dim = v[0, 0].numel()
    quadratic = (v * jv).flatten(2).sum(2).to(torch.float64)
    sq_norm = (v.to(torch.float64) ** 2).flatten(2).sum(2)
    stacked = quadratic - identity * (sq_norm - dim)  # (K, B)
    probes = v.shape[0]
    se = float(stacked.mean(1).std() / math.sqrt(probes)) if probes > 1 else math.nan
    return DivergenceEstimate(stacked.mean(0), se)


def _exact_trace(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """tr dT/dx per sample (float64, (B,)) by d VJPs, one a coordinate, through ``t = T(x)``."""
    dim = x[0].numel()
    if dim > EXACT_TRACE_MAX_DIM:
        raise ValueError(f"the exact trace needs d VJPs; d = {dim} exceeds {EXACT_TRACE_MAX_DIM}: use Hutchinson")
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for j in range(dim):
        basis = torch.zeros_like(x).flatten(1)
        basis[:, j] = 1
        (vjp,) = torch.autograd.grad(t, x, grad_outputs=basis.reshape(x.shape), retain_graph=True)
        total = total + vjp.flatten(1)[:, j].to(torch.float64)
    return total


def divergence(
    t: torch.Tensor,
    x: torch.Tensor,
    kind: ProbeKind,
    probes: int,
    generator: torch.Generator,
    identity: float = 0.0,
    batched: bool = False,
) -> DivergenceEstimate:
    """div_x T per sample by VJPs, where ``t = T(x)`` was computed from ``x`` with ``requires_grad``.

    Hutchinson's estimate (:func:`hutchinson`) with K probes, or with ``kind`` "exact" the sum of the d
    diagonal entries, one VJP a coordinate.

    Arguments:
        t: T(x), (B, ...), with a graph to ``x``.
        x: the point, (B, ...), with ``requires_grad``.
        kind: "rademacher", "gaussian" or "exact".
        probes: K, the number of probes.
        generator: the CPU generator the probes are drawn from.
        identity: the coefficient of I in dT/dx, if known (see :func:`hutchinson`).
        batched: take the K probe VJPs in one vectorised backward.

    Returns:
        div_x T per sample (B,) and the standard error of its batch mean (0 for the exact trace).
    """
    if kind == "exact":
        return DivergenceEstimate(_exact_trace(t, x), 0.0)
    v = probe_stack(x, kind, probes, generator)
    return hutchinson(v, vjp_products(t, x, v, batched), identity)


def vjp_products(t: torch.Tensor, x: torch.Tensor, v: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """J^T v for each of the K probes ``v`` (K, B, ...), through ``t = T(x)`` computed with ``requires_grad``:
    K backward passes, or with ``batched`` one vectorised backward."""
    if batched:
        (vjps,) = torch.autograd.grad(t, x, grad_outputs=v, retain_graph=True, is_grads_batched=True)
        return vjps
    return torch.stack([torch.autograd.grad(t, x, grad_outputs=p, retain_graph=True)[0] for p in v])


def probed_step(
    spec: SolverSpec,
    denoise: DenoiseFn,
    x: torch.Tensor,
    grid: list[float],
    k: int,
    history: tuple[torch.Tensor, ...],
    options: SolverOptions,
    config: SteinConfig,
    generator: torch.Generator,
    cond: Cond | None = None,
) -> tuple[StepResult, DivergenceEstimate]:
    """Solver step k, T(x_k), and div_x T per sample, by the probe products of ``config.products``.

    The step is a pure map of x_k with the history fixed and samples never interact, so:

    - "fd": x_k and the K perturbed states x_k + h v (:func:`fd_step`) go through the step as one batch of
      (K + 1) B samples, the history and the conditioning repeated; J v = (T(x_k + h v) - T(x_k)) / h. No
      backward pass and no extra network call.
    - "vjp", "vjp-batched": VJPs J^T v through the step (K backward passes, or one vectorised one), on the
      CPU in chunks of :data:`VJP_CPU_CHUNK` samples (with their rows of the history and the conditioning),
      each its own graph. The probes are drawn for the whole
      batch first, so the estimate does not depend on the chunking (to float rounding). With
      ``config.probe`` "exact" the trace is summed from d VJPs instead.

    Either way the estimate is Hutchinson's (:func:`hutchinson`) with the step's known identity part
    sigma_{k+1} / sigma_k, and a step's network calls count once (a :class:`CountingDenoiser` sees the first
    chunk's calls only, as the chunks make the same calls).

    Arguments:
        spec: the solver whose step is taken.
        denoise: the denoiser D(x, sigma, **cond) the step calls, with the conditioning of its rows bound.
        x: the state x_k, (B, ...).
        grid: the noise levels sigma_0 > ... > sigma_N.
        k: the step, from ``grid[k]`` to ``grid[k + 1]``.
        history: the solver's earlier denoiser outputs, newest first, each (B, ...), held fixed.
        options: the solver's options.
        config: the correction's settings (``probe``, ``probes``, ``products``).
        generator: the CPU generator the probes are drawn from.
        cond: per-sample conditioning of x_k's rows, each (B, ...); None for an unconditional model.

    Returns:
        The step's result (detached; each tensor (B, ...)) and div_x T: per sample (B,) with the standard
        error of its batch mean.
    """
    batch, identity = x.shape[0], grid[k + 1] / grid[k]
    v = None if config.probe == "exact" else probe_stack(x, config.probe, config.probes, generator)
    if config.products == "fd":
        h = torch.stack([fd_step(x, probe) for probe in v])
        stacked = torch.cat([x, *(x + h * v)])
        repeated = tuple(torch.cat([part] * (config.probes + 1)) for part in history)
        with torch.no_grad():
            joint = spec.step(
                bind_cond(denoise, cond_repeat(cond, config.probes + 1)), stacked, grid, k, repeated, options
            )
        result = _rows(joint, slice(0, batch))
        return result, hutchinson(v, (joint.x_next[batch:].reshape(v.shape) - result.x_next) / h, identity)
    uncounted = denoise.denoiser if isinstance(denoise, CountingDenoiser) else denoise
    size = VJP_CPU_CHUNK if x.device.type == "cpu" else batch
    parts, products = [], []
    for first in range(0, batch, size):
        rows = slice(first, first + size)
        with torch.enable_grad():
            x_in = x[rows].detach().requires_grad_(True)
            call = bind_cond(denoise if first == 0 else uncounted, cond_rows(cond, rows))
            part = spec.step(call, x_in, grid, k, tuple(h[rows] for h in history), options)
            if v is None:
                products.append(_exact_trace(part.x_next, x_in))
            else:
                products.append(vjp_products(part.x_next, x_in, v[:, rows], config.products == "vjp-batched"))
        parts.append(_rows(part, slice(None)))
    result = StepResult(
        torch.cat([p.x_next for p in parts]),
        torch.cat([p.denoised for p in parts]),
        tuple(torch.cat(hs) for hs in zip(*(p.history for p in parts), strict=True)),
        None if parts[0].ahead_point is None else torch.cat([p.ahead_point for p in parts]),
    )
    if v is None:
        return result, DivergenceEstimate(torch.cat(products), 0.0)
    return result, hutchinson(v, torch.cat(products, dim=1), identity)


def _rows(result: StepResult, rows: slice) -> StepResult:
    """The step's result on ``rows`` of its batch, detached."""
    ahead = None if result.ahead_point is None else result.ahead_point[rows].detach()
    return StepResult(
        result.x_next[rows].detach(),
        result.denoised[rows].detach(),
        tuple(part[rows].detach() for part in result.history),
        ahead,
    )

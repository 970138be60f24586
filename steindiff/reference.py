"""Reference solutions of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM Eq. 4).

Integrated with classical RK4 in s = log sigma, where the ODE reads dx/ds = x - D(x, e^s), with
substeps of at most ``max_log_step`` between consecutive grid points. The segment into sigma = 0 is
integrated down to ``floor_ratio`` times the last positive sigma and finished by one denoising step,
whose error is O(sigma_floor^2) (relative 1e-7 or less for the shipped mixtures). For an exact
denoiser this is the exact solution to integration tolerance; for a trained one it is a high-NFE
reference from the same noise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from .denoisers.base import DenoiseFn

__all__ = ["flow_map", "reference_trajectory"]


def _rk4_log_sigma(denoise: DenoiseFn, x: torch.Tensor, sigma_from: float, sigma_to: float, max_log_step: float):
    span = math.log(sigma_to) - math.log(sigma_from)
    n = max(1, math.ceil(abs(span) / max_log_step))
    ds = span / n
    s = math.log(sigma_from)

    def velocity(state: torch.Tensor, log_sigma: float) -> torch.Tensor:
        return state - denoise(state, torch.tensor(math.exp(log_sigma), dtype=state.dtype, device=state.device))

    for i in range(n):
        s_i = s + i * ds
        k1 = velocity(x, s_i)
        k2 = velocity(x + 0.5 * ds * k1, s_i + 0.5 * ds)
        k3 = velocity(x + 0.5 * ds * k2, s_i + 0.5 * ds)
        k4 = velocity(x + ds * k3, s_i + ds)
        x = x + (ds / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def flow_map(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigma_from: float,
    sigma_to: float,
    max_log_step: float = 0.025,
    floor_ratio: float = 0.01,
) -> torch.Tensor:
    """The ODE flow from ``sigma_from`` to ``sigma_to`` (which may be 0) applied to ``x``."""
    if sigma_to > 0:
        return _rk4_log_sigma(denoise, x, sigma_from, sigma_to, max_log_step)
    floor = sigma_from * floor_ratio
    x = _rk4_log_sigma(denoise, x, sigma_from, floor, max_log_step)
    return denoise(x, torch.tensor(floor, dtype=x.dtype, device=x.device))


@torch.no_grad()
def reference_trajectory(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: Sequence[float],
    max_log_step: float = 0.025,
    floor_ratio: float = 0.01,
) -> list[torch.Tensor]:
    """States of the ODE solution from ``x`` at every grid sigma (``len(sigmas)`` tensors, the first is ``x``)."""
    states = [x]
    for sigma_from, sigma_to in itertools.pairwise(sigmas):
        states.append(flow_map(denoise, states[-1], float(sigma_from), float(sigma_to), max_log_step, floor_ratio))
    return states

"""Noise-level grids in EDM coordinates.

Every grid is a descending 1-D tensor of ``steps + 1`` noise levels that ends with an explicit
``sigma = 0``: the last step (from the smallest positive sigma to 0) is a real step and is counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "SCHEDULES",
    "karras_sigmas",
    "logsnr_sigmas",
    "make_sigmas",
    "time_uniform_sigmas",
    "vp_sigma",
    "vp_time",
]

# EDM defaults for data in [-1, 1] (Karras et al. 2022, Table 1).
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
# Continuous VP-SDE with linear beta(t) = beta_min + beta_d t (Song et al. 2021; EDM Table 1).
VP_BETA_MIN = 0.1
VP_BETA_D = 19.9


def _check(steps: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (0.0 < sigma_min <= sigma_max < math.inf):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {sigma_min}, {sigma_max}")


def _finish(sigmas: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The levels with their ends exactly ``sigma_max`` and ``sigma_min`` (no round-off), then sigma = 0."""
    sigmas = sigmas.clone()
    sigmas[0] = sigma_max
    if len(sigmas) > 1:
        sigmas[-1] = sigma_min
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(
    steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> torch.Tensor:
    """EDM grid (Karras et al. 2022, Eq. 5): sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    _check(steps, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((inv_max + ramp * (inv_min - inv_max)) ** rho, sigma_min, sigma_max)


def logsnr_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Uniform in half log-SNR lambda = -log sigma (DPM-Solver's 'logSNR' spacing)."""
    _check(steps, sigma_min, sigma_max)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64)
    return _finish(log_sigmas.exp(), sigma_min, sigma_max)


def vp_sigma(t: torch.Tensor, beta_min: float = VP_BETA_MIN, beta_d: float = VP_BETA_D) -> torch.Tensor:
    """EDM sigma of the linear VP-SDE at time t: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1)."""
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_time(sigma: torch.Tensor, beta_min: float = VP_BETA_MIN, beta_d: float = VP_BETA_D) -> torch.Tensor:
    """Inverse of :func:`vp_sigma`: the root of beta_d t^2 / 2 + beta_min t = log(1 + sigma^2)."""
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def time_uniform_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Uniform in VP time t between t(sigma_max) and t(sigma_min) (DDIM/DDPM-style 'time-uniform' spacing)."""
    _check(steps, sigma_min, sigma_max)
    bounds = vp_time(torch.tensor([sigma_max, sigma_min], dtype=torch.float64))
    times = torch.linspace(float(bounds[0]), float(bounds[1]), steps, dtype=torch.float64)
    return _finish(vp_sigma(times), sigma_min, sigma_max)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "karras": karras_sigmas,
    "logsnr": logsnr_sigmas,
    "time_uniform": time_uniform_sigmas,
}


def make_sigmas(name: str, steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """The grid called ``name`` (one of :data:`SCHEDULES`) with ``steps`` steps, in float64."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[name](steps, sigma_min=sigma_min, sigma_max=sigma_max)

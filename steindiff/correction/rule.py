"""The Stein correction's rule (the paper's Algorithm 1): the coefficient gamma and the corrected state.

One corrected step, around any solver candidate T(x_k):

    u_k     = x_k - T(x_k)
    s_xu    = mean_i <u_i, x_i>,   s_uu = mean_i ||u_i||^2,   s_div = mean_i div u_i
    gamma   = [(1 - 1/alpha_k) s_xu + (sigma_k^2 / alpha_k) s_div] / s_uu        (paper, gamma* via Stein)
    x_{k-1} = (1 - clip(gamma)) x_k + clip(gamma) T(x_k)

gamma* = E<u, x_k - x*> / E||u||^2 minimises E||x_{k-1} - x*||^2 along the line through x_k and T(x_k);
Stein's identity for x_k | x* ~ N(alpha x*, sigma^2 I), E<u, x_k - alpha x*> = sigma^2 E div u, removes x*.

Coordinates: the combination (and so gamma) depends on the coordinates it is taken in. "edm" uses
x = x0 + sigma eps (alpha = 1: the drift term vanishes); "vp" uses x_vp = alpha x with
alpha = (1 + sigma^2)^(-1/2) and sigma_vp = alpha sigma.

Noise-level consistency (our safeguard and SC design B, no extra network evaluation). In the model the
rule itself assumes, x_k = x* + sigma_k eps, the expected squared distance to x* after the step is

    J(gamma) = E||x_k - gamma u - x*||^2 = d sigma_k^2 - 2 gamma b + gamma^2 c,   b = sigma_k^2 s_div, c = s_uu

and gamma_raw = b / c is its minimiser. A state on the marginal at sigma_{k-1}, with x* drawn from its
posterior, has E||x - x*||^2 = E||x - D||^2 + tr Cov[x0|x] = sigma^2 (d - E div D) + sigma^2 E div D
= d sigma_{k-1}^2 (the noise-level identity plus Tweedie's covariance). The literal rule ignores this
floor: it lands near the posterior mean D(x_k) (J far below d sigma_{k-1}^2), the next state has too
little noise for its level, u collapses while sigma^2 div u does not, and gamma explodes (by orders of
magnitude). "cap" keeps gamma on the segment from 1 to gamma_raw where J(gamma) >= d sigma_{k-1}^2;
"match" takes the root of J(gamma) = d sigma_{k-1}^2 nearest to 1 (gamma_raw when J never gets down
to the floor). Both are defined in EDM coordinates.

The safeguards are an ordered table of named gamma transforms (:data:`GAMMA_TRANSFORMS`), each applied
when the config asks for it; a new rule is one function and one entry. The divergence div_x T comes from
:mod:`steindiff.correction.divergence`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from steindiff.correction.divergence import PROBE_PRODUCTS, DivergenceEstimate, ProbeKind, ProbeProducts
from steindiff.limits import Limits

__all__ = [
    "CUSTOM_VARIANT",
    "DEFAULT_VARIANT",
    "GAMMA_TRANSFORMS",
    "PROBE_PRODUCTS",
    "SAFEGUARDS",
    "STEIN_VARIANTS",
    "VANILLA",
    "Coords",
    "GammaContext",
    "GammaTransform",
    "GammaVariant",
    "ProbeKind",
    "ProbeProducts",
    "SteinConfig",
    "SteinStats",
    "combine",
    "noise_level_gamma",
    "stein_config",
    "stein_update",
    "vp_alpha",
]

NoiseLevel = Literal["off", "cap", "match"]
#: the coordinates the convex combination is taken in
Coords = Literal["edm", "vp"]
#: one coefficient from batch means, or one a sample
GammaVariant = Literal["batch", "per_sample"]


@dataclass(frozen=True)
class SteinConfig:
    """Settings of the correction.

    gamma_min, gamma_max: the clip; gamma_max = inf is the paper's literal rule (only a lower clip).
    probes: Hutchinson probes K per step (the paper used 5).
    probe: "rademacher" (lower variance), "gaussian" (the paper's), or "exact" (trace by d VJPs).
    products: how each probe's v^T J v is computed. "vjp": a VJP through the step (the paper's; K
        backward passes); "vjp-batched": all K VJPs in one vectorised backward (``is_grads_batched``),
        the same estimate at a different speed; "fd": a forward difference v^T (T(x + h v) - T(x)) / h
        (:func:`steindiff.correction.divergence.fd_step`), the K perturbed states evaluated in the step's own
        network calls (one batch of (K + 1) B samples): no backward pass, no extra NFE, and close to the
        VJP's estimate with the same probes (measured: see docs/design.md). "exact" probes need a VJP mode.
    coords: "edm" or "vp", the coordinates the convex combination is taken in.
    variant: "batch" (the paper's batch means) or "per_sample" (each sample its own gamma; noisy).
    apply: False observes only: every statistic is computed and recorded, but gamma = 1 is used.
    noise_level: "off", "cap" (safeguard) or "match" (SC design B): see the module docstring.
    max_gamma_se: fall back to gamma = 1 (the solver's own step) when the standard error of the batch
        estimate gamma_raw (over the samples of the batch, probe noise included) exceeds this.
    lookahead: SC design A, the step map T_SC with the look-ahead evaluation (``solvers.with_lookahead``).
    trust_region: gamma_bound = sigma_k / (sigma_k - sigma_{k-1}) takes an Euler step onto D(x_k), the
        posterior mean: the ideal-denoiser optimum (1 into sigma = 0), which the rule reproduces on the
        true marginal. gamma_raw up to 2 standard errors above it is clipped to it; further above, the
        rule's premise (x_k on its marginal) has failed, and the solver's own step (gamma = 1) is used.
    """

    gamma_min: float = 0.1
    gamma_max: float = math.inf
    probes: int = 5
    probe: ProbeKind = "rademacher"
    products: ProbeProducts = "vjp"
    coords: Coords = "edm"
    variant: GammaVariant = "batch"
    apply: bool = True
    noise_level: NoiseLevel = "off"
    max_gamma_se: float = math.inf
    lookahead: bool = False
    trust_region: bool = False

    def __post_init__(self) -> None:
        if math.isnan(self.gamma_min) or math.isnan(self.gamma_max):
            raise ValueError("gamma_min and gamma_max must not be NaN")
        if self.gamma_min > self.gamma_max:
            raise ValueError(f"gamma_min ({self.gamma_min}) must not exceed gamma_max ({self.gamma_max})")
        if not 1 <= self.probes <= Limits.max_probes:
            raise ValueError(f"probes must be between 1 and {Limits.max_probes}, got {self.probes}")
        if self.probe not in ("rademacher", "gaussian", "exact"):
            raise ValueError(f"probe must be 'rademacher', 'gaussian' or 'exact', got {self.probe!r}")
        if self.products not in PROBE_PRODUCTS:
            raise ValueError(f"products must be one of {', '.join(PROBE_PRODUCTS)}, got {self.products!r}")
        if self.probe == "exact" and self.products == "fd":
            raise ValueError("the exact trace takes d VJPs: use products 'vjp' with probe 'exact'")
        if self.coords not in get_args(Coords):
            raise ValueError(f"coords must be 'edm' or 'vp', got {self.coords!r}")
        if self.variant not in get_args(GammaVariant):
            raise ValueError(f"variant must be 'batch' or 'per_sample', got {self.variant!r}")
        if self.noise_level not in ("off", "cap", "match"):
            raise ValueError(f"noise_level must be 'off', 'cap' or 'match', got {self.noise_level!r}")
        if (self.noise_level != "off" or self.trust_region) and self.coords != "edm":
            raise ValueError("the noise-level rules and the trust region are defined in EDM coordinates")
        if not self.max_gamma_se > 0:
            raise ValueError(f"max_gamma_se must be > 0, got {self.max_gamma_se}")


#: the safeguards of the "safe" variants: extrapolate only (gamma >= 1), never below the next noise level's
#: floor nor past the posterior mean, and the solver's own step when the batch estimate is too noisy
SAFEGUARDS: dict = {"gamma_min": 1.0, "noise_level": "cap", "trust_region": True, "max_gamma_se": 0.5}

#: named settings of the correction for the CLI, the benchmark and the app (probes are set separately)
STEIN_VARIANTS: dict[str, dict] = {
    "stein": {"gamma_max": math.inf},  # the paper's literal rule: gamma clipped below at 0.1 only
    "stein-cap1": {"gamma_max": 1.0},  # gamma in [0.1, 1]: never extrapolates past the solver
    "stein-safe": SAFEGUARDS,
    "sc-noise": {"noise_level": "match"},  # SC design B: gamma puts the state at the next noise level
    "sc-lookahead": {**SAFEGUARDS, "lookahead": True},  # SC design A (look-ahead map), with the safeguards
}
#: the variant the app and the CLI start with, chosen by the benchmark (docs/results.md)
DEFAULT_VARIANT = "sc-lookahead"
#: the rule name that takes the clip from explicit gamma_min and gamma_max, with no safeguard
CUSTOM_VARIANT = "custom"


#: the name the benchmark and the cost table give the uncorrected solver
VANILLA = "vanilla"


def stein_config(
    rule: str, *, gamma_min: float = 0.1, gamma_max: float = math.inf, **settings: Any
) -> SteinConfig | None:
    """The correction a rule name stands for: the one path from a name to a config, for the app, the CLI and
    the benchmark.

    Arguments:
        rule: a name of :data:`STEIN_VARIANTS`, :data:`CUSTOM_VARIANT` (the clip ``[gamma_min, gamma_max]``
            with no safeguard) or :data:`VANILLA`.
        gamma_min, gamma_max: the custom rule's clip; the named rules bring their own.
        settings: the remaining :class:`SteinConfig` fields (probes, probe, products, coords, variant).

    Returns:
        The validated config, or None for :data:`VANILLA`. ValueError names an unknown rule or a bad setting.
    """
    if rule == VANILLA:
        return None
    if rule == CUSTOM_VARIANT:
        return SteinConfig(gamma_min=gamma_min, gamma_max=gamma_max, **settings)
    if rule not in STEIN_VARIANTS:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join([*STEIN_VARIANTS, CUSTOM_VARIANT])}")
    return SteinConfig(**{**STEIN_VARIANTS[rule], **settings})


@dataclass(frozen=True)
class SteinStats:
    """What the correction computed at one step (batch means in the chosen coordinates).

    For the per-sample variant, gamma_raw and gamma are medians over the batch and the per-sample
    values are in gamma_per_sample.
    """

    gamma_raw: float
    gamma: float
    s_xu: float
    s_uu: float
    s_div: float
    s_div_se: float
    gamma_se: float = math.nan
    gamma_per_sample: torch.Tensor | None = None
    #: the coefficient actually used, a 0-d or (B,) tensor, and the factor on x_k in EDM coordinates
    applied: torch.Tensor | None = None
    scale: float = 1.0


def vp_alpha(sigma: float) -> float:
    """VP scale alpha = (1 + sigma^2)^(-1/2) of the EDM noise level sigma."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def _ratio_se(numerators: torch.Tensor, denominators: torch.Tensor, ratio: torch.Tensor) -> float:
    """Standard error of the ratio of batch means sum(a_i) / sum(c_i) (delta method), NaN for B < 2."""
    if numerators.numel() < 2 or not bool(torch.isfinite(ratio)):
        return math.nan
    influence = numerators - ratio * denominators
    return float(influence.std() / math.sqrt(numerators.numel()) / denominators.mean())


def noise_level_gamma(
    gamma_raw: torch.Tensor, c: torch.Tensor, dim: int, sigma: float, sigma_next: float, mode: NoiseLevel
) -> torch.Tensor:
    """gamma under the noise-level rule ("cap" or "match"; module docstring), from gamma_raw = b / c.

    Roots of J(gamma) = d sigma_{k-1}^2, i.e. c gamma^2 - 2 b gamma + d (sigma_k^2 - sigma_{k-1}^2) = 0.
    Where J never reaches the floor (no real root) both modes keep gamma_raw; "cap" also keeps 1 when the
    solver's own step is already at or below the floor. An undefined gamma_raw (c = 0) stays undefined.
    """
    b = gamma_raw * c
    gap = dim * (sigma**2 - sigma_next**2)
    disc = b * b - c * gap
    root = disc.clamp(min=0).sqrt()
    low, high = (b - root) / c, (b + root) / c
    nearest = torch.where((low - 1).abs() <= (high - 1).abs(), low, high)
    reaches = disc > 0
    if mode == "match":
        return torch.where(reaches, nearest, gamma_raw)
    solver_below = gap - 2 * b + c <= 0  # J(1) <= d sigma_{k-1}^2
    capped = torch.where(solver_below, torch.ones_like(gamma_raw), nearest)
    return torch.where(reaches, capped, gamma_raw)


@dataclass(frozen=True)
class GammaContext:
    """What a gamma transform may read besides gamma: the rule's statistics at this step.

    gamma_raw: the rule's estimate b / c (0-d, or (B,) for the per-sample variant; NaN where u = 0).
    c: its denominator, the mean (or per-sample) ||u||^2, shaped like gamma_raw.
    dim: the dimension d of a sample.
    sigma, sigma_next: the step's noise levels sigma_k, sigma_{k-1}.
    gamma_se: the standard error of the batch estimate gamma_raw (NaN for the per-sample variant or B < 2).
    config: the correction's settings.
    """

    gamma_raw: torch.Tensor
    c: torch.Tensor
    dim: int
    sigma: float
    sigma_next: float
    gamma_se: float
    config: SteinConfig


@dataclass(frozen=True)
class GammaTransform:
    """One named step of the safeguards: where ``applies(config)``, gamma becomes ``apply(gamma, context)``."""

    name: str
    applies: Callable[[SteinConfig], bool]
    apply: Callable[[torch.Tensor, GammaContext], torch.Tensor]


def _noise_level(gamma: torch.Tensor, ctx: GammaContext) -> torch.Tensor:
    """The noise-level rule ("cap" or "match"), from the statistics b = gamma_raw c and c (first in the table,
    where gamma is still gamma_raw)."""
    return noise_level_gamma(ctx.gamma_raw, ctx.c, ctx.dim, ctx.sigma, ctx.sigma_next, ctx.config.noise_level)


def _trust_region(gamma: torch.Tensor, ctx: GammaContext) -> torch.Tensor:
    """gamma clipped to gamma_bound = sigma_k / (sigma_k - sigma_{k-1}) (the Euler step onto D(x_k)), or 1
    where gamma_raw exceeds it by more than 2 standard errors (NaN stays)."""
    bound = ctx.sigma / (ctx.sigma - ctx.sigma_next)
    se = 0.0 if math.isnan(ctx.gamma_se) else ctx.gamma_se
    inconsistent = ctx.gamma_raw > bound + 2 * se
    return torch.where(inconsistent, torch.ones_like(gamma), gamma.clamp(max=bound))


def _clip(gamma: torch.Tensor, ctx: GammaContext) -> torch.Tensor:
    """clip(gamma, gamma_min, gamma_max); an undefined gamma (0/0: u = 0, or a NaN state) keeps the candidate (1)."""
    clipped = gamma.clamp(ctx.config.gamma_min, ctx.config.gamma_max)
    return torch.where(torch.isnan(gamma), torch.ones_like(gamma), clipped)


def _solver_step(gamma: torch.Tensor, ctx: GammaContext) -> torch.Tensor:
    """gamma = 1: the solver's own step."""
    return torch.ones_like(ctx.gamma_raw)


def _noise_fallback(gamma: torch.Tensor, ctx: GammaContext) -> torch.Tensor:
    """The solver's own step when the batch estimate's standard error exceeds ``max_gamma_se``."""
    return _solver_step(gamma, ctx) if ctx.gamma_se > ctx.config.max_gamma_se else gamma


#: the safeguards in the order they apply to gamma_raw; the last word is gamma = 1 for a run that only observes
GAMMA_TRANSFORMS: tuple[GammaTransform, ...] = (
    GammaTransform("noise_level", lambda config: config.noise_level != "off", _noise_level),
    GammaTransform("trust_region", lambda config: config.trust_region, _trust_region),
    GammaTransform("clip", lambda config: True, _clip),
    GammaTransform("max_gamma_se", lambda config: config.max_gamma_se < math.inf, _noise_fallback),
    GammaTransform("observe_only", lambda config: not config.apply, _solver_step),
)


def stein_update(
    x: torch.Tensor,
    t: torch.Tensor,
    div_t: DivergenceEstimate,
    sigma: float,
    sigma_next: float,
    config: SteinConfig,
) -> tuple[torch.Tensor, SteinStats]:
    """The corrected state x_{k-1} from x_k, the solver's candidate T(x_k) and div_x T (the paper's Algorithm 1).

    With u = x_k - T(x_k) in the chosen coordinates and Stein's identity for x_k | x* ~ N(alpha x*, sigma^2 I):

        gamma_raw = [(1 - 1/alpha) mean <u, x_k> + (sigma^2 / alpha) mean div u] / mean ||u||^2   (gamma* via Stein)

    with div u = d - div_x T (times alpha_{k-1} / alpha_k in VP coordinates). gamma_raw then goes through the
    safeguards of :data:`GAMMA_TRANSFORMS` that ``config`` asks for, in order, and the state is
    :func:`combine`'s. gamma = 1 returns ``t`` bit for bit.

    Arguments:
        x: the state x_k, (B, ...), in EDM coordinates.
        t: the candidate T(x_k), (B, ...), detached.
        div_t: div_x T per sample, (B,).
        sigma, sigma_next: the step's noise levels sigma_k > sigma_{k-1} (EDM).
        config: the correction's settings.

    Returns:
        x_{k-1}, (B, ...) in EDM coordinates, and the statistics of the step.
    """
    dim = x[0].numel()
    if config.coords == "vp":
        alpha, alpha_next = vp_alpha(sigma), vp_alpha(sigma_next)
        # x_vp = alpha x and T_vp(x_vp) = alpha' T(x_vp / alpha), so d T_vp / d x_vp = (alpha' / alpha) dT/dx.
        scale, div_scale, sigma_c, alpha_c = alpha / alpha_next, alpha_next / alpha, alpha * sigma, alpha
        x_c, t_c = alpha * x.to(torch.float64), alpha_next * t.to(torch.float64)
    else:
        scale, div_scale, sigma_c, alpha_c = 1.0, 1.0, sigma, 1.0
        x_c, t_c = x.to(torch.float64), t.to(torch.float64)
    div_u = dim - div_scale * div_t.per_sample
    u = (x_c - t_c).flatten(1)
    xu, uu = (u * x_c.flatten(1)).sum(1), (u * u).sum(1)
    drift, geometric = 1 - 1 / alpha_c, sigma_c**2 / alpha_c
    if config.variant == "per_sample":
        gamma_raw, c = (drift * xu + geometric * div_u) / uu, uu
        gamma_se = math.nan
    else:
        gamma_raw, c = (drift * xu.mean() + geometric * div_u.mean()) / uu.mean(), uu.mean()
        gamma_se = _ratio_se(drift * xu + geometric * div_u, uu, gamma_raw)
    gamma_raw = torch.where(c > 0, gamma_raw, torch.full_like(gamma_raw, math.nan))  # u = 0: undefined
    context = GammaContext(gamma_raw, c, dim, sigma, sigma_next, gamma_se, config)
    gamma = gamma_raw
    for transform in GAMMA_TRANSFORMS:
        if transform.applies(config):
            gamma = transform.apply(gamma, context)
    per_sample = gamma.ndim == 1
    x_next = combine(x, t, gamma, scale)
    stats = SteinStats(
        gamma_raw=float(gamma_raw.median()) if per_sample else float(gamma_raw),
        gamma=float(gamma.median()) if per_sample else float(gamma),
        s_xu=float(xu.mean()),
        s_uu=float(uu.mean()),
        s_div=float(div_u.mean()),
        s_div_se=div_t.batch_se * div_scale,
        gamma_se=gamma_se,
        gamma_per_sample=gamma.cpu() if per_sample else None,
        applied=gamma,
        scale=scale,
    )
    return x_next, stats


def combine(x: torch.Tensor, t: torch.Tensor, gamma: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x_{k-1} = (1 - gamma) scale x_k + gamma T(x_k): the paper's update (Algorithm 1, the convex
    combination), in EDM coordinates. gamma = 1 returns ``t`` exactly.

    Arguments:
        x: the state x_k, (B, ...).
        t: the candidate T(x_k), (B, ...).
        gamma: the coefficient, 0-d or per sample (B,).
        scale: alpha_k / alpha_{k-1} when the combination is taken in VP coordinates, else 1.

    Returns:
        x_{k-1}, (B, ...), in the dtype of ``x``.
    """
    g = gamma.to(x.dtype)
    if g.ndim == 1:
        g = g.reshape(-1, *([1] * (x.ndim - 1)))
    return (1 - g) * (scale * x) + g * t

"""ODE solver steps in EDM coordinates, each a pure map T(x_k; history).

A step goes from ``sigmas[k]`` to ``sigmas[k + 1]``. Its only inputs that depend on the state are
``x`` and the denoiser calls it makes; ``history`` (earlier denoiser outputs, newest first) is held
fixed and detached by the caller. That makes dT/dx, and so the divergence of the residual
u = x - T(x) and the local Lipschitz constant of the step, well defined and computable by autograd.

Notation: lambda = -log sigma (half log-SNR), h = lambda_{k+1} - lambda_k, e^{-h} = sigma_{k+1}/sigma_k.
All steps share the exact linear part (sigma_{k+1}/sigma_k) x: dT/dx = (sigma_{k+1}/sigma_k) I + (terms in dD/dx).

Every step function has the signature of :attr:`SolverSpec.step`:

    Arguments:
        denoise: the denoiser, called as ``denoise(x, sigma)`` with x (B, ...) and sigma a 0-d tensor; for a
            conditional model, the conditioning of x's rows is bound to it (``denoisers.base.bind_cond``).
        x: the state x_k at ``sigmas[k]``, (B, ...).
        sigmas: the grid sigma_0 > ... > sigma_N >= 0.
        k: the step, from ``sigmas[k]`` to ``sigmas[k + 1]``.
        history: the earlier denoiser outputs the step reuses, newest first, each (B, ...) (empty at the start).
        options: the solver's options.

    Returns:
        A :class:`StepResult`: T(x_k) (B, ...), the x0 prediction of this step (B, ...), the next history and
        the look-ahead point (B, ...) or None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from steindiff.denoisers.base import DenoiseFn

__all__ = [
    "SOLVERS",
    "SolverOptions",
    "SolverSpec",
    "StepResult",
    "ddim_step",
    "dpmpp_2m_step",
    "dpmpp_3m_step",
    "get_solver",
    "heun_step",
    "unipc_step",
    "with_lookahead",
]

History = tuple[torch.Tensor, ...]


class StepResult(NamedTuple):
    """What one step returns: the candidate T(x_k), the x0 prediction it made at this step, the next history,
    and, where the next history's newest output is a look-ahead evaluation (UniPC, the look-ahead corrector),
    the point it was evaluated at (at the next step's noise level; None otherwise)."""

    x_next: torch.Tensor
    denoised: torch.Tensor
    history: History
    ahead_point: torch.Tensor | None = None


@dataclass(frozen=True)
class SolverOptions:
    """Low-NFE practices of the reference codes, as options.

    lower_order_final: cap the order of multistep solvers by the number of steps left
        (the last step first order, the one before at most second order), as dpm-solver and
        diffusers do for short schedules. A step into sigma = 0 is always first order (h = inf).
    unipc_order: order p of UniPC's predictor (its corrector then has order p + 1).
    unipc_variant: B(h) = -h ("bh1") or expm1(-h) ("bh2").
    unipc_corrector: apply UniC (free: it reuses the evaluation that the next step needs anyway).
    dpmpp_3m_d2_weight: weight w of the second-difference term -w phi_3 D2 of DPM-Solver++(3M).
        1 is the reference codes' formula (dpm-solver, diffusers, k-diffusion); as D2 estimates
        h^2 x''/2 and the variation-of-constants integral needs -phi_3 h^2 x'', that step is only
        second-order accurate (measured: global order 2 even from exact starting values).
        2 makes it third order (measured slope 3.0).
    """

    lower_order_final: bool = True
    unipc_order: int = 2
    unipc_variant: Literal["bh1", "bh2"] = "bh2"
    unipc_corrector: bool = True
    dpmpp_3m_d2_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.unipc_order not in (1, 2, 3):
            raise ValueError(f"unipc_order must be 1, 2 or 3, got {self.unipc_order}")
        if self.unipc_variant not in ("bh1", "bh2"):
            raise ValueError(f"unipc_variant must be 'bh1' or 'bh2', got {self.unipc_variant!r}")


def _lam(sigma: float) -> float:
    """Half log-SNR in EDM coordinates, lambda = -log sigma (+inf at sigma = 0)."""
    return -math.log(sigma) if sigma > 0 else math.inf


def _sig(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(sigma, dtype=x.dtype, device=x.device)


def _multistep_order(max_order: int, available: int, k: int, sigmas: Sequence[float], options: SolverOptions) -> int:
    """Warm-up (order <= number of stored outputs), first order into sigma = 0, optional lower order at the end."""
    order = min(max_order, available)
    if sigmas[k + 1] == 0:
        order = 1
    if options.lower_order_final:
        order = min(order, len(sigmas) - 1 - k)
    return order


def ddim_step(
    denoise: DenoiseFn, x: torch.Tensor, sigmas: Sequence[float], k: int, history: History, options: SolverOptions
) -> StepResult:
    """DDIM = DPM-Solver-1 = Euler in EDM coordinates (Song et al. 2021, Eq. 12; Lu et al. 2022b, Eq. 9):
    T(x) = (sigma'/sigma) x + (1 - sigma'/sigma) D(x, sigma). One network call; no history.

    Arguments:
        denoise: D(x, sigma), the conditioning of x's rows bound.
        x: the state x_k, (B, ...).
        sigmas: the grid; the step goes from ``sigmas[k]`` to ``sigmas[k + 1]``.
        k: the step.
        history: unused (DDIM keeps none).
        options: unused.

    Returns:
        T(x_k) and D(x_k, sigma_k), each (B, ...), and an empty history.
    """
    sigma, sigma_next = sigmas[k], sigmas[k + 1]
    denoised = denoise(x, _sig(sigma, x))
    ratio = sigma_next / sigma
    return StepResult(ratio * x + (1 - ratio) * denoised, denoised, ())


def _dpmpp_multistep(max_order: int, name: str):
    def step(
        denoise: DenoiseFn, x: torch.Tensor, sigmas: Sequence[float], k: int, history: History, options: SolverOptions
    ) -> StepResult:
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        denoised = denoise(x, _sig(sigma, x))
        outputs = (denoised, *history)  # outputs[i] was evaluated at sigmas[k - i]
        order = _multistep_order(max_order, len(outputs), k, sigmas, options)
        lam = _lam(sigma)
        h = _lam(sigma_next) - lam
        phi_1 = math.expm1(-h)
        x_next = (sigma_next / sigma) * x - phi_1 * denoised  # DPM-Solver++(1), Lu et al. 2022b, Eq. 9
        if order >= 2:
            r0 = (lam - _lam(sigmas[k - 1])) / h
            d1_0 = (denoised - outputs[1]) / r0
            if order == 2:
                # DPM-Solver++(2M), Lu et al. 2022b, Algorithm 2 (multistep midpoint form)
                x_next = x_next - 0.5 * phi_1 * d1_0
            else:
                # DPM-Solver++(3M), dpm-solver's multistep third-order update (Lu et al. 2022b, App. B)
                r1 = (_lam(sigmas[k - 1]) - _lam(sigmas[k - 2])) / h
                d1_1 = (outputs[1] - outputs[2]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = phi_1 / h + 1
                phi_3 = phi_2 / h - 0.5
                x_next = x_next + phi_2 * d1 - options.dpmpp_3m_d2_weight * phi_3 * d2
        return StepResult(x_next, denoised, outputs[: max_order - 1])

    step.__name__ = name
    step.__doc__ = f"""DPM-Solver++({max_order}M) in EDM coordinates (data prediction, multistep; Lu et al. 2022b,
    Algorithm 2 and App. B): x_{{k+1}} = e^{{-h}} x_k - expm1(-h) D_k plus the divided differences of the stored
    outputs, of order up to {max_order} (lower at the start, into sigma = 0 and with ``lower_order_final``).

    Arguments:
        denoise: D(x, sigma), the conditioning of x's rows bound.
        x: the state x_k, (B, ...).
        sigmas: the grid; the step goes from ``sigmas[k]`` to ``sigmas[k + 1]``.
        k: the step.
        history: the earlier outputs D_{{k-1}}, ..., newest first, each (B, ...).
        options: ``lower_order_final`` and, for 3M, ``dpmpp_3m_d2_weight``.

    Returns:
        T(x_k) and D(x_k, sigma_k), each (B, ...), and the next history (the newest {max_order - 1} outputs).
    """
    return step


dpmpp_2m_step = _dpmpp_multistep(2, "dpmpp_2m_step")
dpmpp_3m_step = _dpmpp_multistep(3, "dpmpp_3m_step")


def _unipc_coefficients(
    h: float, rks: Sequence[float], order: int, variant: str
) -> tuple[list[float], list[float], float, float]:
    """UniPC's predictor and corrector weights (Zhao et al. 2023, Algorithms 2-3, Eq. 8 with B(h)).

    ``rks`` are r_i = (lambda_{k-i} - lambda_k) / h for i = 1..order-1. Returns
    (rhos_p, rhos_c, B(h), expm1(-h)).
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    if order == 1:
        return [], [0.5], b_h, h_phi_1
    nodes = torch.tensor([*rks, 1.0], dtype=torch.float64)
    rows, rhs = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rows.append(nodes ** (i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    system, rhs_t = torch.stack(rows), torch.tensor(rhs, dtype=torch.float64)
    rhos_p = [0.5] if order == 2 else torch.linalg.solve(system[:-1, :-1], rhs_t[:-1]).tolist()
    rhos_c = torch.linalg.solve(system, rhs_t).tolist()
    return rhos_p, rhos_c, b_h, h_phi_1


def unipc_step(
    denoise: DenoiseFn, x: torch.Tensor, sigmas: Sequence[float], k: int, history: History, options: SolverOptions
) -> StepResult:
    """UniPC (Zhao et al. 2023): UniP-p predictor, one evaluation, UniC-p corrector, as one map.

    The state x is the corrected state; history[0] = D(x^p_k) was evaluated at the previous
    predictor point and is frozen. So T(x) = UniC(x; D(UniP(x))) depends on x through the identity
    part and through the one evaluation at the new predictor point (which the next step reuses as its
    m0: no extra NFE). At the first step there is no m0 yet and D(x) is evaluated here (2 NFE);
    the last step has no corrector and no evaluation (0 NFE): N steps cost N NFE in all.

    Arguments:
        denoise: D(x, sigma), the conditioning of x's rows bound.
        x: the (corrected) state x_k, (B, ...).
        sigmas: the grid; the step goes from ``sigmas[k]`` to ``sigmas[k + 1]``.
        k: the step.
        history: D at the previous predictor points, newest first, each (B, ...) (empty at the first step).
        options: ``unipc_order``, ``unipc_variant``, ``unipc_corrector``, ``lower_order_final``.

    Returns:
        T(x_k) (UniC-p after UniP-p, Eq. 8), the newest output m_new (B, ...), the next history and the
        predictor point x^p_{k+1} (B, ...) where m_new was evaluated (None at the last step).
    """
    sigma, sigma_next = sigmas[k], sigmas[k + 1]
    outputs = history if history else (denoise(x, _sig(sigma, x)),)
    m0 = outputs[0]
    order = _multistep_order(options.unipc_order, len(outputs), k, sigmas, options)
    lam = _lam(sigma)
    h = _lam(sigma_next) - lam
    rks = [(_lam(sigmas[k - i]) - lam) / h for i in range(1, order)]
    rhos_p, rhos_c, b_h, h_phi_1 = _unipc_coefficients(h, rks, order, options.unipc_variant)
    d1s = [(outputs[i] - m0) / rks[i - 1] for i in range(1, order)]
    base = (sigma_next / sigma) * x - h_phi_1 * m0
    x_pred = base - b_h * sum(rho * d for rho, d in zip(rhos_p, d1s, strict=True)) if d1s else base
    if k == len(sigmas) - 2:
        return StepResult(x_pred, m0, outputs)
    m_new = denoise(x_pred, _sig(sigma_next, x))
    keep = (m_new, *outputs)[: options.unipc_order]
    if not options.unipc_corrector:
        return StepResult(x_pred, m_new, keep, x_pred)
    correction = sum(rho * d for rho, d in zip(rhos_c[:-1], d1s, strict=True)) + rhos_c[-1] * (m_new - m0)
    return StepResult(base - b_h * correction, m_new, keep, x_pred)


def heun_step(
    denoise: DenoiseFn, x: torch.Tensor, sigmas: Sequence[float], k: int, history: History, options: SolverOptions
) -> StepResult:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1, S_churn = 0):
    Euler d = (x - D(x, sigma))/sigma, then the trapezoid correction unless sigma' = 0 (2 NFE, last step 1).

    Arguments:
        denoise: D(x, sigma), the conditioning of x's rows bound.
        x: the state x_k, (B, ...).
        sigmas: the grid; the step goes from ``sigmas[k]`` to ``sigmas[k + 1]``.
        k: the step.
        history: unused (Heun keeps none).
        options: unused.

    Returns:
        T(x_k) and D(x_k, sigma_k), each (B, ...), and an empty history.
    """
    sigma, sigma_next = sigmas[k], sigmas[k + 1]
    denoised = denoise(x, _sig(sigma, x))
    slope = (x - denoised) / sigma
    x_euler = x + (sigma_next - sigma) * slope
    if sigma_next == 0:
        return StepResult(x_euler, denoised, ())
    slope_next = (x_euler - denoise(x_euler, _sig(sigma_next, x))) / sigma_next
    return StepResult(x + (sigma_next - sigma) * 0.5 * (slope + slope_next), denoised, ())


StepFn = Callable[[DenoiseFn, torch.Tensor, Sequence[float], int, History, SolverOptions], StepResult]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its step map, its NFE for a number of steps, and a description.

    ``step(denoise, x, sigmas, k, history, options) -> StepResult`` is the pure map T(x_k; history) from
    ``sigmas[k]`` to ``sigmas[k + 1]`` (the arguments and result in the module docstring): x (B, ...), the
    history's outputs (B, ...) each, held fixed; ``denoise(x, sigma)`` carries the rows' conditioning.
    """

    name: str
    step: StepFn
    description: str
    evals_per_step: int = 1
    #: the step already evaluates the denoiser at a look-ahead point and corrects with it (UniPC, Heun)
    looks_ahead: bool = False
    #: the step's only network call is D(x, sigma_k) at its input x, so T(x) = a x + b D(x, sigma_k) + (terms in
    #: the history) and dT/dx = a I + b dD/dx (DDIM, DPM-Solver++): the Lipschitz diagnostics estimate the
    #: denoiser along the step, from the same calls (``step_lipschitz``)
    one_call_at_input: bool = False

    def nfe(self, steps: int) -> int:
        """NFE of ``steps`` steps ending at sigma = 0 (Heun: 2 per step, 1 for the last)."""
        return self.evals_per_step * steps - (self.evals_per_step - 1)

    def steps_for_nfe(self, nfe: int) -> int:
        """The most steps whose NFE fits in ``nfe``."""
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        return (nfe + self.evals_per_step - 1) // self.evals_per_step


SOLVERS: dict[str, SolverSpec] = {
    spec.name: spec
    for spec in (
        SolverSpec("ddim", ddim_step, "DDIM = DPM-Solver-1 = Euler in EDM coordinates", one_call_at_input=True),
        SolverSpec("dpmpp_2m", dpmpp_2m_step, "DPM-Solver++(2M), multistep, 1 NFE a step", one_call_at_input=True),
        SolverSpec("dpmpp_3m", dpmpp_3m_step, "DPM-Solver++(3M), multistep, 1 NFE a step", one_call_at_input=True),
        SolverSpec("unipc", unipc_step, "UniPC (predictor + corrector, no extra NFE)", looks_ahead=True),
        SolverSpec("heun", heun_step, "EDM Heun: 2 NFE a step, 1 for the last", evals_per_step=2, looks_ahead=True),
    )
}
SOLVERS["euler"] = SolverSpec(
    "euler", ddim_step, "Euler in EDM coordinates (the same map as DDIM)", one_call_at_input=True
)


def _lookahead(base: StepFn, weight: float) -> StepFn:
    def step(
        denoise: DenoiseFn, x: torch.Tensor, sigmas: Sequence[float], k: int, history: History, options: SolverOptions
    ) -> StepResult:
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        if history:  # history[0] = D(x~_k), the previous step's look-ahead evaluation, stands in for D(x_k)
            ahead = history[0]
            predicted = base(lambda _x, _s: ahead, x, sigmas, k, history[1:], options)
        else:
            predicted = base(denoise, x, sigmas, k, (), options)
        if sigma_next == 0:
            return predicted
        d_ahead = denoise(predicted.x_next, _sig(sigma_next, x))
        x_next = predicted.x_next + weight * (1 - sigma_next / sigma) * (d_ahead - predicted.denoised)
        return StepResult(x_next, predicted.denoised, (d_ahead, *predicted.history), predicted.x_next)

    return step


def with_lookahead(spec: SolverSpec, weight: float = 0.5) -> SolverSpec:
    """SC design A: the solver's step followed by a look-ahead correction, at no extra NFE.

    With P the solver's own step (its m0 the previous look-ahead evaluation, as in UniPC):
        x~ = P(x_k),   T_SC(x_k) = x~ + w (1 - sigma'/sigma) (D(x~; sigma') - m0)
    i.e. e^{-h} x_k + (1 - e^{-h}) [(1 - w) m0 + w D(x~)] plus P's multistep terms: for DDIM and w = 1/2
    the trapezoid rule, which is UniC-1 (Zhao et al. 2023, Eq. 8 with B(h) = expm1(-h)). D(x~; sigma') is
    the next step's m0, so N steps cost N NFE (2 at the first step, none at the last, where T_SC = P).
    Solvers that already correct with a look-ahead evaluation (UniPC, Heun) are returned unchanged.
    """
    if spec.looks_ahead:
        return spec
    return SolverSpec(
        f"{spec.name}+lookahead",
        _lookahead(spec.step, weight),
        f"{spec.description}, with a look-ahead corrector (weight {weight})",
        looks_ahead=True,
    )


#: the look-ahead corrector alone (SC design A at gamma = 1): beside `sc-lookahead` on the plain solver, it
#: shows what the Stein coefficient adds to the corrector (where gamma stays at 1 the two are the same run)
SOLVERS.update({f"{name}+lookahead": with_lookahead(SOLVERS[name]) for name in ("ddim", "dpmpp_2m", "dpmpp_3m")})


def get_solver(name: str) -> SolverSpec:
    """The solver registered as ``name``."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose from {', '.join(SOLVERS)}")
    return SOLVERS[name]

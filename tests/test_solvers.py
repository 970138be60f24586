import math

import pytest
import torch

from steindiff import SolverOptions, get_solver, initial_noise, load_model, sample
from steindiff.denoisers import CountingDenoiser
from steindiff.diagnostics.reference import reference_trajectory
from steindiff.schedules import make_sigmas

EXPECTED_ORDER = {"ddim": 1, "dpmpp_2m": 2, "unipc": 3, "heun": 2}


def _log_grid(n, high=5.0, low=0.2):
    return torch.exp(torch.linspace(math.log(high), math.log(low), n + 1, dtype=torch.float64)).tolist()


@pytest.fixture(scope="module")
def ring_problem():
    model = load_model("gmm-ring")
    x = initial_noise(64, model.event_shape, 5.0, seed=0, dtype=torch.float64)
    target = reference_trajectory(model, x, [5.0, 0.2], max_log_step=0.002)[-1]
    return model, x, target


def _error(model, x, target, solver, n):
    run = sample(model, x, _log_grid(n), solver, options=SolverOptions(lower_order_final=False))
    return float((run.samples - target).norm(dim=1).mean())


@pytest.mark.parametrize("solver", list(EXPECTED_ORDER))
def test_converges_to_the_exact_solution_at_its_order(ring_problem, solver):
    """UniPC is order p + 1 = 3 with its corrector; the slope is measured between 16 and 64 steps."""
    model, x, target = ring_problem
    errors = [_error(model, x, target, solver, n) for n in (16, 64)]
    slope = math.log(errors[0] / errors[1]) / math.log(4)
    assert errors[1] < 1e-2
    assert abs(slope - EXPECTED_ORDER[solver]) < 0.25, (errors, slope)


def _dpmpp_3m_slope_from_exact_start(model, x, d2_weight):
    """Order of the 3M multistep with exact history (the first-order warm-up taken out)."""
    step = get_solver("dpmpp_3m").step
    options = SolverOptions(lower_order_final=False, dpmpp_3m_d2_weight=d2_weight)
    errors = []
    for n in (32, 64):
        grid = _log_grid(n)
        ref = reference_trajectory(model, x, grid, max_log_step=0.002)
        history = tuple(model(ref[i], torch.tensor(grid[i], dtype=torch.float64)) for i in (1, 0))
        state = ref[2]
        for k in range(2, n):
            result = step(model, state, grid, k, history, options)
            state, history = result.x_next, result.history
        errors.append(float((state - ref[-1]).norm(dim=1).mean()))
    return math.log(errors[0] / errors[1]) / math.log(2)


@pytest.mark.slow
def test_dpmpp_3m_order_reference_formula_and_taylor_weight(ring_problem):
    """The reference codes' 3M update is second order; weight 2 on its D2 term makes it third order."""
    model, x, _ = ring_problem
    assert abs(_dpmpp_3m_slope_from_exact_start(model, x, 1.0) - 2) < 0.4
    assert abs(_dpmpp_3m_slope_from_exact_start(model, x, 2.0) - 3) < 0.25


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "heun"])
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 10])
def test_nfe_is_counted_and_matches_the_budget(solver, nfe):
    spec = get_solver(solver)
    model = CountingDenoiser(load_model("gmm-ring"))
    steps = spec.steps_for_nfe(nfe)
    sigmas = make_sigmas("karras", steps)
    x = initial_noise(4, (2,), 80.0, seed=0)
    run = sample(model.denoiser, x, sigmas, solver)
    assert run.nfe_total == spec.nfe(steps) <= nfe
    assert sum(r.nfe for r in run.trace) == run.nfe_total
    if solver == "heun":
        assert [r.nfe for r in run.trace] == [2] * (steps - 1) + [1]
        assert run.nfe_total == (nfe if nfe % 2 else nfe - 1)
    else:
        assert run.nfe_total == nfe


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "heun"])
def test_a_step_is_a_pure_function_of_state_and_history(solver):
    model = load_model("gmm-aniso")
    sigmas = make_sigmas("karras", 6).tolist()
    run = sample(model, initial_noise(8, (2,), 80.0, seed=3), sigmas, solver)
    spec = get_solver(solver)
    history = ()
    for k in range(3):
        history = spec.step(model, run.states[k], sigmas, k, history, SolverOptions()).history
    frozen = tuple(h.clone() for h in history)
    first = spec.step(model, run.states[3], sigmas, 3, history, SolverOptions()).x_next
    second = spec.step(model, run.states[3], sigmas, 3, history, SolverOptions()).x_next
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(history, frozen, strict=True))
    assert torch.equal(first, run.states[4])


def test_last_step_into_zero_is_the_denoiser_output():
    model = load_model("gmm-ring")
    x = torch.randn(8, 2)
    for solver in ("ddim", "dpmpp_2m", "dpmpp_3m", "heun"):
        result = get_solver(solver).step(model, x, [0.5, 0.0], 0, (), SolverOptions())
        assert torch.allclose(result.x_next, model(x, torch.tensor(0.5)), atol=1e-6)


def test_unknown_solver_and_bad_options():
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        get_solver("rk45")
    with pytest.raises(ValueError, match="unipc_order"):
        SolverOptions(unipc_order=5)
    with pytest.raises(ValueError, match="nfe"):
        get_solver("heun").steps_for_nfe(0)

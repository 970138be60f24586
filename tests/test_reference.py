import itertools
import math

import pytest
import torch

from steindiff import initial_noise, load_model
from steindiff.denoisers import CountingDenoiser
from steindiff.diagnostics.reference import (
    KEPT_GRIDS,
    OFF_LATTICE_ELEMENTS,
    flow_map,
    flow_maps,
    solve_flow,
    solve_for_grid,
)
from steindiff.records import DiagnosticsConfig
from steindiff.schedules import make_sigmas

F64 = torch.float64


@pytest.fixture(scope="module")
def ring():
    model = load_model("gmm-ring")
    x = initial_noise(8, model.event_shape, model.sigma_max, seed=3, dtype=F64)
    return model, x, solve_flow(model, x, model.sigma_max, model.sigma_min * 0.01, 0.025)


def _stepwise(model, x, grid):
    """The reference the old way: the flow between consecutive grid levels, one interval after another."""
    states = [x]
    for a, b in itertools.pairwise(grid):
        states.append(flow_map(model, states[-1], a, b, max_log_step=0.025, floor_ratio=0.01))
    return states


@pytest.mark.parametrize(("schedule", "steps"), [("karras", 3), ("logsnr", 7), ("karras", 20)])
def test_states_on_any_grid_match_integrating_along_that_grid(ring, schedule, steps):
    model, x, flow = ring
    grid = make_sigmas(schedule, steps, model.sigma_min, model.sigma_max).tolist()
    for ours, theirs in zip(flow.states_at(model, grid), _stepwise(model, x, grid), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-7)


@pytest.mark.slow
def test_one_solution_serves_every_grid_in_four_batched_calls(ring):
    model, x, _ = ring
    flow = solve_flow(model, x, model.sigma_max, model.sigma_min * 0.01, 0.025)  # no grid asked of it yet
    counting = CountingDenoiser(model)
    grid = make_sigmas("karras", 5, model.sigma_min, model.sigma_max).tolist()
    flow.states_at(counting, grid)
    assert counting.nfe == 4 + 1  # RK4 off the lattice to the 4 interior levels at once, the final denoising
    assert flow.states_at(counting, grid) is flow.states_at(counting, grid) and counting.nfe == 5  # kept
    flow.states_at(counting, make_sigmas("logsnr", 5, model.sigma_min, model.sigma_max).tolist())
    assert counting.nfe == 5 + 4  # another grid: the floor's denoised state is kept too
    many = x.repeat(OFF_LATTICE_ELEMENTS // 4 // len(x), 1)  # half the budget a level: 2 levels a call
    big = solve_flow(model, many, model.sigma_max, model.sigma_min * 0.01, 1.0)
    counting.nfe = 0
    big.states_at(counting, grid)
    assert counting.nfe == 4 * 2 + 1


def test_a_grid_shares_its_levels_with_every_other(ring):
    model, _, flow = ring
    coarse = make_sigmas("logsnr", 4, model.sigma_min, model.sigma_max).tolist()
    fine = make_sigmas("logsnr", 7, model.sigma_min, model.sigma_max).tolist()  # holds coarse's levels, and more
    on_fine = dict(zip(fine, flow.states_at(model, fine), strict=True))
    for sigma, state in zip(coarse, flow.states_at(model, coarse), strict=True):
        same = [s for s in fine if math.isclose(s, sigma, rel_tol=1e-12, abs_tol=0)]
        assert len(same) == 1 and torch.allclose(state, on_fine[same[0]], atol=1e-12)


def test_levels_outside_the_solution_are_refused(ring):
    model, _, flow = ring
    with pytest.raises(ValueError, match="covers"):
        flow.states_at(model, [model.sigma_max * 2, 1.0, 0.0])
    with pytest.raises(ValueError, match="covers"):
        flow.states_at(model, [1.0, model.sigma_min * 0.001, 0.0])


def test_the_solution_keeps_only_the_latest_grids(ring):
    model, x, _ = ring
    flow = solve_for_grid(model, x, [model.sigma_max, model.sigma_min, 0.0], 0.25, 0.01)
    grids = [make_sigmas("karras", n, model.sigma_min, model.sigma_max).tolist() for n in range(2, 4 + KEPT_GRIDS)]
    first = flow.states_at(model, grids[0])
    for grid in grids[1:]:
        flow.states_at(model, grid)
    assert flow.states_at(model, grids[0]) is not first
    assert flow.states_at(model, grids[-1]) is flow.states_at(model, grids[-1])


def test_the_multistep_lattice_is_third_order_at_one_call_a_step_and_on_any_grid_without_one():
    """DPM-Solver++(3M) against the closed-form flow of a Gaussian, x(s) = mu + (Sigma + s^2 I)^(1/2)
    (Sigma + s0^2 I)^(-1/2) (x0 - mu): halving the step divides the largest error on the lattice by about
    8; RK4's by about 16."""
    model = load_model("gaussian")
    mu, cov = model.means[0], model.covs[0]
    evals, evecs = torch.linalg.eigh(cov)
    x = initial_noise(16, (2,), 80.0, seed=1, dtype=F64)

    grid = make_sigmas("karras", 7, 0.002, 80.0).tolist()[:-1]  # levels between the lattice nodes

    def largest_error(log_step, method, levels=None):
        """On the lattice, or at ``levels`` (off the lattice: RK4 steps, or the 3M steps cut short)."""
        flow = solve_flow(model, x, 80.0, 0.002, log_step, method)
        sigmas, states = (flow.sigmas, flow.states) if levels is None else (levels, flow.states_at(model, levels))
        errors = []
        for sigma, state in zip(sigmas, states, strict=True):
            gain = evecs @ torch.diag(((evals + sigma**2) / (evals + 80.0**2)).sqrt()) @ evecs.T
            errors.append(float((state - mu - (x - mu) @ gain.T).norm(dim=1).max()))
        return max(errors)

    for method, order in (("dpmpp_3m", 3), ("rk4", 4)):
        for levels in (None, grid):
            errors = [largest_error(h, method, levels) for h in (0.2, 0.1, 0.05)]
            for coarse, fine in itertools.pairwise(errors):
                assert 0.75 * 2**order < coarse / fine < 1.3 * 2**order, (method, levels, errors)
    assert largest_error(0.1, "dpmpp_3m") < 2e-4 and largest_error(0.1, "dpmpp_3m", grid) < 2e-4
    counting = CountingDenoiser(model)
    flow = solve_flow(counting, x, 80.0, 0.002, 0.25, "dpmpp_3m")
    assert counting.nfe == len(flow.sigmas) - 1 == math.ceil(math.log(80.0 / 0.002) / 0.25)
    flow.states_at(counting, grid)
    assert counting.nfe == len(flow.sigmas) - 1  # off the lattice without a network call


def test_unknown_lattice_methods_are_refused(ring):
    model, x, _ = ring
    with pytest.raises(ValueError, match="method must be one of"):
        solve_flow(model, x, 80.0, 0.002, 0.25, "euler")
    with pytest.raises(ValueError, match="reference_method must be one of"):
        DiagnosticsConfig(reference_method="euler")


def test_blocks_walked_side_by_side_take_the_steps_each_takes_alone(ring):
    """flow_maps: blocks of rows between their own noise levels (walks of 5, 2 and 19 RK4 steps, one into
    sigma = 0) in one batched call an RK4 stage, with the values and gradients each block's flow_map gives."""
    model, _, _ = ring
    x = initial_noise(6, model.event_shape, 1.0, seed=5, dtype=F64).requires_grad_(True)
    levels, sizes = [(80.0, 24.0), (0.9, 0.6), (0.002, 0.0)], [2, 3, 1]
    counting = CountingDenoiser(model)
    together = flow_maps(counting, x, levels, sizes, max_log_step=0.25)
    assert counting.nfe == 19 * 4 + 1  # the longest walk's rounds, then the denoising step into sigma = 0
    alone = torch.cat(
        [flow_map(model, part, a, b, max_log_step=0.25) for part, (a, b) in zip(x.split(sizes), levels, strict=True)]
    )
    assert torch.allclose(together, alone, rtol=1e-12, atol=1e-12)
    weights = torch.randn(together.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    (grad_together,) = torch.autograd.grad((together * weights).sum(), x)
    (grad_alone,) = torch.autograd.grad((alone * weights).sum(), x)
    assert torch.allclose(grad_together, grad_alone, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="blocks"):
        flow_maps(model, x, levels, [2, 3])

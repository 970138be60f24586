import math

import pytest
import torch

from steindiff import get_solver, initial_noise, load_model, make_sigmas, sample
from steindiff.diagnostics.jacobians import jacobian_norms, jacobian_rows, lipschitz_bound, local_lipschitz
from steindiff.diagnostics.reference import reference_trajectory
from steindiff.solvers import SolverOptions

F64 = torch.float64


def _step_map(model, solver, sigmas, k, history):
    def fn(z):
        return (
            get_solver(solver)
            .step(model, z, sigmas, k, tuple(h[: z.shape[0]] for h in history), SolverOptions())
            .x_next
        )

    return fn


@pytest.fixture(scope="module")
def ring_states():
    model = load_model("gmm-ring")
    sigmas = make_sigmas("karras", 6).tolist()
    run = sample(model, initial_noise(64, (2,), 80.0, seed=0, dtype=F64), sigmas, "ddim")
    return model, sigmas, run.states


@pytest.mark.parametrize("mode", ["jvp", "vjp2", "fd"])
def test_krylov_estimate_matches_exact_spectral_norm_of_2x2_jacobians(ring_states, mode):
    model, sigmas, states = ring_states
    slack = 1e-6 if mode == "fd" else 1e-9  # a forward difference in float64 is good to ~1e-8
    for k in (2, 3, 4):
        x = states[k]
        fn = _step_map(model, "ddim", sigmas, k, ())
        exact = torch.linalg.matrix_norm(jacobian_rows(fn, x), ord=2)
        power = local_lipschitz(fn, x, iters=20, generator=torch.Generator().manual_seed(0), mode=mode, exact_max_dim=0)
        assert ((power - exact).abs() <= 0.05 * exact).all()
        assert (power <= exact * (1 + slack)).all()  # a lower bound
        denoiser_exact = torch.linalg.matrix_norm(model.jacobian(x, sigmas[k]), ord=2)
        denoiser_power = local_lipschitz(
            lambda z, s=sigmas[k]: model(z, torch.tensor(s, dtype=F64)),
            x,
            20,
            torch.Generator().manual_seed(1),
            mode,
            exact_max_dim=0,
        )
        assert torch.allclose(denoiser_power, denoiser_exact, rtol=0.05)


def test_krylov_estimate_on_images_is_a_tight_lower_bound():
    model = load_model("empirical-digits")
    gen = torch.Generator().manual_seed(0)
    x = model.sample(4, gen) + 0.5 * torch.randn(4, 1, 8, 8, dtype=F64, generator=gen)
    exact = torch.linalg.matrix_norm(model.jacobian(x, 0.5), ord=2)
    power = local_lipschitz(lambda z: model(z, torch.tensor(0.5, dtype=F64)), x, 30, torch.Generator().manual_seed(0))
    assert (power <= exact * (1 + 1e-9)).all() and torch.allclose(power, exact, rtol=0.05)


def test_krylov_estimate_is_never_below_power_iteration_with_the_same_products():
    model = load_model("empirical-digits")
    gen = torch.Generator().manual_seed(1)
    x = model.sample(6, gen) + 2.0 * torch.randn(6, 1, 8, 8, dtype=F64, generator=gen)

    def fn(z):
        return model(z, torch.tensor(2.0, dtype=F64))

    exact = torch.linalg.matrix_norm(model.jacobian(x, 2.0), ord=2)
    for iters in (1, 2, 3):
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
        for _ in range(iters):  # plain power iteration on J^T J from the same start: iters VJPs, iters + 1 JVPs
            w = w / w.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
            w = torch.func.vjp(fn, x)[1](torch.func.jvp(fn, (x,), (w,))[1])[0]
        w = w / w.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        power = torch.func.jvp(fn, (x,), (w,))[1].flatten(1).norm(dim=1)
        krylov = local_lipschitz(fn, x, iters, torch.Generator().manual_seed(7), exact_max_dim=0)
        assert (krylov >= power * (1 - 1e-9)).all() and (krylov <= exact * (1 + 1e-9)).all()
    assert (exact - krylov).abs().max() < (exact - power).abs().max()


@pytest.mark.parametrize("mode", ["jvp", "vjp2", "fd"])
def test_a_second_output_is_estimated_on_the_first_outputs_krylov_space(mode):
    """A DDIM step and the denoiser call it makes at its input: the step's estimate is local_lipschitz's, the
    denoiser's a lower bound near its norm, and J_T Q = (s'/s) Q + (1 - s'/s) J_D Q on the shared basis, so
    the step's estimate never exceeds the paper's bound from the denoiser's (exact Jacobians in 64-D)."""
    model = load_model("empirical-digits")
    gen = torch.Generator().manual_seed(2)
    sigma, sigma_next = 1.0, 0.6
    x = model.sample(6, gen) + sigma * torch.randn(6, 1, 8, 8, dtype=F64, generator=gen)
    sigmas = [sigma, sigma_next, 0.0]

    def step_and_denoiser(z):
        calls = []

        def recorded(state, s):
            calls.append(model(state, s))
            return calls[-1]

        return get_solver("ddim").step(recorded, z, sigmas, 0, (), SolverOptions()).x_next, calls[0]

    start = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    step_l, denoiser_l = jacobian_norms(step_and_denoiser, x, 3, mode, exact_max_dim=0, start=start)
    alone = local_lipschitz(lambda z: step_and_denoiser(z)[0], x, 3, mode=mode, exact_max_dim=0, start=start)
    torch.testing.assert_close(step_l, alone, rtol=1e-12, atol=0)
    exact = torch.linalg.matrix_norm(model.jacobian(x, sigma), ord=2)
    slack = 1e-6 if mode == "fd" else 1e-9
    assert (denoiser_l <= exact * (1 + slack)).all() and (denoiser_l >= 0.8 * exact).all()
    for sl, dl in zip(step_l.tolist(), denoiser_l.tolist(), strict=True):
        assert sl <= lipschitz_bound(sigma, sigma_next, dl) * (1 + slack)
    exact_both = jacobian_norms(step_and_denoiser, x, 3, mode, exact_max_dim=64)  # built Jacobians, per output
    torch.testing.assert_close(exact_both[1], exact, rtol=1e-9, atol=0)
    torch.testing.assert_close(exact_both[0], local_lipschitz(lambda z: step_and_denoiser(z)[0], x, exact_max_dim=64))


def test_the_paper_bound_holds_for_ddim_steps(ring_states):
    """J_T = (s'/s) I + (1 - s'/s) J_D, so ||J_T|| <= s'/s + h L_D (here per sample, exactly)."""
    model, sigmas, states = ring_states
    for k in range(len(sigmas) - 2):
        x = states[k]
        step_l = local_lipschitz(_step_map(model, "ddim", sigmas, k, ()), x)
        den_l = torch.linalg.matrix_norm(model.jacobian(x, sigmas[k]), ord=2)
        for sl, dl in zip(step_l.tolist(), den_l.tolist(), strict=True):
            assert sl <= lipschitz_bound(sigmas[k], sigmas[k + 1], dl) + 1e-9
    assert lipschitz_bound(1.0, 0.0, 3.0) == math.inf
    assert lipschitz_bound(1.0, 0.5, 2.0) == pytest.approx(0.5 + math.log(2) * 2.0)


def test_reference_matches_the_closed_form_flow_of_a_gaussian():
    """For N(mu, Sigma) the flow is x(s) = mu + (Sigma + s^2 I)^(1/2) (Sigma + s0^2 I)^(-1/2) (x0 - mu)."""
    model = load_model("gaussian")
    mu, cov = model.means[0], model.covs[0]
    evals, evecs = torch.linalg.eigh(cov)
    sigmas = make_sigmas("karras", 5, 0.002, 20.0).tolist()
    x = initial_noise(16, (2,), sigmas[0], seed=1, dtype=F64)
    ref = reference_trajectory(model, x, sigmas)
    for s, state in zip(sigmas, ref, strict=True):
        gain = evecs @ torch.diag(((evals + s**2) / (evals + sigmas[0] ** 2)).sqrt()) @ evecs.T
        assert torch.allclose(state, mu + (x - mu) @ gain.T, atol=1e-8)


@pytest.mark.slow
def test_reference_has_converged(ring_states):
    model, sigmas, states = ring_states
    coarse = reference_trajectory(model, states[0], sigmas)
    fine = reference_trajectory(model, states[0], sigmas, max_log_step=0.0125)
    assert max(float((a - b).abs().max()) for a, b in zip(coarse, fine, strict=True)) < 1e-6


@pytest.mark.slow
def test_forward_difference_krylov_matches_the_double_vjp_on_the_unet():
    model = load_model("mnist")
    sigmas = make_sigmas("karras", 4, model.sigma_min, model.sigma_max).tolist()
    run = sample(model, initial_noise(2, model.event_shape, sigmas[0], seed=0), sigmas, "dpmpp_2m")
    for k in range(len(sigmas) - 1):
        fn = _step_map(model, "dpmpp_2m", sigmas, k, tuple(run.denoised[k - 1 : k]) if k else ())
        by_mode = {
            mode: local_lipschitz(fn, run.states[k], 3, torch.Generator().manual_seed(k), mode)
            for mode in ("vjp2", "fd")
        }
        assert torch.allclose(by_mode["fd"], by_mode["vjp2"], rtol=0.01)


def test_known_outputs_spare_forward_differences_one_evaluation():
    """Given the map's outputs at x, the forward-difference estimate records its graph at x + h q_1 and
    takes J q_1 from it: one evaluation fewer, the same estimate within the difference's error (float32
    UNet step). The outputs given are the differences' base: wrong ones give a wrong estimate."""
    model = load_model("mnist")
    sigmas = make_sigmas("karras", 4, model.sigma_min, model.sigma_max).tolist()
    run = sample(model, initial_noise(3, model.event_shape, sigmas[0], seed=1), sigmas, "dpmpp_2m")
    k = 1
    step = _step_map(model, "dpmpp_2m", sigmas, k, tuple(run.denoised[:k]))
    evaluations = []

    def fn(z):
        evaluations.append(len(z))
        return (step(z),)

    x, start = run.states[k], torch.randn(run.states[k].shape, generator=torch.Generator().manual_seed(3))
    (recomputed,) = jacobian_norms(fn, x, 3, "fd", start=start)
    assert len(evaluations) == 1 + 4  # the graph at x, then J q_1 .. J q_4
    evaluations.clear()
    (known,) = jacobian_norms(fn, x, 3, "fd", start=start, outputs=(run.states[k + 1],))
    assert len(evaluations) == 4
    torch.testing.assert_close(known, recomputed, rtol=2e-3, atol=0)
    (wrong,) = jacobian_norms(fn, x, 3, "fd", start=start, outputs=(run.states[k + 1] + 0.01,))
    assert (wrong > 2 * recomputed).all()
    with pytest.raises(ValueError, match="forward differences only"):
        jacobian_norms(fn, x, 3, "vjp2", start=start, outputs=(run.states[k + 1],))


@pytest.mark.parametrize("dim", [2, 20])  # the exact 2-D norms (SVD) and the Krylov estimate (eigvalsh)
@pytest.mark.parametrize("mode", ["vjp2", "fd"])
def test_a_map_that_overflows_at_one_sample_gives_nan_there_and_the_others_their_norms(dim, mode):
    """A diverging run's state can be finite while the map's Jacobian there is not (the exact flow from a
    state near float32's range): that sample's constant is NaN, not an error from LAPACK, and the others'
    are what they are without it."""
    scale = torch.linspace(0.5, 2.0, dim, dtype=F64)

    def fn(z):
        return (torch.tanh(z) * scale * torch.where(z[:, :1].abs() > 1e3, math.inf, 1.0),)

    x = torch.randn(5, dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    x[2, 0] = 1e4
    start = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    (norms,) = jacobian_norms(fn, x, 8, mode, start=start)
    assert norms[2].isnan()
    finite = [0, 1, 3, 4]
    (alone,) = jacobian_norms(fn, x[finite], 8, mode, start=start[finite])
    torch.testing.assert_close(norms[finite], alone)
    exact = torch.linalg.matrix_norm(torch.diag_embed(scale / torch.cosh(x[finite]) ** 2), ord=2)
    torch.testing.assert_close(alone, exact, rtol=1e-4, atol=0)

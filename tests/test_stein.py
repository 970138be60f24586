import math

import pytest
import torch

from steindiff import SteinConfig, get_solver, initial_noise, load_model, make_sigmas, sample
from steindiff.correction.divergence import divergence, fd_step
from steindiff.correction.rule import STEIN_VARIANTS, stein_update, vp_alpha
from steindiff.solvers import SolverOptions

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ddim_residual_fn(model, sigma, sigma_next):
    def u(x):
        return x - get_solver("ddim").step(model, x, [sigma, sigma_next], 0, (), SolverOptions()).x_next

    return u


def test_steins_identity_linear_field_closed_form():
    """E<A x + b, x - mu> = sigma^2 tr A for x ~ N(mu, sigma^2 I); our exact divergence gives tr A."""
    gen = _gen(1)
    a = torch.randn(3, 3, generator=gen, dtype=F64)
    b, mu, sigma = torch.randn(3, generator=gen, dtype=F64), torch.tensor([0.5, -1.0, 2.0], dtype=F64), 0.7
    x = mu + sigma * torch.randn(400_000, 3, generator=gen, dtype=F64)
    lhs = ((x @ a.T + b) * (x - mu)).sum(1)
    assert abs(lhs.mean() - sigma**2 * torch.trace(a)) < 4 * lhs.std() / math.sqrt(len(lhs))
    x_small = x[:5].clone().requires_grad_(True)
    div = divergence(x_small @ a.T + b, x_small, "exact", 1, gen).per_sample
    assert torch.allclose(div, torch.trace(a).expand(5))


def test_steins_identity_for_a_solver_residual():
    """E<u(x), x - mu> = sigma^2 E div u(x) for the (nonlinear) residual of a DDIM step on the ring."""
    model, sigma, mu = load_model("gmm-ring"), 0.6, torch.tensor([0.3, 0.2], dtype=F64)
    gen = _gen(2)
    x = (mu + sigma * torch.randn(100_000, 2, generator=gen, dtype=F64)).requires_grad_(True)
    u = _ddim_residual_fn(model, sigma, 0.3)(x)
    lhs = (u * (x - mu)).sum(1).detach()
    rhs = sigma**2 * divergence(u, x, "exact", 1, gen).per_sample
    se = math.sqrt(lhs.var() / len(lhs) + rhs.var() / len(rhs))
    assert abs(lhs.mean() - rhs.mean()) < 4 * se


def _marginal_batch(model, sigma, n, seed):
    gen = _gen(seed)
    x0 = model.sample(n, gen)
    return x0, x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=F64)


def _stein_and_direct(model, solver, sigma, sigma_next, coords="edm", n=100_000, seed=0):
    x0, x = _marginal_batch(model, sigma, n, seed)
    x_in = x.clone().requires_grad_(True)
    t = get_solver(solver).step(model, x_in, [sigma, sigma_next], 0, (), SolverOptions()).x_next
    div = divergence(t, x_in, "exact", 1, _gen())
    _, stats = stein_update(x, t.detach(), div, sigma, sigma_next, SteinConfig(coords=coords, gamma_min=-math.inf))
    if coords == "vp":
        a, a_next = vp_alpha(sigma), vp_alpha(sigma_next)
        x_c, t_c = a * x, a_next * t.detach()
    else:
        x_c, t_c = x, t.detach()
    u = x_c - t_c
    direct = float((u * (x_c - x0)).sum(1).mean() / (u * u).sum(1).mean())
    return stats.gamma_raw, direct


@pytest.mark.parametrize(("sigma", "sigma_next"), [(80.0, 17.5), (2.0, 1.0), (1.0, 0.9), (0.5, 0.0)])
def test_stein_gamma_equals_direct_gamma_and_the_euler_value_on_exact_marginals(sigma, sigma_next):
    """For the ideal denoiser and an Euler/DDIM step, gamma* = sigma_k / (sigma_k - sigma_{k-1})."""
    stein, direct = _stein_and_direct(load_model("gmm-ring"), "ddim", sigma, sigma_next)
    ideal = sigma / (sigma - sigma_next)
    assert stein == pytest.approx(direct, rel=0.02)
    assert stein == pytest.approx(ideal, rel=0.02)


@pytest.mark.parametrize(
    ("model", "solver", "coords"),
    [("gmm-aniso", "heun", "edm"), ("gmm-moons", "ddim", "vp"), ("gmm-aniso", "heun", "vp")],
)
def test_stein_gamma_equals_direct_gamma_for_other_solvers_and_vp_coordinates(model, solver, coords):
    for sigma, sigma_next in [(3.0, 1.2), (0.8, 0.5)]:
        stein, direct = _stein_and_direct(load_model(model), solver, sigma, sigma_next, coords)
        assert stein == pytest.approx(direct, rel=0.03), (sigma, sigma_next)


def test_vp_and_edm_gammas_differ_as_measured():
    """The coefficient depends on the coordinates (solver-math section 3): VP DDIM is not the sigma_e ratio."""
    edm, _ = _stein_and_direct(load_model("gmm-ring"), "ddim", 1.0, 0.5, "edm")
    vp, _ = _stein_and_direct(load_model("gmm-ring"), "ddim", 1.0, 0.5, "vp")
    assert edm == pytest.approx(2.0, rel=0.02)
    assert abs(vp - edm) > 0.1


def _probe_estimates(kind, identity, k=4000):
    model = load_model("gmm-aniso")
    _, x = _marginal_batch(model, 0.5, 16, seed=3)
    x = x.requires_grad_(True)
    t = get_solver("ddim").step(model, x, [0.5, 0.25], 0, (), SolverOptions()).x_next
    exact = divergence(t, x, "exact", 1, _gen()).per_sample
    gen = _gen(4)
    draws = torch.stack([divergence(t, x, kind, 1, gen, identity).per_sample for _ in range(k)])
    return draws, exact


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(kind):
    draws, exact = _probe_estimates(kind, identity=0.0)
    se = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - exact).abs() <= 4 * se + 1e-12).all()


@pytest.mark.slow
def test_rademacher_and_the_exact_identity_part_lower_the_variance():
    gaussian, _ = _probe_estimates("gaussian", identity=0.0, k=2000)
    rademacher, _ = _probe_estimates("rademacher", identity=0.0, k=2000)
    gaussian_cv, exact = _probe_estimates("gaussian", identity=0.5, k=2000)
    assert rademacher.var(0).mean() < 0.5 * gaussian.var(0).mean()
    assert gaussian_cv.var(0).mean() < 0.5 * gaussian.var(0).mean()
    assert (gaussian_cv.mean(0) - exact).abs().max() < 4 * (gaussian_cv.std(0) / math.sqrt(2000)).max()


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "heun"])
@pytest.mark.parametrize(
    "stein",
    [
        SteinConfig(gamma_min=1, gamma_max=1),
        SteinConfig(gamma_min=1, gamma_max=1, coords="vp"),
        SteinConfig(apply=False),
        SteinConfig(variant="per_sample", gamma_min=1, gamma_max=1),
    ],
)
def test_gamma_one_reproduces_vanilla_bit_for_bit(solver, stein):
    model = load_model("gmm-moons")
    sigmas = make_sigmas("karras", 6)
    x = initial_noise(32, model.event_shape, 80.0, seed=5)
    vanilla = sample(model, x, sigmas, solver)
    corrected = sample(model, x, sigmas, solver, stein=stein)
    assert all(torch.equal(a, b) for a, b in zip(vanilla.states, corrected.states, strict=True))
    assert all(r.value("gamma") == 1 and r.value("gamma_raw") is not None for r in corrected.trace)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma_min": 2.0, "gamma_max": 1.0}, "must not exceed"),
        ({"gamma_min": math.nan}, "NaN"),
        ({"probes": 0}, "probes"),
        ({"probe": "sobol"}, "probe"),
        ({"coords": "ve"}, "coords"),
        ({"variant": "sc"}, "variant"),
        ({"products": "jvp"}, "products"),
        ({"probe": "exact", "products": "fd"}, "exact trace"),
    ],
)
def test_bad_stein_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SteinConfig(**kwargs)


def test_exact_trace_refuses_large_dimension():
    x = torch.zeros(2, 2000, requires_grad=True)
    with pytest.raises(ValueError, match="Hutchinson"):
        divergence(2 * x, x, "exact", 1, _gen())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("solver", "variant"), [("dpmpp_2m", "stein-cap1"), ("heun", "stein-cap1"), ("dpmpp_3m", "sc-lookahead")]
)
def test_forward_difference_probes_give_the_vjp_estimate_at_no_extra_nfe(solver, variant):
    model = load_model("mnist")
    sigmas = make_sigmas("karras", 4, model.sigma_min, model.sigma_max)
    x = initial_noise(4, model.event_shape, float(sigmas[0]), seed=3)
    vanilla = sample(model, x, sigmas, solver, keep_states=False)
    runs = {
        products: sample(
            model,
            x,
            sigmas,
            solver,
            stein=SteinConfig(**STEIN_VARIANTS[variant], probes=2, products=products),
            keep_states=False,
        )
        for products in ("vjp", "fd")
    }
    assert runs["fd"].nfe_total == runs["vjp"].nfe_total == vanilla.nfe_total  # one network call per evaluation
    for exact, fd in zip(runs["vjp"].trace, runs["fd"].trace, strict=True):
        assert fd.value("s_div") == pytest.approx(exact.value("s_div"), rel=1e-3)
        assert fd.value("gamma") == pytest.approx(exact.value("gamma"), rel=1e-3)
    assert torch.allclose(runs["fd"].samples, runs["vjp"].samples, atol=1e-2)


def test_forward_difference_step_scales_with_the_state():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.1]])
    v = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    h = fd_step(x, v)
    step_norms = (h * v).norm(dim=1)
    # sqrt(eps) times ||x||, and times 1 where ||x|| < 1 (the perturbation never falls below rounding)
    assert torch.allclose(step_norms, torch.finfo(torch.float32).eps ** 0.5 * torch.tensor([5.0, 1.0]))

"""The safeguards (noise-level cap, trust region, noise fallback) and the SC variants (look-ahead, noise level)."""

import math

import pytest
import torch

from steindiff import SteinConfig, initial_noise, load_model, make_sigmas, sample
from steindiff.correction import rule
from steindiff.correction.divergence import DivergenceEstimate
from steindiff.correction.rule import (
    GAMMA_TRANSFORMS,
    STEIN_VARIANTS,
    GammaTransform,
    noise_level_gamma,
    stein_config,
    stein_update,
)
from steindiff.solvers import SolverOptions, get_solver, with_lookahead

F64 = torch.float64
DIM, SIGMA, SIGMA_NEXT = 4, 2.0, 1.0


def _predicted_error(gamma, b, c):
    """J(gamma) = d sigma^2 - 2 gamma b + gamma^2 c, the rule's own model of E||x_{k-1} - x*||^2."""
    return DIM * SIGMA**2 - 2 * gamma * b + gamma**2 * c


def _random_statistics(n=20_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(n, generator=gen, dtype=F64) * 10 + 1e-3
    gamma_raw = torch.randn(n, generator=gen, dtype=F64) * 3 + 1
    return gamma_raw, c


def test_noise_level_cap_stays_between_one_and_the_rule_and_above_the_floor():
    gamma_raw, c = _random_statistics()
    gamma = noise_level_gamma(gamma_raw, c, DIM, SIGMA, SIGMA_NEXT, "cap")
    one = torch.ones_like(gamma_raw)
    low, high = torch.minimum(gamma_raw, one), torch.maximum(gamma_raw, one)
    assert bool(((gamma >= low - 1e-12) & (gamma <= high + 1e-12)).all())
    floor = DIM * SIGMA_NEXT**2
    j_gamma, j_one = _predicted_error(gamma, gamma_raw * c, c), _predicted_error(1.0, gamma_raw * c, c)
    # above the floor, unless the solver's own step (gamma = 1, kept) was already below it
    assert bool(((j_gamma >= floor - 1e-9) | ((gamma == 1) & (j_one <= floor))).all())
    # and where the rule's optimum stays above the floor, the rule is untouched
    untouched = _predicted_error(gamma_raw, gamma_raw * c, c) > floor
    assert untouched.any() and torch.equal(gamma[untouched], gamma_raw[untouched])
    assert (gamma != gamma_raw).any()


def test_noise_level_match_lands_on_the_floor_when_it_can():
    gamma_raw, c = _random_statistics(seed=1)
    gamma = noise_level_gamma(gamma_raw, c, DIM, SIGMA, SIGMA_NEXT, "match")
    b = gamma_raw * c
    reaches = b * b > c * DIM * (SIGMA**2 - SIGMA_NEXT**2)
    assert reaches.any() and (~reaches).any()
    j = _predicted_error(gamma, b, c)
    assert torch.allclose(j[reaches], torch.full_like(j[reaches], DIM * SIGMA_NEXT**2), rtol=1e-6, atol=1e-6)
    assert torch.equal(gamma[~reaches], gamma_raw[~reaches])


def _update(x, t, div, config, sigma=SIGMA, sigma_next=SIGMA_NEXT):
    return stein_update(x, t, DivergenceEstimate(div, math.nan), sigma, sigma_next, config)


@pytest.mark.parametrize("name", ["stein-safe", "sc-noise", "sc-lookahead"])
def test_safeguarded_update_is_finite_for_any_finite_statistics(name):
    """Degenerate and extreme inputs: u = 0, tiny or huge u, NaN or huge divergences."""
    config = SteinConfig(**STEIN_VARIANTS[name], probes=1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, DIM, generator=gen, dtype=F64)
    cases = [
        (x.clone(), torch.zeros(16, dtype=F64)),  # u = 0: gamma undefined
        (x + 1e-30, torch.full((16,), 1e30, dtype=F64)),  # gamma_raw ~ 1e90
        (x * 1e6, torch.full((16,), -1e30, dtype=F64)),
        (x + 1.0, torch.full((16,), math.nan, dtype=F64)),
        (x - 1.0, torch.randn(16, generator=gen, dtype=F64) * 1e8),
    ]
    for t, div in cases:
        for sigma_next in (SIGMA_NEXT, 0.0):
            x_next, stats = _update(x, t, div, config, sigma_next=sigma_next)
            assert bool(torch.isfinite(x_next).all()) and math.isfinite(stats.gamma)
            assert stats.gamma >= config.gamma_min


def test_safeguarded_sampling_never_leaves_finite_states_where_the_literal_rule_explodes():
    model = load_model("gmm-moons")
    x = initial_noise(256, model.event_shape, 80.0, seed=4)
    for solver in ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "heun"):
        for nfe in (3, 6, 10):
            sigmas = make_sigmas("karras", get_solver(solver).steps_for_nfe(nfe))
            literal = sample(model, x, sigmas, solver, stein=stein_config("stein", probes=2), keep_states=False)
            safe = sample(model, x, sigmas, solver, stein=stein_config("stein-safe", probes=2), keep_states=False)
            assert bool(torch.isfinite(safe.samples).all())
            bound = [r.sigma / (r.sigma - r.sigma_next) for r in safe.trace]
            assert all(1 <= r.value("gamma") <= b + 1e-12 for r, b in zip(safe.trace, bound, strict=True))
            if solver == "ddim" and nfe == 10:  # the literal rule's blow-up, for contrast
                assert max(r.value("gamma") for r in literal.trace) > 100


def test_trust_region_falls_back_to_the_solver_when_the_rule_is_far_past_the_posterior_mean():
    x = torch.ones(64, DIM, dtype=F64)
    t = x - 0.01  # a tiny residual u, as after a step that landed near the posterior mean
    config = SteinConfig(gamma_min=1.0, trust_region=True)
    _, near = _update(x, t, torch.full((64,), DIM - 0.5e-4 / SIGMA**2 * DIM * 2.0, dtype=F64), config)
    _, far = _update(x, t, torch.full((64,), -1.0, dtype=F64), config)
    assert far.gamma_raw > 100 and far.gamma == 1.0
    bound = SIGMA / (SIGMA - SIGMA_NEXT)
    assert near.gamma_raw < bound and near.gamma == pytest.approx(near.gamma_raw)


def test_noisy_batch_estimate_falls_back_to_the_solver_step():
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 2, (8, DIM), generator=gen).to(F64) * 2 - 1  # every ||u_i||^2 alike
    t = 0.5 * x
    spread = torch.tensor([DIM - 40.0, DIM + 40.0] * 4, dtype=F64)  # per-sample divergences all over the place
    x_next, stats = _update(x, t, spread, SteinConfig(max_gamma_se=0.5))
    assert stats.gamma_se > 0.5 and stats.gamma == 1.0 and torch.equal(x_next, t)
    _, calm = _update(x, t, torch.full((8,), DIM - 0.5 * DIM, dtype=F64), SteinConfig(max_gamma_se=0.5))
    assert calm.gamma_se < 1e-12 and calm.gamma == pytest.approx(calm.gamma_raw) and calm.gamma != 1.0


def test_lookahead_on_ddim_at_gamma_one_is_unipc_first_order():
    """SC design A reduces to a known solver: trapezoid look-ahead on DDIM = UniPC-1 (bh2) with its corrector."""
    model = load_model("gmm-ring")
    x = initial_noise(64, model.event_shape, 80.0, seed=6)
    sigmas = make_sigmas("karras", 6)
    unipc = sample(model, x, sigmas, "unipc", options=SolverOptions(unipc_order=1, unipc_variant="bh2"))
    ahead = sample(model, x, sigmas, "ddim", stein=SteinConfig(lookahead=True, apply=False, probes=1))
    assert torch.allclose(ahead.samples, unipc.samples, rtol=0, atol=1e-6)
    assert ahead.nfe_total == unipc.nfe_total == 6


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m"])
def test_lookahead_costs_no_extra_nfe_and_its_last_step_is_the_solvers(solver):
    model = load_model("gmm-ring")
    x = initial_noise(32, model.event_shape, 80.0, seed=7)
    sigmas = make_sigmas("logsnr", 5)
    run = sample(model, x, sigmas, solver, stein=stein_config("sc-lookahead", probes=1))
    assert run.nfe_total == get_solver(solver).nfe(5)
    assert [r.nfe for r in run.trace] == [2, 1, 1, 1, 0]
    assert run.trace[-1].value("gamma") == 1.0  # into sigma = 0 the trust region's bound is 1


def test_lookahead_leaves_solvers_that_already_look_ahead_alone():
    for name in ("unipc", "heun"):
        assert with_lookahead(get_solver(name)) is get_solver(name)
    assert with_lookahead(get_solver("dpmpp_2m")).name == "dpmpp_2m+lookahead"


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m"])
def test_the_registered_lookahead_solver_is_the_corrector_at_gamma_1(solver):
    """`dpmpp_3m+lookahead` and the like, run plain, are T_SC with gamma clipped to 1, bit for bit; the look-ahead
    map applied twice is the map once."""
    model = load_model("gmm-ring")
    x = initial_noise(32, model.event_shape, 80.0, seed=9)
    sigmas = make_sigmas("karras", 6)
    alone = sample(model, x, sigmas, f"{solver}+lookahead")
    held = sample(model, x, sigmas, solver, stein=SteinConfig(gamma_min=1.0, gamma_max=1.0, lookahead=True))
    assert torch.equal(alone.samples, held.samples) and alone.nfe_total == held.nfe_total == 6
    assert not torch.equal(alone.samples, sample(model, x, sigmas, solver).samples)
    assert with_lookahead(get_solver(f"{solver}+lookahead")) is get_solver(f"{solver}+lookahead")


def test_vanilla_beside_a_lookahead_run_stays_the_plain_solver():
    from steindiff.sampling import compare

    model = load_model("gmm-ring")
    x = initial_noise(32, model.event_shape, 80.0, seed=8)
    sigmas = make_sigmas("karras", 5)
    result = compare(model, x, sigmas, "ddim", stein_config("sc-lookahead", probes=1))
    plain = sample(model, x, sigmas, "ddim")
    assert torch.equal(result.vanilla.samples, plain.samples)
    assert result.stein.nfe_total == plain.nfe_total == 5
    assert all(r.lipschitz_max is not None for r in result.stein.trace[:-1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_level": "both"}, "noise_level"),
        ({"noise_level": "cap", "coords": "vp"}, "EDM coordinates"),
        ({"trust_region": True, "coords": "vp"}, "EDM coordinates"),
        ({"max_gamma_se": 0.0}, "max_gamma_se"),
        ({"max_gamma_se": math.nan}, "max_gamma_se"),
    ],
)
def test_bad_safeguard_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SteinConfig(**kwargs)


def test_the_safeguards_apply_in_the_order_of_their_table():
    names = [transform.name for transform in GAMMA_TRANSFORMS]
    assert names == ["noise_level", "trust_region", "clip", "max_gamma_se", "observe_only"]
    applied = {
        name: [t.name for t in GAMMA_TRANSFORMS if t.applies(stein_config(name, probes=1))] for name in STEIN_VARIANTS
    }
    assert applied["stein"] == applied["stein-cap1"] == ["clip"]
    assert applied["stein-safe"] == applied["sc-lookahead"] == ["noise_level", "trust_region", "clip", "max_gamma_se"]
    assert applied["sc-noise"] == ["noise_level", "clip"]
    assert [t.name for t in GAMMA_TRANSFORMS if t.applies(SteinConfig(apply=False))] == ["clip", "observe_only"]


def test_a_new_gamma_transform_is_one_function_and_one_table_entry(monkeypatch):
    """stein_update walks the table: an entry appended after the clip sees the clipped gamma and its own
    result is the state's coefficient; one whose condition fails is skipped."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, DIM, generator=gen, dtype=F64)
    t, div = 0.5 * x, torch.full((8,), 0.25 * DIM, dtype=F64)
    config = SteinConfig(gamma_max=1.5)
    _, before = _update(x, t, div, config)
    seen = []

    def halve(gamma, context):
        seen.append((float(gamma), float(context.gamma_raw)))
        return gamma / 2

    extra = (GammaTransform("halve", lambda c: c.gamma_max < math.inf, halve),)
    monkeypatch.setattr(rule, "GAMMA_TRANSFORMS", (*GAMMA_TRANSFORMS[:3], *extra, *GAMMA_TRANSFORMS[3:]))
    x_next, after = _update(x, t, div, config)
    assert seen == [(1.5, before.gamma_raw)] and before.gamma_raw > 1.5
    assert after.gamma == 0.75 and torch.allclose(x_next, 0.25 * x + 0.75 * t)
    _update(x, t, div, SteinConfig())  # gamma_max = inf: the entry does not apply
    assert len(seen) == 1

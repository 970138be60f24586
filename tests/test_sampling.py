import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from steindiff import (
    DiagnosticsConfig,
    SteinConfig,
    compare,
    initial_noise,
    load_model,
    make_sigmas,
    noise,
    sample,
)
from steindiff.correction import divergence
from steindiff.correction.rule import SteinStats
from steindiff.diagnostics.jacobians import jacobian_rows
from steindiff.records import STATS_FIELDS, StepRecord
from steindiff.solvers import SolverOptions, get_solver

REQUIRED = {"sigma", "sigma_next", "gamma_raw", "gamma", "s_xu", "s_uu", "s_div", "lipschitz_max", "err_ref", "nfe"}


def _ring_compare(solver="dpmpp_2m", steps=5, stein=None, batch=256, seed=0, **diag):
    model = load_model("gmm-ring")
    sigmas = make_sigmas("karras", steps)
    x = initial_noise(batch, model.event_shape, float(sigmas[0]), seed)
    return compare(model, x, sigmas, solver, stein or SteinConfig(), diagnostics=DiagnosticsConfig(**diag), seed=seed)


def test_noise_depends_only_on_seed_and_index():
    big = initial_noise(10, (1, 3, 3), 2.0, seed=7)
    assert torch.equal(initial_noise(4, (1, 3, 3), 2.0, seed=7), big[:4])
    assert torch.equal(initial_noise(3, (1, 3, 3), 2.0, seed=7, first_index=4), big[4:7])
    assert not torch.equal(initial_noise(4, (1, 3, 3), 2.0, seed=8), big[:4])
    with pytest.raises(ValueError, match="batch"):
        initial_noise(0, (2,), 1.0, seed=0)


def test_seeds_are_numpys_seed_sequence_and_the_noise_is_the_recorded_one():
    """The vectorised hash gives SeedSequence's seeds for every width of entropy (words split at 2^32, one
    word for 0, more words than the pool of 4), rows of different widths in one call; the noise is drawn
    from them as every recorded result was."""
    rows = [(0, 0), (0, 1), (7, 2**32 - 1), (7, 2**32), (2**31 - 1, 4095), (2**64 + 3, 9), (5,), (3, 1, 2)]
    rows += [(1, 2, 3, 4, 5, 6), (2**128 + 1, 2**40, 3, 0, 0, 7)]
    expected = [int(np.random.SeedSequence(list(row)).generate_state(1, np.uint64)[0]) for row in rows]
    assert noise.derived_seeds(rows) == expected
    eps = initial_noise(6, (1, 2, 2), 1.0, seed=2**33 + 1, dtype=torch.float64, first_index=2**32 - 3)
    for i, index in enumerate(range(2**32 - 3, 2**32 + 3)):
        seed = int(np.random.SeedSequence([2**33 + 1, index]).generate_state(1, np.uint64)[0])
        drawn = torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert torch.equal(eps[i], drawn)
    with pytest.raises(ValueError, match=">= 0"):
        noise.derived_seeds([(1, -1)])


def test_same_seed_same_samples_and_trace():
    first, second = _ring_compare(batch=64), _ring_compare(batch=64)
    for a, b in ((first.vanilla, second.vanilla), (first.stein, second.stein)):
        assert torch.equal(a.samples, b.samples)
        assert [r.value("gamma_raw") for r in a.trace] == [r.value("gamma_raw") for r in b.trace]
        assert [r.lipschitz_max for r in a.trace] == [r.lipschitz_max for r in b.trace]
    other = _ring_compare(batch=64, seed=1)
    assert not torch.equal(other.stein.samples, first.stein.samples)


@pytest.mark.parametrize(("products", "calls"), [("fd", 9), ("vjp", 10)])
def test_the_runs_share_their_identical_first_call_and_nothing_else(products, calls):
    model = load_model("gmm-ring")
    log = []

    def logged(x, sigma):
        log.append(len(x))
        return model(x, sigma)

    sigmas = make_sigmas("karras", 5)
    x = initial_noise(32, model.event_shape, float(sigmas[0]), seed=2)
    stein = SteinConfig(products=products, probes=2)
    none = DiagnosticsConfig(lipschitz=False, reference=False)
    result = compare(logged, x, sigmas, "dpmpp_2m", stein, diagnostics=none, seed=2)
    assert len(log) == calls  # 5 a run; with autograd recording (VJP products) nothing is shared
    assert result.vanilla.nfe_total == result.stein.nfe_total == 5
    observer = SteinConfig(products=products, probes=2, apply=False)
    for run, config in ((result.vanilla, observer), (result.stein, stein)):
        alone = sample(model, x, sigmas, "dpmpp_2m", stein=config, diagnostics=none, seed=2)
        assert torch.equal(run.samples, alone.samples)
        assert [r.value("gamma_raw") for r in run.trace] == [r.value("gamma_raw") for r in alone.trace]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_name", "solver", "probe", "products"),
    [
        ("gmm-ring", "dpmpp_3m", "rademacher", "vjp"),
        ("gmm-ring", "heun", "exact", "vjp"),
        ("mlp-ring", "unipc", "gaussian", "vjp-batched"),
        ("mnist", "dpmpp_2m", "rademacher", "vjp"),
    ],
)
def test_vjp_probes_in_chunks_give_the_whole_batchs_run(monkeypatch, model_name, solver, probe, products):
    """On the CPU the VJP probes go through the step in chunks of samples, each its own graph: the same
    samples, statistics and NFE as one graph of the whole batch (float rounding apart)."""
    model = load_model(model_name)
    sigmas = make_sigmas("karras", 4, model.sigma_min, model.sigma_max)
    dtype = torch.float64 if model.exact else torch.float32
    x = initial_noise(20, model.event_shape, float(sigmas[0]), seed=4, dtype=dtype)
    config = SteinConfig(probe=probe, probes=2, products=products)
    none = DiagnosticsConfig(lipschitz=False, reference=False)
    runs = {}
    for chunk in (20, 7):  # one graph; three (7 + 7 + 6)
        monkeypatch.setattr(divergence, "VJP_CPU_CHUNK", chunk)
        runs[chunk] = sample(model, x, sigmas, solver, stein=config, diagnostics=none, seed=4)
    whole, chunked = runs[20], runs[7]
    tolerance = 1e-10 if model.exact else 1e-4
    assert (whole.samples - chunked.samples).norm() <= tolerance * whole.samples.norm()
    for a, b in zip(whole.trace, chunked.trace, strict=True):
        assert a.nfe == b.nfe
        assert a.value("s_div") == pytest.approx(b.value("s_div"), rel=tolerance) and a.value("gamma") == pytest.approx(
            b.value("gamma"), rel=tolerance
        )


@pytest.mark.slow
def test_trace_has_every_quantity_and_serialises():
    result = _ring_compare()
    for run in (result.vanilla, result.stein):
        summary = run.summary()
        json.dumps(summary, allow_nan=False)
        assert len(summary["trace"]) == 5 and summary["nfe_total"] == 5
        for record in summary["trace"]:
            assert set(record) >= REQUIRED
            assert record["lipschitz_max"] is not None and record["lipschitz_flow_max"] is not None
        assert summary["final"]["err_ref"] == pytest.approx(run.trace[-1].err_ref)
        assert len(run.states) == 6 and len(run.denoised) == 5
    # the vanilla run records what the rule would have proposed, and applies gamma = 1
    assert all(r.value("gamma") == 1 and r.value("gamma_raw") is not None for r in result.vanilla.trace)
    assert result.vanilla.trace[0].value("gamma_raw") == pytest.approx(result.stein.trace[0].value("gamma_raw"))


def test_progress_announces_the_reference_and_the_lipschitz_estimates_around_the_runs_steps():
    model = load_model("gmm-ring")
    sigmas = make_sigmas("karras", 3)
    x = initial_noise(32, model.event_shape, float(sigmas[0]), 0)
    events = []

    def run(flow=None, **diag):
        events.clear()
        return compare(
            model,
            x,
            sigmas,
            "ddim",
            SteinConfig(),
            diagnostics=DiagnosticsConfig(**diag),
            callback=lambda label, record: events.append((label, record.step)),
            flow=flow,
            on_phase=events.append,
        )

    steps = [(label, k) for label in ("vanilla", "stein") for k in range(3)]
    first = run()
    assert events == ["reference", *steps, "lipschitz"]
    run(flow=first.flow)  # a reference passed in is not solved again
    assert events == [*steps, "lipschitz"]
    run(lipschitz=False, reference=False)
    assert events == steps


@pytest.mark.slow
def test_error_to_reference_shrinks_with_nfe():
    errors = [_ring_compare(steps=n, lipschitz=False).vanilla.final_err_ref for n in (5, 20, 80)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.slow
def test_the_literal_rule_explodes_on_the_exact_ring_and_the_cap_holds():
    """The known failure (DESIGN section 4): gamma ~ sigma_k/(sigma_k - sigma_{k-1}) at the first step,
    then a blow-up once the first corrected step has landed near the posterior mean."""
    literal = _ring_compare(lipschitz=False)
    sigmas = literal.sigmas
    assert literal.stein.trace[0].value("gamma_raw") == pytest.approx(sigmas[0] / (sigmas[0] - sigmas[1]), rel=0.05)
    assert literal.stein.trace[1].value("gamma_raw") > 10
    assert literal.stein.final_err_ref > 10 * literal.vanilla.final_err_ref
    capped = _ring_compare(stein=SteinConfig(gamma_max=1.0), lipschitz=False)
    assert all(0.1 <= r.value("gamma") <= 1.0 for r in capped.stein.trace)
    assert capped.stein.final_err_ref < 2 * capped.vanilla.final_err_ref


def test_lipschitz_of_the_corrected_map_includes_gamma():
    """At the first step the corrected map is (1 - g) x + g T(x): in 2-D its norm is exact."""
    result = _ring_compare(steps=3, lipschitz=True, batch=32)
    van, cor = result.vanilla.trace[0], result.stein.trace[0]
    ratio = result.sigmas[1] / result.sigmas[0]  # T is nearly linear at sigma = 80: J_T ~ ratio * I
    assert van.lipschitz_max == pytest.approx(ratio, rel=0.05)
    assert cor.lipschitz_max == pytest.approx(abs(1 - cor.value("gamma") + cor.value("gamma") * ratio), rel=0.05)


@pytest.mark.parametrize(
    ("solver", "stein"),
    [
        ("ddim+lookahead", None),
        ("unipc", None),
        ("ddim", SteinConfig(gamma_min=1.0, gamma_max=1.0, lookahead=True, products="fd")),  # the app's probes
    ],
)
def test_a_look_ahead_steps_lipschitz_moves_its_look_ahead_evaluation_with_the_state(solver, stein):
    """A look-ahead step's m0 = D(p, sigma_k) was evaluated at a point p other than x_k; its Lipschitz
    estimate is of z -> T(z; D(p + z - x_k)): here against the 2x2 Jacobians' exact norms. Held fixed, m0
    would leave the last step (T = m0) a Jacobian of 0; moved, it is the denoiser's at p, in closed form."""
    model = load_model("gmm-ring")
    sigmas = make_sigmas("karras", 5).tolist()
    n = 6
    x = initial_noise(12, (2,), sigmas[0], seed=5, dtype=torch.float64)
    diagnostics = DiagnosticsConfig(reference=False, lipschitz_samples=n)
    run = sample(model, x, sigmas, solver, stein=stein, diagnostics=diagnostics)
    spec, options = get_solver(solver if stein is None else f"{solver}+lookahead"), SolverOptions()
    history, point = (), None  # the run's history and where its newest output was evaluated, replayed
    for k, record in enumerate(run.trace):
        state = run.states[k][:n]

        def step(z, k=k, state=state, point=point, history=tuple(h[:n] for h in history)):
            live = history if point is None else (model(point[:n] + z - state, sigmas[k]), *history[1:])
            return spec.step(model, z, sigmas, k, live, options).x_next

        exact = torch.linalg.matrix_norm(jacobian_rows(step, state), ord=2).max()
        assert record.lipschitz_max == pytest.approx(float(exact), rel=1e-6)
        if k == len(run.trace) - 1:
            closed_form = torch.linalg.matrix_norm(model.jacobian(point[:n], sigmas[k]), 2).max()
            assert record.lipschitz_max == pytest.approx(float(closed_form), rel=1e-6)
            assert record.lipschitz_max > 0.1
        result = spec.step(model, run.states[k], sigmas, k, history, options)
        history, point = result.history, result.ahead_point
        assert point is not None or k == len(run.trace) - 1


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_forward_difference_lipschitz_from_the_runs_own_values_matches_the_double_vjp(solver):
    """With forward differences the step maps' values at the runs' states come from the runs
    (``MapAtStep.x_next``, ``.denoised``), not from an evaluation of their own: the estimates must still be the
    double VJP's (float32 mnist; a vanilla run observed with probes, as the app's, and a corrected run with the
    look-ahead corrector). A value that is not the map's would make every forward difference wrong by
    (error) / h, h about 3e-4 of the state's norm."""
    model = load_model("mnist")
    sigmas = make_sigmas("karras", 4, model.sigma_min, model.sigma_max)
    x = initial_noise(6, model.event_shape, float(sigmas[0]), seed=2)
    stein = SteinConfig(probes=1, products="fd", lookahead=True, gamma_max=2.0)
    by_mode = {
        mode: compare(
            model,
            x,
            sigmas,
            solver,
            stein,
            diagnostics=DiagnosticsConfig(reference=False, lipschitz_samples=3, lipschitz_iters=3, jacobian_mode=mode),
            seed=4,
        )
        for mode in ("fd", "vjp2")
    }
    fields = ("lipschitz_max", "lipschitz_median", "lipschitz_denoiser_max")
    fd, vjp2 = ([*r.vanilla.trace, *r.stein.trace] for r in by_mode.values())
    for a, b in zip(fd, vjp2, strict=True):
        for name in fields:
            if getattr(b, name) is not None:
                assert getattr(a, name) == pytest.approx(getattr(b, name), rel=0.02), (a.step, name)


def test_the_papers_bound_holds_along_the_solvers_own_steps_only():
    """DDIM: J_T = (sigma'/sigma) I + (1 - sigma'/sigma) J_D, so ||J_T|| <= sigma'/sigma + h ||J_D|| at each
    state (exact 2x2 norms); the bound is on T, so the corrected run, whose map is not T, has none."""
    model = load_model("gmm-ring")
    sigmas = make_sigmas("karras", 5).tolist()
    x = initial_noise(16, (2,), sigmas[0], seed=2, dtype=torch.float64)
    result = compare(
        model, x, sigmas, "ddim", SteinConfig(gamma_max=1.0), diagnostics=DiagnosticsConfig(reference=False)
    )
    for record in result.vanilla.trace[:-1]:
        assert record.lipschitz_max <= record.bound_paper * (1 + 1e-9)
        assert record.lipschitz_denoiser_max > 0
    assert result.vanilla.trace[-1].bound_paper == math.inf  # the step into sigma = 0: h = inf
    assert all(r.bound_paper is None and r.lipschitz_denoiser_max is None for r in result.stein.trace)


@pytest.mark.parametrize("products", ["vjp", "fd"])
def test_a_diverging_run_is_a_result_not_a_crash(products):
    model = load_model("gmm-ring")
    sigmas = make_sigmas("karras", 4)
    x = initial_noise(16, (2,), 80.0, seed=0)
    x[3, 0] = math.nan
    stein = SteinConfig(products=products)
    result = compare(model, x, sigmas, "heun", stein, diagnostics=DiagnosticsConfig(flow_lipschitz=False))
    for run in (result.vanilla, result.stein):
        summary = run.summary()
        json.dumps(summary, allow_nan=False)
        assert run.first_nonfinite_step == 0
        assert summary["final"]["nonfinite_samples"] >= 1
        assert summary["trace"][0]["finite"] is False


@pytest.mark.parametrize(
    "stein",
    [
        SteinConfig(variant="per_sample", gamma_max=2.0),
        SteinConfig(coords="vp"),
        SteinConfig(probe="gaussian", probes=2),
        SteinConfig(probe="exact"),
    ],
)
def test_variants_run_and_record(stein):
    result = _ring_compare(stein=stein, batch=64, lipschitz=False)
    assert len(result.stein.trace) == 5
    assert all(r.value("s_uu") is not None and r.value("s_div") is not None for r in result.stein.trace)


def test_image_model_with_hutchinson_and_power_iteration():
    model = load_model("empirical-digits")
    sigmas = make_sigmas("karras", 3)
    x = initial_noise(8, model.event_shape, float(sigmas[0]), seed=0)
    result = compare(
        model,
        x,
        sigmas,
        "dpmpp_2m",
        SteinConfig(gamma_max=1.0, probes=2),
        diagnostics=DiagnosticsConfig(lipschitz_samples=2, lipschitz_iters=5, flow_lipschitz=False),
    )
    assert result.stein.samples.shape == (8, 1, 8, 8)
    assert all(r.lipschitz_max is not None and r.err_ref is not None for r in result.stein.trace)


def test_bad_grid_is_refused():
    model = load_model("gmm-ring")
    with pytest.raises(ValueError, match="decreasing"):
        sample(model, torch.zeros(2, 2), [1.0, 2.0, 0.0])


def test_a_step_record_flattens_its_stats_in_place_and_reads_them_by_name():
    names = [f.name for f in dataclasses.fields(StepRecord)]
    at = names.index("stats")
    keys = [*names[:at], *STATS_FIELDS, *names[at + 1 :]]
    assert keys[:12] == ["step", "sigma", "sigma_next", "nfe", "time_s", *STATS_FIELDS]
    assert {"lipschitz_max", "bound_paper", "lipschitz_flow_max", "err_ref", "finite"} <= set(keys[12:])
    plain = StepRecord(0, 2.0, 1.0, 1, 0.5, err_ref=math.inf)
    assert list(plain.as_dict()) == keys
    assert plain.as_dict()["gamma"] == 1.0 == plain.value("gamma") and plain.as_dict()["err_ref"] is None
    assert all(plain.as_dict()[k] is None and plain.value(k) is None for k in STATS_FIELDS if k != "gamma")
    stats = SteinStats(2.5, 1.5, 0.1, 0.2, 0.3, 0.01, math.nan, applied=torch.tensor(1.5), scale=1.0)
    ruled = StepRecord(1, 1.0, 0.0, 1, 0.5, stats, lipschitz_max=0.9)
    row = ruled.as_dict()
    assert list(row) == keys and "applied" not in row and "scale" not in row
    assert [row[k] for k in STATS_FIELDS] == [2.5, 1.5, 0.1, 0.2, 0.3, 0.01, None]
    assert (
        ruled.value("gamma_raw") == 2.5 and math.isnan(ruled.value("gamma_se")) and ruled.value("lipschitz_max") == 0.9
    )
    for name in ("stats", "nonsense"):
        with pytest.raises(ValueError, match="no value"):
            ruled.value(name)

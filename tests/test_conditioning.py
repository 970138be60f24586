"""Conditioning: class labels reach the network at every call, sliced, stacked and repeated with their rows."""

import math

import pytest
import torch

from steindiff import DiagnosticsConfig, SteinConfig, compare, initial_noise, load_model, make_sigmas, sample
from steindiff.correction import divergence
from steindiff.correction.rule import stein_config
from steindiff.denoisers import ConditionalGaussianMixture, GaussianMixture, conditional_ring
from steindiff.denoisers.base import bind_cond, check_cond, cond_cat
from steindiff.diagnostics.lockstep import lockstep
from steindiff.diagnostics.reference import flow_maps, reference_trajectory
from steindiff.diagnostics.step_lipschitz import MapAtStep, measure_lipschitz
from steindiff.records import RunResult, StepRecord
from steindiff.sampling import _SharedFirstCall
from steindiff.solvers import get_solver

F64 = torch.float64
LABELS = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])


def _row_probes(like, kind, probes, generator):
    """Rademacher-like probes that depend on each row's own state only: a row gets the same probes in any batch."""
    signs = [torch.sin((i + 1) * 1e3 * like.double() + 0.3) >= 0 for i in range(probes)]
    return torch.stack([torch.where(s, 1.0, -1.0).to(like.dtype) for s in signs])


def _mode_index(model, x):
    return (x[:, None, :] - model.means[None]).norm(dim=-1).argmin(1)


def test_the_label_restricts_the_exact_posterior_mean_to_its_class():
    model = conditional_ring(2).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=gen, dtype=F64) * 1.5
    label = torch.arange(16) % 2
    for sigma in (0.05, 0.4, 3.0):
        s = torch.tensor(sigma, dtype=F64)
        got = model(x, s, label=label)
        for c in (0, 1):
            part = GaussianMixture(torch.ones(4), model.means[c::2], model.covs[c::2]).double()
            rows = label == c
            assert torch.allclose(got[rows], part(x[rows], s), rtol=1e-12, atol=1e-12)
        # samples never interact: the Jacobian of the batch sum holds each sample's own, (d, B, d)
        jac = torch.autograd.functional.jacobian(lambda z, s=s: model(z, s, label=label).sum(0), x).permute(1, 0, 2)
        assert torch.allclose(model.jacobian(x, s, label=label), jac, rtol=1e-8, atol=1e-10)
    # one component a class: D is that Gaussian's posterior mean mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu)
    single = conditional_ring(8).double()
    label = torch.arange(16) % 8
    mu, var = single.means[label], 0.08**2
    assert torch.allclose(single(x, torch.tensor(0.3, dtype=F64), label=label), mu + var / (var + 0.09) * (x - mu))


@pytest.mark.parametrize("classes", [2, 8])
def test_conditional_samples_land_on_their_class(classes):
    model = conditional_ring(classes).double()
    label = torch.arange(64) % classes
    x = initial_noise(64, model.event_shape, 80.0, seed=1, dtype=F64)
    sigmas = make_sigmas("karras", 12)
    for stein in (None, stein_config("sc-lookahead", probes=2, products="fd")):
        run = sample(model, x, sigmas, "dpmpp_2m", stein=stein, cond={"label": label})
        modes = _mode_index(model, run.samples)
        assert torch.equal(model.classes[modes], label)
        assert float((run.samples - model.means[modes]).norm(dim=1).max()) < 0.4
    plain = sample(model, x, sigmas, "dpmpp_2m", cond={"label": torch.zeros(64, dtype=torch.long)})
    assert bool((model.classes[_mode_index(model, plain.samples)] == 0).all())
    drawn = model.sample(64, torch.Generator().manual_seed(2), label=label)
    assert torch.equal(model.classes[_mode_index(model, drawn)], label)


CONFIGS = {
    "vanilla": None,
    "fd": stein_config("sc-lookahead", probes=2, products="fd", variant="per_sample"),
    "vjp": stein_config("stein-safe", probes=2, products="vjp", variant="per_sample"),
    "vjp-batched": stein_config("custom", probes=2, products="vjp-batched", variant="per_sample"),
    "exact": SteinConfig(probe="exact", variant="per_sample", gamma_max=2.0),
}


@pytest.mark.parametrize(("solver", "name"), [("dpmpp_2m", n) for n in CONFIGS] + [("unipc", "fd"), ("heun", "vjp")])
def test_a_mixed_label_batch_is_each_labels_rows_run_alone(monkeypatch, solver, name):
    """Samples never interact, and each row's conditioning goes with it: through forward-difference probes
    stacked (K + 1) B, VJP chunks (3 rows here), the shared first call, the Lipschitz estimates' joint maps
    and exact flows, and the reference solution. The per-sample rule with probes that depend on a row alone
    makes the corrected run row-wise too."""
    monkeypatch.setattr(divergence, "probe_stack", _row_probes)
    monkeypatch.setattr(divergence, "VJP_CPU_CHUNK", 3)
    model = conditional_ring(2).double()
    x = initial_noise(8, model.event_shape, 80.0, seed=3, dtype=F64)
    sigmas = make_sigmas("karras", 4)
    diagnostics = DiagnosticsConfig(lipschitz_samples=8, flow_log_step=0.2, reference_log_step=0.1)

    def run(rows):
        cond = {"label": LABELS[rows]}
        return compare(model, x[rows], sigmas, solver, CONFIGS[name], diagnostics=diagnostics, seed=4, cond=cond)

    mixed = run(slice(None))
    alone = {c: run(c == LABELS) for c in (0, 1)}
    for k, state in enumerate(mixed.reference):
        for c, part in alone.items():
            assert torch.allclose(state[c == LABELS], part.reference[k], rtol=1e-10, atol=1e-12)
    for key in ("vanilla", "stein"):
        whole = getattr(mixed, key)
        if whole is None:
            continue
        parts = {c: getattr(part, key) for c, part in alone.items()}
        assert whole.nfe_total == parts[0].nfe_total == parts[1].nfe_total
        for c, part in parts.items():
            assert torch.allclose(whole.samples[c == LABELS], part.samples, rtol=1e-10, atol=1e-12)
        for k, record in enumerate(whole.trace):
            steps = [part.trace[k] for part in parts.values()]
            summed = sum(s.err_ref * int((c == LABELS).sum()) for c, s in zip(parts, steps, strict=True))
            assert record.err_ref == pytest.approx(summed / len(LABELS), rel=1e-9)
            for field in ("lipschitz_max", "lipschitz_denoiser_max", "lipschitz_flow_max"):
                if record.value(field) is None:
                    assert all(s.value(field) is None for s in steps)
                else:
                    assert record.value(field) == pytest.approx(max(s.value(field) for s in steps), rel=1e-8)
            assert record.lipschitz_max is not None or k == len(whole.trace) - 1 or not record.finite


def test_conditioning_goes_with_its_rows_through_the_flows_and_the_lockstep_maps():
    model = conditional_ring(2).double()
    x = initial_noise(6, model.event_shape, 5.0, seed=5, dtype=F64)
    label = torch.tensor([1, 0, 0, 1, 1, 0])
    levels, sizes = [(5.0, 0.0), (5.0, 1.0), (2.0, 0.5)], [2, 3, 1]
    joint = flow_maps(model, x, levels, sizes, max_log_step=0.2, cond={"label": label})
    start = 0
    for (a, b), n in zip(levels, sizes, strict=True):
        rows = slice(start, start + n)
        alone = flow_maps(model, x[rows], [(a, b)], [n], max_log_step=0.2, cond={"label": label[rows]})
        assert torch.allclose(joint[rows], alone, rtol=1e-12, atol=1e-12)
        start += n
    states = reference_trajectory(model, x, [5.0, 1.0, 0.3, 0.0], 0.1, cond={"label": label})
    flipped = reference_trajectory(model, x, [5.0, 1.0, 0.3, 0.0], 0.1, cond={"label": 1 - label})
    assert not torch.allclose(states[-1], flipped[-1], atol=0.1)  # the label moves the solution


def test_maps_with_different_conditioning_share_their_batched_calls():
    """lockstep's rounds and measure_lipschitz's groups put maps of different conditioning in one call."""
    model = conditional_ring(2).double()
    x = initial_noise(4, model.event_shape, 3.0, seed=8, dtype=F64)
    a = torch.tensor([0, 1, 1, 0])
    b = 1 - a

    def two_calls(label):  # D at two noise levels, the second at the first's output
        def fn(denoise, z):
            bound = bind_cond(denoise, {"label": label})
            return bound(bound(z, torch.tensor(3.0, dtype=F64)) + z, torch.tensor(1.0, dtype=F64))

        return fn

    joint = lockstep(model, [two_calls(a), two_calls(b)], [4, 4])(torch.cat([x, 2 * x]))
    alone = [lockstep(model, [two_calls(c)], [4])(z) for c, z in ((a, x), (b, 2 * x))]
    assert torch.allclose(joint, torch.cat(alone), rtol=1e-12, atol=1e-12)

    spec, grid = get_solver("ddim"), [3.0, 1.0, 0.0]
    config = DiagnosticsConfig(flow_log_step=0.2)

    def run_and_maps(label):
        trace = [StepRecord(k, grid[k], grid[k + 1], 1, 0.0) for k in range(2)]
        maps = [MapAtStep(x, (), None, 1.0, cond={"label": label}), None]
        return RunResult("run", x, trace, 2), maps, spec

    together = [run_and_maps(a), run_and_maps(b)]
    measure_lipschitz(model, together, grid, None, config, seed=0)
    for (run, _, _), label in zip(together, (a, b), strict=True):
        single = run_and_maps(label)
        measure_lipschitz(model, [single], grid, None, config, seed=0)
        for field in ("lipschitz_max", "lipschitz_denoiser_max", "lipschitz_flow_max"):
            assert run.trace[0].value(field) == pytest.approx(single[0].trace[0].value(field), rel=1e-10)
    assert together[0][0].trace[0].lipschitz_flow_max != together[1][0].trace[0].lipschitz_flow_max

    shared = _SharedFirstCall(model)
    sigma = torch.tensor(3.0, dtype=F64)
    first, other = shared(x, sigma, label=a), shared(x, sigma, label=b)
    assert torch.equal(first, model(x, sigma, label=a)) and torch.equal(other, model(x, sigma, label=b))


def test_conditioning_is_refused_where_it_does_not_fit():
    ring, conditional = load_model("gmm-ring"), conditional_ring(2)
    x = initial_noise(4, (2,), 80.0, seed=6, dtype=F64)
    sigmas, label = make_sigmas("karras", 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="takes conditioning none"):
        sample(ring, x, sigmas, cond={"label": label})  # an unconditional model ignores nothing silently
    with pytest.raises(ValueError, match=r"lacks \['label'\]"):
        sample(conditional, x, sigmas)
    with pytest.raises(ValueError, match="leading batch dimension 4"):
        compare(conditional, x, sigmas, cond={"label": label[:3]})
    with pytest.raises(ValueError, match=r"labels must be in 0 \.\. 1"):
        sample(conditional, x, sigmas, cond={"label": label + 1})
    with pytest.raises(TypeError):
        conditional(x, torch.tensor(1.0))
    first = compare(conditional, x, sigmas, cond={"label": label}, diagnostics=DiagnosticsConfig(lipschitz=False))
    with pytest.raises(ValueError, match="other conditioning"):
        compare(conditional, x, sigmas, cond={"label": 1 - label}, flow=first.flow)
    again = compare(conditional, x, sigmas, cond={"label": label}, flow=first.flow)
    assert torch.equal(again.vanilla.samples, first.vanilla.samples)
    with pytest.raises(ValueError, match="on 3 rows"):
        bind_cond(conditional, {"label": label})(x[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="different conditioning"):
        cond_cat([{"label": label}, None])
    assert check_cond({}, 4, frozenset()) is None and cond_cat([None, None]) is None
    with pytest.raises(ValueError, match="one class a component"):
        ConditionalGaussianMixture(torch.ones(2), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2), [0])


def test_a_model_without_conditioning_runs_as_before():
    model = load_model("gmm-ring")
    x = initial_noise(16, model.event_shape, 80.0, seed=7, dtype=F64)
    sigmas = make_sigmas("karras", 4)
    config = stein_config("sc-lookahead", probes=2, products="fd")
    plain, empty = (compare(model, x, sigmas, "dpmpp_2m", config, seed=1, cond=c) for c in (None, {}))
    assert torch.equal(plain.stein.samples, empty.stein.samples)
    assert [r.as_dict()["gamma"] for r in plain.stein.trace] == [r.as_dict()["gamma"] for r in empty.stein.trace]
    assert math.isfinite(plain.stein.final_err_ref)

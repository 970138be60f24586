"""Maps evaluated in lockstep (their denoiser calls batched) and the compute thread of the server."""

import contextvars
import dataclasses
import threading

import pytest
import torch
from torch.autograd.functional import jacobian

from steindiff import DiagnosticsConfig, SteinConfig, compare, get_solver, initial_noise, load_model, make_sigmas
from steindiff.app.compute_thread import on_compute_thread
from steindiff.diagnostics.lockstep import lockstep
from steindiff.diagnostics.reference import flow_map
from steindiff.diagnostics.step_lipschitz import MapAtStep, measure_lipschitz
from steindiff.solvers import SolverOptions


class _CountingCalls(torch.nn.Module):
    """Wraps a denoiser and logs the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, sigma):
        self.calls.append(len(x))
        return self.model(x, sigma)

    def per_sample_sigma(self, x, sigma):
        return self.model.per_sample_sigma(x, sigma)


def _maps_and_states():
    """Heun steps (2 calls), DDIM steps (1 call) and a denoiser map at different noise levels, on mnist
    in float64 (in float32 the batch composition changes the rounding)."""
    model = load_model("mnist").double()
    sigmas = make_sigmas("karras", 4, model.sigma_min, model.sigma_max).tolist()
    options = SolverOptions()

    def step(solver, k):
        return lambda denoise, z: get_solver(solver).step(denoise, z, sigmas, k, (), options).x_next

    maps = [step("heun", 1), step("ddim", 2), lambda d, z: d(z, torch.tensor(0.7, dtype=z.dtype)), step("heun", 0)]
    xs = [
        initial_noise(n, model.event_shape, sigmas[1], seed=i, dtype=torch.float64) for i, n in enumerate((3, 2, 1, 2))
    ]
    return model, maps, xs


def test_lockstep_batches_the_calls_and_matches_the_maps_run_alone():
    model, maps, xs = _maps_and_states()
    counting = _CountingCalls(model)
    alone = [f(model, x) for f, x in zip(maps, xs, strict=True)]
    joint = lockstep(counting, maps, [len(x) for x in xs])
    with torch.no_grad():
        together = joint(torch.cat(xs))
    assert counting.calls == [8, 5]  # round 1: every map; round 2: the Heun steps' second evaluations
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_gradients_flow_through_the_lockstep():
    model, maps, xs = _maps_and_states()
    weights = [
        torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i, x in enumerate(xs)
    ]
    alone = []
    for f, x, w in zip(maps, xs, weights, strict=True):
        x_in = x.clone().requires_grad_(True)
        alone.append(torch.autograd.grad((f(model, x_in) * w).sum(), x_in)[0])
    z = torch.cat(xs).requires_grad_(True)
    out = lockstep(model, maps, [len(x) for x in xs])(z)
    (together,) = torch.autograd.grad((out * torch.cat(weights)).sum(), z)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-10, atol=1e-10)


def test_maps_with_several_outputs_give_the_concatenation_of_each_output():
    model, maps, xs = _maps_and_states()
    pairs = [lambda denoise, z, f=f: (f(denoise, z), 2 * z) for f in maps]
    with torch.no_grad():
        first, second = lockstep(model, pairs, [len(x) for x in xs])(torch.cat(xs))
        alone = torch.cat([f(model, x) for f, x in zip(maps, xs, strict=True)])
    torch.testing.assert_close(first, alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(second, 2 * torch.cat(xs), rtol=0, atol=0)


def test_a_failing_map_or_denoiser_call_raises_on_the_caller_and_hangs_nothing():
    model, maps, xs = _maps_and_states()

    def broken(denoise, z):
        denoise(z, torch.tensor(1.0, dtype=z.dtype))
        raise ArithmeticError("map failed after its first call")

    with pytest.raises(ArithmeticError, match="map failed"):
        lockstep(model, [maps[0], broken, maps[1]], [3, 2, 2])(torch.cat([xs[0], xs[1], xs[3]]))

    class Failing(_CountingCalls):
        def forward(self, x, sigma):
            raise MemoryError("no room for this batch")

    with pytest.raises(MemoryError, match="no room"):
        lockstep(Failing(model), maps, [len(x) for x in xs])(torch.cat(xs))
    with pytest.raises(ValueError, match="block sizes"):
        lockstep(model, maps, [1, 2])


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "products"), [("fd", "fd"), ("vjp2", "vjp")])  # the app's and the CLI's
def test_lipschitz_estimates_do_not_depend_on_how_the_maps_are_grouped(mode, products):
    model = load_model("mnist").double()  # float64: the batch composition changes float32's rounding
    sigmas = make_sigmas("karras", 3, model.sigma_min, model.sigma_max)
    x = initial_noise(4, model.event_shape, float(sigmas[0]), seed=3, dtype=torch.float64)
    diagnostics = DiagnosticsConfig(lipschitz_samples=2, lipschitz_iters=3, jacobian_mode=mode, reference=False)
    stein = SteinConfig(probes=1, products=products, gamma_max=1.0)
    results = [
        compare(model, x, sigmas, "heun", stein, diagnostics=dataclasses.replace(diagnostics, lipschitz_batch=size))
        for size in (1, 64)  # every map alone; all of them in one estimate
    ]
    fields = ("lipschitz_max", "lipschitz_median", "lipschitz_denoiser_max", "bound_paper")
    for alone, together in zip(*[[*r.vanilla.trace, *r.stein.trace] for r in results], strict=True):
        for name in fields:
            a, b = getattr(alone, name), getattr(together, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert b == pytest.approx(a, rel=1e-6), (alone.step, name)
    assert results[1].vanilla.trace[0].lipschitz_denoiser_max > 0
    assert all(r.diagnostics_time_s > 0 for r in results[1].vanilla.trace)


@pytest.mark.slow
def test_the_exact_flows_constants_are_their_jacobians_norms_however_the_flows_are_grouped():
    """The exact flows (gmm-ring) are walked side by side in one group, or each alone: the same constants,
    the spectral norms of each flow's Jacobian at the run's states, taken by autograd sample by sample."""
    model = load_model("gmm-ring")
    sigmas = make_sigmas("karras", 4, model.sigma_min, model.sigma_max)
    x = initial_noise(6, model.event_shape, float(sigmas[0]), seed=2, dtype=torch.float64)
    diagnostics = DiagnosticsConfig(lipschitz_samples=3, flow_log_step=0.25, reference=False)  # the app's step
    stein = SteinConfig(probes=1, gamma_max=1.0)
    results = [
        compare(model, x, sigmas, "dpmpp_2m", stein, diagnostics=dataclasses.replace(diagnostics, lipschitz_batch=size))
        for size in (1, 64)
    ]
    grid = results[1].sigmas
    for alone, together in ((results[0].vanilla, results[1].vanilla), (results[0].stein, results[1].stein)):
        for k, (record_alone, record) in enumerate(zip(alone.trace, together.trace, strict=True)):
            assert record.lipschitz_flow_max == pytest.approx(record_alone.lipschitz_flow_max, rel=1e-9)

            def flow(z, k=k):
                return flow_map(model, z[None], grid[k], grid[k + 1], max_log_step=diagnostics.flow_log_step)[0]

            norms = [torch.linalg.matrix_norm(jacobian(flow, z), ord=2) for z in together.states[k][:3]]
            assert record.lipschitz_flow_max == pytest.approx(float(max(norms)), rel=1e-9), k


@pytest.mark.slow
def test_the_denoiser_is_estimated_along_a_step_whose_one_call_is_at_its_input():
    """DDIM's one network call is D at the step's input: the denoiser's estimate comes from the step's calls,
    on its Krylov space, with no map of its own, and the step's estimate stays under the paper's bound from
    it. Heun calls twice: its denoiser keeps a map of its own (estimated apart from the step maps, whose
    values the run computed)."""
    model = load_model("mnist").double()
    sigmas = make_sigmas("karras", 3, model.sigma_min, model.sigma_max)
    x = initial_noise(2, model.event_shape, float(sigmas[0]), seed=4, dtype=torch.float64)
    diagnostics = DiagnosticsConfig(lipschitz_samples=2, lipschitz_iters=2, jacobian_mode="fd", reference=False)
    calls = []  # the noise levels of each network call's samples

    def log(_module, inputs, _output):
        calls.append(sorted(model.per_sample_sigma(*inputs).tolist()))

    hook = model.register_forward_hook(log)
    levels = {}
    for solver in ("ddim", "heun"):
        calls.clear()
        result = compare(model, x, sigmas, solver, None, diagnostics=diagnostics)
        levels[solver] = [c for c in calls if len(c) > len(x)]  # the sampling's calls take the 2 samples
        assert all(r.lipschitz_denoiser_max > 0 for r in result.vanilla.trace[:-1]), solver
        if solver == "ddim":
            assert all(r.lipschitz_max <= r.bound_paper * (1 + 1e-6) for r in result.vanilla.trace[:-1])
    hook.remove()
    grid = sigmas.tolist()
    assert levels["ddim"] and all(c == sorted(grid[:3] * 2) for c in levels["ddim"])  # 3 step maps, no more
    denoiser_maps = sorted(grid[:2] * 2)  # at the inputs of steps 0 and 1 (the bound is infinite at the last)
    assert sum(c == denoiser_maps for c in levels["heun"]) == 1 + 3  # D(x), then J q_1, J q_2, J q_3
    flagged = dataclasses.replace(get_solver("heun"), one_call_at_input=True)  # a wrong flag is caught
    first_step = [MapAtStep(x, (), None, 1.0), None, None]
    with pytest.raises(RuntimeError, match="one network call at its input"):
        measure_lipschitz(model, [(result.vanilla, first_step, flagged)], result.sigmas, None, diagnostics, 0)


def test_compute_thread_runs_everything_on_one_thread_in_the_callers_context():
    label = contextvars.ContextVar("label")
    seen = []

    def work(tag):
        seen.append((threading.current_thread().name, label.get(), tag))
        return on_compute_thread(lambda: tag)  # nested: runs in place instead of waiting on itself

    def caller(tag):
        label.set(f"caller {tag}")
        assert on_compute_thread(work, tag) == tag

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    assert sorted(tag for _, _, tag in seen) == [0, 1, 2]
    assert len({name for name, _, _ in seen}) == 1 and seen[0][0].startswith("steindiff-compute")
    assert all(value == f"caller {tag}" for _, value, tag in seen)
    with pytest.raises(KeyError, match="raised there"):
        on_compute_thread(lambda: {}["raised there"])

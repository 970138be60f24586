"""The trap's measure: how much an error in x_k grows by the run's end, against the true flow's growth."""

import math

import pytest
import torch

from steindiff import compare, initial_noise, load_model, make_sigmas, sample
from steindiff.correction.rule import stein_config
from steindiff.records import DiagnosticsConfig

DIAG = DiagnosticsConfig(
    lipschitz=False,
    amplification=True,
    flow_amplification=True,
    lipschitz_samples=6,
    reference=True,
    reference_method="dpmpp_3m",
    reference_log_step=0.05,
    flow_log_step=0.05,
)


def _spectral_norms(fn, x: torch.Tensor) -> list[float]:
    """||d fn / d x|| of each sample, from its whole Jacobian (autograd, one sample at a time)."""
    return [
        float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(lambda z: fn(z[None])[0], row), ord=2))
        for row in x
    ]


def test_a_one_step_solvers_amplification_is_the_norm_of_its_rerun_tail(float64):
    """DDIM keeps no history, so the tail from x_k is the plain DDIM loop over the rest of the grid (written out
    here: x' = (s'/s) x + (1 - s'/s) D(x, s)); its Jacobian's spectral norm (autograd, whole) is the
    amplification, median and max over the probed samples."""
    model = load_model("gmm-ring")
    sigmas = make_sigmas("karras", 5, 0.002, 80.0).tolist()
    x = initial_noise(64, model.event_shape, sigmas[0], seed=1, dtype=torch.float64)
    run = sample(model, x, sigmas, "ddim", diagnostics=DIAG)

    def ddim_from(k: int):
        def tail(z: torch.Tensor) -> torch.Tensor:
            for s, s_next in zip(sigmas[k:-1], sigmas[k + 1 :], strict=True):
                z = (s_next / s) * z + (1 - s_next / s) * model(z, torch.tensor(s, dtype=z.dtype))
            return z

        return tail

    for k, record in enumerate(run.trace):
        norms = sorted(_spectral_norms(ddim_from(k), run.states[k][:6]))
        assert record.amplification_max == pytest.approx(norms[-1], rel=1e-9), k
        assert record.amplification_median == pytest.approx((norms[2] + norms[3]) / 2, rel=1e-9), k


@pytest.mark.slow
def test_a_converged_run_grows_errors_as_the_true_flow_does_and_a_few_step_run_does_not():
    """On the exact ring at 48 NFE DPM-Solver++(2M)'s amplification follows the flow's within 1.5x from every
    state (within 5% from the states above sigma = 1.2); at 4 NFE it exceeds the flow's by over 3x at some state."""
    model = load_model("gmm-ring")
    ratios = {}
    for nfe in (4, 48):
        sigmas = make_sigmas("karras", nfe, 0.002, 80.0)
        x = initial_noise(256, model.event_shape, float(sigmas[0]), seed=0)
        result = compare(model, x, sigmas, "dpmpp_2m", None, diagnostics=DIAG)
        trace = result.vanilla.trace
        ratios[nfe] = [(r.sigma, r.amplification_median / r.flow_amplification_median) for r in trace]
    assert all(1 / 1.5 < r < 1.5 and (s < 1.2 or abs(r - 1) < 0.05) for s, r in ratios[48]), ratios[48]
    assert max(r for _, r in ratios[4]) > 3, ratios[4]


@pytest.mark.slow
def test_an_image_models_tails_by_krylov_are_seeded_and_the_last_is_its_step_maps_constant():
    """On the trained UNet every state's tail is a Krylov estimate: positive and finite, the same for the same
    seed, and the last state's (its one step) the step map's own Lipschitz constant."""
    model = load_model("mnist")
    sigmas = make_sigmas("karras", 4, 0.002, 80.0)
    x = initial_noise(4, model.event_shape, float(sigmas[0]), seed=2)
    config = DiagnosticsConfig(
        lipschitz=False,
        amplification=True,
        lipschitz_samples=2,
        lipschitz_iters=4,
        reference=False,
        jacobian_mode="vjp2",
    )
    stein = stein_config("sc-lookahead", probes=1)
    first, again = (compare(model, x, sigmas, "dpmpp_2m", stein, diagnostics=config) for _ in range(2))
    values = [r.amplification_max for r in first.stein.trace]
    assert values == [r.amplification_max for r in again.stein.trace]
    assert all(v is not None and math.isfinite(v) and v > 0 for v in values)
    last = first.stein.trace[-1]  # the last state's tail is its one step: the step map's own constant
    one_step = compare(
        model,
        x,
        sigmas,
        "dpmpp_2m",
        stein,
        diagnostics=DiagnosticsConfig(
            lipschitz=True, lipschitz_samples=2, lipschitz_iters=4, reference=False, jacobian_mode="vjp2"
        ),
    )
    assert last.amplification_max == pytest.approx(one_step.stein.trace[-1].lipschitz_max, rel=0.05)

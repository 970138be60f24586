"""Runs as the app and the CLI make them (``run_experiment``): the layout and precision each run gives the network."""

import math

import pytest
import torch

from steindiff import initial_noise, load_model
from steindiff.app.summary import _moves, summary_markdown
from steindiff.correction.rule import SteinConfig
from steindiff.denoisers import prepare_for_device
from steindiff.experiment import Experiment, ModelCatalog, run_experiment
from steindiff.records import DiagnosticsConfig


@pytest.mark.slow
def test_image_runs_are_channels_last_on_the_cpu_unless_they_need_functorch():
    catalog = ModelCatalog()
    model = catalog.get("mnist", "cpu")

    def run(products: str, jacobian_mode: str) -> bool:
        """Runs mnist with these products and Lipschitz mode; whether the UNet was then channels-last."""
        experiment = Experiment(
            model="mnist",
            nfe=2,
            batch=2,
            stein=SteinConfig(probes=2, products=products),
            diagnostics=DiagnosticsConfig(lipschitz_samples=1, lipschitz_iters=2, jacobian_mode=jacobian_mode),
        )
        result = run_experiment(experiment, catalog)
        assert torch.isfinite(result.comparison.stein.samples).all()
        assert result.comparison.vanilla.trace[0].lipschitz_max > 0
        weight = next(w for w in model.parameters() if w.ndim == 4 and w.shape[1] > 1)  # one layout fits C = 1
        return weight.is_contiguous(memory_format=torch.channels_last)

    assert run("fd", "fd")
    assert not run("vjp-batched", "vjp2")  # vmap over the backward fails on channels-last activations
    assert not run("vjp", "jvp")  # so does forward-mode AD through GroupNorm
    assert run("vjp", "vjp2")
    x = initial_noise(4, model.event_shape, 2.0, seed=0)
    with torch.no_grad():
        assert torch.allclose(model(x, torch.tensor(2.0)), load_model("mnist")(x, torch.tensor(2.0)), atol=1e-5)


def test_a_run_on_cuda_keeps_float32_convolutions_and_matmuls_out_of_tf32():
    """PyTorch's default lets cuDNN run float32 convolutions in TF32, whose rounding (5e-4) swamps a forward
    difference's step (3e-4 of the state): a run on CUDA turns it off. The flags are process-wide and settable
    without a GPU; a CPU run leaves them alone."""
    cudnn, cublas = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, cublas.allow_tf32
    try:
        cudnn.allow_tf32 = cublas.allow_tf32 = True
        model = load_model("gmm-ring")
        prepare_for_device(model, "cpu")
        assert cudnn.allow_tf32 and cublas.allow_tf32
        prepare_for_device(model, "cuda")
        assert not cudnn.allow_tf32 and not cublas.allow_tf32
        assert cudnn.conv.fp32_precision != "tf32" and cublas.fp32_precision == "ieee"
    finally:
        cudnn.allow_tf32, cublas.allow_tf32 = before


def test_the_summary_says_at_how_many_steps_the_applied_gamma_moved_off_1_and_where_to():
    """The literal rule moves gamma at every step (the table gives the range it went to); a clip to [1, 1]
    never does, and its run is vanilla's."""
    catalog = ModelCatalog()
    no_lipschitz = DiagnosticsConfig(lipschitz=False)

    def run(gamma_min: float, gamma_max: float):
        stein = SteinConfig(gamma_min=gamma_min, gamma_max=gamma_max, probes=2)
        experiment = Experiment(model="gmm-ring", nfe=5, batch=64, stein=stein, diagnostics=no_lipschitz)
        return run_experiment(experiment, catalog)

    literal, held = run(0.1, math.inf), run(1.0, 1.0)
    steps = len(literal.comparison.sigmas) - 1
    assert literal.comparison.stein.gamma_moves == (steps, steps)
    moved = literal.comparison.stein.moved_gammas
    assert len(moved) == steps and all(g != 1 for g in moved)
    assert f"| {steps} of {steps} steps ({min(moved):.3g} .. {max(moved):.3g}) |" in summary_markdown(literal)
    assert held.comparison.stein.gamma_moves == (steps, 0) and f"| 0 of {steps} steps |" in summary_markdown(held)
    assert torch.equal(held.comparison.stein.samples, held.comparison.vanilla.samples)
    vanilla_row = next(line for line in summary_markdown(held).splitlines() if line.startswith("| vanilla"))
    assert "steps" not in vanilla_row  # vanilla only observes the rule: nothing moved, nothing to count
    assert "is vanilla's, step for step" in summary_markdown(held)
    assert "step for step" not in summary_markdown(literal) and "look-ahead" not in summary_markdown(literal)


def test_the_gamma_range_tells_a_move_smaller_than_its_digits_from_1():
    """mnist's default run, seed 4, applies gamma = 1.0019 once: '(1 .. 1)' read as no move at all."""
    assert _moves(1, 5, [1.0019242]) == "1 of 5 steps (1.002)"
    assert _moves(2, 5, [1.5, 0.99996]) == "2 of 5 steps (0.99996 .. 1.5)"
    assert _moves(3, 5, [0.27, 1.04, 0.5]) == "3 of 5 steps (0.27 .. 1.04)"
    assert _moves(0, 5, []) == "0 of 5 steps"


@pytest.mark.parametrize(("solver", "with_corrector"), [("dpmpp_2m", True), ("unipc", False)])
def test_the_summary_says_when_the_corrected_run_steps_with_the_look_ahead_corrector(solver, with_corrector):
    """Under the look-ahead rule the corrected run steps with the corrector, and differs from vanilla with gamma
    held at 1; UniPC's own step already looks ahead, so there the two runs are the same."""
    stein = SteinConfig(gamma_min=1.0, gamma_max=1.0, probes=1, lookahead=True)
    experiment = Experiment(
        model="gmm-ring", solver=solver, nfe=5, batch=64, stein=stein, diagnostics=DiagnosticsConfig(lipschitz=False)
    )
    result = run_experiment(experiment, ModelCatalog())
    table = summary_markdown(result)
    assert result.comparison.stein.gamma_moves[1] == 0
    assert torch.equal(result.comparison.stein.samples, result.comparison.vanilla.samples) == (not with_corrector)
    assert ("steps with the look-ahead corrector" in table) == with_corrector
    assert ("`dpmpp_2m+lookahead` is the corrector alone" in table) == with_corrector
    assert ("is vanilla's, step for step" in table) == (not with_corrector)

"""Runs as the app and the CLI make them (``run_experiment``): the layout each run gives the network."""

import torch

from steindiff import initial_noise, load_model
from steindiff.experiment import Experiment, ModelCatalog, run_experiment
from steindiff.records import DiagnosticsConfig
from steindiff.stein import SteinConfig


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

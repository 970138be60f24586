"""The shipped trained denoisers and the safety of weight loading."""

import pickle

import pytest
import torch

from steindiff import get_solver, initial_noise, load_model, make_sigmas, sample
from steindiff.bench.metrics import score_digits
from steindiff.denoisers import ASSETS, MODELS, PreconditionedDenoiser, WeightsError, load_denoiser, save_denoiser
from steindiff.denoisers.empirical import load_mnist
from steindiff.denoisers.networks import MLP, MLPConfig, UNet, UNetConfig
from steindiff.diagnostics.jacobians import local_lipschitz

TRAINED_2D = [name for name, info in MODELS.items() if name.startswith("mlp-")]


def _noisy(x0, sigma, seed=0):
    return x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_mnist_weights_denoise_better_than_the_identity(sigma):
    model = load_model("mnist")
    x0 = load_mnist()[0][::50][:64]
    noisy = _noisy(x0, sigma)
    with torch.no_grad():
        denoised = model(noisy, torch.tensor(sigma))
    assert ((denoised - x0) ** 2).mean() < 0.5 * ((noisy - x0) ** 2).mean()
    assert model.info["parameters"] == sum(p.numel() for p in model.network.parameters())


@pytest.mark.slow
def test_mnist_samples_at_high_nfe_are_confidently_recognised_digits():
    """The model card's check on 64 of its 1,000 samples: Heun at 35 NFE (card: confidence 0.915)."""
    model = load_model("mnist")
    sigmas = make_sigmas("karras", get_solver("heun").steps_for_nfe(35))
    samples = sample(model, initial_noise(64, model.event_shape, float(sigmas[0]), 0), sigmas, "heun").samples
    scores = score_digits(samples)
    assert scores.confidence > 0.85 and sum(c > 0 for c in scores.class_counts) >= 8


@pytest.mark.parametrize("name", TRAINED_2D)
@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.5])
def test_trained_mlps_approach_their_exact_denoisers(name, sigma):
    trained, exact = load_model(name), load_model("gmm-" + name.removeprefix("mlp-"))
    x0 = exact.sample(4000, torch.Generator().manual_seed(1)).float()
    noisy = _noisy(x0, sigma)
    s = torch.tensor(sigma)
    with torch.no_grad():
        mse_trained = ((trained(noisy, s) - x0) ** 2).sum(1).mean()
        mse_exact = ((exact(noisy, s) - x0) ** 2).sum(1).mean()
    # the exact denoiser is the MMSE estimator: on 4,000 draws the trained one can tie it, not beat it
    assert 0.98 * mse_exact <= mse_trained < 1.1 * mse_exact
    assert mse_trained < ((noisy - x0) ** 2).sum(1).mean()


def test_save_load_round_trip_and_autodiff_both_ways(tmp_path):
    net = UNet(UNetConfig(channels=8, multipliers=(1, 2), groups=4, emb_dim=16))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model = PreconditionedDenoiser(net, (1, 28, 28), 0.5, "tiny", "unet")
    save_denoiser(model, tmp_path / "tiny.safetensors", info={"note": "test"})
    loaded = load_denoiser(tmp_path / "tiny.safetensors")
    x, s = torch.randn(3, 1, 28, 28), torch.tensor(0.7)
    assert torch.equal(model(x, s), loaded(x, s)) and loaded.info == {"note": "test"}
    forward = local_lipschitz(lambda z: loaded(z, s), x, iters=5, generator=torch.Generator().manual_seed(0))
    backward = local_lipschitz(lambda z: loaded(z, s), x, 5, torch.Generator().manual_seed(0), mode="vjp2")
    assert torch.allclose(forward, backward, rtol=1e-4)


def _tiny_mlp(tmp_path):
    model = PreconditionedDenoiser(MLP(MLPConfig(width=16, depth=2, emb_dim=8)), (2,), 0.5, "t", "mlp")
    save_denoiser(model, tmp_path / "good.safetensors")
    return tmp_path / "good.safetensors"


@pytest.mark.slow
def test_large_cpu_batches_go_through_the_unet_in_chunks_with_the_same_values():
    model = load_model("mnist")
    x = initial_noise(150, model.event_shape, 1.0, seed=4).requires_grad_(True)  # 3 chunks, the last partial
    sigma = torch.linspace(0.01, 50.0, 150)  # per-sample levels: a chunk must keep its own
    out = model(x, sigma)
    one_by_one = torch.cat([model(x[i : i + 1], sigma[i : i + 1]) for i in range(0, 150, 7)])
    assert torch.allclose(out[::7], one_by_one, atol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert grad.shape == x.shape and bool(grad[-1].abs().sum() > 0)


def test_missing_truncated_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match=r"not found: .*nothing\.safetensors"):
        load_denoiser(tmp_path / "nothing.safetensors")
    good = _tiny_mlp(tmp_path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"truncated\.safetensors: not a readable safetensors file"):
        load_denoiser(truncated)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(WeightsError, match="not a steindiff denoiser"):
        load_denoiser(tmp_path / "foreign.safetensors")


def test_wrong_shapes_are_named(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = _tiny_mlp(tmp_path)
    with safe_open(str(good), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    tensors["out.weight"] = torch.zeros(3, 16)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(
        WeightsError, match=r"bad.safetensors: tensor 'out.weight' has shape \(3, 16\), expected \(2, 16\)"
    ):
        load_denoiser(tmp_path / "bad.safetensors")


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/steindiff-unpickled-marker", "w"))


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    marker = __import__("pathlib").Path("/tmp/steindiff-unpickled-marker")
    marker.unlink(missing_ok=True)
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_denoiser(path)
    assert not marker.exists()


def test_shipped_files_are_safetensors_only():
    shipped = sorted(p.name for p in ASSETS.iterdir() if p.suffix in {".pt", ".pth", ".bin", ".pkl", ".ckpt"})
    assert shipped == []

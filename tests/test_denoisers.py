import pytest
import torch

from steindiff.denoisers import MODELS, CountingDenoiser, GaussianMixture, load_model


def _autograd_jacobian(model, x, sigma):
    def single(z):
        return model(z[None], sigma)[0].reshape(-1)

    return torch.func.vmap(torch.func.jacrev(single))(x).reshape(x.shape[0], model.dim, model.dim)


@pytest.mark.parametrize("name", ["gmm-ring", "gmm-aniso", "gmm-moons", "gaussian", "empirical-digits"])
@pytest.mark.parametrize("sigma", [0.05, 0.7, 12.0])
def test_closed_form_jacobian_matches_autograd(name, sigma):
    model = load_model(name)
    gen = torch.Generator().manual_seed(0)
    x = model.sample(4, gen) + sigma * torch.randn(4, *model.event_shape, generator=gen, dtype=torch.float64)
    s = torch.tensor(sigma, dtype=torch.float64)
    assert torch.allclose(model.jacobian(x, s), _autograd_jacobian(model, x, s), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", ["gmm-ring", "gmm-aniso"])
def test_mixture_denoiser_satisfies_tweedie(name):
    model: GaussianMixture = load_model(name)
    x = torch.randn(16, 2, dtype=torch.float64)
    for sigma in (0.1, 1.0, 5.0):
        s = torch.tensor(sigma, dtype=torch.float64)
        assert torch.allclose(model(x, s), x + sigma**2 * model.score(x, s), atol=1e-12)


def test_mixture_denoiser_is_the_posterior_mean():
    """E[x0 | x] is the best predictor: any other function of x has larger MSE (here: D + small tilt)."""
    model = load_model("gmm-ring")
    gen = torch.Generator().manual_seed(1)
    x0 = model.sample(20000, gen)
    x = x0 + 0.4 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    d = model(x, torch.tensor(0.4, dtype=torch.float64))
    mse = ((d - x0) ** 2).sum(1).mean()
    for shrink in (0.95, 1.05):
        assert mse < (((shrink * d) - x0) ** 2).sum(1).mean()


def test_limits_at_sigma_zero():
    gmm = load_model("gmm-aniso")
    x = torch.randn(8, 2, dtype=torch.float64)
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert torch.allclose(gmm(x, zero), x, atol=1e-12)
    assert torch.allclose(gmm.jacobian(x, zero), torch.eye(2, dtype=torch.float64).expand(8, 2, 2), atol=1e-10)
    emp = load_model("empirical-digits")
    y = emp.sample(3, torch.Generator().manual_seed(0)) + 0.01
    out = emp(y, zero)
    nearest = emp.points[((y.reshape(3, 1, -1) - emp.points) ** 2).sum(-1).argmin(1)]
    assert torch.equal(out.reshape(3, -1), nearest)
    assert torch.count_nonzero(emp.jacobian(y, zero)) == 0


def test_registry_and_nfe_counter():
    assert {"gmm-ring", "gmm-aniso", "gmm-moons", "empirical-mnist", "empirical-digits"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        load_model("nope")
    model = CountingDenoiser(load_model("gmm-ring"))
    for _ in range(3):
        model(torch.zeros(5, 2), torch.tensor(1.0))
    assert model.nfe == 3


def test_empirical_mnist_ships_offline():
    model = load_model("empirical-mnist")
    assert model.points.shape == (5000, 784) and model.event_shape == (1, 28, 28)
    assert model.points.min() == -1 and model.points.max() == 1


def test_mixture_rejects_inconsistent_parameters():
    with pytest.raises(ValueError, match="must agree"):
        GaussianMixture(torch.ones(2), torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2))
    with pytest.raises(torch.linalg.LinAlgError):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), -torch.eye(2)[None])

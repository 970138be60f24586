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


def _random_mixture(dim: int, components: int) -> GaussianMixture:
    """Random means and full covariances: principal axes that are no 2-D reflection (those are symmetric)."""
    gen = torch.Generator().manual_seed(dim)
    factors = torch.randn(components, dim, dim, generator=gen, dtype=torch.float64)
    covs = factors @ factors.transpose(1, 2) / dim + 0.05 * torch.eye(dim, dtype=torch.float64)
    means = torch.randn(components, dim, generator=gen, dtype=torch.float64)
    return GaussianMixture(torch.rand(components, generator=gen, dtype=torch.float64) + 0.1, means, covs)


@pytest.mark.parametrize(
    "make",
    [lambda: load_model("gmm-aniso"), lambda: load_model("gmm-moons"), lambda: _random_mixture(3, 4)],
    ids=["gmm-aniso", "gmm-moons", "random-3d"],
)
def test_mixture_matches_the_dense_formulas(make):
    """The mixture works in its components' principal axes; here each S_j = Sigma_j + sigma^2 I is solved
    densely: responsibilities from N(x; mu_j, S_j), D = sum_j w_j (mu_j + Sigma_j S_j^{-1} (x - mu_j)),
    score = -sum_j w_j S_j^{-1} (x - mu_j), and the closed-form Jacobian is autograd's of that D; one
    shared sigma and one per sample."""
    model: GaussianMixture = make()
    gen = torch.Generator().manual_seed(3)
    x = model.sample(12, gen) + torch.randn(12, model.dim, generator=gen, dtype=torch.float64)
    for sigma in (torch.tensor(0.3, dtype=torch.float64), torch.linspace(0.01, 6.0, 12, dtype=torch.float64)):
        per_sample = sigma.expand(12).reshape(12, 1, 1, 1)
        total = model.covs + per_sample**2 * torch.eye(model.dim, dtype=torch.float64)  # (B, J, d, d)
        diff = (x[:, None, :] - model.means).unsqueeze(-1)
        solved = torch.linalg.solve(total, diff).squeeze(-1)
        log_prob = torch.distributions.MultivariateNormal(model.means, covariance_matrix=total).log_prob(x[:, None])
        resp = torch.softmax(model.log_weights + log_prob, dim=-1).unsqueeze(-1)
        posterior = model.means + (model.covs @ solved.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(model(x, sigma), (resp * posterior).sum(1), atol=1e-12, rtol=1e-10)
        assert torch.allclose(model.score(x, sigma), -(resp * solved).sum(1), atol=1e-10, rtol=1e-10)
        jacobian = torch.func.vmap(torch.func.jacrev(lambda z, s: model(z[None], s[None])[0]))(x, sigma.expand(12))
        assert torch.allclose(model.jacobian(x, sigma), jacobian, atol=1e-10, rtol=1e-8)


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


@pytest.mark.slow
def test_empirical_mnist_ships_offline():
    model = load_model("empirical-mnist")
    assert model.points.shape == (5000, 784) and model.event_shape == (1, 28, 28)
    assert model.points.min() == -1 and model.points.max() == 1


def test_mixture_rejects_inconsistent_parameters():
    with pytest.raises(ValueError, match="must agree"):
        GaussianMixture(torch.ones(2), torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2))
    with pytest.raises(torch.linalg.LinAlgError):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), -torch.eye(2)[None])

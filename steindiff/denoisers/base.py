"""The denoiser protocol: D(x, sigma) ~ E[x0 | x] in EDM coordinates (x = x0 + sigma * eps)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

__all__ = [
    "CountingDenoiser",
    "DenoiseFn",
    "Denoiser",
    "ExactDenoiser",
    "ModelKind",
    "model_kind",
    "prepare_for_device",
]

#: what solvers and flows call: (x, sigma) -> D(x, sigma), a denoiser or a wrapper of one
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: what a model's samples are: images (C, H, W) or points in the plane
ModelKind = Literal["image", "2d"]


def model_kind(event_shape: Sequence[int]) -> ModelKind:
    """The one test of what a model draws: images for a (C, H, W) event, else points."""
    return "image" if len(event_shape) == 3 else "2d"


class Denoiser(nn.Module, abc.ABC):
    """A posterior-mean estimator over batches of shape ``(B, *event_shape)``.

    ``sigma`` is a 0-d tensor (one noise level for the whole batch) or a ``(B,)`` tensor.
    Samples never interact: the output for sample i depends on input i only, which is what makes
    per-sample Hutchinson probes and per-sample Jacobians through a batched call valid.
    """

    name: str = "denoiser"
    #: True when D is the exact posterior mean of a known distribution (the ideal denoiser).
    exact: bool = False

    def __init__(self, event_shape: tuple[int, ...], sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    @property
    def kind(self) -> ModelKind:
        """What the samples are (:func:`model_kind`)."""
        return model_kind(self.event_shape)

    @property
    def dim(self) -> int:
        """Dimension d of one sample."""
        return int(torch.Size(self.event_shape).numel())

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0_hat = D(x, sigma)."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (or points) for display and metrics from samples: ``x`` itself, except for latent models."""
        return x

    def per_sample_sigma(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``sigma`` as a ``(B,)`` tensor in the dtype and device of ``x``."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])


class ExactDenoiser(Denoiser):
    """An ideal denoiser with a closed-form Jacobian dD/dx (and hence an exact divergence)."""

    exact = True

    @abc.abstractmethod
    def jacobian(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """dD/dx per sample, shape ``(B, d, d)`` over the flattened event."""

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws from the data distribution whose posterior mean this denoiser is."""


class CountingDenoiser:
    """Wraps a denoiser and counts network function evaluations (one batched call = 1 NFE)."""

    def __init__(self, denoiser: DenoiseFn):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma)


def prepare_for_device(model: Denoiser, device: str | torch.device, functorch: bool = False) -> Denoiser:
    """Readies ``model`` for a run on ``device`` and returns it: its 4-D weights laid out, in place, and float32
    convolutions and matmuls kept in float32 there.

    Layout: channels-last for image models on the CPU, unless the run uses ``functorch`` transforms
    (forward-mode AD, or gradients batched by vmap: PyTorch's GroupNorm and vmap fail on channels-last
    activations); contiguous otherwise. oneDNN's convolutions and group norms are faster channels-last: the
    mnist UNet's forward took 95 instead of 117 ms at batch 48 in the app (2 cores), and a forward and
    backward at batch 52 250 instead of 300 ms. A conversion takes about a millisecond for the shipped UNets.

    Precision: on CUDA, PyTorch lets cuDNN run float32 convolutions in TF32 by default, which reads 10 bits of
    each input's mantissa. A forward difference moves the state by about 3e-4 of its norm (``fd_step``), under
    TF32's rounding of 5e-4: with TF32 emulated on the CPU the mnist UNet's forward-difference Lipschitz
    estimates strayed up to 20% from the double VJP's (within 0.2% in float32) and the Hutchinson s_div 1.3%.
    This turns TF32 off in cuDNN and CUDA's matmuls for the whole process (PyTorch's flags of old, which leave
    its newer ``fp32_precision`` settings readable and consistent).
    """
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    fast = torch.device(device).type == "cpu" and model.kind == "image" and not functorch
    return model.to(memory_format=torch.channels_last if fast else torch.contiguous_format)

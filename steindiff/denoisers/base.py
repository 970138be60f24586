"""The denoiser protocol: D(x, sigma; cond) ~ E[x0 | x, cond] in EDM coordinates (x = x0 + sigma * eps).

Conditioning (as k-diffusion's ``extra_args`` and EDM's ``class_labels``) is per sample: keyword tensors whose
leading dimension is the batch's, e.g. class labels of shape (B,). Code that slices, stacks or repeats a
batch does the same to its conditioning with :func:`cond_rows`, :func:`cond_repeat` and :func:`cond_cat`,
and a solver step sees it bound to its denoiser (:func:`bind_cond`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

__all__ = [
    "Cond",
    "CountingDenoiser",
    "DenoiseFn",
    "Denoiser",
    "ExactDenoiser",
    "ModelKind",
    "bind_cond",
    "check_cond",
    "cond_cat",
    "cond_repeat",
    "cond_rows",
    "model_kind",
    "prepare_for_device",
    "same_cond",
]

#: per-sample conditioning of a batch: keyword name -> tensor whose leading dimension is the batch's (B, ...)
Cond = Mapping[str, torch.Tensor]
#: what solvers and flows call: (x, sigma, **cond) -> D(x, sigma; cond), a denoiser or a wrapper of one; a solver
#: step calls it as (x, sigma), with its rows' conditioning bound (:func:`bind_cond`)
DenoiseFn = Callable[..., torch.Tensor]
#: what a model's samples are: images (C, H, W) or points in the plane
ModelKind = Literal["image", "2d"]


def model_kind(event_shape: Sequence[int]) -> ModelKind:
    """The one test of what a model draws: images for a (C, H, W) event, else points."""
    return "image" if len(event_shape) == 3 else "2d"


class Denoiser(nn.Module, abc.ABC):
    """A posterior-mean estimator over batches of shape ``(B, *event_shape)``.

    ``sigma`` is a 0-d tensor (one noise level for the whole batch) or a ``(B,)`` tensor. Conditioning is
    passed as keyword tensors with a leading batch dimension B (:data:`Cond`), the names of
    :attr:`conditions`; a model without conditioning takes none, and ``sample`` and ``compare`` refuse
    conditioning it does not name (:func:`check_cond`) rather than ignore it.
    Samples never interact: the output for sample i depends on input i (and its conditioning) only, which is
    what makes per-sample Hutchinson probes and per-sample Jacobians through a batched call valid.
    """

    name: str = "denoiser"
    #: True when D is the exact posterior mean of a known distribution (the ideal denoiser).
    exact: bool = False
    #: the names of the conditioning :meth:`forward` takes, each required (none: an unconditional model)
    conditions: frozenset[str] = frozenset()

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
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        """The posterior mean x0_hat = D(x, sigma; cond) ~ E[x0 | x, cond], whose residual gives the score by
        Tweedie's formula: grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (EDM, Karras et al. 2022, Eq. 3).

        Arguments:
            x: noisy samples x = x0 + sigma eps, (B, *event_shape).
            sigma: the noise level, 0-d or (B,).
            cond: the conditioning :attr:`conditions` names, each (B, ...): e.g. class labels (B,).

        Returns:
            x0_hat, (B, *event_shape).
        """

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
    """Wraps a denoiser and counts network function evaluations (one batched call = 1 NFE); the conditioning
    of the call's rows passes through."""

    def __init__(self, denoiser: DenoiseFn):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, **cond)


def check_cond(cond: Cond | None, batch: int, accepts: frozenset[str] | None = None) -> dict[str, torch.Tensor] | None:
    """``cond`` checked for a batch of ``batch`` samples: None when empty, else a dict of tensors whose leading
    dimension is ``batch``. With ``accepts`` (a model's :attr:`Denoiser.conditions`), a name it does not take
    and one it lacks are refused: an unconditional model is given no conditioning to ignore."""
    given = dict(cond or {})
    if accepts is not None and set(given) != set(accepts):
        unknown, missing = sorted(set(given) - set(accepts)), sorted(set(accepts) - set(given))
        takes = ", ".join(sorted(accepts)) or "none"
        raise ValueError(f"the model takes conditioning {takes}: got {unknown} it does not take, lacks {missing}")
    for name, value in given.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or len(value) != batch:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"conditioning {name!r} must be a tensor with a leading batch dimension {batch}, got {shape}"
            )
    return given or None


def bind_cond(denoise: DenoiseFn, cond: Cond | None) -> DenoiseFn:
    """``denoise`` with the conditioning of a batch's rows bound: (x, sigma) -> denoise(x, sigma, **cond), which
    checks that x has as many rows; ``denoise`` itself when there is none."""
    if not cond:
        return denoise
    rows = {len(value) for value in cond.values()}
    if len(rows) != 1:
        raise ValueError(f"conditioning of different batch sizes: { {k: len(v) for k, v in cond.items()} }")
    (batch,) = rows

    def bound(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        if len(x) != batch:
            raise ValueError(f"a call on {len(x)} rows with the conditioning of {batch}")
        return denoise(x, sigma, **cond)

    return bound


def cond_rows(cond: Cond | None, rows: slice | torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The conditioning of ``rows`` (a slice or an index tensor) of a batch, as ``x[rows]`` takes them."""
    return None if not cond else {name: value[rows] for name, value in cond.items()}


def cond_repeat(cond: Cond | None, times: int) -> dict[str, torch.Tensor] | None:
    """The conditioning of ``times`` copies of a batch stacked one after the other, as ``torch.cat([x] * times)``."""
    return None if not cond else {name: torch.cat([value] * times) for name, value in cond.items()}


def cond_cat(conds: Sequence[Cond | None]) -> dict[str, torch.Tensor] | None:
    """The conditioning of batches concatenated in order, as ``torch.cat(xs)``: None when none has any; the
    batches must all have the same names."""
    if not any(conds):
        return None
    names = {tuple(sorted(c)) if c else () for c in conds}
    if len(names) != 1:
        raise ValueError(f"batches with different conditioning cannot be concatenated: {sorted(names)}")
    return {name: torch.cat([c[name] for c in conds]) for name in conds[0]}


def same_cond(a: Cond | None, b: Cond | None) -> bool:
    """Whether two conditionings are the same, value for value (none and empty alike)."""
    a, b = dict(a or {}), dict(b or {})
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def prepare_for_device(model: Denoiser, device: str | torch.device, functorch: bool = False) -> Denoiser:
    """Readies ``model`` for a run on ``device`` and returns it: its 4-D weights laid out, in place, and float32
    convolutions and matmuls kept in float32 there.

    Layout: channels-last for image models on the CPU, unless the run uses ``functorch`` transforms
    (forward-mode AD, or gradients batched by vmap: PyTorch's GroupNorm and vmap fail on channels-last
    activations); contiguous otherwise. oneDNN's convolutions and group norms are faster channels-last, forward
    and backward, and the conversion is cheap for the shipped UNets (measured: see docs/design.md).

    Precision: on CUDA, PyTorch lets cuDNN run float32 convolutions in TF32 by default, which reads 10 bits of
    each input's mantissa. A forward difference moves the state by about 3e-4 of its norm (``fd_step``), under
    TF32's rounding of 5e-4, so TF32 would spoil the forward-difference Lipschitz estimates and Hutchinson
    products that float32 gets right (measured: see docs/design.md). This turns TF32 off in cuDNN and CUDA's
    matmuls for the whole process (PyTorch's flags of old, which leave its newer ``fp32_precision`` settings
    readable and consistent).
    """
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    fast = torch.device(device).type == "cpu" and model.kind == "image" and not functorch
    return model.to(memory_format=torch.channels_last if fast else torch.contiguous_format)

"""Trained denoisers: EDM preconditioning around a compact UNet (images) or an MLP (2-D).

Only plain torch ops (conv, group norm, matmul attention), so forward- and reverse-mode autodiff,
double VJPs and torch.func transforms all work through them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .base import Denoiser

__all__ = ["MLP", "MLPConfig", "PreconditionedDenoiser", "UNet", "UNetConfig", "build_network"]


def _fourier_features(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the (B,) noise conditioning, frequencies 1 .. 1000 (DDPM/EDM style)."""
    freqs = torch.exp(torch.linspace(0, math.log(1000.0), dim // 2, device=c_noise.device, dtype=c_noise.dtype))
    angles = c_noise[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift  # adaptive group norm (Dhariwal & Nichol 2021)
        return self.skip(x) + self.conv2(F.silu(h))


class _Attention(nn.Module):
    """Single-head self-attention over pixels, written with matmuls (autodiff in every mode)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (b, hw, hw)
        return x + self.proj((v @ weights.transpose(1, 2)).reshape(b, c, h, w))


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`UNet`: image size (padded), channels, multipliers, blocks a level."""

    image_size: int = 32
    in_channels: int = 1
    channels: int = 32
    multipliers: tuple[int, ...] = (1, 2, 2)
    blocks: int = 1
    attention_levels: tuple[int, ...] = (2,)
    emb_dim: int = 128
    groups: int = 8


class UNet(nn.Module):
    """F(c_in x, c_noise): a compact DDPM-style UNet (residual blocks with adaptive group norm,
    attention at the coarsest level, skip connections), about 1M parameters at the defaults."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c0, emb = config.channels, config.emb_dim
        self.embed = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.stem = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c = [c0], c0
        for level, mult in enumerate(config.multipliers):
            for _ in range(config.blocks):
                self.down.append(_ResBlock(c, c0 * mult, emb, config.groups))
                c = c0 * mult
                skips.append(c)
            if level < len(config.multipliers) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList(
            [_ResBlock(c, c, emb, config.groups), _Attention(c, config.groups), _ResBlock(c, c, emb, config.groups)]
        )
        for level, mult in reversed(list(enumerate(config.multipliers))):
            for _ in range(config.blocks + 1):
                self.up.append(_ResBlock(c + skips.pop(), c0 * mult, emb, config.groups))
                c = c0 * mult
                if level in config.attention_levels:
                    self.up.append(_Attention(c, config.groups))
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.head = nn.Sequential(
            nn.GroupNorm(min(config.groups, c), c), nn.SiLU(), nn.Conv2d(c, config.in_channels, 3, padding=1)
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(_fourier_features(c_noise, self.config.emb_dim))
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
            if not isinstance(layer, _Attention):
                skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, _ResBlock) else layer(h)
        return self.head(h)


@dataclass(frozen=True)
class MLPConfig:
    """Architecture of :class:`MLP`: data dimension, width, depth, embedding size."""

    dim: int = 2
    width: int = 256
    depth: int = 4
    emb_dim: int = 64


class MLP(nn.Module):
    """F(c_in x, c_noise) for low-dimensional data: the noise embedding is added to every hidden layer."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Sequential(nn.Linear(config.emb_dim, config.width), nn.SiLU())
        self.inp = nn.Linear(config.dim, config.width)
        self.hidden = nn.ModuleList(nn.Linear(config.width, config.width) for _ in range(config.depth - 1))
        self.emb_proj = nn.ModuleList(nn.Linear(config.width, config.width) for _ in range(config.depth - 1))
        self.out = nn.Linear(config.width, config.dim)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(_fourier_features(c_noise, self.config.emb_dim))
        h = F.silu(self.inp(x))
        for layer, proj in zip(self.hidden, self.emb_proj, strict=True):
            h = F.silu(layer(h) + proj(emb))
        return self.out(h)


def build_network(kind: str, config: dict) -> nn.Module:
    """A network from its kind ("unet" or "mlp") and its config dictionary (as stored with the weights)."""
    if kind == "unet":
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        return UNet(UNetConfig(**cfg))
    if kind == "mlp":
        return MLP(MLPConfig(**config))
    raise ValueError(f"unknown network kind {kind!r}; expected 'unet' or 'mlp'")


#: samples a UNet call takes at once on the CPU: oneDNN's cost a sample grows with the batch past a few dozen
#: (measured: see docs/design.md), and the forward-difference probes make batches of (K + 1) B
UNET_CPU_CHUNK = 64


class PreconditionedDenoiser(Denoiser):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, Eq. 7 and Table 1):
    c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.

    Images of ``image_size`` smaller than the network's are padded with ``pad_value`` (the data's
    background) and cropped back, so the event shape is the data's.
    """

    def __init__(
        self,
        network: nn.Module,
        event_shape: tuple[int, ...],
        sigma_data: float,
        name: str,
        kind: str,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        pad_value: float = -1.0,
        info: dict | None = None,
    ):
        super().__init__(event_shape, sigma_min=sigma_min, sigma_max=sigma_max)
        # the network's kind ("unet" or "mlp"), stored as "kind" with the weights; ``Denoiser.kind`` is the samples'
        self.network, self.sigma_data, self.name, self.network_kind = network, float(sigma_data), name, kind
        self.pad_value, self.info = pad_value, dict(info or {})

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.network_kind != "unet":
            return x, 0
        pad = (self.network.config.image_size - x.shape[-1]) // 2
        return (F.pad(x, (pad,) * 4, value=self.pad_value) if pad else x), pad

    def _network(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """F(x_in, c_noise); a UNet on the CPU in chunks of at most UNET_CPU_CHUNK samples."""
        if self.network_kind != "unet" or x_in.device.type != "cpu" or len(x_in) <= UNET_CPU_CHUNK:
            return self.network(x_in, c_noise)
        chunks = zip(x_in.split(UNET_CPU_CHUNK), c_noise.split(UNET_CPU_CHUNK), strict=True)
        return torch.cat([self.network(part, noise) for part, noise in chunks])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = self.per_sample_sigma(x, sigma)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        sd2 = self.sigma_data**2
        c_skip, c_out, c_in = sd2 / (s**2 + sd2), s * self.sigma_data / (s**2 + sd2).sqrt(), 1 / (s**2 + sd2).sqrt()
        padded, pad = self._pad(c_in * x)
        out = self._network(padded, sigma.log() / 4)
        if pad:
            out = out[..., pad:-pad, pad:-pad]
        return c_skip * x + c_out * out

    def config_dict(self) -> dict:
        """What is stored beside the weights to rebuild this denoiser."""
        return {
            "kind": self.network_kind,
            "network": asdict(self.network.config),
            "event_shape": list(self.event_shape),
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "pad_value": self.pad_value,
            "name": self.name,
        }

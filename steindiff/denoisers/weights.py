"""Saving and loading trained denoisers as safetensors (never pickle), with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .networks import PreconditionedDenoiser, build_network

__all__ = ["WeightsError", "load_denoiser", "save_denoiser"]

METADATA_KEY = "steindiff"


class WeightsError(ValueError):
    """A weights file that is missing, not safetensors, truncated, or does not fit the architecture."""


def save_denoiser(denoiser: PreconditionedDenoiser, path: str | Path, info: dict | None = None) -> None:
    """Write the network weights and the configuration needed to rebuild ``denoiser``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in denoiser.network.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps({**denoiser.config_dict(), "info": info or denoiser.info})}
    save_file(tensors, str(path), metadata=metadata)


def load_denoiser(path: str | Path) -> PreconditionedDenoiser:
    """Rebuild a denoiser saved by :func:`save_denoiser`; raises :class:`WeightsError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    if METADATA_KEY not in metadata:
        raise WeightsError(f"{path}: no '{METADATA_KEY}' metadata: not a steindiff denoiser")
    config = json.loads(metadata[METADATA_KEY])
    network = build_network(config["kind"], config["network"])
    expected = network.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{path}: tensors do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise WeightsError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    network.load_state_dict(tensors)
    network.requires_grad_(False)
    return PreconditionedDenoiser(
        network,
        tuple(config["event_shape"]),
        config["sigma_data"],
        config["name"],
        config["kind"],
        sigma_min=config["sigma_min"],
        sigma_max=config["sigma_max"],
        pad_value=config["pad_value"],
        info=config.get("info", {}),
    ).eval()

"""Saving and loading trained denoisers as safetensors (never pickle), with clear errors.

Loading trusts nothing in the file: the metadata is parsed and checked (required keys, known fields, value
ranges), the architecture it describes is built on the meta device (no memory), and every tensor's name,
shape and dtype in the header is checked against it before any tensor is read. The memory a load takes is
then bounded by the file's own size, whatever its header asks for.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .networks import MLPConfig, PreconditionedDenoiser, UNetConfig, build_network

__all__ = ["WeightsError", "load_denoiser", "save_denoiser"]

METADATA_KEY = "steindiff"

#: the safetensors dtypes a network's weights may be stored in; they load as the network's own dtype
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: the configuration's keys beside ``info`` (optional): all required
REQUIRED = ("kind", "network", "event_shape", "sigma_data", "sigma_min", "sigma_max", "pad_value", "name")
#: the most ints an architecture field may hold (image size, channels, widths, ...): bounds what is built
SIZE_LIMIT = 65536
#: per network kind and integer field: the range of its values
INT_RANGES: dict[str, dict[str, tuple[int, int]]] = {
    "unet": {
        "image_size": (1, 4096),
        "in_channels": (1, 64),
        "channels": (1, 4096),
        "blocks": (1, 16),
        "emb_dim": (2, 8192),
        "groups": (1, 4096),
    },
    "mlp": {"dim": (1, SIZE_LIMIT), "width": (1, SIZE_LIMIT), "depth": (1, 64), "emb_dim": (2, 8192)},
}
#: the UNet's list fields: at most this many entries
MAX_LEVELS = 8


class WeightsError(ValueError):
    """A weights file that is missing, not safetensors, truncated, or does not fit the architecture."""


def save_denoiser(denoiser: PreconditionedDenoiser, path: str | Path, info: dict | None = None) -> None:
    """Write the network weights and the configuration needed to rebuild ``denoiser``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in denoiser.network.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps({**denoiser.config_dict(), "info": info or denoiser.info})}
    save_file(tensors, str(path), metadata=metadata)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


def _int_in(path: Path, field: str, value: Any, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise WeightsError(f"{path}: the network's {field!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _int_list(path: Path, field: str, value: Any, low: int, high: int, min_len: int) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not min_len <= len(value) <= MAX_LEVELS:
        raise WeightsError(
            f"{path}: the network's {field!r} must be a list of {min_len} to {MAX_LEVELS} integers, got {value!r}"
        )
    for item in value:
        _int_in(path, field, item, low, high)
    return tuple(value)


def _network_config(path: Path, kind: str, network: Any, event_shape: tuple[int, ...]) -> dict[str, Any]:
    """The architecture fields of ``kind`` checked (known, typed, in range, consistent with the event shape);
    missing fields take the dataclass defaults, as they always did."""
    if not isinstance(network, dict):
        raise WeightsError(f"{path}: 'network' must be a JSON object of architecture fields, got {network!r}")
    defaults = {f.name: f.default for f in fields(UNetConfig if kind == "unet" else MLPConfig)}
    unknown = sorted(set(network) - set(defaults))
    if unknown:
        raise WeightsError(
            f"{path}: unknown field {unknown[0]!r} in the {kind!r} network config (known: {', '.join(defaults)})"
        )
    config = {**defaults, **network}
    for field, (low, high) in INT_RANGES[kind].items():
        _int_in(path, field, config[field], low, high)
    if config["emb_dim"] % 2:
        raise WeightsError(f"{path}: the network's 'emb_dim' must be even, got {config['emb_dim']}")
    if kind == "mlp":
        if event_shape != (config["dim"],):
            raise WeightsError(f"{path}: 'event_shape' {list(event_shape)} does not fit an MLP of dim {config['dim']}")
        return config
    config["multipliers"] = _int_list(path, "multipliers", config["multipliers"], 1, 64, 1)
    levels = len(config["multipliers"])
    # levels the UNet does not have get no attention (the default (2,) on a two-level UNet): allowed, as always
    config["attention_levels"] = _int_list(path, "attention_levels", config["attention_levels"], 0, MAX_LEVELS, 0)
    size, factor = config["image_size"], 2 ** (levels - 1)
    if size % factor:
        raise WeightsError(f"{path}: the network's 'image_size' {size} is not divisible by {factor} ({levels} levels)")
    if (
        len(event_shape) != 3
        or event_shape[0] != config["in_channels"]
        or max(event_shape[1:]) > size
        or (size - event_shape[2]) % 2
    ):
        raise WeightsError(
            f"{path}: 'event_shape' {list(event_shape)} does not fit a UNet of {config['in_channels']} channel(s) "
            f"and image size {size}"
        )
    return config


def _check_config(path: Path, config: Any) -> dict[str, Any]:
    """The stored configuration, every key and value checked; raises :class:`WeightsError` naming ``path``."""
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: the '{METADATA_KEY}' metadata is not a JSON object")
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise WeightsError(
            f"{path}: the '{METADATA_KEY}' metadata has no {missing[0]!r} (required: {', '.join(REQUIRED)})"
        )
    unknown = sorted(set(config) - {*REQUIRED, "info"})
    if unknown:
        raise WeightsError(f"{path}: unknown field {unknown[0]!r} in the '{METADATA_KEY}' metadata")
    if config["kind"] not in ("unet", "mlp"):
        raise WeightsError(f"{path}: unknown network 'kind' {config['kind']!r}; expected 'unet' or 'mlp'")
    shape = config["event_shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= 3 or not all(_is_int(n) and n >= 1 for n in shape):
        raise WeightsError(f"{path}: 'event_shape' must be a list of 1 to 3 positive integers, got {shape!r}")
    for key in ("sigma_data", "sigma_min", "sigma_max", "pad_value"):
        if not _is_number(config[key]):
            raise WeightsError(f"{path}: {key!r} must be a finite number, got {config[key]!r}")
    if config["sigma_data"] <= 0:
        raise WeightsError(f"{path}: 'sigma_data' must be positive, got {config['sigma_data']!r}")
    if not 0 < config["sigma_min"] < config["sigma_max"]:
        raise WeightsError(
            f"{path}: 'sigma_min' and 'sigma_max' must satisfy 0 < sigma_min < sigma_max, "
            f"got {config['sigma_min']!r} and {config['sigma_max']!r}"
        )
    if not isinstance(config["name"], str):
        raise WeightsError(f"{path}: 'name' must be a string, got {config['name']!r}")
    if not isinstance(config.get("info", {}), dict):
        raise WeightsError(f"{path}: 'info' must be a JSON object, got {config['info']!r}")
    network = _network_config(path, config["kind"], config["network"], tuple(shape))
    return {**config, "network": network}


def _meta_network(path: Path, kind: str, network: dict[str, Any]) -> torch.nn.Module:
    """The architecture on the meta device: its parameters' names, shapes and dtypes, and no memory."""
    try:
        with torch.device("meta"):
            return build_network(kind, network)
    except (ValueError, TypeError, RuntimeError) as err:
        raise WeightsError(f"{path}: the {kind!r} network config does not build ({err})") from None


def _check_header(path: Path, handle, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor the header lists has the name, shape and a floating dtype the architecture expects."""
    keys = set(handle.keys())
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{path}: tensors do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]}"
            + (f"; {len(missing)} missing, {len(unexpected)} unexpected" if len(missing) + len(unexpected) > 6 else "")
            + ")"
        )
    for key, want in expected.items():
        view = handle.get_slice(key)
        shape, dtype = tuple(view.get_shape()), view.get_dtype()
        if shape != tuple(want.shape):
            raise WeightsError(f"{path}: tensor {key!r} has shape {shape}, expected {tuple(want.shape)}")
        if dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{path}: tensor {key!r} has dtype {dtype}, expected one of {', '.join(FLOAT_DTYPES)}")


def load_denoiser(path: str | Path) -> PreconditionedDenoiser:
    """Rebuild a denoiser saved by :func:`save_denoiser`; raises :class:`WeightsError` naming the file.

    Nothing is allocated before the metadata and the header's tensor names, shapes and dtypes are checked
    against the architecture, so a hostile header costs no more memory than the file's size."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if METADATA_KEY not in metadata:
                raise WeightsError(f"{path}: no '{METADATA_KEY}' metadata: not a steindiff denoiser")
            try:
                config = json.loads(metadata[METADATA_KEY])
            except (ValueError, RecursionError) as err:  # JSONDecodeError, ints past the digit limit, deep nesting
                raise WeightsError(f"{path}: the '{METADATA_KEY}' metadata is not valid JSON ({err})") from None
            config = _check_config(path, config)
            network = _meta_network(path, config["kind"], config["network"])
            expected = network.state_dict()
            _check_header(path, handle, expected)
            # copies in the network's dtype: views of the file's memory map would fault if the file changed
            tensors = {key: handle.get_tensor(key).to(want.dtype, copy=True) for key, want in expected.items()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    network.load_state_dict(tensors, assign=True)
    still_meta = [name for name, t in [*network.named_parameters(), *network.named_buffers()] if t.is_meta]
    if still_meta:  # a buffer outside the state dict: the architecture changed under this loader
        raise WeightsError(f"{path}: the network has state not stored in weights files ({still_meta[0]})")
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

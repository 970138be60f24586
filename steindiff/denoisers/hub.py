"""diffusers models as EDM denoisers: a UNet2DModel on a discrete VP schedule, in pixel or latent space.

A model trained on T discrete timesteps with cumulative alphas abar_t sees x_vp = sqrt(abar) x0 +
sqrt(1 - abar) eps. In EDM coordinates x = x_vp / sqrt(abar) = x0 + sigma eps with
sigma_t = sqrt((1 - abar_t) / abar_t) (EDM, Karras et al. 2022, Table 1, VP column), so

    D(x; sigma) = x - sigma eps_hat                         (epsilon prediction)
                = alpha^2 x - sigma_vp v_hat                 (v prediction, v = alpha eps - sigma_vp x0)
                = x0_hat                                     (sample prediction)

with alpha = (1 + sigma^2)^(-1/2), sigma_vp = alpha sigma, and the network called on alpha x at the
continuous timestep t(sigma) found by linear interpolation of t over the table of log sigma_t, as
k-diffusion's DiscreteSchedule does. The model's own sigma_1 .. sigma_T bound the schedules; the
scheduler's ``clip_sample`` is never applied (this is ODE sampling on D).

Latent models (an autoencoder beside the UNet, as in LDMPipeline) are sampled in latent space;
:meth:`HubDenoiser.decode` turns latents into images for display. Divergences and Lipschitz
constants are then those of the latent sampler.

Weights load with ``use_safetensors=True`` only: a component with only pickled weights is refused. A
component whose weights do not fit its config.json is refused too, in one line naming the file: before the
load, when its safetensors headers hold fewer numbers than the architecture (built on the meta device)
needs, so a config cannot make the loader allocate more than the weights' size; after it, when diffusers
reports missing, unexpected or mismatched keys (it would otherwise initialise them at random and only warn).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .base import Denoiser
from .weights import WeightsError

__all__ = ["DIFFUSERS_PREFIX", "HubDenoiser", "load_diffusers", "resolve_folder"]

DIFFUSERS_PREFIX = "diffusers:"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
LATENT_COMPONENTS = ("vqvae", "vae")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
#: the file diffusers loads a component's weights from (or, sharded, the index beside the shards)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: the discrete schedules a scheduler config may describe: timesteps in this range
MAX_TIMESTEPS = 100_000


class HubDenoiser(Denoiser):
    """A diffusers UNet2DModel on a discrete VP schedule as D(x; sigma) in EDM coordinates."""

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        event_shape: tuple[int, ...],
        name: str = "diffusers",
        autoencoder: nn.Module | None = None,
        latent_scale: float = 1.0,
    ):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon, v_prediction or sample)")
        abar = alphas_cumprod.to(torch.float64)
        sigmas = ((1 - abar) / abar).sqrt()
        super().__init__(event_shape, sigma_min=float(sigmas[0]), sigma_max=float(sigmas[-1]))
        self.name = name
        self.unet = unet
        self.autoencoder = autoencoder
        self.latent_scale = float(latent_scale)
        self.prediction_type = prediction_type
        self.network_dtype = next(unet.parameters()).dtype
        self.register_buffer("log_sigmas", sigmas.log())

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous timestep of each sigma: t interpolated linearly over the log-sigma table."""
        log_sigma = sigma.to(torch.float64).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        low_value, high_value = self.log_sigmas[high - 1], self.log_sigmas[high]
        return high - 1 + (log_sigma - low_value) / (high_value - low_value)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = self.per_sample_sigma(x, sigma).to(torch.float64)
        shape = (-1, *([1] * (x.ndim - 1)))
        alpha = (1 + s * s).rsqrt()
        x_vp = x * alpha.to(x.dtype).reshape(shape)
        t = self.sigma_to_t(s).to(torch.promote_types(self.network_dtype, torch.float32))  # fp16 nets: fp32 t
        out = self.unet(x_vp.to(self.network_dtype), t).sample.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s.to(x.dtype).reshape(shape) * out
        if self.prediction_type == "v_prediction":
            return (alpha * alpha).to(x.dtype).reshape(shape) * x - (alpha * s).to(x.dtype).reshape(shape) * out
        return out

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from samples: the autoencoder's decoder for latent models, else ``x``."""
        if self.autoencoder is None:
            return x
        latents = (x / self.latent_scale).to(next(self.autoencoder.parameters()).dtype)
        return self.autoencoder.decode(latents).sample.to(x.dtype)


@dataclass(frozen=True)
class _Layout:
    """Where a diffusers folder keeps its parts."""

    folder: Path
    autoencoder: str | None
    #: per model component: how many numbers its safetensors headers hold
    held: dict[str, int]


def resolve_folder(spec: str) -> Path:
    """A local folder, or the cached (or, with network allowed, downloaded) snapshot of a hub id.

    Only JSON and safetensors files are fetched. With ``HF_HUB_OFFLINE=1`` (or no network) a hub id
    must already be in the Hugging Face cache.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"{path}: expected a diffusers folder (with model_index.json), got a file")
        return path
    if not HUB_ID.match(spec):
        raise WeightsError(f"{spec!r} is neither an existing folder nor a hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors"], local_files_only=offline))
    except (LocalEntryNotFoundError, OSError) as err:
        raise WeightsError(
            f"{spec} is not in the local Hugging Face cache and cannot be downloaded here ({type(err).__name__}). "
            f"On a machine with network run `huggingface-cli download {spec} --include '*.json' '*.safetensors'` "
            f"(it fills ~/.cache/huggingface), or save the pipeline to a folder and pass diffusers:<folder>."
        ) from None


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (diffusers' span several), shortened to ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _weights_file(part: Path) -> Path:
    """The file diffusers loads ``part``'s weights from: the one a message about them names."""
    for name in (WEIGHTS_NAME, WEIGHTS_NAME + ".index.json"):
        if (part / name).is_file():
            return part / name
    files = sorted(part.glob("*.safetensors"))
    return files[0] if len(files) == 1 else part


def _check_component(folder: Path, component: str) -> int:
    """The component's folder exists and holds readable safetensors weights (never pickles); returns how
    many numbers its safetensors headers hold (read from the headers, no tensor is loaded)."""
    part = folder / component
    if not (part / "config.json").is_file():
        raise WeightsError(f"{part}: missing config.json (is {folder} a diffusers pipeline folder?)")
    tensors = sorted(part.glob("*.safetensors"))
    if not tensors:
        pickled = sorted(p.name for p in part.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
        raise WeightsError(
            f"{part}: {found}. steindiff loads safetensors only and never unpickles; convert the weights "
            "(e.g. save_pretrained(..., safe_serialization=True) where you trust the file) or use a revision "
            "that ships *.safetensors."
        )
    from safetensors import SafetensorError, safe_open

    numbers = 0
    for file in tensors:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open handles have no __iter__)
                    numbers += math.prod(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{file}: not a readable safetensors file ({_one_line(err)})") from None
    return numbers


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; WeightsError names a missing, unreadable or broken file."""
    if not path.is_file():
        raise WeightsError(f"{path}: not found; expected {what}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise WeightsError(f"{path}: not valid JSON ({_one_line(err)}); expected {what}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: not a JSON object; expected {what}")
    return data


def _layout(folder: Path) -> _Layout:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise WeightsError(f"{folder}: no model_index.json; expected a saved diffusers pipeline folder")
    index = _read_json(index_file, "a saved diffusers pipeline's model index")
    for component in ("unet", "scheduler"):
        if component not in index:
            raise WeightsError(f"{index_file}: the pipeline has no {component!r} component")
    autoencoder = next((c for c in LATENT_COMPONENTS if c in index), None)
    components = ("unet", *([autoencoder] if autoencoder else []))
    held = {component: _check_component(folder, component) for component in components}
    _read_json(folder / "scheduler" / "scheduler_config.json", "the pipeline's scheduler config")
    return _Layout(folder, autoencoder, held)


@contextmanager
def _quiet(diffusers) -> Iterator[None]:
    """diffusers' log at errors only: a refused load says why in one line, not among its warnings."""
    logging = diffusers.utils.logging
    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def _scheduler(diffusers, folder: Path) -> tuple[torch.Tensor, str]:
    """The discrete schedule's cumulative alphas and the prediction type, checked; WeightsError names the file."""
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        config = diffusers.DDPMScheduler.load_config(folder, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable scheduler config ({_one_line(err)})") from None
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise WeightsError(f"{path}: unsupported prediction_type {prediction!r} (epsilon, v_prediction or sample)")
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= MAX_TIMESTEPS:
        raise WeightsError(f"{path}: num_train_timesteps must be an integer in [2, {MAX_TIMESTEPS}], got {steps!r}")
    try:
        abar = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.to(torch.float64)
    except (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError) as err:
        raise WeightsError(f"{path}: the scheduler does not build ({_one_line(err)})") from None
    sigmas = ((1 - abar) / abar).sqrt()
    if not (bool(torch.isfinite(sigmas).all()) and bool((sigmas > 0).all()) and bool((sigmas.diff() > 0).all())):
        raise WeightsError(f"{path}: the schedule's noise levels are not finite, positive and increasing")
    return abar, prediction


def _load_component(diffusers, model_cls, layout: _Layout, component: str, dtype: torch.dtype) -> nn.Module:
    """``model_cls`` from ``folder/component``, refused (one line naming the file) unless its weights fill
    exactly the architecture of its config.json; a config asking for more numbers than the weights hold is
    refused before anything is allocated (the architecture is built on the meta device)."""
    folder = layout.folder
    part = folder / component
    weights = _weights_file(part)
    try:
        config = model_cls.load_config(folder, subfolder=component)
        with torch.device("meta"):
            needed = sum(t.numel() for t in model_cls.from_config(config).state_dict().values())
    except (OSError, ValueError, TypeError, KeyError, NotImplementedError, RuntimeError) as err:
        raise WeightsError(f"{part / 'config.json'}: not a {model_cls.__name__} config ({_one_line(err)})") from None
    held = layout.held[component]
    if held < needed:
        raise WeightsError(
            f"{weights}: holds {held:,} numbers, but {component}/config.json describes a {model_cls.__name__} "
            f"of {needed:,}: the weights do not fit the architecture"
        )
    load = {"use_safetensors": True, "torch_dtype": dtype, "output_loading_info": True}
    try:
        model, info = model_cls.from_pretrained(folder, subfolder=component, **load)
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{weights}: could not load the {component} ({_one_line(err)})") from None
    problems = [
        f"{len(info[kind])} {word} (e.g. {sorted(str(k) for k in info[kind])[:2]})"
        for kind, word in (
            ("missing_keys", "missing"),
            ("unexpected_keys", "unexpected"),
            ("mismatched_keys", "mismatched"),
        )
        if info.get(kind)
    ]
    if problems:  # diffusers would initialise the missing ones at random and only warn
        raise WeightsError(f"{weights}: the weights do not fit {component}/config.json: {', '.join(problems)}")
    return model


def load_diffusers(spec: str, device: str = "cpu", half: bool = False) -> HubDenoiser:
    """Load ``spec`` (a hub id or a local pipeline folder) as a :class:`HubDenoiser` on ``device``.

    ``half`` runs the UNet (and the decoder) in float16; CUDA only. The sampler state and the Stein
    statistics stay in float32 / float64.
    """
    try:
        import diffusers
        from diffusers.models.attention_processor import Attention, AttnProcessor
    except ImportError:
        raise WeightsError("loading diffusers models needs the diffusers package: pip install diffusers") from None
    if half and not device.startswith("cuda"):
        raise ValueError("half precision is for CUDA devices only")
    layout = _layout(resolve_folder(spec))
    dtype = torch.float16 if half else torch.float32
    with _quiet(diffusers):
        alphas_cumprod, prediction = _scheduler(diffusers, layout.folder)
        unet = _load_component(diffusers, diffusers.UNet2DModel, layout, "unet", dtype)
        autoencoder = None
        if layout.autoencoder is not None:
            model_cls = diffusers.VQModel if layout.autoencoder == "vqvae" else diffusers.AutoencoderKL
            autoencoder = _load_component(diffusers, model_cls, layout, layout.autoencoder, dtype)
    # plain (math) attention: PyTorch's fused CPU attention has neither a double backward nor forward-mode AD
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    latent_scale = 1.0
    if autoencoder is not None:
        latent_scale = float(getattr(autoencoder.config, "scaling_factor", 1.0) or 1.0)
        autoencoder = autoencoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    denoiser = HubDenoiser(
        unet.eval().requires_grad_(False),
        alphas_cumprod,
        prediction,
        (unet.config.in_channels, *size),
        name=DIFFUSERS_PREFIX + spec,
        autoencoder=autoencoder,
        latent_scale=latent_scale,
    )
    return denoiser.to(device)

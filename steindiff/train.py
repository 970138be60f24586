"""Training denoisers with the EDM loss (Karras et al. 2022, Eq. 8 and Table 1): seeded, resumable.

    python -m steindiff train --model mnist --steps 6000 --out runs/mnist --export assets/mnist.safetensors

Every step draws ln sigma ~ N(P_mean, P_std^2) and minimises
lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
The exported weights are the EMA of the parameters.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from steindiff.denoisers.empirical import load_mnist
from steindiff.denoisers.gmm import GMM_PRESETS, gmm_preset
from steindiff.denoisers.networks import MLP, MLPConfig, PreconditionedDenoiser, UNet, UNetConfig
from steindiff.denoisers.weights import FLOAT_DTYPES, WeightsError, save_denoiser

__all__ = ["TrainConfig", "build_trainee", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (EDM's P_mean, P_std; Adam with a linear warm-up; EMA of the weights)."""

    steps: int = 6000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    p_mean: float = -1.2
    p_std: float = 1.2
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500


def build_trainee(model: str) -> tuple[PreconditionedDenoiser, Callable[[int, torch.Generator], torch.Tensor]]:
    """The untrained denoiser for a trainable model name and a function drawing a batch of clean data."""
    if model == "mnist":
        images = load_mnist()[0]
        network = UNet(UNetConfig())
        denoiser = PreconditionedDenoiser(network, (1, 28, 28), sigma_data=0.5, name="mnist", kind="unet")

        def draw(n: int, gen: torch.Generator) -> torch.Tensor:
            return images[torch.randint(len(images), (n,), generator=gen)]

        return denoiser, draw
    preset = model.removeprefix("mlp-")
    if model.startswith("mlp-") and f"gmm-{preset}" in GMM_PRESETS:
        mixture = gmm_preset(f"gmm-{preset}")
        sigma_data = float(mixture.sample(100_000, torch.Generator().manual_seed(0)).std())
        denoiser = PreconditionedDenoiser(MLP(MLPConfig()), (2,), sigma_data=sigma_data, name=model, kind="mlp")

        def draw(n: int, gen: torch.Generator) -> torch.Tensor:
            return mixture.sample(n, gen).float()

        return denoiser, draw
    raise ValueError(
        f"no training recipe for {model!r}; trainable: mnist, "
        + ", ".join(f"mlp-{k.removeprefix('gmm-')}" for k in GMM_PRESETS if k.startswith("gmm-"))
    )


def _checkpoint_tensors(denoiser, ema, optimizer, gen) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in denoiser.network.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, state in optimizer.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors["rng"] = gen.get_state()
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _restore(path: Path, denoiser, ema, optimizer, gen) -> None:
    """Load a checkpoint written by :func:`_checkpoint_tensors` into the run's objects; every tensor's name,
    shape and dtype is checked against them before any is read. Raises WeightsError naming ``path``."""
    if not path.is_file():
        raise WeightsError(f"{path}: not found (resuming needs the checkpoint beside checkpoint.json)")
    expected = {f"model.{k}": v for k, v in denoiser.network.state_dict().items()}
    expected.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    params = dict(enumerate(denoiser.network.parameters()))
    rng = gen.get_state()
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            optional = {k for k in keys if _optimizer_entry(k, params) is not None}
            missing, unexpected = sorted({*expected, "rng"} - keys), sorted(keys - {*expected, "rng"} - optional)
            if missing or unexpected:
                raise WeightsError(
                    f"{path}: not a checkpoint of this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
            shapes = {k: tuple(v.shape) for k, v in expected.items()}
            shapes.update({k: _optimizer_entry(k, params) for k in optional})
            for key in sorted(keys):
                view = handle.get_slice(key)
                shape, dtype = tuple(view.get_shape()), view.get_dtype()
                want, dtypes = (tuple(rng.shape), ("U8",)) if key == "rng" else (shapes[key], FLOAT_DTYPES)
                if shape != want or dtype not in dtypes:
                    raise WeightsError(
                        f"{path}: tensor {key!r} is {dtype} {shape}, expected {' or '.join(dtypes)} {want}"
                    )
            # copies: views of the file's memory map would fault when the next checkpoint rewrites it
            tensors = {key: handle.get_tensor(key).clone() for key in keys}
        denoiser.network.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state = optimizer.state_dict()
        for i in state["param_groups"][0]["params"]:
            entries = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if entries:
                state["state"][i] = entries
        optimizer.load_state_dict(state)
        gen.set_state(tensors["rng"])
    except (SafetensorError, OSError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {reason}") from None


def _optimizer_entry(key: str, params: dict[int, torch.Tensor]) -> tuple[int, ...] | None:
    """The shape of the Adam state tensor ``opt.<i>.<name>``, or None for a key of no such form."""
    prefix, _, rest = key.partition(".")
    index, _, name = rest.partition(".")
    if prefix != "opt" or not index.isdigit() or int(index) not in params:
        return None
    if name == "step":
        return ()
    return tuple(params[int(index)].shape) if name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") else None


def train(
    model: str, config: TrainConfig, out: Path, export: Path | None = None, device: str = "cpu", resume: bool = False
) -> PreconditionedDenoiser:
    """Train ``model`` for ``config.steps`` steps, checkpointing into ``out``; export the EMA weights."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    denoiser, draw = build_trainee(model)
    denoiser.to(device)
    ema = copy.deepcopy(denoiser.network).requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.network.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    start, elapsed = 0, 0.0
    meta_path, ckpt_path, log_path = out / "checkpoint.json", out / "checkpoint.safetensors", out / "loss.jsonl"
    if resume and meta_path.exists():
        meta = _checkpoint_record(meta_path)
        if meta["model"] != model or {**meta["config"], "steps": config.steps} != asdict(config):
            raise ValueError(f"{meta_path}: the checkpoint was made with other settings; start a new --out")
        _restore(ckpt_path, denoiser, ema, optimizer, gen)
        start, elapsed = meta["step"], meta["elapsed_s"]
    elif log_path.exists():
        log_path.unlink()
    params = sum(p.numel() for p in denoiser.network.parameters())
    sd = denoiser.sigma_data
    running, began = [], time.perf_counter() - elapsed
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"train {model}")
    for step in bar:
        x0 = draw(config.batch, gen).to(device)
        sigma = (config.p_mean + config.p_std * torch.randn(config.batch, generator=gen)).exp().to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).reshape(-1, *([1] * (x0.ndim - 1)))
        loss = (weight * (denoiser(x0 + sigma.reshape_as(weight) * noise, sigma) - x0) ** 2).mean()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), denoiser.network.parameters(), strict=True):
                p_ema.lerp_(p, 1 - config.ema_decay)
        running.append(loss.detach().item())
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            mean_loss = sum(running) / len(running)
            running.clear()
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            with log_path.open("a") as log:
                log.write(
                    json.dumps({"step": done, "loss": mean_loss, "elapsed_s": time.perf_counter() - began}) + "\n"
                )
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_file(_checkpoint_tensors(denoiser, ema, optimizer, gen), str(ckpt_path))
            meta_path.write_text(
                json.dumps(
                    {"model": model, "config": asdict(config), "step": done, "elapsed_s": time.perf_counter() - began}
                )
            )
    trained = copy.deepcopy(denoiser)
    trained.network.load_state_dict(ema.state_dict())
    trained.info = {
        "parameters": params,
        "steps": config.steps,
        "train_config": asdict(config),
        "train_time_s": round(time.perf_counter() - began, 1),
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)",
        "final_loss": _last_loss(log_path),
    }
    if export is not None:
        save_denoiser(trained.cpu(), export)
    return trained.eval()


def _checkpoint_record(path: Path) -> dict:
    """checkpoint.json: the model, settings, step and time of the checkpoint; WeightsError names a broken one."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable checkpoint record ({err})") from None
    fields = {"model": str, "config": dict, "step": int, "elapsed_s": (int, float)}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in fields.items()):
        raise WeightsError(f"{path}: not a checkpoint record (expected {', '.join(fields)})")
    return meta


def _last_loss(log_path: Path) -> float | None:
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    return json.loads(lines[-1])["loss"] if lines else None

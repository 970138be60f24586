"""The app's settings (defaults, server limits) and their validation into an Experiment.

No gradio here: the app, its /run endpoint, scripts and machines without gradio share one definition.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from steindiff.correction.rule import CUSTOM_VARIANT, DEFAULT_VARIANT, stein_config
from steindiff.denoisers import ASSETS, DEFAULT_IMAGE_MODEL
from steindiff.experiment import Experiment, ExperimentResult, ModelCatalog, run_experiment
from steindiff.limits import Limits
from steindiff.records import DiagnosticsConfig

__all__ = [
    "CUSTOM_RULE",
    "DEFAULT_RULE",
    "DEVICE",
    "LIMITS",
    "SETTINGS",
    "batch_for_model",
    "build_experiment",
    "default_model",
    "model_device",
    "warm_up",
]

LIMITS = Limits(max_nfe=100, max_batch=4096, max_image_batch=256, max_probes=16, max_lipschitz_samples=64)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT_RULE = DEFAULT_VARIANT
#: the rule that takes the clip from the form's gamma_min, gamma_max and literal settings
CUSTOM_RULE = CUSTOM_VARIANT

#: the batch the form offers for each kind of model: 16 samples of an image model (as /run's default), 2,000
#: particles of a 2-D one, enough to draw its distribution and steady the rule's batch statistics
DEFAULT_BATCH: dict[str, int] = {"image": 16, "2d": 2000}

#: (name, default) of the settings, in the order of the /run endpoint's parameters and of the URL
SETTINGS: list[tuple[str, Any]] = [
    ("model", DEFAULT_IMAGE_MODEL),
    ("solver", "dpmpp_2m"),
    ("schedule", "karras"),
    ("nfe", 5),
    ("batch", DEFAULT_BATCH["image"]),
    ("seed", 0),
    ("stein_on", True),
    ("gamma_min", 0.1),
    ("gamma_max", 1.0),
    ("literal", True),
    ("rule", DEFAULT_RULE),
    # K = 1, as in the benchmark sweeps. At batch 16 a second probe changed no view in kind: over the presets
    # and seeds 0-2, every applied gamma within 6% and FD-MNIST within 8% (between seeds it moves by 20%);
    # with one probe each sampling call is at batch 32 instead of 48.
    ("probes", 1),
    ("probe", "rademacher"),
    ("products", "fd"),
    ("coords", "edm"),
    ("variant", "batch"),
    ("lipschitz", True),
    ("reference", True),
]


def batch_for_model(catalog: ModelCatalog, model: str, batch: float | None) -> float | None:
    """The batch the form shows once ``model`` is chosen: ``batch`` where the user set it, the model kind's
    default (:data:`DEFAULT_BATCH`) where it is another kind's default, empty or over this kind's limit.
    Unknown models leave it as it is (the run's check names them)."""
    if not catalog.accepts(model):
        return batch
    kind = catalog.kind(model)
    others = {value for other, value in DEFAULT_BATCH.items() if other != kind}
    if batch is None or batch in others or not 1 <= batch <= LIMITS.batch_limit(kind):
        return DEFAULT_BATCH[kind]
    return batch


def default_model() -> str:
    """The model the form starts with: the shipped image network, or ``gmm-ring`` where its weights are missing."""
    return DEFAULT_IMAGE_MODEL if (ASSETS / f"{DEFAULT_IMAGE_MODEL}.safetensors").exists() else "gmm-ring"


def warm_up(catalog: ModelCatalog, model: str) -> ExperimentResult:
    """One run of the form's defaults on ``model``, at the batch the form shows for it, as a server's first
    request would make it: the model is loaded, the first calls' costs at each shape (on the CPU, oneDNN's
    kernels for each batch; on a GPU, the context and cuDNN's choices) are paid, and the default seed's
    reference solution is cached in ``catalog``.
    The app's start-up runs it (docs/app-performance.md: on the 2-core CPU the first request then took 4.7 s,
    as the next did, instead of 8.4-8.8 s)."""
    settings = {**dict(SETTINGS), "model": model}
    settings["batch"] = batch_for_model(catalog, model, settings["batch"])
    return run_experiment(build_experiment(catalog, *settings.values()), catalog, LIMITS)


def model_device(catalog: ModelCatalog, model: str) -> str:
    """Where the app runs ``model``: an image model on :data:`DEVICE` (the GPU when there is one), a 2-D
    model on the CPU. A 2-D run is many small operations on a few thousand points, which a GPU serves slower:
    the app's gmm-ring run (2,000 particles, NFE 5) took 0.59-0.69 s on an H200 and 0.24-0.27 s on this
    project's 2-core CPU (docs/results.md, 'On a GPU')."""
    return DEVICE if _serves_images(catalog, model) else "cpu"


def _serves_images(catalog: ModelCatalog, model: str) -> bool:
    """Whether ``catalog`` accepts ``model`` and it is an image model (unknown names: False; the
    Experiment's check names them)."""
    return catalog.accepts(model) and catalog.kind(model) == "image"


def build_experiment(
    catalog: ModelCatalog,
    model: str,
    solver: str,
    schedule: str,
    nfe: float,
    batch: float,
    seed: float,
    stein_on: bool,
    gamma_min: float,
    gamma_max: float,
    literal: bool,
    rule: str,
    probes: float,
    probe: str,
    products: str,
    coords: str,
    variant: str,
    lipschitz: bool,
    reference: bool,
    device: str | None = None,
) -> Experiment:
    """The settings of the form (or of the /run call) as a validated Experiment; ValueError names the problem.

    ``rule`` names a correction of :data:`steindiff.correction.rule.STEIN_VARIANTS` (its clip and safeguards), or
    "custom": the clip from ``gamma_min``, ``gamma_max`` and ``literal``, with no safeguard. ``products``
    ("vjp", "vjp-batched" or "fd") sets how the Hutchinson probes and the Lipschitz estimates take their
    Jacobian products: autograd, or forward differences (one forward a product, no backward pass).
    ``device`` defaults to :func:`model_device`'s choice.
    """
    numbers = {
        "nfe": nfe,
        "batch": batch,
        "seed": seed,
        "probes": probes,
        "gamma_min": gamma_min,
        "gamma_max": gamma_max,
    }
    for name, value in numbers.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"{name} must be a number, got {value}")
    for name in ("nfe", "batch", "seed", "probes"):
        if float(numbers[name]) != int(numbers[name]):
            raise ValueError(f"{name} must be a whole number, got {numbers[name]}")
    image = _serves_images(catalog, model)
    stein = stein_config(
        rule,
        gamma_min=float(gamma_min),
        gamma_max=math.inf if literal else float(gamma_max),
        probes=int(probes),
        probe=probe,
        products=products,
        coords=coords,
        variant=variant,
    )
    # interactive budgets: a few samples for the Lipschitz estimates, a subset for the reference error
    diagnostics = DiagnosticsConfig(
        lipschitz=bool(lipschitz),
        lipschitz_samples=4,
        lipschitz_iters=3 if image else 20,
        jacobian_mode="fd" if products == "fd" else "vjp2",
        flow_log_step=0.25,
        reference=bool(reference),
        reference_samples=4 if image else 64,
        # images: DPM-Solver++(3M) steps of 0.25 in log sigma (43 network calls from 80 to 0.002), finished at
        # the network's sigma_min by the solvers' own final denoising step. On mnist (8 samples, against the
        # 0.02-step RK4 solution, on Karras NFE 5 and 10 and logSNR NFE 5 grids) the final states land 0.19
        # away and 0.21 at most along the way; RK4 steps of 0.5 (88 calls) land 0.15 away and 0.49 along
        # the way (at sigma = 17.5, where states have norm about 500); 3M steps of 0.33 (32 calls) 0.30.
        # Vanilla DPM-Solver++(2M)'s err_ref there is about 7 (docs/results.md). The network's noise
        # embedding oscillates in log sigma, so finer steps hardly help (README, known issues).
        # 2-D: 3M steps of 0.05 down to 0.01 sigma_min (306 calls; RK4 steps of 0.1 took 613). On the three
        # mixtures (64 samples, seeds 0 and 1, Karras NFE 5 and 32, logSNR NFE 10), against a 0.0125-step
        # RK4 solution in float64: at most 4.3e-5 along the way and 2.2e-5 at the end (RK4's 3.5e-5 and
        # 2.9e-6; both near float32's rounding, states of norm about 100), where DPM-Solver++(2M) ends
        # 6.6e-3 to 1.9e-2 away at NFE 32. For the trained MLPs (mlp-ring, mlp-moons) both are limited by the
        # network: 4.6e-4 to 9.1e-4 at the end (RK4: 6.1e-4 to 1.1e-3), at most 6.1e-3 along the way (RK4:
        # 4.8e-3). A new grid then costs the reference no call (RK4's: four).
        reference_method="dpmpp_3m",
        reference_log_step=0.25 if image else 0.05,
        reference_floor_ratio=1.0 if image else 0.01,
    )
    return Experiment(
        model=model,
        solver=solver,
        schedule=schedule,
        nfe=int(nfe),
        batch=int(batch),
        seed=int(seed),
        stein=stein if stein_on else None,
        diagnostics=diagnostics,
        device=device or model_device(catalog, model),
    )

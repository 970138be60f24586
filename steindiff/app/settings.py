"""The app's settings, listed once: each field's type, default, limits, form control and help.

One frozen dataclass, :class:`Settings`, drives the form, the ``/run`` endpoint's keyword parameters, the URL
state, the presets and the validation into an :class:`~steindiff.experiment.Experiment`. No gradio here: the
app, its ``/run`` endpoint, scripts and machines without gradio share one definition.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from steindiff.correction.divergence import PROBE_PRODUCTS, ProbeKind
from steindiff.correction.rule import (
    CUSTOM_VARIANT,
    DEFAULT_VARIANT,
    STEIN_VARIANTS,
    Coords,
    GammaVariant,
    stein_config,
)
from steindiff.denoisers import ASSETS, DEFAULT_IMAGE_MODEL, ModelKind
from steindiff.experiment import Experiment, ModelCatalog
from steindiff.limits import Limits
from steindiff.records import DiagnosticsConfig
from steindiff.schedules import SCHEDULES
from steindiff.solvers import SOLVERS

__all__ = [
    "CUSTOM_RULE",
    "DEFAULT_BATCH",
    "DEFAULT_RULE",
    "DEVICE",
    "LIMITS",
    "Control",
    "Settings",
    "batch_for_model",
    "default_model",
    "model_device",
    "step_from_link",
]

#: what one request to the shared server may ask for
LIMITS = Limits(max_nfe=100, max_batch=4096, max_image_batch=256, max_probes=16, max_lipschitz_samples=64)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT_RULE = DEFAULT_VARIANT
#: the rule that takes the clip from the form's gamma_min, gamma_max and literal settings
CUSTOM_RULE = CUSTOM_VARIANT

#: the batch the form offers for each kind of model: 16 samples of an image model (as /run's default), 2,000
#: particles of a 2-D one, enough to draw its distribution and steady the rule's batch statistics
DEFAULT_BATCH: dict[ModelKind, int] = {"image": 16, "2d": 2000}

Widget = Literal["dropdown", "slider", "number", "checkbox", "radio"]
#: where a control sits on the form: the run's own settings, the correction's, its custom clip (shown with the
#: custom rule), the probes' and coordinates' (folded away), the diagnostics
Group = Literal["run", "stein", "custom", "advanced", "diagnostics"]


@dataclass(frozen=True)
class Control:
    """How the form shows one setting, and what it accepts.

    ``choices`` None: any value of the field's type (the model's choices are the server's catalog); ``low``
    and ``high`` bound a number; ``whole`` numbers are integers.
    """

    label: str
    widget: Widget
    group: Group = "run"
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    whole: bool = False


def _setting(default: Any, control: Control) -> Any:
    return field(default=default, metadata={"control": control})


@dataclass(frozen=True)
class Settings:
    """Everything the form sets for one comparison, in the form's order (and the ``/run`` parameters'). The
    defaults are the first lesson (presets.PRESETS' first): a 3-step Heun run on mnist, in the trap, corrected."""

    model: str = _setting(DEFAULT_IMAGE_MODEL, Control("model", "dropdown"))
    solver: str = _setting("heun", Control("solver", "dropdown", choices=tuple(s for s in SOLVERS if s != "euler")))
    schedule: str = _setting("karras", Control("schedule", "dropdown", choices=tuple(SCHEDULES)))
    nfe: int = _setting(5, Control("NFE (network evaluations)", "slider", low=1, high=LIMITS.max_nfe, whole=True))
    batch: int = _setting(
        DEFAULT_BATCH["image"],
        Control(
            f"batch (2-D: up to {LIMITS.max_batch} particles; images: up to {LIMITS.max_image_batch})",
            "number",
            low=1,
            whole=True,
        ),
    )
    seed: int = _setting(0, Control("seed", "number", low=0, whole=True))
    stein_on: bool = _setting(True, Control("run the corrected sampler beside vanilla", "checkbox", "stein"))
    rule: str = _setting(
        DEFAULT_RULE,
        Control(
            "rule (stein = the paper's literal rule; custom = the clip below)",
            "dropdown",
            "stein",
            choices=(*STEIN_VARIANTS, CUSTOM_RULE),
        ),
    )
    literal: bool = _setting(True, Control("custom: no upper clip (gamma_max = inf)", "checkbox", "custom"))
    gamma_min: float = _setting(0.1, Control("custom: gamma_min", "number", "custom"))
    gamma_max: float = _setting(1.0, Control("custom: gamma_max (when not literal)", "number", "custom"))
    # K = 1, as in the benchmark sweeps: a second probe changed no view in kind at batch 16, and it makes each
    # sampling call a third larger (docs/design.md)
    probes: int = _setting(
        1, Control("Hutchinson probes K", "slider", "advanced", low=1, high=LIMITS.max_probes, whole=True)
    )
    probe: str = _setting("rademacher", Control("probe", "radio", "advanced", choices=get_args(ProbeKind)))
    products: str = _setting(
        "fd",
        Control(
            "Jacobian products (probes and Lipschitz): vjp = autograd, fd = forward differences",
            "radio",
            "advanced",
            choices=PROBE_PRODUCTS,
        ),
    )
    coords: str = _setting(
        "edm", Control("coordinates of the combination", "radio", "advanced", choices=get_args(Coords))
    )
    variant: str = _setting("batch", Control("gamma from", "radio", "advanced", choices=get_args(GammaVariant)))
    lipschitz: bool = _setting(
        True, Control("Lipschitz constants and error amplification (the trap)", "checkbox", "diagnostics")
    )
    reference: bool = _setting(True, Control("error to the reference solution", "checkbox", "diagnostics"))
    # an image model's true flow, walked from every step's noise level for the amplification, takes minutes on a
    # CPU (docs/app.md); a 2-D model's takes a fraction of a second and is always measured
    flow: bool = _setting(
        False, Control("image models: the true flow's amplification too (slow on a CPU)", "checkbox", "diagnostics")
    )

    @classmethod
    def names(cls) -> list[str]:
        """The settings' names, in order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each setting's default, by name."""
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def controls(cls) -> dict[str, Control]:
        """Each setting's form control, by name."""
        return {f.name: f.metadata["control"] for f in fields(cls)}

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        """The settings as keyword parameters (named, typed by their defaults, defaulted): the ``/run``
        endpoint's signature."""
        keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
        return [inspect.Parameter(k, keyword, default=v, annotation=type(v)) for k, v in cls.defaults().items()]

    @classmethod
    def from_values(cls, **values: Any) -> Settings:
        """Settings from the form's or a caller's values (missing ones default); ValueError names a number that
        is missing, not a number, or not whole where it must be."""
        unknown = set(values) - set(cls.names())
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        merged = {**cls.defaults(), **values}
        for name, control in cls.controls().items():
            value = merged[name]
            if control.widget == "checkbox":
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false, got {value!r}")
                continue
            if control.widget not in ("number", "slider"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if control.whole:
                if float(value) != int(value):
                    raise ValueError(f"{name} must be a whole number, got {value}")
                merged[name] = int(value)
            else:
                merged[name] = float(value)
        return cls(**merged)

    @classmethod
    def from_link(cls, params: Mapping[str, str], models: Sequence[str], first_model: str) -> dict[str, Any]:
        """The settings a link's query names, each read as its default's type. A value that does not read, or
        that the form does not offer, gives the default: a mistyped link, or a bare '+' (which reads as a
        space)."""
        state = {}
        defaults = cls.defaults()
        for name, control in cls.controls().items():
            if name not in params:
                continue
            default = defaults[name]
            offered, fallback = (models, first_model) if name == "model" else (control.choices, default)
            try:
                text = params[name]
                value = (text.lower() == "true") if isinstance(default, bool) else type(default)(text)
            except ValueError:
                value = fallback
            state[name] = value if offered is None or value in offered else fallback
        return state

    def experiment(self, catalog: ModelCatalog, device: str | None = None) -> Experiment:
        """These settings as an Experiment at the server's interactive budgets; ValueError names a bad setting.

        ``rule`` names a correction of :data:`steindiff.correction.rule.STEIN_VARIANTS` (its clip and
        safeguards), or "custom": the clip from ``gamma_min``, ``gamma_max`` and ``literal``, with no safeguard.
        ``device`` defaults to :func:`model_device`'s choice. The Experiment is checked against
        :data:`LIMITS` when it runs.
        """
        image = _serves_images(catalog, self.model)
        stein = stein_config(
            self.rule,
            gamma_min=float(self.gamma_min),
            gamma_max=math.inf if self.literal else float(self.gamma_max),
            probes=int(self.probes),
            probe=self.probe,
            products=self.products,
            coords=self.coords,
            variant=self.variant,
        )
        # interactive budgets: a few samples for the Lipschitz estimates, a subset for the reference error.
        # The reference takes DPM-Solver++(3M) steps (one call a step), finished at the network's sigma_min by
        # the solvers' own final denoising step for images: its accuracy on each model is in docs/design.md.
        diagnostics = DiagnosticsConfig(
            lipschitz=bool(self.lipschitz),
            amplification=bool(self.lipschitz),
            flow_amplification=bool(self.lipschitz) and bool(self.reference) and (self.flow or not image),
            lipschitz_samples=4,
            lipschitz_iters=3 if image else 20,
            jacobian_mode="fd" if self.products == "fd" else "vjp2",
            flow_log_step=0.25,
            reference=bool(self.reference),
            reference_samples=4 if image else 64,
            reference_method="dpmpp_3m",
            reference_log_step=0.25 if image else 0.05,
            reference_floor_ratio=1.0 if image else 0.01,
        )
        return Experiment(
            model=self.model,
            solver=self.solver,
            schedule=self.schedule,
            nfe=int(self.nfe),
            batch=int(self.batch),
            seed=int(self.seed),
            stein=stein if self.stein_on else None,
            diagnostics=diagnostics,
            device=device or model_device(catalog, self.model),
        )


def step_from_link(params: Mapping[str, str]) -> int | None:
    """The step a link opens its first run at (``step=k``, a whole number from 0), or None: its last."""
    text = params.get("step", "")
    return int(text) if text.isascii() and text.isdigit() else None


def batch_for_model(catalog: ModelCatalog, model: str, batch: float | None) -> float | None:
    """The batch the form shows once ``model`` is chosen: ``batch`` where the user set it, the model kind's
    default (:data:`DEFAULT_BATCH`) where it is another kind's default, empty or over this kind's limit.
    Unknown models, and models whose weights do not load, leave it as it is (the run says why)."""
    if not catalog.accepts(model):
        return batch
    try:
        kind = catalog.kind(model)  # a registry or hub model's is known without loading it
    except ValueError:
        return batch
    others = {value for other, value in DEFAULT_BATCH.items() if other != kind}
    if batch is None or batch in others or not 1 <= batch <= LIMITS.batch_limit(kind):
        return DEFAULT_BATCH[kind]
    return batch


def default_model() -> str:
    """The model the form starts with: the shipped image network, or ``gmm-ring`` where its weights are missing."""
    return DEFAULT_IMAGE_MODEL if (ASSETS / f"{DEFAULT_IMAGE_MODEL}.safetensors").exists() else "gmm-ring"


def model_device(catalog: ModelCatalog, model: str) -> str:
    """Where the app runs ``model``: an image model on :data:`DEVICE` (the GPU when there is one), a 2-D model
    on the CPU, since a run of many small operations on a few thousand points is slower on a GPU
    (docs/design.md)."""
    return DEVICE if _serves_images(catalog, model) else "cpu"


def _serves_images(catalog: ModelCatalog, model: str) -> bool:
    """Whether ``catalog`` accepts ``model`` and it is an image model (unknown names: False; the
    Experiment's check names them)."""
    return catalog.accepts(model) and catalog.kind(model) == "image"

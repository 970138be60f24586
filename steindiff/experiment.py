"""One validated comparison, as the CLI and the app describe it, and its JSON-ready result."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from steindiff.bench.metrics import DIGIT_SHAPE, load_classifier, score_digits
from steindiff.correction.rule import SteinConfig
from steindiff.denoisers import MODELS, Denoiser, ModelKind, load_denoiser, load_model, prepare_for_device
from steindiff.denoisers.hub import DIFFUSERS_PREFIX, load_diffusers
from steindiff.diagnostics.reference import FlowSolution, reference_floor
from steindiff.limits import Limits
from steindiff.noise import initial_noise
from steindiff.records import Comparison, DiagnosticsConfig, StepRecord
from steindiff.sampling import Phase, compare, takes_functorch
from steindiff.schedules import SCHEDULES, make_sigmas
from steindiff.solvers import SOLVERS, SolverOptions, get_solver

__all__ = [
    "Experiment",
    "ExperimentResult",
    "ModelCatalog",
    "VectorField",
    "check_device",
    "run_experiment",
    "vector_field",
]


@dataclass(frozen=True)
class Experiment:
    """Everything a user sets for one vanilla-vs-Stein comparison. ``stein`` None: vanilla only."""

    model: str
    solver: str = "dpmpp_2m"
    schedule: str = "karras"
    nfe: int = 5
    batch: int = 64
    seed: int = 0
    stein: SteinConfig | None = field(default_factory=SteinConfig)
    options: SolverOptions = field(default_factory=SolverOptions)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    sigma_min: float | None = None
    sigma_max: float | None = None
    device: str = "cpu"
    dtype: str = "float32"
    score: bool = True

    def check(self, models: ModelCatalog, limits: Limits = Limits()) -> None:
        """Raise ValueError naming the first bad setting."""
        if not models.accepts(self.model):
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(models.names())}")
        if self.model.startswith(DIFFUSERS_PREFIX) and self.diagnostics.jacobian_mode == "jvp":
            raise ValueError(
                "jacobian_mode 'jvp' (forward-mode AD) fails through diffusers' GroupNorm on the CPU; use 'vjp2'"
            )
        get_solver(self.solver)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        _check_int("nfe", self.nfe, 1, limits.max_nfe)
        _check_int("batch", self.batch, 1, limits.batch_limit(models.kind(self.model)))
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.stein is not None:
            _check_int("probes", self.stein.probes, 1, limits.max_probes)
        _check_int("lipschitz_samples", self.diagnostics.lipschitz_samples, 1, limits.max_lipschitz_samples)
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) exceeds sigma_max ({self.sigma_max})")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        check_device(self.device)

    def config_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data (infinite numbers as the string 'inf')."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        return clean(asdict(self))


def check_device(device: str) -> None:
    """Raise ValueError unless ``device`` is 'cpu', or 'cuda[:N]' with CUDA present."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


class ModelCatalog:
    """The models a caller may use; loads each once.

    The registry, ``extra`` models (name -> our safetensors file) and ``diffusers_models``
    ("diffusers:<hub id or folder>") as given on a server's command line; ``any_diffusers`` also
    accepts every "diffusers:..." name (the CLI, on the user's own machine; never a shared server).
    ``half`` runs diffusers networks in float16 (CUDA only).
    """

    def __init__(
        self,
        extra: Mapping[str, Path] | None = None,
        diffusers_models: Sequence[str] = (),
        any_diffusers: bool = False,
        half: bool = False,
    ):
        self.extra = dict(extra or {})
        clash = set(self.extra) & set(MODELS)
        if clash:
            raise ValueError(f"extra model names clash with the registry: {sorted(clash)}")
        bad = [name for name in diffusers_models if not name.startswith(DIFFUSERS_PREFIX)]
        if bad:
            raise ValueError(f"diffusers models are named {DIFFUSERS_PREFIX}<hub id or folder>, got {bad}")
        self.diffusers_models = list(diffusers_models)
        self.any_diffusers = any_diffusers
        self.half = half
        self._loaded: dict[tuple[str, str], Denoiser] = {}
        self._kinds: dict[str, ModelKind] = {}
        self._flows: dict[tuple, FlowSolution] = {}

    @classmethod
    def from_args(cls, items: Sequence[str], half: bool = False) -> ModelCatalog:
        """The registry plus a server's command-line models, each ``NAME=PATH`` (a steindiff safetensors file)
        or ``diffusers:<hub id or folder>``; ValueError names an item of neither form."""
        extra, hub = {}, []
        for item in items:
            name, sep, path = item.partition("=")
            if item.startswith(DIFFUSERS_PREFIX):
                hub.append(item)
            elif sep and name and path:
                extra[name] = Path(path)
            else:
                raise ValueError(f"--model expects NAME=PATH or diffusers:ID, got {item!r}")
        return cls(extra, hub, half=half)

    def reference_flow(self, key: tuple) -> FlowSolution | None:
        """A reference ODE solution computed earlier for the same model, noise and reference settings."""
        return self._flows.get(key)

    def remember_reference_flow(self, key: tuple, flow: FlowSolution | None, keep: int = 16) -> None:
        """Keep the last ``keep`` reference solutions: a run that changes only the solver, the schedule, the
        NFE or the Stein settings reuses one."""
        if flow is None:
            return
        self._flows.pop(key, None)
        self._flows[key] = flow
        while len(self._flows) > keep:
            self._flows.pop(next(iter(self._flows)))

    def names(self) -> list[str]:
        return [*MODELS, *self.extra, *self.diffusers_models]

    def accepts(self, name: str) -> bool:
        """Whether ``name`` may be loaded from this catalog."""
        return name in self.names() or (self.any_diffusers and name.startswith(DIFFUSERS_PREFIX))

    def kind(self, name: str) -> ModelKind:
        """What the model draws: 'image' or '2d'."""
        if name in MODELS:
            return MODELS[name].kind
        if name.startswith(DIFFUSERS_PREFIX):
            return "image"
        if name not in self._kinds:
            self._kinds[name] = self.get(name).kind
        return self._kinds[name]

    def get(self, name: str, device: str = "cpu") -> Denoiser:
        key = (name, device)
        if key not in self._loaded:
            if not self.accepts(name):
                raise ValueError(f"unknown model {name!r}; choose from {', '.join(self.names())}")
            if name.startswith(DIFFUSERS_PREFIX):
                model = load_diffusers(name.removeprefix(DIFFUSERS_PREFIX), device, self.half)
            else:
                model = load_model(name) if name in MODELS else load_denoiser(self.extra[name])
            self._loaded[key] = model.to(device)
        return self._loaded[key]


@dataclass(frozen=True)
class VectorField:
    """D(x, sigma_k) - x on a square grid of 2-D points, for every step's sigma_k (where x is pulled)."""

    points: torch.Tensor  # (P, 2)
    displacement: list[torch.Tensor]  # per step, (P, 2)


def vector_field(
    model: Denoiser, sigmas: list[float], device: str = "cpu", half_width: float = 2.5, size: int = 17
) -> VectorField:
    """The denoiser's pull on a grid covering the data, at each step's noise level (2-D models)."""
    axis = torch.linspace(-half_width, half_width, size)
    points = torch.cartesian_prod(axis, axis).to(device)
    with torch.no_grad():
        pulls = [(model(points, torch.tensor(s, device=device)) - points).cpu() for s in sigmas[:-1]]
    return VectorField(points.cpu(), pulls)


@dataclass
class ExperimentResult:
    """The comparison, the model it ran on, the digit scores of each run, and (2-D) the vector field."""

    experiment: Experiment
    model: Denoiser
    comparison: Comparison
    scores: dict[str, dict[str, Any]]
    field: VectorField | None = None

    def runs(self) -> dict[str, Any]:
        out = {"vanilla": self.comparison.vanilla}
        if self.comparison.stein is not None:
            out["stein"] = self.comparison.stein
        return out

    def to_json(self) -> dict[str, Any]:
        """``config``, ``sigmas``, and per run ``trace``, ``final`` (with digit scores) and ``nfe_total``."""
        out: dict[str, Any] = {
            "config": {**self.experiment.config_dict(), "steps": len(self.comparison.sigmas) - 1},
            "sigmas": self.comparison.sigmas,
        }
        for name, run in self.runs().items():
            summary = run.summary()
            summary["final"].update(self.scores.get(name, {}))
            out[name] = summary
        return out


def run_experiment(
    experiment: Experiment,
    models: ModelCatalog,
    limits: Limits = Limits(),
    callback: Callable[[str, StepRecord], None] | None = None,
    on_phase: Callable[[Phase], None] | None = None,
) -> ExperimentResult:
    """Validate, build the grid and the noise, run vanilla and corrected, and score digit samples.

    ``callback`` and ``on_phase`` report progress as :func:`steindiff.sampling.compare`'s do."""
    experiment.check(models, limits)
    products = experiment.stein.products if experiment.stein else None
    functorch = takes_functorch(products, experiment.diagnostics.jacobian_mode)
    model = prepare_for_device(models.get(experiment.model, experiment.device), experiment.device, functorch)
    steps = SOLVERS[experiment.solver].steps_for_nfe(experiment.nfe)
    sigma_min, sigma_max = experiment.sigma_min or model.sigma_min, experiment.sigma_max or model.sigma_max
    sigmas = make_sigmas(experiment.schedule, steps, sigma_min, sigma_max)  # refuses sigma_min > sigma_max
    dtype = getattr(torch, experiment.dtype)
    noise = initial_noise(
        experiment.batch, model.event_shape, float(sigmas[0]), experiment.seed, dtype, experiment.device
    )
    diag = experiment.diagnostics
    grid = sigmas.tolist()
    reference_key = (  # what the reference solution depends on: not the grid between its ends
        experiment.model,
        experiment.device,
        experiment.dtype,
        experiment.seed,
        len(noise[: diag.reference_samples]),
        grid[0],
        reference_floor(grid, diag.reference_floor_ratio, model.sigma_min),
        diag.reference_log_step,
        diag.reference_floor_ratio,
        diag.reference_method,
    )
    comparison = compare(
        model,
        noise,
        sigmas,
        experiment.solver,
        experiment.stein,
        options=experiment.options,
        diagnostics=diag,
        seed=experiment.seed,
        callback=callback,
        flow=models.reference_flow(reference_key) if diag.reference else None,
        on_phase=on_phase,
    )
    models.remember_reference_flow(reference_key, comparison.flow)
    field_2d = vector_field(model, comparison.sigmas, experiment.device) if model.kind == "2d" else None
    result = ExperimentResult(experiment, model, comparison, {}, field_2d)
    if experiment.score and model.event_shape == DIGIT_SHAPE and experiment.batch >= 2:
        classifier = load_classifier()
        for name, run in result.runs().items():
            s = score_digits(run.samples, classifier)
            result.scores[name] = {"fd_mnist": s.fd, "classes": s.class_counts}
    return result

"""steindiff: few-step diffusion ODE sampling, the contractivity trap, and the Stein correction."""

from .denoisers import MODELS, Denoiser, load_model
from .noise import initial_noise
from .records import Comparison, DiagnosticsConfig, RunResult, StepRecord
from .reference import reference_trajectory
from .sampling import compare, sample
from .schedules import SCHEDULES, make_sigmas
from .solvers import SOLVERS, SolverOptions, get_solver
from .stein import SteinConfig

__all__ = [
    "MODELS",
    "SCHEDULES",
    "SOLVERS",
    "Comparison",
    "Denoiser",
    "DiagnosticsConfig",
    "RunResult",
    "SolverOptions",
    "SteinConfig",
    "StepRecord",
    "compare",
    "get_solver",
    "initial_noise",
    "load_model",
    "make_sigmas",
    "reference_trajectory",
    "sample",
]

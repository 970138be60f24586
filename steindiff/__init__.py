"""steindiff: few-step diffusion ODE sampling, the contractivity trap, and the Stein correction."""

from steindiff.correction.rule import SteinConfig
from steindiff.denoisers import MODELS, Denoiser, load_model
from steindiff.diagnostics.reference import reference_trajectory
from steindiff.noise import initial_noise
from steindiff.records import Comparison, DiagnosticsConfig, RunResult, StepRecord
from steindiff.sampling import compare, sample
from steindiff.schedules import SCHEDULES, make_sigmas
from steindiff.solvers import SOLVERS, SolverOptions, get_solver

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

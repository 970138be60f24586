"""Our DDIM, DPM-Solver++ and UniPC against diffusers' own schedulers, same analytic model and noise.

diffusers works in VP coordinates on discrete timesteps; we run in EDM coordinates on the sigmas of
its timesteps (sigma_e = sqrt((1 - abar) / abar)), starting from x_vp / alpha and ending at sigma = 0.
"""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from steindiff import SolverOptions, load_model, sample  # noqa: E402

CASES = {
    "ddim": (diffusers.DDIMScheduler, {"set_alpha_to_one": True, "clip_sample": False}, SolverOptions()),
    "dpmpp_2m": (
        diffusers.DPMSolverMultistepScheduler,
        {"solver_order": 2, "final_sigmas_type": "zero"},
        SolverOptions(),
    ),
    "dpmpp_3m": (
        diffusers.DPMSolverMultistepScheduler,
        {"solver_order": 3, "final_sigmas_type": "zero"},
        SolverOptions(),
    ),
    "unipc": (diffusers.UniPCMultistepScheduler, {"solver_order": 2, "final_sigmas_type": "zero"}, SolverOptions()),
    "unipc-3": (
        diffusers.UniPCMultistepScheduler,
        {"solver_order": 3, "final_sigmas_type": "zero"},
        SolverOptions(unipc_order=3),
    ),
}


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_scheduler(case, steps, prediction):
    scheduler_cls, kwargs, options = CASES[case]
    model = load_model("gmm-aniso")
    scheduler = scheduler_cls(prediction_type=prediction, **kwargs)
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.to(torch.float64)
    x_vp = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    state, grid = x_vp.clone(), []
    for t in scheduler.timesteps:
        ab = abar[int(t)]
        alpha, sigma_vp, sigma_e = ab.sqrt(), (1 - ab).sqrt(), ((1 - ab) / ab).sqrt()
        grid.append(float(sigma_e))
        x0 = model(state / alpha.float(), torch.tensor(float(sigma_e)))
        output = x0 if prediction == "sample" else (state - alpha.float() * x0) / sigma_vp.float()
        state = scheduler.step(output, t, state).prev_sample
    ours = sample(model, x_vp / (1 / math.sqrt(1 + grid[0] ** 2)), [*grid, 0.0], case.split("-")[0], options=options)
    assert torch.allclose(ours.samples, state, atol=2e-5), (ours.samples - state).abs().max()

import pytest
import torch

from steindiff.schedules import karras_sigmas, logsnr_sigmas, make_sigmas, time_uniform_sigmas, vp_sigma, vp_time


@pytest.mark.parametrize("name", ["karras", "logsnr", "time_uniform"])
@pytest.mark.parametrize("steps", [1, 2, 5, 33])
def test_grids_descend_from_sigma_max_to_an_explicit_zero(name, steps):
    sigmas = make_sigmas(name, steps, 0.002, 80.0)
    assert sigmas.shape == (steps + 1,)
    assert sigmas[-1] == 0
    # exactly: grids of one model from the same noise share their ends (the app's reference solution)
    assert float(sigmas[0]) == 80.0
    if steps > 1:
        assert float(sigmas[-2]) == 0.002
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_karras_is_uniform_in_sigma_to_the_one_over_rho():
    sigmas = karras_sigmas(10, 0.002, 80.0, rho=7.0)[:-1]
    gaps = torch.diff(sigmas ** (1 / 7))
    assert torch.allclose(gaps, gaps[0].expand_as(gaps), rtol=1e-10)


def test_logsnr_is_uniform_in_log_sigma():
    gaps = torch.diff(logsnr_sigmas(10, 0.01, 10.0)[:-1].log())
    assert torch.allclose(gaps, gaps[0].expand_as(gaps), rtol=1e-10)


def test_time_uniform_is_uniform_in_vp_time_and_vp_time_inverts_vp_sigma():
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    assert torch.allclose(vp_time(vp_sigma(t)), t, rtol=1e-10)
    gaps = torch.diff(vp_time(time_uniform_sigmas(8, 0.01, 50.0)[:-1]))
    assert torch.allclose(gaps, gaps[0].expand_as(gaps), rtol=1e-8)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_sigmas("cosine", 5), "unknown schedule"),
        (lambda: make_sigmas("karras", 0), "steps"),
        (lambda: make_sigmas("karras", 5, 1.0, 0.5), "sigma_min"),
        (lambda: make_sigmas("logsnr", 5, 0.0, 1.0), "sigma_min"),
    ],
)
def test_bad_grids_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()

"""Seeded randomness: each sample's initial noise, and independent streams for probes and start vectors.

Everything is drawn on the CPU from seeds derived with numpy's SeedSequence, so a seed gives the same
numbers on every device; a sample's initial noise depends only on the seed and its index in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["LIPSCHITZ_STREAM", "PROBE_STREAM", "initial_noise", "sample_seed", "stream_generator"]


def _derived_seed(*entropy: int) -> int:
    """A 64-bit seed from these integers (numpy's SeedSequence): different integers, unrelated seeds."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0])


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` in run ``seed``: each sample's noise depends only on (seed, index)."""
    return _derived_seed(seed, index)


def initial_noise(
    batch: int,
    event_shape: Sequence[int],
    sigma: float,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    first_index: int = 0,
) -> torch.Tensor:
    """x_T = sigma * eps with eps drawn per sample on the CPU: the same whatever the batch size or device."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    gen = torch.Generator()
    shape = tuple(event_shape)
    eps = torch.stack(
        [
            torch.randn(shape, generator=gen.manual_seed(sample_seed(seed, first_index + i)), dtype=torch.float64)
            for i in range(batch)
        ]
    )
    return (sigma * eps).to(dtype=dtype, device=device)


#: the streams of :func:`stream_generator`: the Hutchinson probes, the Krylov start vectors
PROBE_STREAM, LIPSCHITZ_STREAM = 1, 2


def stream_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for the random numbers of run ``seed`` named by ``stream`` (independent of the
    initial noise and of every other stream)."""
    return torch.Generator().manual_seed(_derived_seed(seed, *stream))

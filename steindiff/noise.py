"""Seeded randomness: each sample's initial noise, and independent streams for probes and start vectors.

Everything is drawn on the CPU from seeds derived as numpy's SeedSequence derives them, so a seed gives the
same numbers on every device; a sample's initial noise depends only on the seed and its index in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "AMPLIFICATION_STREAM",
    "LIPSCHITZ_STREAM",
    "PROBE_STREAM",
    "derived_seeds",
    "initial_noise",
    "stream_generator",
]

_MASK32 = 0xFFFFFFFF
#: the hash constants of numpy's SeedSequence (numpy 1.17+, random/bit_generator.pyx), from whose seeds every
#: recorded run drew its noise; tests/test_sampling.py holds :func:`derived_seeds` to numpy's own
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_POOL_SIZE = 4


def _words(value: int) -> list[int]:
    """A non-negative integer as SeedSequence reads it: 32-bit words, lowest first, one word for 0."""
    if value < 0:
        raise ValueError(f"seeds, streams and sample indices must be >= 0, got {value}")
    words = [value & _MASK32]
    while value := value >> 32:
        words.append(value & _MASK32)
    return words


def _hasher(init: int, mult: int) -> Callable[[np.ndarray], np.ndarray]:
    """SeedSequence's multiply-xorshift hash of 32-bit words whose multiplier starts at ``init`` and steps by
    ``mult`` at each call (``hashmix`` with the A constants, ``generate_state``'s output with the B)."""
    multiplier = init

    def hash_words(value: np.ndarray) -> np.ndarray:
        nonlocal multiplier
        value = value ^ multiplier
        multiplier = (multiplier * mult) & _MASK32
        value = (value * multiplier) & _MASK32
        return value ^ (value >> 16)

    return hash_words


def _seed_sequence_seeds(entropy: np.ndarray) -> np.ndarray:
    """``SeedSequence(row).generate_state(1, np.uint64)[0]`` for each row of 32-bit words (n, words), at once.

    SeedSequence hashes the words into a pool of 4 (``mix_entropy``), then the pool into the state
    (``generate_state``); its multipliers evolve with the number of words only, the same for every row.
    """
    hashmix = _hasher(_INIT_A, _MULT_A)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        value = (_MIX_MULT_L * x - _MIX_MULT_R * y) & _MASK32  # uint64 wraps modulo 2^64, a multiple of 2^32
        return value ^ (value >> 16)

    rows, width = entropy.shape
    zero = np.zeros(rows, dtype=np.uint64)
    pool = [hashmix(entropy[:, i] if i < width else zero) for i in range(_POOL_SIZE)]
    for source in range(_POOL_SIZE):
        for target in range(_POOL_SIZE):
            if source != target:
                pool[target] = mix(pool[target], hashmix(pool[source]))
    for source in range(_POOL_SIZE, width):
        for target in range(_POOL_SIZE):
            pool[target] = mix(pool[target], hashmix(entropy[:, source]))
    output = _hasher(_INIT_B, _MULT_B)
    low, high = output(pool[0]), output(pool[1])
    return low | (high << 32)


def derived_seeds(entropy: Sequence[Sequence[int]]) -> list[int]:
    """A 64-bit seed from each sequence of non-negative integers: numpy's
    ``SeedSequence(row).generate_state(1, np.uint64)[0]``, the rows hashed at once in array arithmetic
    instead of one SeedSequence each. Different integers, unrelated seeds."""
    words = [[word for value in row for word in _words(value)] for row in entropy]
    seeds = np.zeros(len(words), dtype=np.uint64)
    for width in {len(row) for row in words}:
        rows = [i for i, row in enumerate(words) if len(row) == width]
        seeds[rows] = _seed_sequence_seeds(np.array([words[i] for i in rows], dtype=np.uint64))
    return seeds.tolist()


def initial_noise(
    batch: int,
    event_shape: Sequence[int],
    sigma: float,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    first_index: int = 0,
) -> torch.Tensor:
    """x_T = sigma * eps with eps drawn per sample on the CPU: the same whatever the batch size or device.

    Sample i's eps comes from a generator seeded with ``derived_seeds([(seed, i)])``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    gen = torch.Generator()
    shape = tuple(event_shape)
    seeds = derived_seeds([(seed, first_index + i) for i in range(batch)])
    eps = torch.stack([torch.randn(shape, generator=gen.manual_seed(s), dtype=torch.float64) for s in seeds])
    return (sigma * eps).to(dtype=dtype, device=device)


#: the streams of :func:`stream_generator`: the Hutchinson probes, the Krylov start vectors of the step maps and
#: of the runs' tails (the benchmark's blocks draw stream 3)
PROBE_STREAM, LIPSCHITZ_STREAM, AMPLIFICATION_STREAM = 1, 2, 4


def stream_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for the random numbers of run ``seed`` named by ``stream`` (independent of the
    initial noise and of every other stream)."""
    return torch.Generator().manual_seed(derived_seeds([(seed, *stream)])[0])

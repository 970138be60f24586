"""Maps that call a denoiser, evaluated together: the calls they make in each round as one batched call.

The Lipschitz diagnostics estimate the Jacobian norm of many small maps (every step of every run, a few
samples each). Each map calls the network one or more times, with its own noise level and history, so
run one after the other they make many small network calls. :func:`lockstep` runs them side by side
instead: each map on a short-lived thread that only does the map's own arithmetic, and the caller's
thread gathers the network calls all live maps are waiting on into one call with per-sample noise levels
(the network runs on the caller's thread, which keeps one OpenMP pool; see ``compute_thread``). Samples
never interact, so the result is the maps' outputs; only the batch composition of the calls changes. A map
calls the denoiser with the conditioning of the rows it passes (``denoise(x, sigma, **cond)``), and the
batched call concatenates the conditioning as it concatenates the rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from steindiff.denoisers.base import Cond, DenoiseFn, Denoiser, cond_cat

__all__ = ["DenoiserMap", "lockstep"]

#: a map of a batch that calls the denoiser it is given, mixing no samples: z -> f(denoise, z), one output or a
#: tuple of them
DenoiserMap = Callable[[DenoiseFn, torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


def lockstep(
    denoiser: Denoiser, maps: Sequence[DenoiserMap], sizes: Sequence[int]
) -> Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]:
    """The block-diagonal map z -> cat_i maps[i](denoiser, z_i), z_i the i-th block of ``sizes[i]`` rows; for
    maps with several outputs (each the same number), the tuple of each output's concatenation.

    In each round, every map still running has either finished or is waiting on a denoiser call; those
    calls run as one. Autograd sees through it (grad mode is carried to the map threads). Not for
    torch.func transforms, whose state is per thread: with them, call the maps one by one.
    """
    if len(maps) != len(sizes):
        raise ValueError(f"{len(maps)} maps but {len(sizes)} block sizes")

    def joint(z: torch.Tensor) -> torch.Tensor:
        if len(maps) == 1:
            return maps[0](denoiser, z)
        return _Rounds(denoiser, maps, z.split(list(sizes))).run()

    return joint


class _Rounds:
    """One evaluation of the joint map: the map threads, the calls they wait on, and their outputs.

    Each map thread waits on its own event, so a round wakes only the maps it answers.
    """

    def __init__(self, denoiser: Denoiser, maps: Sequence[DenoiserMap], parts: Sequence[torch.Tensor]):
        self.denoiser, self.maps, self.parts = denoiser, maps, parts
        self.grad = torch.is_grad_enabled()
        self.lock = threading.Lock()
        self.round_ready = threading.Event()  # every live map waits on a call or has finished
        self.answered = [threading.Event() for _ in maps]
        self.waiting: dict[int, tuple[torch.Tensor, torch.Tensor, Cond]] = {}
        self.answers: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor | tuple[torch.Tensor, ...]] = {}
        self.errors: dict[int, BaseException] = {}
        self.finished = 0
        self.failure: BaseException | None = None

    def run(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(len(self.maps))]
        for thread in threads:
            thread.start()
        while True:
            self.round_ready.wait()
            with self.lock:
                self.round_ready.clear()
                calls = sorted(self.waiting.items())
                self.waiting.clear()
            if not calls:
                break
            try:
                x, sigma = torch.cat([x for _, (x, _, _) in calls]), torch.cat([s for _, (_, s, _) in calls])
                out = self.denoiser(x, sigma, **(cond_cat([c for _, (_, _, c) in calls]) or {}))
                self.answers.update(
                    zip([i for i, _ in calls], out.split([len(x) for _, (x, _, _) in calls]), strict=True)
                )
            except BaseException as err:  # handed to the waiting maps, then re-raised here
                with self.lock:
                    self.failure = err
            for i, _ in calls:
                self.answered[i].set()
        for thread in threads:
            thread.join()
        if self.failure is not None:
            raise self.failure
        if self.errors:
            raise self.errors[min(self.errors)]
        outputs = [self.outputs[i] for i in range(len(self.maps))]
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))
        return torch.cat(outputs)

    def _round_complete(self) -> None:
        """Under the lock: wake the caller when no live map is left running."""
        if len(self.waiting) + self.finished == len(self.maps):
            self.round_ready.set()

    def _work(self, index: int) -> None:
        torch.set_grad_enabled(self.grad)  # grad mode is per thread

        def denoise(x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
            with self.lock:
                if self.failure is not None:
                    raise RuntimeError("an earlier batched denoiser call failed")
                self.waiting[index] = (x, self.denoiser.per_sample_sigma(x, sigma), cond)
                self._round_complete()
            self.answered[index].wait()
            self.answered[index].clear()
            if index not in self.answers:
                raise RuntimeError("the batched denoiser call failed") from self.failure
            return self.answers.pop(index)

        try:
            self.outputs[index] = self.maps[index](denoise, self.parts[index])
        except BaseException as err:  # re-raised on the caller's thread
            self.errors[index] = err
        finally:
            with self.lock:
                self.finished += 1
                self._round_complete()

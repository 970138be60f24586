"""What one request may ask for: the one home of the settings' limits (the CLI's and the benchmark's are these
defaults; the app's server passes tighter ones)."""

from __future__ import annotations

from dataclasses import dataclass

from steindiff.denoisers.base import ModelKind

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the CLI is generous; a shared server is not)."""

    max_nfe: int = 1000
    max_batch: int = 100_000
    max_image_batch: int = 100_000
    max_probes: int = 256
    max_lipschitz_samples: int = 4096

    def batch_limit(self, kind: ModelKind) -> int:
        """The largest batch of a model of ``kind`` ('image' or '2d')."""
        return self.max_image_batch if kind == "image" else self.max_batch

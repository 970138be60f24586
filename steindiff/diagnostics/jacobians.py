"""Per-step diagnostics: local Lipschitz constants, the paper's bound, error to a reference."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch

from steindiff.correction.divergence import fd_step

__all__ = [
    "JacobianMode",
    "jacobian_norms",
    "jacobian_rows",
    "krylov_start",
    "lipschitz_bound",
    "local_lipschitz",
    "mean_distance",
]

MapFn = Callable[[torch.Tensor], torch.Tensor]
#: a map with several outputs of one input (for :func:`jacobian_norms`)
OutputsFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
JacobianMode = Literal["jvp", "vjp2", "fd"]


def _per_sample_normalise(v: torch.Tensor) -> torch.Tensor:
    norms = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v / norms.reshape(-1, *([1] * (v.ndim - 1)))


class _Products(NamedTuple):
    """Jacobian products of a map's outputs at a point, per sample."""

    jvp: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # w -> (J_i w for every output i)
    vjp: Callable[[torch.Tensor, int], torch.Tensor]  # (g, i) -> J_i^T g
    outputs: tuple[torch.Tensor, ...]  # the map's outputs at the point (detached)
    first: tuple[torch.Tensor, ...] | None  # J_i q for the direction q given with known outputs, else None


def _products(
    fn: OutputsFn,
    x: torch.Tensor,
    mode: JacobianMode,
    known: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None,
) -> _Products:
    """Products of fn's Jacobians at x: J w by forward mode, double VJP or forward difference; J^T g by a VJP.
    An output that does not depend on x has J = 0.

    ``known`` (mode "fd"): fn's outputs at x, already computed, and a first direction q. The graph for the
    VJPs is then recorded at x + h q, the forward difference's point along q, which also gives J q: one
    evaluation of fn fewer. J^T g is then taken at x + h q, within the difference's own error of x.
    """
    x = x.detach()
    if known is not None and mode != "fd":
        raise ValueError(f"known outputs serve forward differences only, not mode {mode!r}")
    at = x if known is None else x + fd_step(x, known[1]) * known[1]
    with torch.enable_grad():
        x_in = at.clone().requires_grad_(True)
        out = fn(x_in)
        live = [i for i, o in enumerate(out) if o.requires_grad]
        if mode == "vjp2":  # x -> sum_i J_i^T d_i, whose VJP in d_i is J_i w
            dummies = [torch.zeros_like(out[i], requires_grad=True) for i in live]
            (vjp_graph,) = torch.autograd.grad([out[i] for i in live], x_in, grad_outputs=dummies, create_graph=True)
    outputs = tuple(o.detach() for o in out) if known is None else known[0]

    def difference(at_step: Sequence[torch.Tensor], h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple((o.detach() - o_x) / h for o, o_x in zip(at_step, outputs, strict=True))

    def jvp(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if mode == "jvp":
            return tuple(torch.func.jvp(fn, (x,), (w,))[1])
        if mode == "fd":
            h = fd_step(x, w)
            with torch.no_grad():
                return difference(fn(x + h * w), h)
        with torch.enable_grad():
            products = torch.autograd.grad(vjp_graph, dummies, grad_outputs=w, retain_graph=True)
        by_output = dict(zip(live, products, strict=True))
        return tuple(by_output.get(i, torch.zeros_like(o)) for i, o in enumerate(out))

    def vjp(g: torch.Tensor, output: int) -> torch.Tensor:
        if not out[output].requires_grad:
            return torch.zeros_like(x)
        with torch.enable_grad():
            return torch.autograd.grad(out[output], x_in, grad_outputs=g, retain_graph=True)[0]

    first = None if known is None else difference(out, fd_step(x, known[1]))
    return _Products(jvp, vjp, outputs, first)


def jacobian_rows(fn: MapFn, x: torch.Tensor) -> torch.Tensor:
    """The per-sample Jacobian of fn at x over flattened events, (B, d_out, d_in), by d_out VJPs."""
    return _jacobians(lambda z: (fn(z),), x)[0]


def _jacobians(fn: OutputsFn, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-sample Jacobian of each of fn's outputs at x, (B, d_out, d_in) each, by d_out VJPs an output."""
    products = _products(fn, x, "jvp")
    jacobians = []
    for i, out in enumerate(products.outputs):
        rows = []
        for j in range(out[0].numel()):
            basis = torch.zeros_like(out).flatten(1)
            basis[:, j] = 1
            rows.append(products.vjp(basis.reshape(out.shape), i).detach().flatten(1))
        jacobians.append(torch.stack(rows, dim=1))
    return tuple(jacobians)


def krylov_start(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian start vectors shaped like ``x`` for :func:`local_lipschitz`, drawn in float64 on the CPU
    (the same on every device)."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float64)


def local_lipschitz(
    fn: MapFn,
    x: torch.Tensor,
    iters: int = 20,
    generator: torch.Generator | None = None,
    mode: JacobianMode = "jvp",
    exact_max_dim: int = 16,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spectral norm of dfn/dx at each sample of ``x``, shape (B,).

    ``fn`` must map a batch to a batch of the same shape without mixing samples, so J is block
    diagonal. Up to ``exact_max_dim`` dimensions the Jacobian is built (d VJPs) and its norm is exact.
    Above, a Krylov estimate for each sample (Golub-Kahan-Lanczos, Golub & Van Loan, Matrix
    Computations, sec. 10.4): from a random unit q_1, ``iters`` rounds of u_i = J q_i and
    q_{i+1} = J^T u_i, re-orthogonalised against q_1..q_i, and a last u = J q_{iters+1}. With U the
    images J q_i, the largest eigenvalue of U^T U = Q^T (J^T J) Q is the Rayleigh-Ritz estimate of
    ||J||^2 on the Krylov space, which holds power iteration's iterate: for the same products (iters
    VJPs, iters + 1 JVPs) it is never below power iteration's estimate and never above ||J||, so the
    result is a lower bound that converges much faster. ``mode`` "jvp" uses forward-mode AD for J w;
    "vjp2" a double VJP (for models where forward mode fails); "fd" a forward difference
    (:func:`steindiff.correction.divergence.fd_step`): one forward a product instead of three, and a lower
    bound only up to the difference's error (close to the double VJP's: measured, see docs/design.md).
    ``start`` gives the start vectors q_1 (shaped like ``x``; normalised per sample), else they are
    Gaussian from ``generator``.
    """
    return jacobian_norms(lambda z: (fn(z),), x, iters, mode, exact_max_dim, start, generator)[0]


def jacobian_norms(
    fn: OutputsFn,
    x: torch.Tensor,
    iters: int = 20,
    mode: JacobianMode = "jvp",
    exact_max_dim: int = 16,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    outputs: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`local_lipschitz` for a map with several outputs: the spectral norm of each output's Jacobian at
    each sample of ``x``, a tuple of (B,) tensors, all from the Krylov space of the first output.

    Each output's estimate is its Rayleigh-Ritz value on that space: the largest singular value of its
    Jacobian on the orthonormal basis q_1..q_{iters+1}, a lower bound. Its products J_i q come from the
    evaluations that give the first output's, so a second output computed along the first costs no network
    call: the denoiser call a solver step makes at its own input gives the denoiser's estimate along the
    step's. Up to ``exact_max_dim`` dimensions every output's norm is exact (d VJPs each).

    ``outputs``, fn's outputs at ``x`` where the caller has them (a solver run has its steps' values), spare
    forward differences one evaluation of fn: the graph for the VJPs is recorded at x + h q_1 instead of x,
    which also gives J q_1 (the VJPs are then taken within the difference's own error of x).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if x[0].numel() <= exact_max_dim:
        return tuple(
            _where_finite(lambda j: torch.linalg.matrix_norm(j, ord=2), jacobian.to(torch.float64)).to(x.dtype)
            for jacobian in _jacobians(fn, x)
        )
    w = krylov_start(x, generator) if start is None else start
    tiny = torch.finfo(x.dtype).tiny
    q = _per_sample_normalise(w.to(dtype=x.dtype, device=x.device)).flatten(1)
    products = _products(fn, x, mode, None if outputs is None else (outputs, q.reshape(x.shape)))
    basis, images = [q], []
    for i in range(iters):
        first = products.first if i == 0 and products.first is not None else products.jvp(q.reshape(x.shape))
        image = [product.detach() for product in first]
        images.append(image)
        residual = products.vjp(image[0], 0).detach().flatten(1)
        scale = residual.norm(dim=1, keepdim=True)
        for _ in range(2):  # classical Gram-Schmidt, twice ("twice is enough")
            for b in basis:
                residual = residual - (residual * b).sum(1, keepdim=True) * b
        norm = residual.norm(dim=1, keepdim=True)
        # a sample whose Krylov space is exhausted goes on with q = 0, which adds only a zero Ritz value
        q = torch.where(norm <= 1e-5 * scale, torch.zeros_like(residual), residual / norm.clamp_min(tiny))
        basis.append(q)
    images.append([product.detach() for product in products.jvp(q.reshape(x.shape))])
    return tuple(_top_ritz_value(output_images, x.dtype) for output_images in zip(*images, strict=True))


def _top_ritz_value(images: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sqrt of the largest eigenvalue of U^T U, U the images J q_i of the orthonormal basis, per sample."""
    u = torch.stack([image.flatten(1) for image in images], 1).to(torch.float64)  # (B, basis size, d_out)
    ritz = _where_finite(lambda gram: torch.linalg.eigvalsh(gram)[:, -1], u @ u.transpose(1, 2))
    return ritz.clamp_min(0).sqrt().to(dtype)


def _where_finite(norm: Callable[[torch.Tensor], torch.Tensor], matrices: torch.Tensor) -> torch.Tensor:
    """``norm`` of each of a batch of matrices whose entries are all finite, NaN for the others: a map that
    overflowed at a state of a diverging run (a Jacobian or a product of it non-finite) has no constant to
    show, and LAPACK's SVD and eigensolvers raise on non-finite input."""
    finite = matrices.flatten(1).isfinite().all(1)
    out = torch.full(matrices.shape[:1], math.nan, dtype=matrices.dtype, device=matrices.device)
    if finite.any():
        out[finite] = norm(matrices[finite])
    return out


def lipschitz_bound(sigma: float, sigma_next: float, denoiser_lipschitz: float) -> float:
    """The paper's bound L_T <= sigma_t/sigma_s + sigma_t h_t L_x (VP coordinates), in EDM coordinates.

    For a first-order step T(x) = (sigma'/sigma) x + (1 - e^{-h}) D(x) with 1 - e^{-h} <= h, writing
    the VP bound for x_vp = alpha x and dividing by alpha'/alpha gives
    L_T <= sigma'/sigma + h L_D with h = log(sigma/sigma') and L_D the Lipschitz constant of D.
    Infinite for the step into sigma = 0 (h = inf).
    """
    if sigma_next == 0:
        return math.inf
    return sigma_next / sigma + math.log(sigma / sigma_next) * denoiser_lipschitz


def mean_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the Euclidean distance ||a_i - b_i|| (inf/nan when a state diverged)."""
    return float((a.to(torch.float64) - b.to(torch.float64)).flatten(1).norm(dim=1).mean())

"""The differentiable sparse linear solve of the Gauss-Newton layer (docs/design.md §3).

:func:`gn_solve` solves, for every batch item,

    A x = b,    A = blockdiag_p(H(p)) + λ L⊗I_n + ε I,

with ``L`` the free-boundary grid Laplacian (:mod:`layers.laplacian`), by preconditioned conjugate
gradients, and differentiates through the solve implicitly: the backward pass solves ``A y = x̄`` with the
same operator (``A`` is symmetric) and returns ``b̄ = y``, ``H̄ = −sym(y xᵀ)`` per node and
``λ̄ = −yᵀ (L⊗I) x``. No CG iteration is unrolled, so memory does not grow with the iteration count.

Backends:

* ``"torch"`` — matrix-free batched PCG (:func:`layers.cg.cg`): ``A x = Hd x − λ S x`` where
  ``Hd = sym(H) + (λ deg + ε) I`` is the per-node diagonal block of ``A`` and ``S`` the grid adjacency
  (shifted in-place subtractions, no sparse matrix); it solves the equivalent system ``(A / λ) x = b / λ``
  so that the Laplacian part needs no multiplication. Runs on any device.
* ``"graph"`` — the same PCG on the same numbers (same iterates and iteration counts), replayed as CUDA graphs
  on fixed buffers cached per system shape (:func:`layers.gn_operator.graph_solve`): no per-kernel launch
  overhead, one host check per 8 iterations. On a non-CUDA device it runs the same stages eagerly.
* ``"cupy"`` — ``A`` assembled as a CSR matrix on the GPU and solved with ``cupyx.scipy.sparse.linalg.cg``
  per batch item, tensors shared through DLPack.

The preconditioner (on by default) is block-Jacobi: the per-node block ``Hd(p)`` inverted in closed form.
With ``coupling="diagonal"`` the cross terms of ``H`` are dropped and the system splits into ``n``
independent scalar systems (one per displacement component), solved as a batch of ``B·n`` systems.

The file reads top to bottom: :func:`gn_solve` and its configuration; the autograd function (forward solve,
implicit backward) and its helpers; the systems (diagonal blocks, preconditioner, the per-backend solve); the
validation of the arguments last. The matrix-free operator and the per-node block kernels are in
:mod:`layers.gn_operator`.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .cg import cg
from .cupy_backend import cg_cupy, cupy_available
from .enums import Backend, Coupling
from .gn_operator import BlockPreconditioner, GNOperator, block_apply, block_inverse, graph_solve
from .laplacian import block_diagonal_csr, laplacian_apply, laplacian_degree, system_csr_from_blocks

__all__ = ["DEFAULT_MAXITER", "GNSolveInfo", "block_apply", "block_inverse", "gn_solve"]

logger = logging.getLogger(__name__)

#: Default CG iteration limit of :func:`gn_solve` (``maxiter=None``).
DEFAULT_MAXITER = 1000

_SYM_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


class GNSolveInfo(NamedTuple):
    """Convergence report of the forward solve of :func:`gn_solve`.

    Attributes:
        iterations: ``(B,)`` int64 CG iterations per batch item (with ``coupling="diagonal"``: the maximum
            over the ``n`` scalar systems of the item).
        rel_residual: ``(B,)`` final relative residual ``‖b − A x‖ / ‖b‖`` per item (0 for ``b = 0``).
        converged: ``(B,)`` bool, whether the item reached ``rtol`` within ``maxiter``.
        backend: ``"torch"``, ``"graph"`` or ``"cupy"``, the backend that ran.
    """

    iterations: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    backend: str


# ----------------------------------------------------------------------------------------------- public API


def gn_solve(
    H: torch.Tensor,
    b: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    coupling: str = "full",
    backend: str = "auto",
    rtol: float = 1e-3,
    maxiter: int | None = None,
    x0: torch.Tensor | None = None,
    precondition: bool = True,
    return_info: bool = False,
    eps: float = 1e-6,
    strict: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, GNSolveInfo]:
    """Solve ``(blockdiag(H) + λ L⊗I_n + ε I) x = b`` per batch item, differentiably (docs/design.md §3).

    Args:
        H: ``(B, n, n, *G)`` per-node blocks ``JᵀJ`` (symmetric positive semi-definite), ``G`` a 2D or 3D grid
            with ``n = len(G)``; units of ``b`` per unit of ``x``. With ``coupling="diagonal"`` only the
            diagonal ``H[:, i, i]`` is used (off-diagonal entries are ignored, not checked for symmetry).
        b: ``(B, n, *G)`` right-hand side (e.g. ``−(g + λ (L⊗I) u)`` of a GN step).
        lam: regularisation weight λ > 0: a float, or a tensor of shape ``()`` or ``(B,)`` (dtype and
            device of ``H``; differentiable).
        coupling: ``"full"`` (the ``n×n`` blocks) or ``"diagonal"`` (cross terms dropped: ``n`` independent
            scalar systems).
        backend: ``"auto"`` (see :func:`_resolve_backend`), ``"torch"``, ``"graph"`` or ``"cupy"`` (module
            docstring).
        rtol: relative residual tolerance ``‖b − A x‖ ≤ rtol ‖b‖`` per item (per component system with
            ``coupling="diagonal"``); the backward solve uses the same tolerance relative to ``‖x̄‖``.
        maxiter: CG iteration limit; ``None`` means :data:`DEFAULT_MAXITER` (1000).
        x0: optional initial guess ``(B, n, *G)`` for the forward solve (not differentiated).
        precondition: use the block-Jacobi preconditioner (per-node block of ``A``, inverted).
        return_info: also return a :class:`GNSolveInfo`.
        eps: absolute value ``ε ≥ 0`` added to the diagonal of ``A`` (keeps it positive definite).
        strict: raise ``RuntimeError`` instead of logging a warning when CG does not converge.

    Returns:
        ``x`` ``(B, n, *G)`` (units of ``b`` / ``H``), or ``(x, info)`` when ``return_info``. Differentiable
        with respect to ``H``, ``b`` and ``lam`` (implicit differentiation; first order only).

    Raises:
        ValueError: on bad shapes, dtypes (float32/float64 only), devices, non-finite values, ``lam ≤ 0``,
            non-symmetric ``H`` (``max|H − Hᵀ| > tol·max|H|``, ``tol`` 1e-5 for float32, 1e-10 for float64),
            or an unknown ``coupling``/``backend``; the message names the argument.
        RuntimeError: with ``strict=True`` when CG does not converge; when ``backend="cupy"`` is requested
            but cupy is unavailable.
    """
    maxiter = DEFAULT_MAXITER if maxiter is None else maxiter
    n, lam_t, coupling, backend = _validate(H, b, lam, x0, coupling, backend, rtol, maxiter, eps)
    cfg = _Config(n=n, coupling=coupling, backend=backend, rtol=float(rtol), maxiter=int(maxiter),
                  precondition=bool(precondition), eps=float(eps), strict=bool(strict))
    x0_d = None if x0 is None else x0.detach()
    x, iters, rel, conv = _GNSolveFn.apply(H, b, lam_t, x0_d, cfg)
    if return_info:
        return x, GNSolveInfo(iters, rel, conv, str(backend))
    return x


@dataclass
class _Config:
    """The settings of one :func:`gn_solve` call, checked (``backend`` resolved: never ``"auto"``)."""

    n: int
    coupling: Coupling
    backend: Backend
    rtol: float
    maxiter: int
    precondition: bool
    eps: float
    strict: bool


# ------------------------------------------------------------------------------------ the autograd function


class _GNSolveFn(torch.autograd.Function):
    """``x = A(H, λ)⁻¹ b`` with implicit-differentiation backward."""

    @staticmethod
    def forward(ctx, H, b, lam, x0, cfg: _Config):
        bsz = H.shape[0]
        lam_b = lam.expand(bsz) if lam.dim() == 0 else lam
        system = _build_system(H, lam_b, cfg)
        x0_s = None if x0 is None else _to_system_shape(x0, cfg)
        x, iters, rel, conv = system.solve(_to_system_shape(b, cfg), x0_s)
        iters, rel, conv = _merge_info(b, iters, rel, conv, cfg)
        _report(conv, iters, rel, cfg.rtol, cfg.maxiter, cfg.strict, "forward")
        x = x.view(b.shape)
        ctx.system = system
        ctx.cfg = cfg
        ctx.lam_dim = lam.dim()
        ctx.save_for_backward(x)
        ctx.mark_non_differentiable(iters, rel, conv)
        return x, iters, rel, conv

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x, *_unused):
        (x,) = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        need_h, need_b, need_lam = ctx.needs_input_grad[:3]
        if grad_x is None or not (need_h or need_b or need_lam):
            return None, None, None, None, None
        gx = _to_system_shape(grad_x.contiguous(), cfg)
        y, iters, rel, conv = ctx.system.solve(gx, None)
        iters, rel, conv = _merge_info(grad_x, iters, rel, conv, cfg)
        _report(conv, iters, rel, cfg.rtol, cfg.maxiter, cfg.strict, "backward")
        y = y.view(x.shape)
        grad_h = grad_lam = None
        if need_h:
            if cfg.coupling == Coupling.FULL:
                outer = y.unsqueeze(2) * x.unsqueeze(1)  # (B, n, n, *G): y_i x_j
                grad_h = (outer + outer.transpose(1, 2)).mul_(-0.5)
            else:
                grad_h = x.new_zeros((x.shape[0], cfg.n, cfg.n, *x.shape[2:]))
                grad_h.diagonal(dim1=1, dim2=2).copy_((-(y * x)).movedim(1, -1))
        if need_lam:
            grad_lam = -(y * laplacian_apply(x)).reshape(x.shape[0], -1).sum(1)
            if ctx.lam_dim == 0:
                grad_lam = grad_lam.sum()
        return grad_h, (y if need_b else None), grad_lam, None, None


def _to_system_shape(t: torch.Tensor, cfg: _Config) -> torch.Tensor:
    """``(B, n, *G)`` -> the system layout (``(B n, 1, *G)`` for diagonal coupling)."""
    if cfg.coupling == Coupling.DIAGONAL:
        return t.reshape(t.shape[0] * cfg.n, 1, *t.shape[2:])
    return t


def _merge_info(b: torch.Tensor, iters: torch.Tensor, rel: torch.Tensor, conv: torch.Tensor, cfg: _Config):
    """Per-item info from per-system info (diagonal coupling: combine the ``n`` scalar systems)."""
    if cfg.coupling == Coupling.FULL:
        return iters, rel, conv
    bsz, n = b.shape[0], cfg.n
    bn2 = b.reshape(bsz, n, -1).square().sum(-1)  # (B, n) ‖b_i‖²
    res2 = (rel.view(bsz, n).square() * bn2).sum(1)
    tot = bn2.sum(1)
    rel_item = torch.where(tot > 0, torch.sqrt(res2 / torch.where(tot > 0, tot, torch.ones_like(tot))), 0.0)
    return iters.view(bsz, n).amax(1), rel_item.to(rel.dtype), conv.view(bsz, n).all(1)


def _report(converged: torch.Tensor, iterations: torch.Tensor, rel: torch.Tensor, rtol: float, maxiter: int,
            strict: bool, what: str) -> None:
    """Log (or raise, when ``strict``) non-convergence of a solve."""
    if bool(converged.all()):
        return
    bad = (~converged).nonzero().flatten().tolist()
    msg = (
        f"gn_solve {what}: CG did not reach rtol={rtol:g} within maxiter={maxiter} for batch items {bad} "
        f"(relative residuals {[f'{v:.3g}' for v in rel[bad].tolist()]}, "
        f"iterations {iterations[bad].tolist()})"
    )
    if strict:
        raise RuntimeError(msg)
    logger.warning(msg)


# ---------------------------------------------------------------------------------------------- the systems


def _build_system(H: torch.Tensor, lam_b: torch.Tensor, cfg: _Config) -> _System:
    """Diagonal blocks ``Hd`` (+ inverses) of ``A``; ``(B, n, n, *G)`` or ``(B n, 1, 1, *G)`` (diagonal)."""
    bsz, n = H.shape[0], cfg.n
    grid = tuple(H.shape[3:])
    deg = laplacian_degree(grid, H.device, H.dtype)
    dadd = lam_b.view(bsz, *([1] * n)) * deg + cfg.eps  # (B, *G): λ deg + ε
    if cfg.coupling == Coupling.FULL:
        hd = (H + H.transpose(1, 2)).mul_(0.5)
        hd.diagonal(dim1=1, dim2=2).add_(dadd.unsqueeze(-1))
        lam_sys = lam_b
    else:
        hd = torch.diagonal(H, dim1=1, dim2=2).movedim(-1, 1) + dadd.unsqueeze(1)  # (B, n, *G)
        hd = hd.reshape(bsz * n, 1, 1, *grid)
        lam_sys = lam_b.repeat_interleave(n)
    minv = block_inverse(hd) if cfg.precondition else None
    if cfg.backend in (Backend.TORCH, Backend.GRAPH):  # store the blocks of A / λ and their inverses
        lam_view = lam_sys.view(-1, 1, 1, *([1] * n))
        hd = hd.div_(lam_view)
        if minv is not None:
            minv = minv.mul_(lam_view)
    return _System(hd.contiguous(), minv, lam_sys.contiguous(), cfg.backend, cfg.rtol, cfg.maxiter)


@dataclass
class _System:
    """One batch of SPD systems ``(Hd − λ S⊗I) x = rhs``, ``(B', c, *G)``, and how to solve them.

    For the torch and graph backends ``hd`` and ``minv`` are stored divided / multiplied by λ (the system
    ``A / λ``, whose operator needs no λ); for the cupy backend they are stored as they are.
    """

    hd: torch.Tensor  # (B', c, c, *G): Hd, or Hd / λ (torch and graph backends)
    minv: torch.Tensor | None  # (B', c, c, *G): Hd⁻¹, or λ Hd⁻¹ (torch and graph); None without preconditioner
    lam: torch.Tensor  # (B',)
    backend: Backend
    rtol: float
    maxiter: int

    def solve(self, rhs: torch.Tensor, x0: torch.Tensor | None):
        """-> ``(x, iterations (B',), rel_residual (B',), converged (B',))``."""
        if self.backend in (Backend.TORCH, Backend.GRAPH):
            rhs_scaled = rhs / self.lam.view(-1, *([1] * (rhs.dim() - 1)))  # (A / λ) x = b / λ
            if self.backend == Backend.GRAPH:
                res = graph_solve(self.hd, self.minv, rhs_scaled, x0, rtol=self.rtol, maxiter=self.maxiter)
            else:
                precond = BlockPreconditioner(self.minv) if self.minv is not None else None
                res = cg(GNOperator(self.hd), rhs_scaled, precond=precond, x0=x0, rtol=self.rtol,
                         maxiter=self.maxiter)
            return res.x, res.iterations, res.rel_residual, res.converged
        xs, its, rels, convs = [], [], [], []
        for k in range(rhs.shape[0]):
            a = system_csr_from_blocks(self.hd[k], self.lam[k], Coupling.FULL)
            m = block_diagonal_csr(self.minv[k]) if self.minv is not None else None
            x_k, it, rel, conv = cg_cupy(
                a, rhs[k].reshape(-1), M=m, x0=None if x0 is None else x0[k].reshape(-1),
                rtol=self.rtol, maxiter=self.maxiter,
            )
            xs.append(x_k.view(rhs.shape[1:]))
            its.append(it)
            rels.append(rel)
            convs.append(conv)
        dev = rhs.device
        return (
            torch.stack(xs),
            torch.tensor(its, dtype=torch.int64, device=dev),
            torch.tensor(rels, dtype=rhs.dtype, device=dev),
            torch.tensor(convs, dtype=torch.bool, device=dev),
        )


# ----------------------------------------------------------------------------------------------- validation


def _validate(H, b, lam, x0, coupling, backend, rtol, maxiter, eps) -> tuple[int, torch.Tensor, Coupling, Backend]:
    """Check the arguments of :func:`gn_solve`; return ``(n, lam as a tensor, coupling, resolved backend)``.

    Type and shape checks first (each message names the argument), then the value checks with one host
    synchronisation, then the backend (``"auto"`` resolved, ``"cupy"`` checked).
    """
    coupling = Coupling.lookup(coupling, "coupling")
    backend = Backend.lookup(backend, "backend")
    _check_tensor("H", H)
    if H.dim() not in (5, 6):
        raise ValueError(f"H must have shape (B, n, n, *G) with n = len(G) in (2, 3); got {tuple(H.shape)}")
    n = H.dim() - 3
    if H.shape[1] != n or H.shape[2] != n:
        raise ValueError(f"H must have shape (B, {n}, {n}, *G) for a {n}D grid; got {tuple(H.shape)}")
    _check_tensor("b", b, H)
    expected_b = (H.shape[0], n, *H.shape[3:])
    if tuple(b.shape) != expected_b:
        raise ValueError(f"b must have shape (B, n, *G) = {expected_b} to match H; got {tuple(b.shape)}")
    if x0 is not None:
        _check_tensor("x0", x0, H)
        if x0.shape != b.shape:
            raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}; got {tuple(x0.shape)}")
    if isinstance(lam, torch.Tensor):
        _check_tensor("lam", lam, H)
        if lam.shape not in ((), (H.shape[0],)):
            raise ValueError(f"lam must be a float or a tensor of shape () or (B,) = ({H.shape[0]},); "
                             f"got shape {tuple(lam.shape)}")
        lam_t = lam
    elif isinstance(lam, numbers.Real) and not isinstance(lam, bool):
        if not math.isfinite(float(lam)) or float(lam) <= 0:
            raise ValueError(f"lam must be finite and > 0; got {lam}")
        lam_t = torch.tensor(float(lam), dtype=H.dtype, device=H.device)
    else:
        raise ValueError(f"lam must be a float or a tensor; got {type(lam).__name__}")
    if not (isinstance(rtol, numbers.Real) and rtol > 0):
        raise ValueError(f"rtol must be > 0; got {rtol}")
    if not (isinstance(maxiter, numbers.Integral) and maxiter >= 1):
        raise ValueError(f"maxiter must be a positive integer; got {maxiter}")
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0; got {eps}")

    # value checks, with a single host synchronisation
    with torch.no_grad():
        # min and max propagate NaN and show ±Inf: one cheap pass per tensor instead of isfinite
        hmin, hmaxv = torch.aminmax(H.detach()) if H.numel() else (H.new_zeros(()), H.new_zeros(()))
        bmin, bmax = torch.aminmax(b.detach()) if b.numel() else (b.new_zeros(()), b.new_zeros(()))
        hmax = torch.maximum(hmin.abs(), hmaxv.abs())
        asym = H.new_zeros(())
        if coupling == Coupling.FULL:
            for i in range(n):
                for j in range(i + 1, n):
                    asym = torch.maximum(asym, (H[:, i, j] - H[:, j, i]).abs().amax())
        lam_d = lam_t.detach()
        flags = torch.stack([
            torch.isfinite(hmax),
            torch.isfinite(bmin) & torch.isfinite(bmax),
            torch.isfinite(lam_d).all(),
            (lam_d > 0).all(),
            asym <= _SYM_RTOL[H.dtype] * hmax,
        ]).tolist()
    if not flags[0]:
        raise ValueError("H contains NaN or Inf")
    if not flags[1]:
        raise ValueError("b contains NaN or Inf")
    if not flags[2]:
        raise ValueError("lam contains NaN or Inf")
    if not flags[3]:
        raise ValueError("lam must be > 0")
    if not flags[4]:
        raise ValueError(
            f"H must be symmetric per node (max |H_ij - H_ji| = {float(asym):.3g} exceeds "
            f"{_SYM_RTOL[H.dtype]:g} * max|H| = {float(hmax):.3g})"
        )

    return n, lam_t, coupling, _resolve_backend(backend, H.device)


def _resolve_backend(backend: Backend, device: torch.device) -> Backend:
    """``"auto"`` -> graph for CUDA tensors (the fastest measured there, ``benchmarks/results/gpu.md``: 2.9 ms
    against 8.0 ms (torch) and 9.6 ms (cupy) for a forward solve at 56×48×56 on an H200), torch otherwise;
    ``"cupy"`` checked."""
    if backend == Backend.AUTO:
        return Backend.GRAPH if device.type == "cuda" else Backend.TORCH
    if backend == Backend.CUPY:
        if device.type != "cuda":
            raise ValueError(f"backend='cupy' needs CUDA tensors; H is on {device}")
        if not cupy_available():
            raise RuntimeError(
                "backend='cupy' requested but cupy (with cupyx.scipy.sparse.linalg) is unavailable"
            )
    return backend


def _check_tensor(name: str, t, ref: torch.Tensor | None = None) -> None:
    """``t`` is a tensor: float32/float64 (``ref=None``, for ``H``), else of ``ref``'s dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if ref is None:
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} must be float32 or float64; got {t.dtype}")
        return
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of H ({ref.dtype}); got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of H ({ref.device}); got {t.device}")

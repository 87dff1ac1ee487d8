"""Batched matrix-free preconditioned conjugate gradients in torch (the ``"torch"`` backend of the GN solve).

:func:`cg` is one preconditioned CG loop over a whole batch: every batch item has its own step sizes, its own
convergence test ``‖b − A x‖ / ‖b‖ ≤ rtol`` and its own iteration count; converged items are frozen (their
``x`` no longer changes) while the others continue. Runs on any device. This is the one CG loop used by both
the forward and the backward solve of :func:`layers.gn_solve` (torch backend). The ``"cupy"`` backend's CG is
:func:`layers.cupy_backend.cg_cupy`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["CGResult", "Operator", "cg"]

#: A linear operator / preconditioner: ``f(x) -> A x`` for ``x`` of the shape of ``b``. If the callable has a
#: truthy attribute ``accepts_out``, the CG loop calls it as ``f(x, out=buf)`` and it must write ``A x`` into
#: ``buf`` (and return it): this avoids one allocation per call.
Operator = Callable[..., torch.Tensor]


class CGResult(NamedTuple):
    """Result of a batched CG solve.

    Attributes:
        x: solution, same shape as ``b`` ``(B, ...)``.
        iterations: ``(B,)`` int64, CG iterations used by each item.
        rel_residual: ``(B,)`` final relative residual ``‖b − A x‖ / ‖b‖`` (recomputed from ``x`` when
            ``true_residual=True``; 0 for a zero right-hand side), dtype of ``b``.
        converged: ``(B,)`` bool, whether the item's recursive residual met ``rtol`` within ``maxiter``
            iterations (the recomputed ``rel_residual`` can differ from it by rounding).
    """

    x: torch.Tensor
    iterations: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor


def _call(op: Operator, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if getattr(op, "accepts_out", False):
        return op(x, out=out)
    return op(x)


def cg(
    operator: Operator,
    b: torch.Tensor,
    *,
    precond: Operator | None = None,
    x0: torch.Tensor | None = None,
    rtol: float = 1e-3,
    maxiter: int = 1000,
    check_every: int | None = None,
    true_residual: bool = True,
) -> CGResult:
    """Batched (preconditioned) conjugate gradients for SPD systems ``A x = b``, one per batch item.

    Args:
        operator: ``A``: maps ``(B, ...)`` to ``(B, ...)``, acting on each batch item separately; symmetric
            positive definite per item (see :data:`Operator` for the optional ``out=`` protocol).
        b: right-hand sides ``(B, ...)``, floating point.
        precond: ``M ≈ A⁻¹`` (SPD), same calling convention as ``operator``; ``None`` for plain CG.
        x0: initial guess, shape of ``b`` (not modified). Items whose ``b`` is zero ignore it.
        rtol: relative tolerance: item ``k`` stops when ``‖r_k‖ ≤ rtol ‖b_k‖`` (recursive residual).
        maxiter: maximum number of iterations (for every item).
        check_every: test "all items converged" (a host synchronisation on GPU) every this many iterations;
            default 1 on CPU and 8 on other devices. Converged items are frozen in between, so the result
            and the iteration counts do not depend on it.
        true_residual: recompute ``‖b − A x‖`` from the final ``x`` (one extra operator call) for the
            reported ``rel_residual``; otherwise report the recursive residual.

    Returns:
        :class:`CGResult` ``(x, iterations, rel_residual, converged)``. A zero right-hand side gives
        ``x = 0``, 0 iterations and residual 0.
    """
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0; got {maxiter}")
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0; got {rtol}")
    if check_every is None:
        check_every = 1 if b.device.type == "cpu" else 8
    bsz = b.shape[0]
    m = b[0].numel() if bsz > 0 else 0

    # Work on fixed buffers through (B, 1, M) "row" and (B, M, 1) "column" views made once: per-item dot
    # products are bmm's of a row and a column, per-item scalars stay (B, 1, 1) and broadcast over rows.
    def row(t: torch.Tensor) -> torch.Tensor:
        return t.view(bsz, 1, m)

    def col(t: torch.Tensor) -> torch.Tensor:
        return t.view(bsz, m, 1)

    def apply(op: Operator, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        res = _call(op, t, out)
        return res if res is out else out.copy_(res)

    b = b.contiguous()
    bb = torch.bmm(row(b), col(b))
    zero_rhs = bb == 0
    tol2 = bb * (rtol * rtol)
    buf = torch.empty_like(b)  # operator output (A p)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        if x0.shape != b.shape:
            raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}; got {tuple(x0.shape)}")
        x = x0.detach().clone(memory_format=torch.contiguous_format)
        row(x).masked_fill_(zero_rhs, 0.0)
        r = torch.sub(b, apply(operator, x, buf))
    x_r, r_r, r_c, buf_r, buf_c = row(x), row(r), col(r), row(buf), col(buf)
    rr = torch.bmm(r_r, r_c)
    active = rr > tol2
    iterations = torch.zeros(bsz, 1, 1, dtype=torch.int64, device=b.device)
    if precond is not None:
        z = apply(precond, r, torch.empty_like(b))
        z_r, z_c = row(z), col(z)
        rz = torch.bmm(r_r, z_c)
    else:
        z, z_r = r, r_r
        rz = rr
    p = z.clone()
    p_r = row(p)
    zero = b.new_zeros(())

    for k in range(maxiter):
        if k % check_every == 0 and not bool(active.any()):
            break
        apply(operator, p, buf)
        alpha = torch.where(active, rz / torch.bmm(p_r, buf_c), zero)
        x_r.addcmul_(alpha, p_r)
        r_r.addcmul_(alpha, buf_r, value=-1.0)
        rr = torch.bmm(r_r, r_c)
        iterations += active
        active &= rr > tol2
        if precond is not None:
            apply(precond, r, z)
            rz_new = torch.bmm(r_r, z_c)
        else:
            rz_new = rr
        beta = torch.where(active, rz_new / rz, zero)
        torch.addcmul(z_r, beta, p_r, out=p_r)  # p = z + β p in one pass
        rz = rz_new

    converged = ~active.view(bsz)
    if true_residual:
        torch.sub(b, apply(operator, x, buf), out=buf)
        rr = torch.bmm(buf_r, buf_c)
    rel = torch.where(zero_rhs, zero, torch.sqrt(rr / torch.where(zero_rhs, torch.ones_like(bb), bb)))
    return CGResult(x, iterations.view(bsz), rel.view(bsz), converged)

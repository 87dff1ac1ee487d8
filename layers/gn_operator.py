"""The matrix-free operator of the GN system, its block-Jacobi preconditioner and the CUDA-graph solvers.

For the ``"torch"`` and ``"graph"`` backends of :func:`layers.gn_solve.gn_solve` (docs/design.md §3) the
system is stored divided by λ: ``A' = A / λ = Hd' − S⊗I`` with ``Hd' = Hd / λ`` the per-node diagonal blocks
(``Hd = sym(H) + (λ deg + ε) I``) and ``S`` the grid adjacency. :class:`GNOperator` applies ``A'`` with ``c``
fused multiply-adds and ``2n`` shifted in-place subtractions, :class:`BlockPreconditioner` applies
``λ Hd⁻¹``; :func:`graph_solve` solves with :class:`layers.cg.GraphedCG` on fixed buffers cached per system
shape, so that the many small solves of a GN registration replay captured CUDA graphs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .cg import CGResult, GraphedCG
from .laplacian import adjacency_views

__all__ = ["BlockPreconditioner", "GNOperator", "block_apply", "block_inverse", "clear_graph_cache", "graph_solve"]

#: How many system shapes keep their CUDA-graph solver (fixed buffers and graphs) alive.
GRAPH_CACHE_SIZE = 8

_GRAPH_SOLVERS: OrderedDict = OrderedDict()


def graph_solve(hd: torch.Tensor, minv: torch.Tensor | None, rhs: torch.Tensor, x0: torch.Tensor | None, *,
                rtol: float, maxiter: int, block: int = 8) -> CGResult:
    """Solve ``(Hd' − S⊗I) x = rhs`` per batch item with the cached :class:`~layers.cg.GraphedCG` of its shape.

    Args:
        hd: ``(B, c, c, *G)`` diagonal blocks of the system divided by λ (``Hd'``), symmetric.
        minv: ``(B, c, c, *G)`` their inverses (the preconditioner), or ``None`` for plain CG.
        rhs: ``(B, c, *G)`` right-hand side (divided by λ).
        x0: optional initial guess, shape of ``rhs``.
        rtol, maxiter, block: as for :class:`layers.cg.GraphedCG`.

    Returns:
        :class:`layers.cg.CGResult` (tensors of their own). The inputs are copied into the cached solver's
        fixed buffers, so the same iterates as :func:`layers.cg.cg` on :class:`GNOperator` result.
    """
    key = (rhs.device, rhs.dtype, tuple(hd.shape), minv is None, int(block))
    entry = _GRAPH_SOLVERS.get(key)
    if entry is None:
        static_hd = torch.zeros_like(hd, memory_format=torch.contiguous_format)
        static_minv = None if minv is None else torch.zeros_like(minv, memory_format=torch.contiguous_format)
        precond = None if static_minv is None else BlockPreconditioner(static_minv)
        solver = GraphedCG(GNOperator(static_hd), precond, tuple(rhs.shape), rhs.dtype, rhs.device, block)
        entry = (static_hd, static_minv, solver)
        _GRAPH_SOLVERS[key] = entry
        while len(_GRAPH_SOLVERS) > GRAPH_CACHE_SIZE:
            _GRAPH_SOLVERS.popitem(last=False)
    else:
        _GRAPH_SOLVERS.move_to_end(key)
    static_hd, static_minv, solver = entry
    static_hd.copy_(hd)
    if static_minv is not None:
        static_minv.copy_(minv)
    return solver.solve(rhs, x0=x0, rtol=rtol, maxiter=maxiter)


def clear_graph_cache() -> None:
    """Release the cached CUDA-graph solvers of :func:`graph_solve` (their buffers and graphs)."""
    _GRAPH_SOLVERS.clear()


# ------------------------------------------------------------------------------- operator, preconditioner


class GNOperator:
    """Matrix-free ``A' x = Hd' x − S x`` for a batch of systems ``(B, c, *G)``.

    ``Hd' = Hd / λ`` are the per-node diagonal blocks of the system divided by λ (per item), so that the
    Laplacian part needs no scaling: ``A' = A / λ``. Per call: ``c`` fused multiply-adds (blocks) and ``2n``
    shifted in-place subtractions (adjacency ``S``: the views of :func:`layers.laplacian.adjacency_views`,
    made once per buffer, as in :func:`layers.laplacian.adjacency_apply_`); no allocation.
    """

    accepts_out = True

    def __init__(self, hd_scaled: torch.Tensor) -> None:
        self.blocks = _BlockApply(hd_scaled)  # (B, c, c, *G)
        self._adj = _ViewCache(adjacency_views)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(x)
        out = self.blocks(x, out)
        for target, source in self._adj(out, x):
            target.sub_(source)
        return out


class _BlockApply:
    """``out = blocks · x`` per node (symmetric blocks, see :func:`block_apply`) with cached views."""

    def __init__(self, blocks: torch.Tensor) -> None:
        c = blocks.shape[1]
        self.rows = [blocks[:, j] for j in range(c)]  # row j == column j (symmetric)
        self.comps = _ViewCache(lambda x: [x[:, j : j + 1] for j in range(c)])

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        comps = self.comps(x)
        out = torch.mul(self.rows[0], comps[0], out=out)
        for h, xj in zip(self.rows[1:], comps[1:]):
            out.addcmul_(h, xj)
        return out


class BlockPreconditioner(_BlockApply):
    """Block-Jacobi preconditioner ``z = Hd⁻¹ r`` per node (``minv`` ``(B, c, c, *G)``, symmetric)."""

    accepts_out = True


class _ViewCache:
    """Views of the few fixed CG buffers, made once per buffer instead of once per operator call.

    Keyed by ``(data_ptr, shape, stride)``; the cached views keep their storage alive, so a key cannot be
    reused by another tensor while cached. Bounded; meant to live for one solve.
    """

    def __init__(self, make) -> None:
        self._make = make
        self._views: dict = {}

    def __call__(self, *tensors: torch.Tensor):
        key = tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in tensors)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= 16:
                self._views.clear()
            views = self._views[key] = self._make(*tensors)
        return views


def block_apply(blocks: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-node product with **symmetric** ``c×c`` blocks: ``out[:, i] = Σ_j blocks[:, i, j] x[:, j]``.

    Args:
        blocks: ``(B, c, c, *G)``, symmetric in dims 1 and 2 (row ``j`` is used as column ``j``).
        x: ``(B, c, *G)``.
        out: optional ``(B, c, *G)`` buffer (must not alias ``x``).

    Returns:
        ``(B, c, *G)`` (``out`` when given). ``c`` fused multiply-adds over ``(B, c, *G)`` (the kernel of
        :class:`_BlockApply`, which the CG loop uses with its views made once).
    """
    return _BlockApply(blocks)(x, out)


def block_inverse(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of symmetric positive-definite per-node blocks ``(B, c, c, *G)`` -> ``(B, c, c, *G)``.

    Closed form (adjugate / determinant) for ``c ≤ 3``, written into one preallocated, exactly symmetric
    output; ``torch.linalg.inv`` otherwise.
    """
    c = blocks.shape[1]
    if c == 1:
        return blocks.reciprocal()
    if c > 3:
        inv = torch.linalg.inv(torch.movedim(torch.movedim(blocks, 1, -1), 1, -1))
        inv = torch.movedim(torch.movedim(inv, -1, 1), -1, 1)
        return (inv + inv.transpose(1, 2)).mul_(0.5)
    out = torch.empty_like(blocks)
    h = [[blocks[:, i, j] for j in range(c)] for i in range(c)]
    o = [[out[:, i, j] for j in range(c)] for i in range(c)]
    if c == 2:
        a, b, d = h[0][0], h[0][1], h[1][1]
        inv_det = torch.mul(a, d).addcmul_(b, b, value=-1.0).reciprocal_()
        torch.mul(d, inv_det, out=o[0][0])
        torch.mul(a, inv_det, out=o[1][1])
        torch.mul(b, inv_det, out=o[0][1]).neg_()
        o[1][0].copy_(o[0][1])
        return out
    a, b, cc = h[0][0], h[0][1], h[0][2]
    d, e, f = h[1][1], h[1][2], h[2][2]

    def cofactor(dst, p, q, r, t):  # dst = p q − r t
        return torch.mul(p, q, out=dst).addcmul_(r, t, value=-1.0)

    cofactor(o[0][0], d, f, e, e)
    cofactor(o[0][1], cc, e, b, f)
    cofactor(o[0][2], b, e, cc, d)
    cofactor(o[1][1], a, f, cc, cc)
    cofactor(o[1][2], b, cc, a, e)
    cofactor(o[2][2], a, d, b, b)
    inv_det = torch.mul(a, o[0][0]).addcmul_(b, o[0][1]).addcmul_(cc, o[0][2]).reciprocal_()
    for i, j in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)):
        o[i][j].mul_(inv_det)
    for i, j in ((1, 0), (2, 0), (2, 1)):
        o[i][j].copy_(o[j][i])
    return out

"""Graph Laplacian of a regular 2D/3D grid: matrix-free stencil and sparse CSR assembly.

``L`` is the graph Laplacian of the grid graph with 4 (2D) or 6 (3D) face neighbours and a free
(Neumann) boundary: ``L[p, q] = -1`` for every edge ``p ~ q``, ``L[p, p] = deg(p)`` (the number of
neighbours of node ``p``, between ``n`` and ``2n``), no padding nodes (docs/design.md §3). Nodes are numbered
in C order (``numpy.ravel_multi_index``) over the grid shape ``G``; ``N = prod(G)``.

The Gauss-Newton system matrix of one batch item is

    A = blockdiag_p(H(p)) + λ L⊗I_c + ε I,

with ``c`` unknowns per node. Its unknowns are ordered component-major, as a ``(c, *G)`` field is
flattened: unknown ``i`` of node ``p`` has index ``i * N + p`` (so ``L⊗I_c`` is ``kron(I_c, L)`` as a
matrix). :func:`system_csr_from_blocks` builds it as a torch sparse CSR tensor for the cupy backend
(:mod:`layers.cupy_backend`, which hands it to cupy), :func:`assemble_system_csr` from ``H`` for tests; the
torch backend never assembles it (see :mod:`layers.gn_solve`).

All structures depend only on the grid shape; they are built once and cached per shape, device and dtype.

Stencil variants timed on a ``(1, 3, 56, 48, 56)`` float32 field, 2 CPU threads (torch 2.13): replicate-pad
+ shifted views 0.38 ms, in-place shifted slice subtractions 0.32 ms, ``torch.diff`` form 0.45 ms,
``conv3d`` with a 7-point kernel 3.6 ms. :func:`laplacian_apply` uses the first (one allocation besides its
output, autograd-friendly); the GN operator uses the second, in place (:func:`adjacency_views`, as in
:func:`adjacency_apply_`). cupy is never imported here: the hand-over of these CSR tensors to cupy is in
:mod:`layers.cupy_backend`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .enums import Coupling

__all__ = [
    "adjacency_apply_",
    "adjacency_views",
    "assemble_system_csr",
    "block_diagonal_csr",
    "laplacian_apply",
    "laplacian_csr",
    "laplacian_degree",
    "sparse_csr",
    "system_csr_from_blocks",
    "system_structure",
]

_CACHE_SIZE = 32


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be a 2D or 3D grid shape of positive sizes; got {shape}")
    return shape


def laplacian_apply(x: torch.Tensor) -> torch.Tensor:
    """Apply the grid Laplacian ``L`` to every channel of ``x``.

    Args:
        x: ``(B, C, *G)`` with ``G`` a 2D or 3D grid shape (any floating dtype and device).

    Returns:
        ``(B, C, *G)``: ``(L x)(p) = deg(p) x(p) - Σ_{q ~ p} x(q)`` per channel (units of ``x``).

    Implementation: replicate-pad once and subtract the ``2n`` shifted views from ``2n·x``. A replicated
    ghost neighbour equals the node itself, so it cancels one unit of the ``2n`` diagonal, which gives
    exactly the free-boundary Laplacian. Differentiable (plain torch ops).
    """
    nd = x.dim() - 2
    if nd not in (2, 3):
        raise ValueError(f"x must have shape (B, C, *G) with a 2D or 3D grid; got {tuple(x.shape)}")
    xp = F.pad(x, (1, 1) * nd, mode="replicate")
    out = x * float(2 * nd)
    inner = [slice(1, -1)] * nd
    for d in range(nd):
        for start in (0, 2):
            sl = list(inner)
            sl[d] = slice(start, start + x.shape[2 + d])
            out -= xp[(slice(None), slice(None), *sl)]
    return out


def adjacency_views(out: torch.Tensor, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(target, source)`` view pairs such that ``target -= source`` for every pair is ``out -= S x``.

    ``S = deg·I - L`` is the grid adjacency matrix, applied per channel. Args as :func:`adjacency_apply_`;
    at most ``2n`` pairs (none along an axis of size 1). The views depend only on the two tensors, so a caller
    that applies ``S`` many times to the same buffers (the GN operator) makes them once.
    """
    pairs = []
    for ax in range(2, x.dim()):
        m = x.shape[ax] - 1
        if m > 0:
            pairs.append((out.narrow(ax, 1, m), x.narrow(ax, 0, m)))
            pairs.append((out.narrow(ax, 0, m), x.narrow(ax, 1, m)))
    return pairs


def adjacency_apply_(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """In place ``out -= S x`` with ``S`` the grid adjacency matrix (``S = deg·I - L``), per channel.

    Args:
        out: ``(B, C, *G)`` accumulator, modified in place and returned.
        x: ``(B, C, *G)``, same shape as ``out`` (and not aliasing it).

    Used by the matrix-free GN operator ``A x = Hd x - λ S x`` (``Hd`` holds the per-node diagonal block
    including ``λ deg``); ``2n`` strided in-place subtractions (:func:`adjacency_views`), no allocation.
    """
    for target, source in adjacency_views(out, x):
        target.sub_(source)
    return out


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _degree_cached(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    deg = torch.zeros(shape, dtype=dtype, device=device)
    for d, s in enumerate(shape):
        if s > 1:
            deg.narrow(d, 0, s - 1).add_(1)
            deg.narrow(d, 1, s - 1).add_(1)
    return deg


def laplacian_degree(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Node degrees ``deg(p)`` of the grid graph, ``(*shape)`` (the diagonal of ``L``); cached, do not
    modify in place."""
    return _degree_cached(_shape(shape), torch.device(device or "cpu"), dtype)


def _edges(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed edge list ``(rows, cols)`` (both directions) of the grid graph, int64 on the CPU."""
    n_nodes = math.prod(shape)
    idx = torch.arange(n_nodes, dtype=torch.int64).view(shape)
    rows, cols = [], []
    for d, s in enumerate(shape):
        if s < 2:
            continue
        a = idx.narrow(d, 0, s - 1).reshape(-1)
        b = idx.narrow(d, 1, s - 1).reshape(-1)
        rows += [a, b]
        cols += [b, a]
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    return torch.cat(rows), torch.cat(cols)


def sparse_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """``(size, size)`` torch sparse CSR tensor from trusted (already valid) arrays, without invariant checks
    and without torch's one-time "beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=(size, size), check_invariants=False)


def _coo_to_csr_order(
    rows: torch.Tensor, cols: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort order of COO entries into CSR order and the int64 ``crow`` array (entries must be unique)."""
    order = torch.argsort(rows * n_rows + cols)
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=crow[1:])
    return order, crow


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _laplacian_csr_cached(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    n_nodes = math.prod(shape)
    er, ec = _edges(shape)
    diag = torch.arange(n_nodes, dtype=torch.int64)
    rows = torch.cat([er, diag])
    cols = torch.cat([ec, diag])
    deg = _degree_cached(shape, torch.device("cpu"), torch.float64).reshape(-1)
    vals = torch.cat([torch.full((er.numel(),), -1.0, dtype=torch.float64), deg])
    order, crow = _coo_to_csr_order(rows, cols, n_nodes)
    return sparse_csr(
        crow.to(torch.int32).to(device),
        cols[order].to(torch.int32).to(device),
        vals[order].to(dtype=dtype, device=device),
        n_nodes,
    )


def laplacian_csr(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The grid Laplacian ``L`` as a torch sparse CSR tensor ``(N, N)``, ``N = prod(shape)``.

    Rows/columns are nodes in C order; indices are int32 (what cuSPARSE/cupy expect). Built once per
    ``(shape, device, dtype)`` and cached: treat the result as read-only.
    """
    return _laplacian_csr_cached(_shape(shape), torch.device(device or "cpu"), dtype)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _system_structure_cached(
    shape: tuple[int, ...], c: int, full: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_nodes = math.prod(shape)
    m = c * n_nodes
    node = torch.arange(n_nodes, dtype=torch.int64)
    rows, cols, src = [], [], []
    # per-node block entries; source index into the flattened block values
    pairs = [(i, j) for i in range(c) for j in range(c)] if full else [(i, i) for i in range(c)]
    for k, (i, j) in enumerate(pairs):
        rows.append(i * n_nodes + node)
        cols.append(j * n_nodes + node)
        src.append(k * n_nodes + node)
    n_block = len(pairs) * n_nodes
    er, ec = _edges(shape)
    for i in range(c):  # off-diagonal Laplacian entries (value -λ) of every component
        rows.append(i * n_nodes + er)
        cols.append(i * n_nodes + ec)
        src.append(torch.full_like(er, n_block))
    rows_t, cols_t, src_t = torch.cat(rows), torch.cat(cols), torch.cat(src)
    order, crow = _coo_to_csr_order(rows_t, cols_t, m)
    return (
        crow.to(torch.int32).to(device),
        cols_t[order].to(torch.int32).to(device),
        src_t[order].to(device),
    )


def system_structure(
    shape: Sequence[int], c: int, coupling: str, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached CSR pattern of ``A = blockdiag(Hd) - λ S⊗I_c`` (``S`` the adjacency) on a grid.

    Returns ``(crow, col, src)``: int32 CSR row pointers ``(c N + 1,)`` and column indices ``(nnz,)``, and an
    int64 gather index ``src`` ``(nnz,)`` such that the CSR values are ``v[src]`` for
    ``v = cat(block_values, [-λ])``, where ``block_values`` is the per-node block flattened as
    ``(c, c, N)`` (``coupling="full"``) or its diagonal as ``(c, N)`` (``coupling="diagonal"``).
    """
    full = Coupling.lookup(coupling) == Coupling.FULL
    return _system_structure_cached(_shape(shape), int(c), full, torch.device(device or "cpu"))


def system_csr_from_blocks(
    hd: torch.Tensor, lam: torch.Tensor | float, coupling: str = "full"
) -> torch.Tensor:
    """CSR ``A = blockdiag(hd) - λ S⊗I_c`` of one batch item from its *diagonal* blocks.

    Args:
        hd: ``(c, c, *G)`` per-node diagonal blocks of ``A`` (``H + (λ deg + ε) I``, already including the
            Laplacian diagonal).
        lam: λ, a float or a 0-d tensor (same dtype/device as ``hd``).
        coupling: ``"full"`` uses all ``c×c`` entries, ``"diagonal"`` only the diagonal ones.

    Returns:
        sparse CSR tensor ``(c N, c N)`` with int32 indices, unknowns ordered ``i * N + node``.
    """
    c = hd.shape[0]
    grid = tuple(hd.shape[2:])
    n_nodes = math.prod(grid)
    crow, col, src = system_structure(grid, c, coupling, hd.device)
    if Coupling.lookup(coupling) == Coupling.FULL:
        block = hd.reshape(-1)
    else:
        block = torch.diagonal(hd.reshape(c, c, n_nodes), dim1=0, dim2=1).t().reshape(-1)
    neg_lam = torch.as_tensor(lam, dtype=hd.dtype, device=hd.device).reshape(1).neg()
    values = torch.cat([block, neg_lam])[src]
    return sparse_csr(crow, col, values, c * n_nodes)


def assemble_system_csr(
    H: torch.Tensor, lam: torch.Tensor | float, coupling: str = "full", eps: float = 0.0
) -> torch.Tensor:
    """Assemble ``A = blockdiag(H) + λ L⊗I_c + ε I`` of one batch item as a torch sparse CSR tensor.

    Args:
        H: ``(c, c, *G)`` per-node blocks (symmetric; 2D or 3D grid ``G``). With ``coupling="diagonal"`` only
            their diagonal is used.
        lam: λ > 0, a float or a 0-d tensor.
        coupling: ``"full"`` or ``"diagonal"``.
        eps: absolute value added to the diagonal.

    Returns:
        ``(c N, c N)`` CSR tensor (int32 indices) on ``H``'s device and dtype; unknown ``i`` of node ``p``
        has index ``i * N + p`` (the order of a flattened ``(c, *G)`` field).
    """
    if H.dim() not in (4, 5) or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must have shape (c, c, *G) with a 2D or 3D grid; got {tuple(H.shape)}")
    c = H.shape[0]
    grid = tuple(H.shape[2:])
    lam_t = torch.as_tensor(lam, dtype=H.dtype, device=H.device)
    deg = laplacian_degree(grid, H.device, H.dtype)
    eye = torch.eye(c, dtype=H.dtype, device=H.device).view(c, c, *([1] * len(grid)))
    hd = H + eye * (lam_t * deg + eps)
    return system_csr_from_blocks(hd, lam_t, coupling)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _block_csr_structure(n_nodes: int, c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    crow = torch.arange(0, c * c * n_nodes + 1, c, dtype=torch.int32)
    node = torch.arange(n_nodes, dtype=torch.int64).view(1, n_nodes, 1)
    comp = torch.arange(c, dtype=torch.int64).view(1, 1, c)
    col = (comp * n_nodes + node).expand(c, n_nodes, c).reshape(-1).to(torch.int32)
    return crow.to(device), col.to(device)


def block_diagonal_csr(blocks: torch.Tensor) -> torch.Tensor:
    """CSR ``blockdiag_p(blocks(p))`` of one batch item (e.g. the block-Jacobi preconditioner of the cupy
    backend).

    Args:
        blocks: ``(c, c, *G)`` per-node blocks.

    Returns:
        ``(c N, c N)`` sparse CSR tensor with int32 indices, unknowns ordered ``i * N + node``.
    """
    c = blocks.shape[0]
    n_nodes = blocks[0, 0].numel()
    crow, col = _block_csr_structure(n_nodes, c, blocks.device)
    values = blocks.reshape(c, c, n_nodes).permute(0, 2, 1).reshape(-1)
    return sparse_csr(crow, col, values, c * n_nodes)

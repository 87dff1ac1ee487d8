"""The discrete stage of ConvexAdam (Siebert, Hansen, Heinrich 2021; docs/design.md §6), pure torch: an SSD cost
volume over integer node shifts, coupled convex optimisation and inverse consistency.

Units: on the coarse grid of stride ``grid_sp`` (node ``g`` at full-resolution position
``grid_sp*g + (grid_sp-1)/2``, :func:`layers.grid.pool_to_grid`), the discrete displacements are integer
shifts of whole nodes, ``d ∈ [-disp_hw, disp_hw]^n`` (so up to ``disp_hw · grid_sp`` full-resolution
voxels); the convex stage works in these node units (the coupling weights θ refer to them, as in the
published code). All smoothing uses replicate padding (:func:`layers.features.box_filter`), so the border is
not pulled towards zero. The method as a whole (features, this stage, the Adam fine-tuning):
:class:`lightning_modules.baselines.ConvexAdam`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .features import box_filter
from .grid import spatial_dims
from .warp import warp_image

__all__ = ["THETAS", "check_window", "coupled_convex", "displacement_shifts", "inverse_consistency", "ssd_cost_volume"]

#: Coupling weights θ of the coupled convex optimisation (published values).
THETAS: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)

#: Upper bound on the number of elements of one temporary in the cost-volume code (chunking).
_CHUNK_ELEMENTS = 1 << 24


def displacement_shifts(disp_hw: int, n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The integer shifts ``[-disp_hw, disp_hw]^n`` as ``(K, n)``, ``K = (2 disp_hw + 1)^n``, array-axis
    order, in lexicographic order (first axis slowest)."""
    r = range(-int(disp_hw), int(disp_hw) + 1)
    return torch.tensor(list(itertools.product(r, repeat=n)), device=device, dtype=dtype)


def check_window(grid: Sequence[int], disp_hw: int) -> None:
    """Refuse a search window ``2·disp_hw + 1`` nodes wide that does not fit the coarse grid ``grid`` (node counts
    per axis), or a negative ``disp_hw``, with a message naming ``disp_hw``."""
    if disp_hw < 0:
        raise ValueError(f"disp_hw must be >= 0; got {disp_hw}")
    window = 2 * int(disp_hw) + 1
    if any(window > g for g in grid):
        raise ValueError(
            f"the displacement window 2*disp_hw+1 = {window} nodes is larger than the coarse grid "
            f"{tuple(grid)}; use a smaller disp_hw or grid_sp"
        )


def ssd_cost_volume(fixed: torch.Tensor, moving: torch.Tensor, disp_hw: int) -> torch.Tensor:
    """SSD cost volume over integer shifts, box-filtered (``3^n``, replicate padding) twice.

    Args:
        fixed, moving: coarse features ``(B, C, *G)``.
        disp_hw: half-width of the shift window in nodes.

    Returns:
        ``(B, K, *G)``: ``C[b, k, x] = box²(Σ_c (F_c(x) − M_c(x + d_k))²)`` with ``d_k`` the ``k``-th row of
        :func:`displacement_shifts` (the moving features are replicate-padded outside the grid). Computed in
        chunks of shifts so that temporaries stay below about 64 MB.
    """
    n = spatial_dims(fixed, "fixed")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} features differ")
    grid = tuple(fixed.shape[2:])
    check_window(grid, disp_hw)
    h = int(disp_hw)
    b, c = fixed.shape[:2]
    shifts = displacement_shifts(h, n, dtype=torch.long).tolist()
    padded = F.pad(moving, [h] * (2 * n), mode="replicate") if h > 0 else moving
    out = fixed.new_empty(b, len(shifts), *grid)
    nodes = b * c * int(torch.tensor(grid).prod())
    chunk = max(1, _CHUNK_ELEMENTS // max(nodes, 1))
    for start in range(0, len(shifts), chunk):
        part = []
        for d in shifts[start:start + chunk]:
            idx = (slice(None), slice(None)) + tuple(slice(h + o, h + o + g) for o, g in zip(d, grid))
            part.append((fixed - padded[idx]).pow(2).sum(1))
        block = torch.stack(part, 1)
        out[:, start:start + len(part)] = box_filter(box_filter(block, 1), 1)
    return out


def _argmin_shift(
    cost: torch.Tensor, shifts: torch.Tensor, u: torch.Tensor | None, theta: float
) -> torch.Tensor:
    """Per-node ``argmin_d C(x, d) + θ |d − u(x)|²`` -> the chosen shifts ``(B, n, *G)`` (node units)."""
    b, k = cost.shape[:2]
    grid = cost.shape[2:]
    n = shifts.shape[1]
    flat = cost.reshape(b, k, -1)
    out = cost.new_empty(b, n, flat.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    sq = shifts.pow(2).sum(1).view(1, k, 1)  # |d|²
    uf = None if u is None else u.reshape(b, n, -1)
    for start in range(0, flat.shape[-1], step):
        sl = slice(start, start + step)
        total = flat[:, :, sl]
        if uf is not None:
            # |d − u|² = |d|² − 2 d·u + |u|²; the last term does not depend on d
            total = total + theta * (sq - 2.0 * torch.einsum("kn,bnx->bkx", shifts, uf[:, :, sl]))
        idx = total.argmin(1)  # (B, X)
        out[:, :, sl] = shifts.t()[:, idx].permute(1, 0, 2)
    return out.reshape(b, n, *grid)


def coupled_convex(cost: torch.Tensor, disp_hw: int, thetas: Sequence[float] = THETAS) -> torch.Tensor:
    """Coupled convex optimisation of a cost volume.

    ``u₀`` = the hard per-node argmin of the cost, then one ``3^n`` average pool (replicate padding); then for
    each θ: the per-node argmin of ``C(x, d) + θ |d − u(x)|²``, followed by a ``3^n`` average pool.

    Args:
        cost: ``(B, K, *G)`` from :func:`ssd_cost_volume` with the same ``disp_hw``.
        disp_hw: half-width of the shift window.
        thetas: the coupling weights (increasing).

    Returns:
        ``(B, n, *G)`` displacement in coarse-node units.
    """
    n = cost.dim() - 2
    shifts = displacement_shifts(disp_hw, n, device=cost.device, dtype=cost.dtype)
    if cost.shape[1] != shifts.shape[0]:
        raise ValueError(f"cost has {cost.shape[1]} shifts but disp_hw={disp_hw} needs {shifts.shape[0]}")
    u = box_filter(_argmin_shift(cost, shifts, None, 0.0), 1)
    for theta in thetas:
        u = box_filter(_argmin_shift(cost, shifts, u, float(theta)), 1)
    return u


def inverse_consistency(
    forward: torch.Tensor, backward: torch.Tensor, iterations: int = 15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make two fields on the same grid approximately inverse to each other.

    Each iteration updates both simultaneously: ``u₁ ← ½(u₁ − u₂∘(id + u₁))`` and
    ``u₂ ← ½(u₂ − u₁∘(id + u₂))`` (:func:`layers.warp.warp_image`, border padding).

    Args:
        forward, backward: ``(B, n, *G)`` in voxel units of the grid they live on.
        iterations: number of iterations (15).

    Returns:
        The updated ``(forward, backward)``.
    """
    u1, u2 = forward, backward
    for _ in range(int(iterations)):
        u1, u2 = 0.5 * (u1 - warp_image(u2, u1)), 0.5 * (u2 - warp_image(u1, u2))
    return u1, u2

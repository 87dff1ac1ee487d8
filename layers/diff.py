"""Finite differences: spatial gradient, Jacobian determinant and the regularisers built on them (diffusion,
log-Jacobian energy).

One central-difference operator for the whole project (:func:`spatial_gradient`): second-order central
differences in the interior and first-order one-sided differences at the borders (the same as
``numpy.gradient``), so it is exact for affine fields everywhere.
"""

from __future__ import annotations

import math

import torch

from .grid import check_field, spatial_dims

__all__ = ["diffusion", "jacobian_determinant", "log_jacobian_energy", "safe_log", "spatial_gradient"]


def spatial_gradient(x: torch.Tensor) -> torch.Tensor:
    """Central-difference gradient of ``x`` ``(B, C, *S)`` -> ``(B, C, n, *S)`` in units per voxel.

    ``out[:, c, i]`` is the derivative of channel ``c`` along array axis ``i``.
    """
    n = spatial_dims(x)
    grads = torch.gradient(x, dim=tuple(range(2, 2 + n)), edge_order=1)
    return torch.stack(grads, dim=2)


def jacobian_determinant(u: torch.Tensor) -> torch.Tensor:
    """``det(I + ∇u)`` of a displacement ``(B, n, *S)`` (voxel units) -> ``(B, *S)``, dimensionless."""
    n = check_field(u)
    g = spatial_gradient(u)  # (B, n, n, *S): d u_i / d x_j
    if n == 2:
        return (1 + g[:, 0, 0]) * (1 + g[:, 1, 1]) - g[:, 0, 1] * g[:, 1, 0]
    # cofactor expansion along the first row (elementwise: much faster than a batched linalg.det)
    a, b, c = 1 + g[:, 0, 0], g[:, 0, 1], g[:, 0, 2]
    d, e, f = g[:, 1, 0], 1 + g[:, 1, 1], g[:, 1, 2]
    p, q, r = g[:, 2, 0], g[:, 2, 1], 1 + g[:, 2, 2]
    return a * (e * r - f * q) - b * (d * r - f * p) + c * (d * q - e * p)


def diffusion(u: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean over batch, voxels and components of squared forward differences.

    ``u`` ``(B, n, *S)`` -> scalar; for each axis ``a`` the mean of ``(u[x + e_a] - u[x])^2``, summed over axes.
    """
    n = check_field(u)
    total = u.new_zeros(())
    for a in range(n):
        d = torch.diff(u, dim=2 + a)
        total = total + d.pow(2).mean()
    return total


def safe_log(x: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """``log x`` for ``x ≥ eps``, continued linearly below (``log eps + (x − eps)/eps``): finite and with a
    non-zero slope for any ``x``, so a penalty built on it still pushes folded voxels (``x ≤ 0``) back."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    return torch.where(x > eps, torch.log(x.clamp_min(eps)), math.log(eps) + (x - eps) / eps)


def log_jacobian_energy(u: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Volume-change regulariser: mean over batch and voxels of ``safe_log(det(I + ∇u))²``.

    ``u`` ``(B, n, *S)`` (voxel units; the determinant does not depend on the unit as long as the field is in
    voxels of its own grid) -> scalar. Zero for any volume-preserving map; it penalises expansion and
    compression alike (``log 2`` and ``log ½`` cost the same), leaving shears and rotations to the diffusion
    term. A folded voxel (``J ≤ 0``) costs at least ``(log(eps) − 1)²`` (≈ 31.6 for ``eps = 0.01``), growing
    quadratically with ``−J`` (:func:`safe_log` is linear there).
    """
    return safe_log(jacobian_determinant(u), eps).pow(2).mean()

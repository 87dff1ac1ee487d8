"""Affine pre-alignment: a multi-resolution affine registration on MIND-SSC features, and its displacement.

An affine map is stored as a matrix ``M`` ``(B, n, n)`` and an offset ``t`` ``(B, n)`` acting on voxel positions
(array order) of the fixed grid about its centre ``c = (S - 1) / 2``:

    T(x) = c + M (x - c) + t,    u(x) = T(x) - x    (voxel units; docs/design.md §2: warped(x) = moving(x + u(x)))

so the identity is ``M = I``, ``t = 0``. The displacement of an affine map is computed in closed form everywhere
(:func:`affine_displacement`), and composing a deformable field after it (:func:`compose_affine`) needs no
resampling: ``x -> T(x + v(x))``.

:func:`affine_register` optimises ``(M, t)`` with Adam, coarse to fine (average-pooled images, MIND-SSC
features, mean squared feature difference after warping the moving features with
:func:`layers.warp.warp_image`), starting from the translation that aligns the intensity centroids. The
parameters are scaled so that one unit of ``M`` is one half image size of displacement, as is one unit of
``t / h`` (``h`` half the largest image size): one learning rate suits both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .features import mind_ssc
from .grid import identity_grid, spatial_dims
from .warp import warp_image

__all__ = ["AFFINE_ITERATIONS", "AFFINE_LEVELS", "affine_displacement", "affine_register", "centroid",
           "compose_affine"]

#: default pooling factors (coarse to fine) and Adam steps per level of :func:`affine_register`; the full
#: resolution level matters for small images (on 32³ the 8³ and 16³ levels alone leave a 12° rotation ~1 voxel off)
AFFINE_LEVELS = (4, 2, 1)
AFFINE_ITERATIONS = (150, 60, 20)


def _centre(shape: Sequence[int], ref: torch.Tensor) -> torch.Tensor:
    return torch.tensor([(int(s) - 1) / 2.0 for s in shape], dtype=ref.dtype, device=ref.device)


def _apply(matrix: torch.Tensor, offset: torch.Tensor, points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``T(p)`` for points ``(B, n, *P)`` (voxel positions of the grid ``shape``)."""
    n = matrix.shape[-1]
    c = _centre(shape, points).view(1, n, *([1] * (points.dim() - 2)))
    rel = (points - c).flatten(2)  # (B, n, P)
    out = torch.bmm(matrix.to(points.dtype), rel).view_as(points)
    return out + c + offset.to(points.dtype).view(offset.shape[0], n, *([1] * (points.dim() - 2)))


def affine_displacement(matrix: torch.Tensor, offset: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The displacement ``u(x) = T(x) - x`` ``(B, n, *S)`` (voxel units) of the affine map ``(matrix (B, n, n),
    offset (B, n))`` on the grid ``shape`` (see the module docstring)."""
    n = len(shape)
    if matrix.dim() != 3 or matrix.shape[1:] != (n, n) or offset.shape != (matrix.shape[0], n):
        raise ValueError(f"matrix must be (B, {n}, {n}) and offset (B, {n}); got {tuple(matrix.shape)}, "
                         f"{tuple(offset.shape)}")
    x = identity_grid(shape, device=matrix.device, dtype=matrix.dtype).expand(matrix.shape[0], n, *shape)
    return _apply(matrix, offset, x, shape) - x


def compose_affine(v: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The displacement of ``x -> T(x + v(x))``: a deformable field ``v`` ``(B, n, *S)`` (voxel units, found on
    the affinely pre-aligned moving image) followed by the affine map ``T`` -> ``(B, n, *S)``, in closed form."""
    shape = tuple(v.shape[2:])
    x = identity_grid(shape, device=v.device, dtype=v.dtype)
    return _apply(matrix, offset, x + v, shape) - x


def centroid(image: torch.Tensor) -> torch.Tensor:
    """Intensity centre of mass ``(B, n)`` (voxel positions) of ``image`` ``(B, 1, *S)`` (shifted so that its
    minimum is 0; the grid centre for a constant image)."""
    n = spatial_dims(image, "image")
    w = image.mean(1, keepdim=True)
    w = w - w.flatten(1).min(1).values.view(-1, 1, *([1] * n))
    total = w.flatten(1).sum(1)
    x = identity_grid(image.shape[2:], device=image.device, dtype=image.dtype)
    c = (w * x).flatten(2).sum(-1) / total.clamp_min(1e-12)[:, None]
    centre = _centre(image.shape[2:], image).expand_as(c)
    return torch.where(total[:, None] > 0, c, centre)


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return x
    pool = F.avg_pool3d if x.dim() == 5 else F.avg_pool2d
    return pool(x, factor, factor, ceil_mode=True)


def affine_register(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    levels: Sequence[int] = AFFINE_LEVELS,
    iterations: Sequence[int] = AFFINE_ITERATIONS,
    lr: float = 0.01,
    init_centroids: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine map ``(matrix (B, n, n), offset (B, n))`` (voxel units, fixed grid; see the module docstring) that
    aligns ``moving`` ``(B, 1, *S)`` to ``fixed`` ``(B, 1, *S)`` (intensities; any modality, through MIND-SSC).

    Args:
        levels: pooling factors of the resolution levels, coarse to fine.
        iterations: Adam steps per level.
        lr: Adam learning rate in half-image units (0.01: about 1 % of half the image per step at most).
        init_centroids: start from the translation between the intensity centroids (else the identity).
    Returns:
        the detached affine parameters (the loss is a mean over each pair's voxels, so pairs of a batch are
        independent).
    """
    n = spatial_dims(fixed, "fixed")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed and moving must have the same shape; got {tuple(fixed.shape)}, "
                         f"{tuple(moving.shape)}")
    if len(levels) != len(iterations) or not levels:
        raise ValueError(f"levels and iterations need one entry per level; got {list(levels)}, {list(iterations)}")
    shape = tuple(fixed.shape[2:])
    b = fixed.shape[0]
    h = max(shape) / 2.0
    fixed, moving = fixed.detach().float(), moving.detach().float()
    t0 = (centroid(moving) - centroid(fixed)) / h if init_centroids else fixed.new_zeros(b, n)
    with torch.enable_grad():
        dm = torch.zeros(b, n, n, device=fixed.device, requires_grad=True)
        dt = t0.clone().requires_grad_(True)
        opt = torch.optim.Adam([dm, dt], lr=float(lr))
        eye = torch.eye(n, device=fixed.device).expand(b, n, n)
        for factor, steps in zip(levels, iterations):
            f_feat = mind_ssc(_pool(fixed, int(factor)))
            m_feat = mind_ssc(_pool(moving, int(factor)))
            coarse = tuple(f_feat.shape[2:])
            # full-resolution positions of the coarse nodes (node g averages voxels factor*g ... factor*g+factor-1)
            pos = identity_grid(coarse, device=fixed.device) * factor + (factor - 1) / 2.0
            pos = pos.expand(b, n, *coarse)
            for _ in range(int(steps)):
                opt.zero_grad(set_to_none=True)
                u = (_apply(eye + dm, dt * h, pos, shape) - pos) / factor  # coarse-grid voxel units
                loss = (warp_image(m_feat, u) - f_feat).pow(2).mean() * b
                loss.backward()
                opt.step()
    return (eye + dm).detach(), (dt * h).detach()

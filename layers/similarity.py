"""Intensity similarity measures: local normalised cross-correlation (LNCC).

The one LNCC of the project (:func:`lncc`, :class:`LNCC`): windowed means with :func:`layers.features.box_filter`
(a ``(2r+1)^n`` window, replicate padding), and the *squared* correlation coefficient per voxel, as in the ANTs
``CC`` metric and VoxelMorph's NCC loss::

    cc(x) = cov(x)² / (var_F(x) · var_M(x) + eps)

with ``cov = <F M> − <F><M>``, ``var_F = <F²> − <F>²``, ``var_M = <M²> − <M>²`` and ``<·>`` the window mean.
Values lie in ``[0, 1)``; 1 − mean(cc) is the loss to minimise. ``eps`` is in squared intensity units (of the
window variance), so it should be small against the variance of the images' textured regions (1e-5 for images
scaled to about ``[0, 1]``); it keeps flat windows (background) at ``cc ≈ 0`` and finite gradients.
"""

from __future__ import annotations

import torch

from .features import box_filter
from .grid import spatial_dims

__all__ = ["LNCC", "lncc"]


def _check(x: torch.Tensor, name: str, radius: int, eps: float) -> int:
    n = spatial_dims(x, name)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point image; got {x.dtype}")
    if int(radius) != radius or radius < 1:
        raise ValueError(f"radius must be an integer >= 1 (window 2r+1 voxels); got {radius}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    return n


class LNCC:
    """Squared local normalised cross-correlation against a fixed image, with the fixed window statistics
    computed once (see the module docstring).

    Args:
        fixed: ``(B, C, *S)`` float image (2D or 3D; channels are compared channel by channel).
        radius: window half-width ``r`` in voxels (window ``(2r+1)^n``), an integer >= 1.
        eps: added to the variance product (squared intensity units), > 0.

    Calling it with a moving image ``(B', C, *S)`` (``B' = B``, or any ``B'`` when ``B = 1``) returns the per-voxel
    map ``cc`` ``(B', C, *S)`` in ``[0, 1)``, differentiable in the moving image.

    Raises:
        ValueError: non-float or non-2D/3D input, ``radius < 1``, ``eps <= 0``, or a moving image whose shape
            does not match.
    """

    def __init__(self, fixed: torch.Tensor, radius: int = 2, eps: float = 1e-5) -> None:
        self.n = _check(fixed, "fixed", radius, eps)
        self.radius, self.eps = int(radius), float(eps)
        f = fixed.detach()
        with torch.no_grad():
            mean_f = box_filter(f, self.radius)
            self.var_f = (box_filter(f * f, self.radius) - mean_f * mean_f).clamp_min(0)
        self.fixed, self.mean_f = f, mean_f

    def __call__(self, moving: torch.Tensor) -> torch.Tensor:
        _check(moving, "moving", self.radius, self.eps)
        if moving.shape[1:] != self.fixed.shape[1:] or (moving.shape[0] != self.fixed.shape[0]
                                                         and self.fixed.shape[0] != 1):
            raise ValueError(f"moving {tuple(moving.shape)} does not match fixed {tuple(self.fixed.shape)}")
        c = moving.shape[1]
        stats = box_filter(torch.cat([moving, moving * moving, moving * self.fixed], dim=1), self.radius)
        mean_m, mean_mm, mean_fm = stats[:, :c], stats[:, c:2 * c], stats[:, 2 * c:]
        cov = mean_fm - self.mean_f * mean_m
        var_m = (mean_mm - mean_m * mean_m).clamp_min(0)
        return cov * cov / (self.var_f * var_m + self.eps)


def lncc(fixed: torch.Tensor, moving: torch.Tensor, radius: int = 2, eps: float = 1e-5) -> torch.Tensor:
    """Per-voxel squared local normalised cross-correlation of two images ``(B, C, *S)`` -> ``(B, C, *S)``
    in ``[0, 1)`` (see the module docstring; differentiable in ``moving``; ``fixed`` is treated as a
    constant). ``radius``: window half-width in voxels (>= 1); ``eps``: variance-product offset (> 0)."""
    return LNCC(fixed, radius, eps)(moving)

"""Resampling of volumes to a target spacing or shape, keeping keypoints, spacing and affine consistent.

Every resampling here is a *linear index map* per axis: output voxel ``j`` reads input position
``j * scale`` (voxel indices, array order), sampled through :func:`layers.grid.sample` (which goes through the
project's one ``grid_sample``, :func:`layers.grid.grid_sample`; linear for images, nearest for labels and masks,
zeros outside the input). Hence

* keypoints: ``p_out = p_in / scale``;
* spacing: ``spacing_out = spacing_in * scale`` (mm per voxel);
* affine: ``affine_out = affine_in @ diag(scale, 1)`` (voxel 0 keeps its world position).

Two ways to choose the map:

* :func:`grid_for_spacing` -- exact target spacing, voxel 0 fixed, the output covers the input extent
  (the convention of MONAI's ``Spacing``);
* :func:`grid_for_shape` -- exact target shape, first and last voxel centres kept (``align_corners=True``,
  as :func:`layers.grid.resize_field`), so the spacing becomes ``spacing * (S - 1) / (T - 1)``.

No anti-aliasing is applied when downsampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from layers.grid import identity_grid, sample

__all__ = ["grid_for_shape", "grid_for_spacing", "resample_array", "scale_affine"]


def grid_for_spacing(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Output shape and index scale for resampling a grid ``shape`` with ``spacing`` (mm) to
    ``target_spacing``.

    Returns ``(out_shape, scale)`` with ``scale_i = target_i / spacing_i`` and
    ``out_i = floor((S_i - 1) / scale_i) + 1`` (the output never reads beyond the last input voxel).
    """
    if len(target_spacing) != len(shape) or len(spacing) != len(shape):
        raise ValueError(
            f"target_spacing {list(target_spacing)} must have {len(shape)} entries like shape {tuple(shape)}"
        )
    if any(float(t) <= 0 for t in target_spacing):
        raise ValueError(f"target_spacing must be positive; got {list(target_spacing)}")
    scale = tuple(float(t) / float(s) for t, s in zip(target_spacing, spacing))
    out = tuple(int(math.floor((int(s) - 1) / c + 1e-6)) + 1 for s, c in zip(shape, scale))
    return out, scale


def grid_for_shape(shape: Sequence[int], target_shape: Sequence[int]) -> tuple[float, ...]:
    """Index scale ``(S_i - 1) / (T_i - 1)`` that maps a ``target_shape`` grid onto ``shape`` end to end."""
    if len(target_shape) != len(shape):
        raise ValueError(
            f"target_shape {list(target_shape)} must have {len(shape)} entries like shape {tuple(shape)}"
        )
    if any(int(t) < 2 for t in target_shape):
        raise ValueError(f"target_shape entries must be >= 2; got {list(target_shape)}")
    return tuple((int(s) - 1) / (int(t) - 1) for s, t in zip(shape, target_shape))


def resample_array(
    x: torch.Tensor, out_shape: Sequence[int], scale: Sequence[float], mode: str = "linear"
) -> torch.Tensor:
    """Resample ``x`` ``(C, *S)`` to ``(C, *out_shape)``: output voxel ``j`` reads ``x`` at ``j * scale``.

    ``mode`` is ``"linear"`` (images, output float32) or ``"nearest"`` (labels/masks, output keeps the dtype).
    Positions beyond the input read 0.
    """
    n = x.dim() - 1
    if len(out_shape) != n or len(scale) != n:
        raise ValueError(f"out_shape and scale need {n} entries; got {list(out_shape)}, {list(scale)}")
    out_shape = tuple(int(s) for s in out_shape)
    if out_shape == tuple(x.shape[1:]) and all(abs(c - 1.0) < 1e-12 for c in scale):
        return x
    coords = identity_grid(out_shape, dtype=torch.float32)
    coords = coords * torch.as_tensor(scale, dtype=torch.float32).view(1, n, *([1] * n))
    out = sample(x[None].float(), coords, mode=mode, padding_mode="zeros")[0]
    if mode == "nearest":
        return out.round().to(x.dtype)
    return out


def scale_affine(affine: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """``affine @ diag(scale, 1)`` for a 4x4 affine of an ``n``-D grid (``n <= 3``) -> ``(4, 4)`` float64."""
    diag = np.ones(4, dtype=np.float64)
    diag[: len(scale)] = np.asarray(scale, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ np.diag(diag)

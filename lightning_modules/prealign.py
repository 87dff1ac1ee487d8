"""Affine pre-alignment before any registration method (``eval.py --affine``).

:class:`AffinePrealigned` wraps a registration module: it finds an affine map with
:func:`layers.affine.affine_register` (multi-resolution, MIND-SSC, Adam), warps the moving image (and its labels
and mask) with it, lets the wrapped method register the pre-aligned pair, and returns the composition
``x -> T(x + v(x))`` (:func:`layers.affine.compose_affine`) as the displacement of the original pair, so metrics,
displacement files and warped outputs all refer to the moving image as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from layers.affine import AFFINE_ITERATIONS, AFFINE_LEVELS, affine_displacement, affine_register, compose_affine
from layers.warp import warp_image, warp_labels

from .base import RegistrationModule, check_number

__all__ = ["AffinePrealigned"]


class AffinePrealigned(RegistrationModule):
    """``model`` registering after an affine pre-alignment (evaluation only).

    Args:
        model: any registration module (a baseline or a trained LearnGN).
        levels, iterations, lr: :func:`layers.affine.affine_register` settings (pooling factors coarse to fine,
            Adam steps per level, learning rate in half-image units).
    """

    evaluation_only = True

    def __init__(
        self,
        model: RegistrationModule,
        levels: Sequence[int] = AFFINE_LEVELS,
        iterations: Sequence[int] = AFFINE_ITERATIONS,
        lr: float = 0.01,
    ) -> None:
        super().__init__()
        if not isinstance(model, RegistrationModule):
            raise TypeError(f"model must be a RegistrationModule; got {type(model).__name__}")
        if len(levels) != len(iterations) or not levels:
            raise ValueError(f"levels and iterations need one entry per level; got {list(levels)}, {list(iterations)}")
        self.model = model
        self.levels = [check_number(f"levels[{i}]", v, low=1, integer=True) for i, v in enumerate(levels)]
        self.iterations = [check_number(f"iterations[{i}]", v, low=0, integer=True) for i, v in enumerate(iterations)]
        self.lr = check_number("lr", lr, low=0.0, strict=True)
        self.method_name = f"affine+{getattr(model, 'method_name', type(model).__name__)}"

    def prealign(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The affine map ``(matrix (B, n, n), offset (B, n))`` of a batch and the batch with the moving image,
        labels and mask warped by it (moving keypoints, which would need the inverse map, are dropped)."""
        fixed, moving = batch["fixed"], batch["moving"]
        matrix, offset = affine_register(fixed, moving, levels=self.levels, iterations=self.iterations, lr=self.lr)
        u = affine_displacement(matrix.to(moving.dtype), offset.to(moving.dtype), tuple(moving.shape[2:]))
        pre = dict(batch)
        pre["moving"] = warp_image(moving, u)
        if "moving_label" in batch:
            pre["moving_label"] = warp_labels(batch["moving_label"], u)
        if "moving_mask" in batch:
            pre["moving_mask"] = warp_image(batch["moving_mask"], u, mode="nearest")
        pre.pop("moving_keypoints", None)
        return matrix, offset, pre

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """The displacement ``(B, n, *S)`` (voxel units) of the affine map followed by the wrapped method's field."""
        matrix, offset, pre = self.prealign(batch)
        v = self.model.register(pre)
        return compose_affine(v, matrix.to(v.dtype), offset.to(v.dtype))

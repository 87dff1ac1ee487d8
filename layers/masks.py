"""Fixed / moving masks in the similarity terms (docs/design.md §3, §6): the one place that validates a mask,
turns a pair of masks into a per-voxel similarity weight, and takes a masked mean.

A **mask** is ``(B, 1, *S)`` (or ``(1, 1, *S)``, shared by the batch) with values in ``[0, 1]`` (1 inside; a
binary Learn2Reg ``masksTr`` mask, or a soft one such as a mask averaged over grid blocks). A similarity term
restricted by masks weights each voxel ``x`` of the fixed grid by

    w(x) = m_F(x) · m_M(x + u(x))

(either factor 1 when its mask is not given): the fixed mask on the fixed grid and the moving mask warped with
the current field linearly (:func:`layers.warp.warp_image`). The warped moving mask is a weight *without*
gradient in ``u`` (``u`` is detached for it), so an optimiser cannot lower a masked loss by moving the mask
itself, only by aligning the images inside it. A term over a weighted region is the weighted mean
:func:`masked_mean`, so an all-ones mask gives the unmasked mean.
"""

from __future__ import annotations

import torch

from .grid import spatial_dims
from .warp import warp_image

__all__ = ["check_mask", "masked_mean", "similarity_weight"]


def check_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "mask", *, check_values: bool = True
               ) -> torch.Tensor:
    """Validate a mask against an image / feature map ``like`` ``(B, C, *S)`` and return it as ``like``'s
    dtype and device, ``(B, 1, *S)`` or ``(1, 1, *S)``.

    Raises ``ValueError`` naming ``name`` for a non-tensor, a shape other than ``(B, 1, *S)`` / ``(1, 1, *S)``,
    and (``check_values``, one host synchronisation) non-finite values or values outside ``[0, 1]``.
    """
    if not torch.is_tensor(mask):
        raise ValueError(f"{name} must be a tensor (B, 1, *S); got {type(mask).__name__}")
    n = spatial_dims(like, "image")
    expected = (like.shape[0], 1, *like.shape[2:])
    if mask.dim() != n + 2 or mask.shape[1] != 1 or mask.shape[0] not in (1, like.shape[0]) \
            or tuple(mask.shape[2:]) != tuple(like.shape[2:]):
        raise ValueError(f"{name} must be {expected} (or batch 1) to match the image {tuple(like.shape)}; "
                         f"got {tuple(mask.shape)}")
    out = mask.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
    if check_values and out.numel():
        low, high = torch.aminmax(out)
        low, high = float(low), float(high)  # NaN fails both comparisons below
        if not (low >= 0.0 and high <= 1.0):
            raise ValueError(f"{name} values must lie in [0, 1] (1 inside); got the range [{low}, {high}]")
    return out


def similarity_weight(
    fixed_mask: torch.Tensor | None, moving_mask: torch.Tensor | None, u: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The per-voxel weight ``m_F(x) · m_M(x + u(x))`` ``(B, 1, *S)`` of a similarity term (module docstring),
    or None when neither mask is given.

    Args:
        fixed_mask: ``(B, 1, *S)`` / ``(1, 1, *S)`` in ``[0, 1]`` on the grid of ``u``, or None.
        moving_mask: the same on the moving image's copy of that grid, or None.
        u: displacement ``(B, n, *S)`` in voxels of that grid (detached here); None (or no moving mask): the
            moving mask is used unwarped.
    """
    if moving_mask is not None and u is not None:
        if moving_mask.shape[0] != u.shape[0]:
            moving_mask = moving_mask.expand(u.shape[0], *moving_mask.shape[1:])
        moving_mask = warp_image(moving_mask.to(u.dtype), u.detach())
    if fixed_mask is None:
        return moving_mask
    if moving_mask is None:
        return fixed_mask
    return fixed_mask * moving_mask


def masked_mean(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Weighted mean of ``x`` ``(B, C, *S)`` over batch, channels and voxels:
    ``Σ w x / (C Σ w)`` with ``weight`` ``(B, 1, *S)`` / ``(1, 1, *S)`` broadcast over the channels (``x.mean()``
    when ``weight`` is None; 0 when the weights sum to 0, the denominator being clamped at ``eps``)."""
    if weight is None:
        return x.mean()
    total = (x * weight).sum()
    count = weight.expand(x.shape[0], 1, *x.shape[2:]).sum() * x.shape[1]
    return total / count.clamp_min(eps)

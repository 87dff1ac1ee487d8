"""Training losses of the learned registration models (docs/design.md §4).

All take the full-resolution displacement ``u`` ``(B, n, *S)`` (voxel units) and return a scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .diff import diffusion
from .enums import LabelLoss
from .features import mind_ssc
from .masks import masked_mean, similarity_weight
from .warp import warp_image, warp_keypoints, warp_onehot

__all__ = ["class_weights", "keypoint_loss", "label_loss", "mind_loss", "onehot_of", "regularity_loss"]


def onehot_of(labels: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """``(B, 1, *S)`` integer labels -> ``(B, 1 + L, *S)`` float one-hot over background + ``label_ids``."""
    ids = torch.as_tensor([int(v) for v in label_ids], device=labels.device)
    fg = (labels == ids.view(1, -1, *([1] * (labels.dim() - 2)))).to(torch.get_default_dtype())
    bg = 1.0 - fg.sum(1, keepdim=True).clamp(max=1.0)
    return torch.cat([bg, fg], dim=1)


def class_weights(onehot: torch.Tensor, power: float = -0.35) -> torch.Tensor:
    """Weights ``(K,)`` ∝ voxel count^power (absent classes get 0), normalised to mean 1 over present ones."""
    counts = onehot.detach().flatten(2).sum((0, 2))
    present = counts > 0
    w = torch.where(present, counts.clamp_min(1.0) ** power, torch.zeros_like(counts))
    return w / w[present].mean().clamp_min(1e-12) if present.any() else w


def label_loss(
    u: torch.Tensor,
    moving_label: torch.Tensor,
    fixed_label: torch.Tensor,
    label_ids: Sequence[int],
    kind: str = "mse",
) -> torch.Tensor:
    """Supervision by labels: the moving one-hot, warped linearly with ``u``, against the fixed one-hot.

    ``kind="mse"``: class-weighted MSE (weights from the fixed labels, count^-0.35, mean 1);
    ``kind="dice"``: 1 − mean soft Dice over the foreground labels present in the fixed image.
    """
    kind = LabelLoss.lookup(kind, "label_loss")
    fix = onehot_of(fixed_label, label_ids).to(u.dtype)
    warped = warp_onehot(onehot_of(moving_label, label_ids).to(u.dtype), u)
    if kind == LabelLoss.MSE:
        w = class_weights(fix).to(u.dtype)
        per_class = (warped - fix).pow(2).flatten(2).mean((0, 2))
        return (w * per_class).sum() / w.numel()
    dims = tuple(range(2, u.dim()))  # LabelLoss.DICE
    inter = (warped * fix).sum(dims)
    denom = warped.sum(dims) + fix.sum(dims)
    dice = 2 * inter / denom.clamp_min(1e-6)
    present = fix.sum(dims)[:, 1:] > 0
    return 1.0 - dice[:, 1:][present].mean()


def keypoint_loss(
    u: torch.Tensor, fixed_kp: torch.Tensor, moving_kp: torch.Tensor, spacing: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean distance (mm when ``spacing`` ``(B, n)`` is given, else voxels) between ``p + u(p)`` and the
    moving keypoints; NaN-padded rows ignored."""
    mapped = warp_keypoints(fixed_kp.to(u.dtype), u)
    diff = mapped - moving_kp.to(u.dtype)
    if spacing is not None:
        diff = diff * spacing.to(u.dtype).view(-1, 1, u.shape[1])
    valid = torch.isfinite(diff).all(-1)
    if not valid.any():
        return u.new_zeros(())
    dist = torch.sqrt(diff[valid].pow(2).sum(-1) + 1e-12)
    return dist.mean()


def mind_loss(
    u: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unsupervised similarity: MSE between MIND-SSC of the fixed image and of the warped moving image.

    With masks (``(B, 1, *S)`` in ``[0, 1]``, :mod:`layers.masks`), the mean is weighted by
    ``m_F · m_M ∘ (id + u)`` (the warped moving mask without gradient): voxels outside the masks do not count.
    """
    diff = (mind_ssc(fixed) - warp_image(mind_ssc(moving), u)).pow(2)
    return masked_mean(diff, similarity_weight(fixed_mask, moving_mask, u))


def regularity_loss(u: torch.Tensor) -> torch.Tensor:
    """Regularity guard: the diffusion regulariser of ``u`` (:func:`layers.diffusion`)."""
    return diffusion(u)

"""Training losses of the learned registration models (docs/design.md §4) and the outer losses of learned
hyper-parameters (docs/design.md §5).

The training losses take the full-resolution displacement ``u`` ``(B, n, *S)`` (voxel units) and return a scalar;
:func:`outer_loss` takes a batch and ``u`` and returns its weighted terms.

The outer loss of bilevel λ learning, of test-time λ selection and of the meta-learned Adam schedule
(:func:`outer_loss`) is a supervised registration error (label overlap and/or keypoint distance) plus a
**regularity guard** (:func:`regularity_guard`): without it a Dice-only outer loss prefers a smaller λ (a
rougher field fits the labels better) and drives λ to 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .diff import diffusion, jacobian_determinant
from .enums import Guard, LabelLoss
from .features import mind_ssc
from .masks import masked_mean, similarity_weight
from .metrics import jacobian_stats
from .metrics.labels import batch_label_ids
from .warp import warp_image, warp_keypoints, warp_onehot

__all__ = ["class_weights", "keypoint_loss", "label_loss", "mind_loss", "negative_jacobian_penalty", "onehot_of",
           "outer_loss", "regularity_guard", "regularity_loss", "sdlogj_excess", "soft_dice"]


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
    dice = soft_dice(warped, fix)  # LabelLoss.DICE
    present = fix.flatten(2).sum(2)[:, 1:] > 0
    return 1.0 - dice[:, 1:][present].mean()


def soft_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Soft Dice ``2 Σ a·b / (Σ a + Σ b)`` per item and channel of two maps ``(B, K, *S)`` in ``[0, 1]`` (sums
    over ``S``; the denominator clamped at ``1e-6``, so two empty maps give 0) -> ``(B, K)``."""
    if a.shape != b.shape:
        raise ValueError(f"soft_dice needs maps of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.flatten(2), b.flatten(2)
    return 2 * (a * b).sum(2) / (a.sum(2) + b.sum(2)).clamp_min(1e-6)


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


def negative_jacobian_penalty(u: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of ``relu(margin − det(I + ∇u))`` over batch and voxels (:func:`layers.diff`).

    Args:
        u: ``(B, n, *S)`` displacement in voxel units.
        margin: the Jacobian determinant below which voxels are penalised (0: only folds; a small positive
            value such as 0.1 also pushes away from near-folds). Dimensionless.

    Returns:
        scalar, dimensionless (0 for a fold-free field when ``margin = 0``).
    """
    return torch.relu(margin - jacobian_determinant(u)).mean()


def sdlogj_excess(u: torch.Tensor, bound: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ``relu(SDlogJ − bound)``: zero while every pair's SDlogJ is within ``bound``.

    SDlogJ is the evaluation metric itself (:func:`layers.metrics.jacobian_stats`: std of
    ``log det(I + ∇u)`` over the cropped interior, within ``mask``; docs/design.md §7), so a large weight on
    this hinge turns "maximise Dice subject to SDlogJ ≤ bound" into an exact penalty.

    Args:
        u: ``(B, n, *S)`` displacement in voxel units.
        bound: the SDlogJ allowed (dimensionless, e.g. 0.2).
        mask: optional ``(B, 1, *S)`` fixed mask (the metric's region).

    Returns:
        scalar, dimensionless. Pairs with an empty region (NaN SDlogJ) count as 0.

    The metric clamps ``det J`` at 1e-9 before the log, so folded voxels add to SDlogJ but pass no gradient:
    the guard steers fold-free fields (pair it with ``"negjac"``-style terms where folding is expected; the
    evaluation reports folding separately).
    """
    sd = jacobian_stats(u, mask)["sdlogj"]
    return torch.relu(torch.nan_to_num(sd, nan=0.0) - bound).mean()


def regularity_guard(
    u: torch.Tensor, kind: str = "diffusion", margin: float = 0.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The regularity guard of the outer loss: ``"diffusion"``
    (:func:`regularity_loss`, voxel² per voxel²), ``"negjac"``
    (:func:`negative_jacobian_penalty` with ``margin`` as the determinant margin), ``"sdlogj"``
    (:func:`sdlogj_excess` with ``margin`` as the SDlogJ bound, within the fixed ``mask`` ``(B, 1, *S)``) or
    ``"none"`` (zero); scalar."""
    kind = Guard.lookup(kind, "guard")
    if kind == Guard.DIFFUSION:
        return regularity_loss(u)
    if kind == Guard.NEGJAC:
        return negative_jacobian_penalty(u, margin)
    if kind == Guard.SDLOGJ:
        return sdlogj_excess(u, margin, mask)
    return u.new_zeros(())


def outer_loss(
    batch: Mapping[str, Any],
    u: torch.Tensor,
    *,
    label_ids: Sequence[int] | None = None,
    label_kind: str = "dice",
    w_label: float = 1.0,
    w_keypoint: float = 0.0,
    guard: str = "diffusion",
    w_guard: float = 1.0,
    guard_margin: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Weighted terms of the outer loss for a batch and its full-resolution field ``u`` ``(B, n, *S)``.

    Args:
        batch: a batch dict (``data/batch.py``); ``fixed_label``/``moving_label`` for the label term,
            ``fixed_keypoints``/``moving_keypoints`` (and ``moving_spacing``) for the keypoint term.
        label_ids: labels of the label term (default: :func:`layers.metrics.labels.batch_label_ids`, the
            non-zero labels of ``batch["label_ids"]`` or of the fixed label map).
        label_kind: ``"dice"`` (1 − soft Dice) or ``"mse"`` (class-weighted), see
            :func:`label_loss`.
        w_label, w_keypoint: weights of the label term (dimensionless) and of the keypoint distance (mm).
        guard, w_guard, guard_margin: the regularity guard (:func:`regularity_guard`) and its weight.

    Returns:
        ``{"label", "keypoint", "guard"}`` (those with a positive weight and data), scalars; their sum is the
        outer loss. ``ValueError`` when no supervised term applies.
    """
    terms: dict[str, torch.Tensor] = {}
    if w_label > 0 and batch.get("fixed_label") is not None and batch.get("moving_label") is not None:
        if label_ids is None:
            label_ids = batch_label_ids(batch)
        terms["label"] = w_label * label_loss(
            u, batch["moving_label"], batch["fixed_label"], label_ids, label_kind
        )
    if (
        w_keypoint > 0
        and batch.get("fixed_keypoints") is not None
        and batch.get("moving_keypoints") is not None
    ):
        spacing = batch.get("moving_spacing", batch.get("spacing"))
        terms["keypoint"] = w_keypoint * keypoint_loss(
            u, batch["fixed_keypoints"], batch["moving_keypoints"], spacing
        )
    if not terms:
        raise ValueError(
            "the outer loss needs labels (w_label > 0) or keypoints (w_keypoint > 0) in the batch"
        )
    if guard != "none" and w_guard > 0:
        terms["guard"] = w_guard * regularity_guard(u, guard, guard_margin, batch.get("fixed_mask"))
    return terms

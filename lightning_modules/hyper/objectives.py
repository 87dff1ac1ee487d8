"""Outer (validation) objectives and small helpers shared by the learned-hyper-parameter modules.

The outer loss of bilevel λ learning and of test-time λ selection is a supervised registration error (label
overlap and/or keypoint distance) plus a **regularity guard**: without it a Dice-only outer loss prefers
a smaller λ (a rougher field fits the labels better) and drives λ to 0 (docs/design.md §5).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from layers.diff import jacobian_determinant
from layers.enums import StrEnum
from layers.losses import keypoint_loss, label_loss, regularity_loss
from lightning_modules.labels import batch_label_ids
from lightning_modules.metrics import jacobian_stats

__all__ = ["Guard", "cycle", "negative_jacobian_penalty", "outer_loss", "regularity_guard", "sdlogj_excess"]

class Guard(StrEnum):
    """The regularity guard of the outer loss (:func:`regularity_guard`)."""

    DIFFUSION = "diffusion"  #: :func:`layers.losses.regularity_loss`
    NEGJAC = "negjac"  #: :func:`negative_jacobian_penalty`
    SDLOGJ = "sdlogj"  #: :func:`sdlogj_excess`
    NONE = "none"  #: no guard


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

    SDlogJ is the evaluation metric itself (:func:`lightning_modules.metrics.jacobian_stats`: std of
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
    (:func:`layers.losses.regularity_loss`, voxel² per voxel²), ``"negjac"``
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
    batch: dict[str, Any],
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
        label_ids: labels of the label term (default: :func:`lightning_modules.labels.batch_label_ids`, the
            non-zero labels of ``batch["label_ids"]`` or of the fixed label map).
        label_kind: ``"dice"`` (1 − soft Dice) or ``"mse"`` (class-weighted), see
            :func:`layers.losses.label_loss`.
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


def cycle(make_iterable: Any) -> Iterator[Any]:
    """Endless iterator over ``make_iterable()`` (e.g. a DataLoader factory), restarted when exhausted.

    ``make_iterable`` is a zero-argument callable returning an iterable (called again at every pass, so a
    shuffled DataLoader reshuffles) or an iterable that can be iterated repeatedly.
    """
    while True:
        source: Iterable[Any] = make_iterable() if callable(make_iterable) else make_iterable
        empty = True
        for item in source:
            empty = False
            yield item
        if empty:
            raise RuntimeError("cannot cycle over an empty iterable")

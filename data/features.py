"""Feature maps of a batch's fixed and moving images, shared by the learned model and the baselines."""

from __future__ import annotations

from typing import Any

import torch

from layers import mind_ssc, signed_distance_maps
from layers.enums import StrEnum
from layers.metrics.labels import batch_label_ids

__all__ = ["FEATURE_KINDS", "FeatureKind", "batch_features"]


class FeatureKind(StrEnum):
    """The features of a batch that the GN layer registers (:func:`batch_features`)."""

    MIND = "mind"  #: MIND-SSC of the images
    SDM = "sdm"  #: signed square-root distance maps of the label maps (an oracle / teacher setting)
    INTENSITY = "intensity"  #: the images themselves


#: The values of :class:`FeatureKind`, as strings.
FEATURE_KINDS = tuple(k.value for k in FeatureKind)


def batch_features(
    batch: dict[str, Any],
    kind: str = "mind",
    *,
    mind_radius: int = 1,
    mind_dilation: int = 2,
    sdm_scale: float = 1.0,
    intensity_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed and moving features ``(B, C, *S)`` of a batch.

    Args:
        batch: see ``data/batch.py``.
        kind: ``"mind"`` (MIND-SSC of the images, C = 12 in 3D / 4 in 2D), ``"sdm"`` (signed square-root
            distance maps of the label maps, one channel per label of :func:`batch_label_ids` (those of
            ``label_ids``, else the non-zero labels of both maps); needs ``fixed_label`` and
            ``moving_label``: an oracle/teacher setting, since test-time labels are usually unknown), or
            ``"intensity"`` (the images, C = 1, multiplied by ``intensity_scale``).
    """
    kind = FeatureKind.lookup(kind, "features")
    fixed, moving = batch["fixed"], batch["moving"]
    if kind == FeatureKind.MIND:
        return (mind_ssc(fixed, mind_radius, mind_dilation), mind_ssc(moving, mind_radius, mind_dilation))
    if kind == FeatureKind.INTENSITY:
        return fixed * intensity_scale, moving * intensity_scale
    if "fixed_label" not in batch or "moving_label" not in batch:
        raise ValueError("features kind='sdm' needs fixed_label and moving_label in the batch (a dataset with labels)")
    label_ids = batch_label_ids(batch, maps=("fixed_label", "moving_label"))
    spacing = batch.get("spacing")
    sp = tuple(float(s) for s in spacing[0]) if spacing is not None else None
    f = signed_distance_maps(batch["fixed_label"], label_ids, sp, sdm_scale).to(fixed.dtype)
    m = signed_distance_maps(batch["moving_label"], label_ids, sp, sdm_scale).to(fixed.dtype)
    return f, m

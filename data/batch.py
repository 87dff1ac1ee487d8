"""The sample / batch contract shared by ``data/``, the LightningModules and ``eval.py``.

A **sample** (one registration pair, what a Dataset returns) is a dict:

==================== ============================ ===========================================================
key                  shape / type                 meaning
==================== ============================ ===========================================================
``fixed``            ``(1, *S)`` float32           fixed image (intensities already normalised)
``moving``           ``(1, *S)`` float32           moving image, same grid ``S`` as ``fixed``
``fixed_label``      ``(1, *S)`` int64             optional: fixed label map (0 = background)
``moving_label``     ``(1, *S)`` int64             optional: moving label map
``fixed_mask``       ``(1, *S)`` float32           optional: fixed mask (1 inside)
``moving_mask``      ``(1, *S)`` float32           optional
``fixed_keypoints``  ``(K, n)`` float32            optional: voxel indices (array order) on the fixed grid
``moving_keypoints`` ``(K, n)`` float32            optional: the corresponding moving points
``true_disp``        ``(n, *S)`` float32           optional (synthetic): the true displacement, voxel units
``spacing``          ``(n,)`` float32              mm per voxel of the fixed grid
``moving_spacing``   ``(n,)`` float32              mm per voxel of the moving grid (= spacing if resampled)
``fixed_id``         ``str``                       case id used in ``disp_<fixed>_<moving>.nii.gz``
``moving_id``        ``str``
``affine``           ``(4, 4)`` float64            voxel-to-world affine of the served fixed grid (for files)
``label_ids``        ``(L,)`` int64                optional: the labels to evaluate (e.g. the JSON ``labels``)
==================== ============================ ===========================================================

A **batch** is the collated dict: tensors gain a leading batch dimension ``B``; keypoints are padded with
NaN to the largest ``K`` of the batch; ``label_ids`` of different lengths are padded with ``-1``; strings
become lists. Keys that some samples lack are dropped from the batch (see :func:`data.collate.collate_pairs`).

In evaluation (``RegistrationDataModule.predict_dataloader``) a pair that cannot be loaded is a **failed
sample** ``{"fixed_id", "moving_id", "failed": "<error>"}`` (:mod:`data.guard`); a batch with failed samples
holds them under ``failed`` (a list of ``{"fixed_id", "moving_id", "error", "position"}``) next to the stacked
loaded samples, whose positions in the original order are ``positions``. Such a batch may have no images at
all when every sample failed.

Producers: :class:`data.learn2reg.Learn2RegDataset`, :class:`data.synthetic.SyntheticPairs` (which adds
``true_disp`` and body masks) and :class:`data.slices.SliceDataset` (2D slices of either; ids get a ``_sNNN``
suffix). Sample tensors are fresh copies: modifying them does not touch any cache.

Which labels a batch evaluates, encodes or supervises is read in one place,
:func:`layers.metrics.labels.batch_label_ids`; the masks of the similarity terms of a method with ``use_masks``
in another, :func:`batch_masks` (the maths is in :mod:`layers.masks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from layers.masks import check_mask

__all__ = ["FAILED_KEY", "ID_KEYS", "IMAGE_KEYS", "KEYPOINT_KEYS", "LABEL_KEYS", "MASK_KEYS", "batch_masks"]

IMAGE_KEYS = ("fixed", "moving")
LABEL_KEYS = ("fixed_label", "moving_label")
MASK_KEYS = ("fixed_mask", "moving_mask")
KEYPOINT_KEYS = ("fixed_keypoints", "moving_keypoints")
ID_KEYS = ("fixed_id", "moving_id")
#: key of a failed sample (its value: the error message); see :mod:`data.guard`
FAILED_KEY = "failed"


def batch_masks(batch: Mapping[str, Any], use_masks: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(fixed_mask, moving_mask)`` of a batch for the similarity terms (docs/design.md §3, §6), each
    ``(B, 1, *S)`` in the fixed image's dtype or None (absent from the batch, or ``use_masks`` off). A batch
    without masks registers unmasked even with ``use_masks``.

    Raises ``ValueError`` naming the key for a mask whose shape does not match ``batch["fixed"]`` or whose
    values lie outside ``[0, 1]``.
    """
    if not use_masks:
        return None, None
    fixed = batch["fixed"]
    dtype_like = fixed if fixed.is_floating_point() else fixed.float()
    fixed_mask, moving_mask = (None if batch.get(key) is None else check_mask(batch[key], dtype_like, key)
                               for key in MASK_KEYS)
    return fixed_mask, moving_mask

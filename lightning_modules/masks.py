"""The masks of a batch for the similarity terms of a method with ``use_masks`` (docs/design.md §3, §6).

Every method with a ``use_masks`` option (``LearnGN``, ``HandcraftedGN``, ``AdamIO``, ``ConvexAdam``; off by
default) takes the batch's ``fixed_mask`` / ``moving_mask`` (``data/batch.py``; Learn2Reg ``masksTr`` or
``eval.py --fixed-mask/--moving-mask``) through :func:`batch_masks`; the maths is in :mod:`layers.masks`.
"""

from __future__ import annotations

from typing import Any

import torch

from data.batch import MASK_KEYS
from layers.masks import check_mask

__all__ = ["batch_masks"]


def batch_masks(batch: dict[str, Any], use_masks: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(fixed_mask, moving_mask)`` of a batch, each ``(B, 1, *S)`` in the fixed image's dtype or None (absent
    from the batch, or ``use_masks`` off). A batch without masks registers unmasked even with ``use_masks``.

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

"""Label ids and label-map checks shared by the metrics (docs/design.md §7).

Label maps are ``(B, 1, *S)`` integer (0 = background, never evaluated); a batch's label ids are padded with
``-1``; spacings are mm per voxel, ``(n,)`` or ``(B, n)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["batch_label_ids", "check_label_map", "check_label_pair", "label_id_list", "same_shape", "spacing_tensor"]


def check_label_map(x: torch.Tensor, name: str) -> None:
    """Refuse anything but an integer label map ``(B, 1, *S)``, with a message naming ``name``."""
    if x.dim() not in (4, 5) or x.shape[1] != 1:
        raise ValueError(f"{name} must be an integer label map (B, 1, *S); got shape {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name} must be an integer label map; got dtype {x.dtype}")


def label_id_list(label_ids: torch.Tensor | Iterable[int]) -> list[int]:
    """Label ids ``(L,)`` (a 1-D tensor or a sequence) as a list of ints, background (0) and the ``-1`` padding
    of ragged batch rows removed, order kept, duplicates dropped."""
    if isinstance(label_ids, torch.Tensor):
        if label_ids.dim() > 1:
            raise ValueError(f"label_ids must be 1-D here; got shape {tuple(label_ids.shape)}")
        label_ids = label_ids.tolist()
    out: list[int] = []
    for k in label_ids:
        k = int(k)
        if k > 0 and k not in out:
            out.append(k)
    return out


def batch_label_ids(
    batch: Mapping[str, Any], *, maps: Sequence[str] = ("fixed_label",), per_pair: bool = False
) -> list[int] | list[list[int]]:
    """The labels to evaluate (or encode, or supervise) for a batch: the one place that reads ``label_ids``.

    Args:
        batch: a batch dict (``data/batch.py``): ``label_ids`` ``(L,)`` or ``(B, L)`` (rows of different
            lengths padded with ``-1`` by the collate function), a tensor or a sequence; optional.
        maps: the label maps ``(B, 1, *S)`` whose non-zero labels are used when the batch has no ``label_ids``.
        per_pair: with a ``(B, L)`` ``label_ids`` whose rows differ, return one list per pair instead of
            the first row's.

    Returns:
        the label ids as ints, background (0) removed, order kept, duplicates dropped
        (:func:`label_id_list`); with ``per_pair`` and rows that differ, one such list per pair.
    """
    ids = batch.get("label_ids")
    if ids is None:
        return label_id_list(torch.unique(torch.cat([batch[m].flatten() for m in maps])))
    ids = torch.as_tensor(ids)
    if ids.dim() == 2:
        if not per_pair or all(torch.equal(ids[0], row) for row in ids):
            return label_id_list(ids[0])
        return [label_id_list(row) for row in ids]
    return label_id_list(ids)


def spacing_tensor(spacing: Any, batch: int, n: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Spacing ``None`` / ``(n,)`` / ``(1, n)`` / ``(B, n)`` -> ``(B, n)`` tensor (mm per voxel)."""
    if spacing is None:
        return torch.ones(batch, n, dtype=dtype, device=device)
    sp = torch.as_tensor(spacing, dtype=dtype, device=device)
    if sp.dim() == 1 and sp.shape[0] == n:
        return sp.expand(batch, n)
    if sp.dim() == 2 and sp.shape[1] == n and sp.shape[0] in (1, batch):
        return sp.expand(batch, n)
    raise ValueError(f"spacing must have shape ({n},) or ({batch}, {n}); got {tuple(sp.shape)}")


def same_shape(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    """Refuse two tensors of different shapes, with a message naming both (``na``, ``nb``)."""
    if a.shape != b.shape:
        raise ValueError(f"{na} {tuple(a.shape)} and {nb} {tuple(b.shape)} must have the same shape")


def check_label_pair(
    warped_label: torch.Tensor, fixed_label: torch.Tensor, label_ids: torch.Tensor | Iterable[int]
) -> list[int]:
    """Check a warped and a fixed label map ``(B, 1, *S)`` (integer, same shape); the label ids as a list
    (:func:`label_id_list`)."""
    check_label_map(warped_label, "warped_label")
    check_label_map(fixed_label, "fixed_label")
    same_shape(warped_label, fixed_label, "warped_label", "fixed_label")
    return label_id_list(label_ids)

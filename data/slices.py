"""2D slice mode: matching 2D slices of 3D registration pairs, for fast training and debugging."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .batch import KEYPOINT_KEYS

__all__ = ["SliceDataset", "foreground_slices", "slice_id", "slice_sample"]

log = logging.getLogger(__name__)

# keys holding (C, *S) volumes: one spatial axis is removed by slicing
_VOLUME_KEYS = ("fixed", "moving", "fixed_label", "moving_label", "fixed_mask", "moving_mask")


def _slice_affine(affine: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    """4x4 affine of slice ``index`` along ``axis``: columns of the two in-plane axes first, then the sliced
    axis, translation moved to the slice (so 2D voxel ``(a, b)`` keeps its world position)."""
    cols = [a for a in range(3) if a != axis] + [axis]
    out = affine.clone()
    out[:, :3] = affine[:, cols]
    out[:3, 3] = affine[:3, 3] + index * affine[:3, axis]
    return out


def slice_id(case_id: str, index: int) -> str:
    """The id of slice ``index`` of a case: ``<case_id>_s<index>`` (3 digits); slice ``-1`` (``_s-01``) stands
    for a pair whose slices could not be listed (see :class:`SliceDataset`)."""
    return f"{case_id}_s{index:03d}"


def slice_sample(sample: dict, axis: int, index: int) -> dict:
    """The 2D pair of slice ``index`` along spatial ``axis`` of a 3D sample (:mod:`data.batch` keys).

    Volumes ``(C, D, H, W)`` -> ``(C, *S2)``; ``true_disp`` ``(3, *S)`` -> ``(2, *S2)`` (in-plane components;
    the out-of-plane motion is dropped); keypoints: the rows whose fixed point lies within ±0.5 voxel of the
    slice, with the ``axis`` coordinate dropped (``(K', 2)``); ``spacing``/``moving_spacing`` -> 2 entries;
    ids get the suffix ``_s<index>`` (3 digits); ``affine`` stays 4x4 (see :func:`_slice_affine`).
    """
    if sample["fixed"].dim() != 4:
        raise ValueError(
            f"slice mode needs 3D samples (1, D, H, W); got fixed {tuple(sample['fixed'].shape)}"
        )
    if not 0 <= axis < 3:
        raise ValueError(f"axis must be 0, 1 or 2; got {axis}")
    size = sample["fixed"].shape[1 + axis]
    if not 0 <= index < size:
        raise IndexError(f"slice {index} out of range for axis {axis} of size {size}")
    keep = [a for a in range(3) if a != axis]
    out: dict = {}
    for key, value in sample.items():
        if key in _VOLUME_KEYS:
            out[key] = value.select(1 + axis, index).clone()
        elif key == "true_disp":
            out[key] = value[keep].select(1 + axis, index).clone()
        elif key in ("spacing", "moving_spacing"):
            out[key] = value[keep].clone()
        elif key in ("fixed_id", "moving_id"):
            out[key] = slice_id(value, index)
        elif key == "affine":
            out[key] = _slice_affine(value, axis, index)
        elif key not in KEYPOINT_KEYS:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    if all(k in sample for k in KEYPOINT_KEYS):
        fk, mk = sample["fixed_keypoints"], sample["moving_keypoints"]
        rows = (fk[:, axis] - index).abs() <= 0.5
        out["fixed_keypoints"] = fk[rows][:, keep]
        out["moving_keypoints"] = mk[rows][:, keep]
    return out


def foreground_slices(sample: dict, axis: int, min_foreground: int = 1) -> list[int]:
    """Slice indices along ``axis`` with at least ``min_foreground`` voxels of the fixed label (> 0), or of
    the fixed mask when there is no label; every slice when there is neither."""
    ref = sample.get("fixed_label", sample.get("fixed_mask"))
    size = sample["fixed"].shape[1 + axis]
    if ref is None:
        return list(range(size))
    dims = [d for d in range(ref.dim()) if d != 1 + axis]
    counts = (ref > 0).sum(dim=dims)
    return [int(i) for i in torch.nonzero(counts >= min_foreground).flatten()]


class SliceDataset(Dataset):
    """Wrap any 3D pair dataset; item ``j`` is one 2D slice pair (:func:`slice_sample`).

    Args:
        base: a dataset of 3D samples (e.g. :class:`data.learn2reg.Learn2RegDataset`, ``SyntheticPairs``).
        axis: the spatial axis that is sliced (0, 1 or 2; array order).
        indices: the slice indices taken from every pair; ``None`` = every slice with foreground in the fixed
            label (:func:`foreground_slices`; this scans each base pair once, on first use).
        min_foreground: foreground voxels a slice needs in ``indices=None`` mode.

    The last base sample is kept so consecutive slices of one pair load it once. With ``indices=None``, a pair
    that fails to load while its slices are listed stays in the index as one item with slice ``-1``, whose
    loading raises that pair's error again (so a guarded evaluation records it, :mod:`data.guard`).
    """

    def __init__(
        self, base: Dataset, axis: int = 0, indices: Sequence[int] | None = None, min_foreground: int = 1
    ) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2; got {axis}")
        self.base = base
        self.axis = int(axis)
        self.indices = None if indices is None else [int(i) for i in indices]
        self.min_foreground = int(min_foreground)
        self._index: list[tuple[int, int]] | None = None
        self._last: tuple[int, dict] | None = None

    def _base_item(self, i: int) -> dict:
        if self._last is None or self._last[0] != i:
            self._last = (i, self.base[i])
        return self._last[1]

    @property
    def index(self) -> list[tuple[int, int]]:
        """``(pair, slice)`` of every item."""
        if self._index is None:
            if self.indices is not None:
                self._index = [(i, s) for i in range(len(self.base)) for s in self.indices]
            else:
                self._index = []
                for i in range(len(self.base)):
                    try:
                        found = foreground_slices(self._base_item(i), self.axis, self.min_foreground)
                    except Exception as exc:
                        log.warning("pair %d cannot be loaded to list its slices: %s", i, exc)
                        self._index.append((i, -1))
                        continue
                    if not found:
                        log.warning("pair %d has no foreground slice along axis %d; skipped", i, self.axis)
                    self._index += [(i, s) for s in found]
        return self._index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> dict:
        i, s = self.index[j]
        return slice_sample(self._base_item(i), self.axis, s)  # s = -1: loading the pair raises its error

    def pair_info(self, j: int) -> tuple[str, str, str] | None:
        """``(fixed_id, moving_id, source)`` of item ``j`` (see :func:`data.guard.pair_info`)."""
        from .guard import pair_info

        i, s = self.index[j]
        info = pair_info(self.base, i)
        if info is None:
            return None
        return slice_id(info[0], s), slice_id(info[1], s), f"{info[2]}, slice {s} along axis {self.axis}"

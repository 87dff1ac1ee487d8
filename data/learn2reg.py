"""The Learn2Reg reader: a ``Dataset`` of registration pairs following the sample contract of
:mod:`data.batch`, with loaded volumes cached in memory (a volume shared by several pairs loads once)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import VolumeCache
from .intensity import INTENSITY_MODES
from .keypoints import check_keypoint_pair
from .learn2reg_task import PAIR_SECTIONS, ImageEntry, Learn2RegTask, PairEntry
from .nifti import read_header
from .resample import grid_for_shape, grid_for_spacing
from .volume import Volume, load_volume, resample_volume

__all__ = ["Learn2RegDataset", "add_labels_and_masks"]

log = logging.getLogger(__name__)

_Grid = tuple[tuple[int, ...], tuple[float, ...]] | None


class Learn2RegDataset(Dataset):
    """Registration pairs of a Learn2Reg task; item ``i`` is a sample dict as in :mod:`data.batch`.

    Each sample holds ``fixed``/``moving`` ``(1, *S)`` float32 in ``[0, 1]``, ``spacing``/``moving_spacing``
    ``(n,)`` mm, ``fixed_id``/``moving_id`` (case ids, e.g. ``"0001"``), ``affine`` ``(4, 4)`` of the fixed
    image (after resampling), and when available ``fixed_label``/``moving_label`` ``(1, *S)`` int64,
    ``fixed_mask``/``moving_mask`` ``(1, *S)`` float32, ``fixed_keypoints``/``moving_keypoints`` ``(K, n)``
    voxel indices (only when both files exist), ``label_ids`` ``(L,)`` int64 (the JSON ``labels`` keys).

    Args:
        json_path: the ``<TASK>_dataset.json`` (or a loaded :class:`Learn2RegTask`).
        pairs: a JSON section (``"registration_val"``, ``"registration_test"``, ``"training_paired_images"``),
            ``"training"`` (:meth:`Learn2RegTask.training_pairs`), or an explicit list of :class:`PairEntry`.
        max_pairs: cap on the number of ``"training"`` pairs (seeded subset); ``None`` = all.
        seed: seed of that subset.
        intensity: ``"auto"`` (from the JSON ``modality``), ``"ct"`` (window), ``"mr"`` (percentiles) or
            ``"none"`` (min-max); all map to ``[0, 1]``.
        ct_window: CT window ``(low, high)`` in HU.
        percentiles: MR scaling percentiles ``(low, high)`` in %.
        target_spacing: resample both images to this spacing (mm, array order); the moving image is resampled
            onto the fixed image's output grid (both start at voxel 0).
        target_shape: resample each image to this shape (end voxels kept; spacing adapts). Exclusive with
            ``target_spacing``. Without either, fixed and moving shapes must agree (``ValueError`` otherwise).
        require_labels: every image must have a non-empty label map (error otherwise).
        cache: a shared :class:`VolumeCache` (e.g. across splits); otherwise a new one of
            ``cache_size`` entries.
        cache_size: volumes kept in memory (``None`` = all, ``0`` = none).
    """

    def __init__(
        self,
        json_path: str | Path | Learn2RegTask,
        pairs: str | Sequence[PairEntry] = "registration_val",
        *,
        max_pairs: int | None = None,
        seed: int = 0,
        intensity: str = "auto",
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        percentiles: Sequence[float] = (0.5, 99.5),
        target_spacing: Sequence[float] | None = None,
        target_shape: Sequence[int] | None = None,
        require_labels: bool = False,
        cache: VolumeCache | None = None,
        cache_size: int | None = 128,
    ) -> None:
        self.task = json_path if isinstance(json_path, Learn2RegTask) else Learn2RegTask(json_path)
        if intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}; got {intensity!r}")
        if target_spacing is not None and target_shape is not None:
            raise ValueError("give target_spacing or target_shape, not both")
        n = self.task.ndim
        for name, value in (("target_spacing", target_spacing), ("target_shape", target_shape)):
            if value is not None and len(value) != n:
                raise ValueError(f"{name} must have {n} entries for a {n}D task; got {list(value)}")
        if isinstance(pairs, str):
            if pairs == "training":
                pairs = self.task.training_pairs(max_pairs=max_pairs, seed=seed)
            elif pairs in PAIR_SECTIONS:
                pairs = self.task.section_pairs(pairs)
            else:
                raise ValueError(f"pairs must be 'training', one of {PAIR_SECTIONS} or a list; got {pairs!r}")
        self.pairs: list[PairEntry] = list(pairs)
        self.intensity = intensity
        self.ct_window = tuple(float(v) for v in ct_window)
        self.percentiles = tuple(float(v) for v in percentiles)
        self.target_spacing = None if target_spacing is None else tuple(float(v) for v in target_spacing)
        self.target_shape = None if target_shape is None else tuple(int(v) for v in target_shape)
        self.require_labels = require_labels
        self.label_ids = self.task.label_ids
        self.cache: VolumeCache = cache if cache is not None else VolumeCache(cache_size)
        self._headers: dict[Path, tuple[tuple[int, ...], np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"Learn2RegDataset({self.task.name!r}, pairs={len(self.pairs)}, ndim={self.task.ndim})"

    def pair_info(self, index: int) -> tuple[str, str, str]:
        """``(fixed_id, moving_id, source)`` of pair ``index`` without loading it (``source``: the JSON key and
        the two files)."""
        pair = self.pairs[index]
        return pair.fixed.case, pair.moving.case, f"{pair.key} ({pair.fixed.path} <- {pair.moving.path})"

    # ------------------------------------------------------------------ loading
    def _header(self, path: Path) -> tuple[tuple[int, ...], np.ndarray]:
        if path not in self._headers:
            self._headers[path] = read_header(path, self.task.ndim)
        return self._headers[path]

    def _grids(self, pair: PairEntry) -> tuple[_Grid, _Grid]:
        """Output grid ``(shape, scale)`` of the fixed and the moving image (``None`` = as stored)."""
        f_shape, f_spacing = self._header(pair.fixed.path)
        m_shape, m_spacing = self._header(pair.moving.path)
        if self.target_shape is not None:
            return (
                (self.target_shape, grid_for_shape(f_shape, self.target_shape)),
                (self.target_shape, grid_for_shape(m_shape, self.target_shape)),
            )
        if self.target_spacing is not None:
            out, f_scale = grid_for_spacing(f_shape, f_spacing, self.target_spacing)
            m_scale = tuple(t / float(s) for t, s in zip(self.target_spacing, m_spacing))
            return (out, f_scale), (out, m_scale)
        if f_shape != m_shape:
            raise ValueError(
                f"fixed {pair.fixed.path} has shape {f_shape} but moving {pair.moving.path} "
                f"has shape {m_shape} "
                f"({pair.key}); set target_spacing or target_shape to resample"
            )
        return None, None

    def load(self, image: ImageEntry, grid: _Grid = None) -> Volume:
        """The (cached) :class:`Volume` of an image on ``grid``
        (``(out_shape, scale)``, ``None`` = as stored)."""
        key = (str(image.path), None if grid is None else (grid[0], tuple(round(c, 9) for c in grid[1])))
        return self.cache.get(key, lambda: self._load(image, grid))

    def _load(self, image: ImageEntry, grid: _Grid) -> Volume:
        log.debug("loading %s (%s)", image.path, image.key)
        vol = load_volume(
            image.path,
            label_path=self.task.companion(image, "labels"),
            mask_path=self.task.companion(image, "masks"),
            keypoint_path=self.task.companion(image, "keypoints"),
            ndim=self.task.ndim,
            intensity=self.intensity,
            modality=self.task.modality_name(image.modality),
            ct_window=self.ct_window,
            percentiles=self.percentiles,
            require_labels=self.require_labels,
            label_ids=self.label_ids or None,
        )
        return vol if grid is None else resample_volume(vol, *grid)

    # ------------------------------------------------------------------ samples
    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        f_grid, m_grid = self._grids(pair)
        f, m = self.load(pair.fixed, f_grid), self.load(pair.moving, m_grid)
        if f.shape != m.shape:  # cannot happen after the header check; guards against inconsistent files
            raise ValueError(f"fixed {f.path} {f.shape} and moving {m.path} {m.shape} differ after loading")
        sample: dict = {
            "fixed": f.image.clone(),
            "moving": m.image.clone(),
            "spacing": torch.as_tensor(f.spacing, dtype=torch.float32),
            "moving_spacing": torch.as_tensor(m.spacing, dtype=torch.float32),
            "fixed_id": pair.fixed.case,
            "moving_id": pair.moving.case,
            "affine": torch.tensor(f.affine, dtype=torch.float64),
        }
        add_labels_and_masks(sample, f, m)
        if f.keypoints is not None and m.keypoints is not None:
            check_keypoint_pair(f.keypoints, m.keypoints, f.keypoint_path, m.keypoint_path)
            sample["fixed_keypoints"] = f.keypoints.clone()
            sample["moving_keypoints"] = m.keypoints.clone()
        elif (f.keypoints is None) != (m.keypoints is None):
            log.debug("%s: keypoints on one side only; dropped", pair.key)
        if self.label_ids:
            sample["label_ids"] = torch.as_tensor(self.label_ids, dtype=torch.int64)
        return sample


def add_labels_and_masks(sample: dict, fixed: Volume, moving: Volume) -> dict:
    """Add ``<fixed|moving>_label`` (long) and ``<fixed|moving>_mask`` (float) ``(1, *S)`` to a sample from the
    volumes that have them (``data/batch.py``); returns the sample."""
    for prefix, vol in (("fixed", fixed), ("moving", moving)):
        if vol.label is not None:
            sample[f"{prefix}_label"] = vol.label.long()
        if vol.mask is not None:
            sample[f"{prefix}_mask"] = vol.mask.float()
    return sample

"""One registration pair read from NIfTI files (no dataset JSON), and warping any image with a saved field.

* :func:`load_file_pair` reads a fixed and a moving image (and optional labels / masks) with the project's
  loader and intensity normalisation (:func:`data.volume.load_volume`), resamples the moving side onto the
  fixed grid from the two files' affines (:func:`resample_to_grid`, nibabel's ``resample_from_to``: linear for
  images, nearest for labels and masks, zeros outside the moving image) and returns a sample of
  :mod:`data.batch` on the fixed grid. When both files share the grid (same shape and affine) nothing is
  resampled and the sample equals the one :class:`data.learn2reg.Learn2RegDataset` serves for that pair.
* :func:`warp_file` maps an image file in the moving image's space onto the fixed grid with a displacement
  ``u`` ``(n, *S)`` (voxel units, fixed grid; docs/design.md §2): the image is resampled onto the fixed grid from its
  affine and warped with :func:`layers.warp.warp_image` (linear) or :func:`layers.warp.warp_labels` (nearest).
  The registration's ``warped.nii.gz`` and ``eval.py --apply`` both go through it, so applying a saved field
  reproduces the registration's output exactly.

Meaning of the field when the moving image has its own grid: fixed voxel ``x`` corresponds to the world point
``A_f (x + u(x))`` (``A_f`` the fixed affine), wherever the moving image's voxels lie; the ITK export
(:mod:`data.itk`) writes exactly that as a physical displacement.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.processing import resample_from_to

from layers.warp import warp_image, warp_labels

from .learn2reg import add_labels_and_masks
from .learn2reg_task import case_id
from .nifti import load_nifti
from .volume import Volume, load_volume

__all__ = ["file_ndim", "load_file_pair", "resample_to_grid", "same_grid", "warp_file"]

log = logging.getLogger(__name__)


def file_ndim(path: str | Path) -> int:
    """Spatial dimensionality (2 or 3) of a NIfTI image, trailing axes of size 1 ignored; ``ValueError`` naming
    the file otherwise (``FileNotFoundError`` when it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:
        raise ValueError(f"cannot read NIfTI file {path} (truncated, corrupt or not NIfTI?): {exc}") from exc
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise ValueError(f"{path}: expected a 2D or 3D image but the file holds shape {shape}")
    return len(shape)


def same_grid(shape: Sequence[int], affine: np.ndarray, target_shape: Sequence[int], target_affine: np.ndarray,
              atol: float = 1e-5) -> bool:
    """Whether two grids coincide: equal shapes and affines ``(4, 4)`` equal to ``atol`` (mm)."""
    return tuple(shape) == tuple(target_shape) and np.allclose(affine, target_affine, rtol=0, atol=atol)


def resample_to_grid(
    array: np.ndarray,
    affine: np.ndarray,
    target_shape: Sequence[int],
    target_affine: np.ndarray,
    *,
    nearest: bool = False,
) -> np.ndarray:
    """Resample ``array`` ``(*S_in)`` with voxel-to-world ``affine`` ``(4, 4)`` onto the grid ``target_shape``
    with ``target_affine`` (world = mm), by nibabel's ``resample_from_to``: linear (``nearest=False``, output
    float32) or nearest (output in the input's dtype). Beyond the input the values fade to 0 within one voxel
    (scipy's ``grid-constant`` mode, so a point a rounding error outside the edge keeps the edge value). The array
    itself is returned when the grids coincide (:func:`same_grid`). 2D arrays ``(H, W)`` are treated as
    ``(H, W, 1)``."""
    target_shape = tuple(int(s) for s in target_shape)
    array = np.asarray(array)
    if array.ndim != len(target_shape) or array.ndim not in (2, 3):
        raise ValueError(f"cannot resample an array of shape {array.shape} onto a grid of shape {target_shape}")
    if same_grid(array.shape, affine, target_shape, target_affine):
        return array
    flat = array.ndim == 2
    src = array[..., None] if flat else array
    shape3 = target_shape + (1,) if flat else target_shape
    data = src.astype(np.float64) if nearest else src.astype(np.float32)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    out = np.asarray(resample_from_to(img, (shape3, np.asarray(target_affine, dtype=np.float64)),
                                      order=0 if nearest else 1, mode="grid-constant", cval=0.0).dataobj)
    out = out[..., 0] if flat else out
    return out.astype(array.dtype) if nearest else out.astype(np.float32)


def _on_fixed_grid(vol: Volume, shape: tuple[int, ...], affine: np.ndarray, spacing: np.ndarray) -> Volume:
    """The moving :class:`Volume` resampled onto the fixed grid (image linear, label and mask nearest)."""
    if same_grid(vol.shape, vol.affine, shape, affine):
        return vol
    log.info("resampling %s %s onto the fixed grid %s", vol.path, vol.shape, shape)

    def res(x: torch.Tensor | None, nearest: bool) -> torch.Tensor | None:
        if x is None:
            return None
        out = resample_to_grid(x[0].numpy(), vol.affine, shape, affine, nearest=nearest)
        return torch.from_numpy(np.ascontiguousarray(out))[None]

    return replace(vol, image=res(vol.image, False), label=res(vol.label, True), mask=res(vol.mask, True),
                   keypoints=None, spacing=np.asarray(spacing, dtype=np.float64), affine=affine)


def load_file_pair(
    fixed: str | Path,
    moving: str | Path,
    *,
    fixed_labels: str | Path | None = None,
    moving_labels: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    moving_mask: str | Path | None = None,
    intensity: str = "none",
    ct_window: Sequence[float] = (-1000.0, 1000.0),
    percentiles: Sequence[float] = (0.5, 99.5),
) -> dict:
    """A registration sample (:mod:`data.batch`) of two NIfTI files on the fixed image's grid.

    Args:
        fixed, moving: the images (2D or 3D, the same dimensionality; any shapes, spacings and orientations).
        fixed_labels, moving_labels: optional integer label maps on their image's grid.
        fixed_mask, moving_mask: optional masks (> 0 inside) on their image's grid.
        intensity: ``"ct"``, ``"mr"`` or ``"none"`` (min-max), as :func:`data.intensity.normalise_intensity`;
            each image is normalised on its own grid, before resampling.
        ct_window, percentiles: as :func:`data.intensity.normalise_intensity`.
    Returns:
        ``fixed``/``moving`` ``(1, *S)`` float32, ``spacing``/``moving_spacing`` ``(n,)`` mm (both the fixed
        grid's), ``affine`` ``(4, 4)`` float64 of the fixed image, ``fixed_id``/``moving_id`` (case ids of the
        file names), and ``fixed_label``/``moving_label`` ``(1, *S)`` int64, ``fixed_mask``/``moving_mask``
        ``(1, *S)`` float32 when given.

    Errors name the file: a missing file, a 4D image, images of different dimensionality, a label map or mask
    whose shape differs from its image, non-finite voxels, a non-integer label map.
    """
    n = file_ndim(fixed)
    n_moving = file_ndim(moving)
    if n_moving != n:
        raise ValueError(f"fixed image {fixed} is {n}D but moving image {moving} is {n_moving}D")
    kw = dict(ndim=n, intensity=intensity, ct_window=ct_window, percentiles=percentiles)
    f = load_volume(Path(fixed), label_path=_opt(fixed_labels), mask_path=_opt(fixed_mask), **kw)
    m = load_volume(Path(moving), label_path=_opt(moving_labels), mask_path=_opt(moving_mask), **kw)
    m = _on_fixed_grid(m, f.shape, f.affine, f.spacing)
    spacing = torch.as_tensor(f.spacing, dtype=torch.float32)
    sample: dict = {
        "fixed": f.image.clone(),
        "moving": m.image.clone(),
        "spacing": spacing,
        "moving_spacing": spacing.clone(),
        "fixed_id": case_id(fixed),
        "moving_id": case_id(moving),
        "affine": torch.tensor(f.affine, dtype=torch.float64),
    }
    return add_labels_and_masks(sample, f, m)


def _opt(path: str | Path | None) -> Path | None:
    return None if path is None else Path(path)


def warp_file(
    image: str | Path,
    u: torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    *,
    nearest: bool = False,
) -> np.ndarray:
    """Warp the NIfTI ``image`` (in the moving image's space, any grid) onto the fixed grid with ``u``.

    Args:
        image: the file (raw intensities or a label map; not normalised).
        u: ``(n, *S)`` displacement in voxel units of the fixed grid ``S`` (docs/design.md §2).
        affine: ``(4, 4)`` voxel-to-world affine of the fixed grid (mm).
        nearest: nearest-neighbour sampling (label maps) instead of linear.
    Returns:
        ``(*S)`` array: float32 (linear), or the file's dtype (nearest). Outside the image the resampling onto
        the fixed grid reads 0 and the warp repeats the border (:mod:`layers.warp`).
    """
    u = torch.as_tensor(u, dtype=torch.float32)
    if u.dim() not in (3, 4) or u.shape[0] != u.dim() - 1:
        raise ValueError(f"u must be (n, *S) with n = 2 or 3; got shape {tuple(u.shape)}")
    n, shape = u.shape[0], tuple(u.shape[1:])
    aff = np.asarray(affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    ndim = file_ndim(image)
    if ndim != n:
        raise ValueError(f"{image} is a {ndim}D image but the displacement is {n}D")
    src = load_nifti(image, n)
    on_grid = resample_to_grid(src.array, src.affine, shape, aff, nearest=nearest)
    x = torch.from_numpy(np.ascontiguousarray(on_grid))[None, None]
    if nearest:
        if np.issubdtype(on_grid.dtype, np.floating):
            return warp_image(x.float(), u[None], mode="nearest")[0, 0].numpy().astype(on_grid.dtype)
        return warp_labels(x.long(), u[None])[0, 0].numpy().astype(on_grid.dtype)
    return warp_image(x.float(), u[None])[0, 0].numpy()

"""Reading NIfTI volumes with their voxel spacing and affine (nibabel).

One job: turn a ``.nii``/``.nii.gz`` file into an array in array-axis order plus its spacing and affine,
and refuse files whose dimensionality is not the expected one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["NiftiData", "check_finite", "load_nifti", "read_header"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NiftiData:
    """A loaded NIfTI volume.

    Attributes:
        array: ``(*S)`` array in the file's array-axis order and stored dtype (scaling applied if the header
            asks for it).
        spacing: ``(n,)`` float64, mm per voxel along each array axis (the header's pixdim).
        affine: ``(4, 4)`` float64 voxel-to-world affine as stored.
        path: the file.
    """

    array: np.ndarray
    spacing: np.ndarray
    affine: np.ndarray
    path: Path


def load_nifti(path: str | Path, ndim: int = 3) -> NiftiData:
    """Load a NIfTI file that must hold an ``ndim``-dimensional volume.

    Trailing axes of size 1 beyond ``ndim`` are squeezed (``(D, H, W, 1)`` is read as ``(D, H, W)``); any
    other dimensionality (e.g. a 4D series where a 3D volume is expected) raises ``ValueError`` naming the
    file, and so do unreadable voxels (a truncated ``.nii.gz``) and NaN / infinite voxels
    (:func:`check_finite`). A missing file raises ``FileNotFoundError`` with the path.

    Args:
        path: the ``.nii`` / ``.nii.gz`` file.
        ndim: the expected number of spatial dimensions (2 or 3).
    Returns:
        :class:`NiftiData` with ``array`` of shape ``(*S)`` (``len(S) == ndim``),
        ``spacing`` ``(ndim,)`` in mm.
    """
    path = Path(path)
    shape, spacing = read_header(path, ndim)
    try:
        img = nib.load(str(path))
        if img.dataobj.slope not in (None, 1.0) or img.dataobj.inter not in (None, 0.0):
            array = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            array = np.asanyarray(img.dataobj)
        array = np.asarray(array).reshape(shape)
    except Exception as exc:  # truncated .gz (EOFError), short files, bad compression, ...
        raise ValueError(
            f"cannot read the voxels of NIfTI file {path} (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    check_finite(array, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    log.debug("loaded %s shape=%s spacing=%s dtype=%s", path, shape, spacing.tolist(), array.dtype)
    return NiftiData(array=array, spacing=spacing, affine=affine, path=path)


def check_finite(array: np.ndarray, path: str | Path) -> None:
    """Refuse an array with NaN or infinite values (``ValueError`` naming ``path`` and the count): a single one
    would otherwise spoil intensity scaling, features and metrics of the whole image without a word."""
    if np.issubdtype(array.dtype, np.inexact):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ValueError(
                f"NIfTI file {path} holds {bad} non-finite voxel{'s' if bad > 1 else ''} (NaN or Inf) of "
                f"{array.size}; fix or replace them before registration"
            )


def read_header(path: str | Path, ndim: int = 3) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape ``S`` and spacing ``(n,)`` (mm) of a NIfTI file without reading its voxels.

    Same checks as :func:`load_nifti` (missing file, wrong dimensionality).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise ValueError(f"cannot read NIfTI file {path} (truncated, corrupt or not NIfTI?): {exc}") from exc
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > ndim and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != ndim:
        raise ValueError(f"{path}: expected a {ndim}D volume but the file holds shape {tuple(img.shape)}")
    zooms = list(img.header.get_zooms()[:ndim]) + [1.0] * max(0, ndim - len(img.header.get_zooms()))
    spacing = np.asarray([float(z) if z else 1.0 for z in zooms], dtype=np.float64)
    if not np.isfinite(spacing).all():
        raise ValueError(f"{path}: the header's voxel spacing (pixdim) is not finite: {spacing.tolist()}")
    return shape, spacing

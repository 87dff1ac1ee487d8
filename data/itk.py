"""ITK / ANTs displacement fields: the project's field converted to physical units and ITK's LPS frame.

The project's displacement ``u`` ``(n, *S)`` is in voxel units of the fixed grid (channel ``i`` along array
axis ``i``; docs/design.md §2): fixed voxel ``x`` corresponds to the point at voxel position ``x + u(x)`` of the
fixed grid, i.e. to the world point ``A (x + u(x))`` with ``A`` the fixed image's NIfTI voxel-to-world affine
(RAS+, mm). ITK's displacement fields are in **physical units (mm) in the LPS frame**, on the fixed image's
grid: the transform maps the physical point ``p`` to ``p + d(p)``. Hence, per voxel,

    d_RAS = M u,    d_LPS = diag(-1, -1, 1) M u,    M = A[:n, :n] (direction times spacing).

**File layout.** The field is written as ANTs writes its ``*Warp.nii.gz`` files and as ITK reads vector images:
a 5D NIfTI of shape ``(X, Y, Z, 1, 3)`` (``(X, Y, 1, 1, 2)`` in 2D), float32, with the fixed image's affine,
the vectors stored as LPS components, and intent code 1007 (``NIFTI_INTENT_VECTOR``). Not 1006
(``NIFTI_INTENT_DISPVECT``): ITK 5.3 and later read a DISPVECT file's vectors as RAS and negate their first two
components on reading (checked with SimpleITK 2.5 / ITK 5.4), whereas older ITK and ANTs read them as stored,
so a DISPVECT file cannot mean the same to both; a VECTOR file with LPS components does. Use it with
``antsApplyTransforms -t disp_itk.nii.gz`` or SimpleITK's ``DisplacementFieldTransform`` (after casting the
image to ``sitkVectorFloat64``).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .io import displacement_array, write_nifti

__all__ = ["ITK_INTENT", "itk_displacement", "read_itk_displacement", "voxel_displacement", "write_itk_displacement"]

#: NIfTI intent code of the written field (NIFTI_INTENT_VECTOR; see the module docstring)
ITK_INTENT = 1007

_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def _linear_part(affine: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    aff = np.asarray(affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4); got {aff.shape}")
    return aff[:n, :n]


def _field(u: torch.Tensor | np.ndarray) -> np.ndarray:
    return displacement_array(u).astype(np.float64)


def itk_displacement(u: torch.Tensor | np.ndarray, affine: np.ndarray | torch.Tensor) -> np.ndarray:
    """The ITK field of ``u`` ``(n, *S)`` (voxel units, fixed grid) on the fixed grid with NIfTI affine ``affine``
    ``(4, 4)`` -> ``(*S, 1, n)`` float32 (3D: ``(X, Y, Z, 1, 3)``; 2D: ``(X, Y, 1, 1, 2)``), mm, LPS components."""
    arr = _field(u)
    n = arr.shape[0]
    m = _linear_part(affine, n)
    d = np.einsum("ij,j...->...i", m, arr) * _RAS_TO_LPS[:n]  # (*S, n)
    shape = arr.shape[1:] + (1,) * (3 - n) + (1, n)
    return np.ascontiguousarray(d.reshape(shape).astype(np.float32))


def voxel_displacement(d: np.ndarray, affine: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`itk_displacement`: an ITK field ``(*S, 1, n)`` (or ``(*S, n)``; mm, LPS) on the grid of
    ``affine`` -> ``u`` ``(n, *S)`` float32 in voxel units."""
    d = np.asarray(d, dtype=np.float64)
    n = d.shape[-1]
    if n not in (2, 3):
        raise ValueError(f"an ITK displacement has 2 or 3 components in its last axis; got shape {d.shape}")
    spatial = d.shape[:n]
    d = d.reshape(*spatial, n) * _RAS_TO_LPS[:n]
    m_inv = np.linalg.inv(_linear_part(affine, n))
    u = np.einsum("ij,...j->i...", m_inv, d)
    return torch.from_numpy(np.ascontiguousarray(u.astype(np.float32)))


def write_itk_displacement(
    path: str | Path, u: torch.Tensor | np.ndarray, affine: np.ndarray | torch.Tensor
) -> Path:
    """Write :func:`itk_displacement` of ``u`` ``(n, *S)`` (voxel units) with the fixed ``affine`` ``(4, 4)`` to
    ``path`` (atomically; see the module docstring for the layout). Returns ``path``."""
    d = itk_displacement(u, affine)
    if not np.isfinite(d).all():
        raise ValueError(f"displacement for {path} holds non-finite values")
    return write_nifti(path, d, affine, intent=ITK_INTENT)


def read_itk_displacement(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """Read a field written by :func:`write_itk_displacement` -> ``(u (n, *S) voxel units, affine (4, 4))``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ITK displacement file not found: {path}")
    img = nib.load(str(path))
    if len(img.shape) != 5 or img.shape[3] != 1 or img.shape[4] not in (2, 3):
        raise ValueError(f"{path}: an ITK displacement field has shape (X, Y, Z, 1, n); got {img.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    n = img.shape[4]
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if n == 2:
        data = data[:, :, 0]
    return voxel_displacement(data, affine), affine

"""Helpers for the one-pair-from-files tests: a small synthetic 3D pair written as NIfTI files with a
non-trivial affine (an oblique rotation, a flip, anisotropic spacing and an offset)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from data.synthetic import SyntheticPairs

SHAPE = (20, 22, 24)
SPACING = (1.5, 1.0, 2.0)


def oblique_affine(spacing=SPACING) -> np.ndarray:
    """Voxel -> world (RAS, mm): a 30° rotation about z, a flip of the first axis, anisotropic spacing, an
    offset."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([-1.0, 1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = [12.0, -7.5, 30.0]
    return aff


def permuted_grid(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same physical image stored another way: axes permuted (2, 0, 1) and the new first axis flipped.
    Returns ``(array', affine')`` with ``affine' @ idx' == affine @ idx`` for corresponding voxels."""
    s2 = array.shape[2]
    out = np.ascontiguousarray(np.flip(np.transpose(array, (2, 0, 1)), axis=0))
    # out[a, b, c] = array[b, c, s2 - 1 - a]
    m = np.eye(4)
    m[:3, :3] = [[0, 1, 0], [0, 0, 1], [-1, 0, 0]]
    m[:3, 3] = [0, 0, s2 - 1]
    return out, affine @ m


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def synthetic_pair(seed: int = 0, shape=SHAPE, magnitude: float = 0.15) -> dict:
    """A synthetic 3D pair (images in scanner-like units, int16 labels) as numpy arrays."""
    s = SyntheticPairs(1, seed=seed, shape=shape, ndim=3, max_displacement=magnitude, num_keypoints=4)[0]
    return {
        "fixed": (s["fixed"][0].numpy() * 1000).astype(np.float32),
        "moving": (s["moving"][0].numpy() * 1000).astype(np.float32),
        "fixed_label": s["fixed_label"][0].numpy().astype(np.int16),
        "moving_label": s["moving_label"][0].numpy().astype(np.int16),
        "true_disp": s["true_disp"].numpy(),
    }


def write_pair(root: Path, affine: np.ndarray | None = None, seed: int = 0, shape=SHAPE) -> dict[str, Path]:
    """Write ``fixed.nii.gz``, ``moving.nii.gz``, ``fixed_labels.nii.gz``, ``moving_labels.nii.gz`` (one grid)."""
    aff = oblique_affine() if affine is None else affine
    arrays = synthetic_pair(seed, shape)
    return {
        "fixed": save(root / "fixed.nii.gz", arrays["fixed"], aff),
        "moving": save(root / "moving.nii.gz", arrays["moving"], aff),
        "fixed_labels": save(root / "fixed_labels.nii.gz", arrays["fixed_label"], aff),
        "moving_labels": save(root / "moving_labels.nii.gz", arrays["moving_label"], aff),
    }

"""Fixtures for the data tests: a tiny Learn2Reg dataset written to a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHAPE = (6, 7, 8)
SPACING = (1.5, 0.8, 2.0)
LABELS = {"0": "background", "1": "liver", "2": "spleen", "3": "kidney"}


def tiny_affine(spacing=SPACING) -> np.ndarray:
    """An anisotropic affine with an offset (voxel -> mm)."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-10.0, 5.0, 2.5]
    return aff


def write_nifti(path: Path, array: np.ndarray, spacing=SPACING) -> Path:
    """Save ``array`` with an anisotropic affine (pixdim = spacing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, tiny_affine(spacing))
    img.header.set_zooms(tuple(spacing) + (1.0,) * (array.ndim - len(spacing)))
    nib.save(img, str(path))
    return path


def make_learn2reg(
    root: Path,
    n_subjects: int = 6,
    val_cases: tuple[str, ...] = ("0005", "0006"),
    keypoints: bool = True,
    masks: bool = True,
    modality: str = "CT",
    shape=SHAPE,
) -> tuple[Path, dict]:
    """Write a tiny unpaired Learn2Reg task ``Tiny`` to ``root``; returns the JSON path and the raw arrays
    (``arrays[case] = {"image", "label", "mask", "keypoints"}``)."""
    rng = np.random.default_rng(123)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    training = []
    for k in range(1, n_subjects + 1):
        case = f"{k:04d}"
        name = f"Tiny_{case}_0000"
        image = (rng.normal(size=shape) * 100 + 40 * k).astype(np.float32)
        label = rng.integers(0, 4, size=shape).astype(np.int16)
        mask = (rng.random(shape) > 0.3).astype(np.uint8)
        kps = np.round(rng.uniform(0, min(shape) - 1, size=(5, 3)), 2)
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", label)
        if masks:
            write_nifti(root / "masksTr" / f"{name}.nii.gz", mask)
        if keypoints:
            (root / "keypointsTr").mkdir(parents=True, exist_ok=True)
            np.savetxt(root / "keypointsTr" / f"{name}.csv", kps, delimiter=",", fmt="%.2f")
        arrays[case] = {"image": image, "label": label, "mask": mask, "keypoints": kps}
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {
        "name": "Tiny",
        "pairings": "unpaired",
        "modality": {"0": modality},
        "labels": LABELS,
        "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": list(shape)},
        "registration_direction": {"fixed": 0, "moving": 0},
        "numTraining": n_subjects,
        "training": training,
    }
    if val_cases:
        a, b = val_cases
        meta["registration_val"] = [
            {"fixed": f"./imagesTr/Tiny_{a}_0000.nii.gz", "moving": f"./imagesTr/Tiny_{b}_0000.nii.gz"},
            {"fixed": f"./imagesTr/Tiny_{b}_0000.nii.gz", "moving": f"./imagesTr/Tiny_{a}_0000.nii.gz"},
        ]
    json_path = root / "Tiny_dataset.json"
    json_path.write_text(json.dumps(meta, indent=2))
    return json_path, arrays


@pytest.fixture
def tiny_l2r(tmp_path: Path) -> tuple[Path, dict]:
    """``(json_path, arrays)`` of a 6-subject tiny task with val pairs 0005<->0006."""
    return make_learn2reg(tmp_path / "Tiny")

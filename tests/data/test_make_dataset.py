"""data/make_dataset.py: a Learn2Reg JSON from a folder of NIfTI files, read back by the data module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.datamodule import RegistrationDataModule
from data.make_dataset import main, make_dataset

from .nifti_pairs import oblique_affine, save


def write_folder(root: Path, n: int = 6, shape=(8, 9, 10), labels: bool = True) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    for k in range(n):
        name = f"sub-{k:02d}_T1w.nii.gz"
        save(root / "images" / name, rng.normal(size=shape).astype(np.float32) + k, oblique_affine())
        if labels:
            save(root / "labels" / name, rng.integers(0, 3, size=shape).astype(np.uint8), oblique_affine())
    return root / "images", root / "labels"


def test_make_dataset_writes_a_task_the_data_module_reads(tmp_path):
    images, labels = write_folder(tmp_path)
    out = tmp_path / "task" / "Own_dataset.json"
    assert main([str(images), "--labels", str(labels), "--val", "2", "--modality", "CT", "--out", str(out)]) == 0
    task = json.loads(out.read_text())
    assert task["name"] == "Own" and task["modality"] == {"0": "CT"} and task["tensorImageSize"] == {"0": "3D"}
    assert task["labels"] == {"0": "background", "1": "1", "2": "2"}
    assert task["tensorImageShape"] == {"0": [8, 9, 10]}
    assert len(task["training"]) == 6 and all("label" in e for e in task["training"])
    assert task["training"][0]["image"] == "../images/sub-00_T1w.nii.gz"  # relative to the JSON
    assert task["registration_val"] == [
        {"fixed": "../images/sub-04_T1w.nii.gz", "moving": "../images/sub-05_T1w.nii.gz"},
        {"fixed": "../images/sub-05_T1w.nii.gz", "moving": "../images/sub-04_T1w.nii.gz"},
    ]
    dm = RegistrationDataModule(source=str(out), max_pairs=None)
    dm.setup("fit")
    val_ids = {(s["fixed_id"], s["moving_id"]) for s in dm.datasets["val"]}
    assert val_ids == {("sub-04_T1w", "sub-05_T1w"), ("sub-05_T1w", "sub-04_T1w")}
    train = dm.datasets["train"]
    assert len(train) == 4 * 3  # all ordered pairs of the other four subjects
    sample = train[0]
    assert sample["fixed"].shape == (1, 8, 9, 10) and "fixed_label" in sample
    assert not {sample["fixed_id"], sample["moving_id"]} & {"sub-04_T1w", "sub-05_T1w"}
    # an existing JSON is kept unless --overwrite
    assert main([str(images), "--out", str(out)]) == 2
    assert main([str(images), "--out", str(out), "--overwrite", "--val", "0"]) == 0
    assert json.loads(out.read_text())["registration_val"] == []


def test_make_dataset_refusals(tmp_path, capsys):
    images, labels = write_folder(tmp_path, n=3)
    out = tmp_path / "Own_dataset.json"
    with pytest.raises(ValueError, match="--val"):
        make_dataset(images, out, val=2)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_dataset(tmp_path / "nowhere", out)
    other = tmp_path / "other"
    save(other / "x.nii.gz", np.zeros((8, 9, 10), np.uint8), oblique_affine())
    with pytest.raises(ValueError, match="matches an image"):
        make_dataset(images, out, labels=other, val=0)
    bad = tmp_path / "bad"
    save(bad / "sub-00_T1w.nii.gz", np.zeros((4, 4, 4), np.uint8), oblique_affine())
    with pytest.raises(ValueError, match="shape"):
        make_dataset(images, out, labels=bad, val=0)
    save(images / "sub-00_T1w.nii", np.zeros((8, 9, 10), np.float32), oblique_affine())
    with pytest.raises(ValueError, match="unique"):
        make_dataset(images, out, val=0)
    assert main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_make_dataset_reports_mixed_shapes(tmp_path, capsys):
    images, _ = write_folder(tmp_path, n=4, labels=False)
    save(images / "sub-09_T1w.nii.gz", np.zeros((7, 9, 10), np.float32), oblique_affine())
    assert main([str(images), "--out", str(tmp_path / "T_dataset.json"), "--shuffle"]) == 0
    text = capsys.readouterr().out
    assert "target_shape" in text and "no label map" in text
    task = json.loads((tmp_path / "T_dataset.json").read_text())
    assert "tensorImageShape" not in task and task["labels"] == {}

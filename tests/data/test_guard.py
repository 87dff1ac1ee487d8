"""Per-pair guarding of evaluation data (``data/guard.py``), refusal of bad voxels, and safe output files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data.collate import collate_pairs
from data.datamodule import RegistrationDataModule
from data.guard import GuardedDataset, collate_guarded, pair_info
from data.intensity import normalise_intensity
from data.io import (
    atomic_write_bytes,
    check_unique_disp_names,
    read_displacement,
    remove_stale_temporaries,
    write_displacement,
)
from data.learn2reg import Learn2RegDataset
from data.nifti import load_nifti
from data.slices import SliceDataset
from data.synthetic import SyntheticPairs

from .conftest import SHAPE, make_learn2reg, write_nifti


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])


# ------------------------------------------------------------------------------------------ bad voxels
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused_with_file_and_count(tmp_path, value):
    arr = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    arr[1, 2, 3] = value
    arr[0, 0, 0] = value
    path = write_nifti(tmp_path / "img.nii.gz", arr)
    with pytest.raises(ValueError, match=r"holds 2 non-finite voxels") as err:
        load_nifti(path)
    assert str(path) in str(err.value)


def test_integer_images_and_finite_floats_load(tmp_path):
    path = write_nifti(tmp_path / "int.nii.gz", np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE))
    assert load_nifti(path).array.shape == SHAPE


def test_intensity_scaling_refuses_nan_instead_of_zeroing():
    img = np.linspace(0, 1, 27, dtype=np.float32).reshape(3, 3, 3)
    img[1, 1, 1] = np.nan
    for mode in ("ct", "mr", "none"):
        with pytest.raises(ValueError, match="1 non-finite value"):
            normalise_intensity(img, mode)
    assert not normalise_intensity(np.zeros((3, 3)), "none").any()  # a constant image stays all zeros


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02])
def test_truncated_nifti_names_the_file(tmp_path, keep):
    path = write_nifti(tmp_path / "img.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype("f4"))
    _truncate(path, keep)
    with pytest.raises(ValueError, match="truncated") as err:
        load_nifti(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------ guarded dataset
def test_guarded_dataset_turns_a_bad_pair_into_a_failed_sample(tiny_l2r):
    json_path, _ = tiny_l2r
    _truncate(json_path.parent / "imagesTr" / "Tiny_0005_0000.nii.gz")
    ds = GuardedDataset(Learn2RegDataset(json_path, "registration_val"))
    for i in range(len(ds)):
        s = ds[i]
        assert "failed" in s and "Tiny_0005_0000.nii.gz" in s["failed"] and s["failed"].startswith("loading")
        assert (s["fixed_id"], s["moving_id"]) in {("0005", "0006"), ("0006", "0005")}


def test_keyboard_interrupt_is_not_swallowed():
    class Stop(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        GuardedDataset(Stop())[0]


def test_collate_guarded_keeps_good_samples_and_positions():
    ds = SyntheticPairs(3, shape=(16, 16))
    samples = [ds[0], {"fixed_id": "a", "moving_id": "b", "failed": "loading: boom"}, ds[2]]
    batch = collate_guarded(samples)
    assert batch["fixed"].shape[0] == 2 and batch["positions"] == [0, 2]
    assert batch["failed"] == [{"position": 1, "fixed_id": "a", "moving_id": "b", "error": "loading: boom"}]
    assert set(collate_guarded([ds[0], ds[1]])) == set(collate_pairs([ds[0], ds[1]]))  # unchanged without failures
    only = collate_guarded([samples[1]])
    assert "fixed" not in only and len(only["failed"]) == 1
    # samples that cannot be stacked all fail with the reason instead of stopping the run
    other = SyntheticPairs(1, shape=(12, 12))[0]
    mixed = collate_guarded([ds[0], other])
    assert "fixed" not in mixed and all("batching" in f["error"] for f in mixed["failed"])
    mixed = collate_guarded([ds[0], other, samples[1]])
    assert "fixed" not in mixed and len(mixed["failed"]) == 3


def test_pair_info_without_loading(tiny_l2r):
    json_path, _ = tiny_l2r
    ds = Learn2RegDataset(json_path, "registration_val")
    assert pair_info(ds, 0)[:2] == ("0005", "0006") and "registration_val[0]" in pair_info(ds, 0)[2]
    syn = SyntheticPairs(2, shape=(8, 8), stream=2)
    assert pair_info(syn, 1)[:2] == (syn[1]["fixed_id"], syn[1]["moving_id"])
    sl = SliceDataset(SyntheticPairs(1, shape=(8, 8, 8)), indices=[2, 4])
    assert pair_info(sl, 1)[:2] == (sl[1]["fixed_id"], sl[1]["moving_id"])
    assert pair_info(torch.utils.data.Subset(sl, [1]), 0) == pair_info(sl, 1)
    assert pair_info(torch.utils.data.TensorDataset(torch.zeros(2)), 0) is None


def test_slice_listing_survives_a_bad_pair(tiny_l2r):
    json_path, _ = tiny_l2r
    _truncate(json_path.parent / "imagesTr" / "Tiny_0005_0000.nii.gz")
    sl = SliceDataset(Learn2RegDataset(json_path, "training"), axis=0)
    bad = [j for j, (_, s) in enumerate(sl.index) if s < 0]
    assert len(bad) == 10 and len(sl) > len(bad)  # the 10 training pairs with case 0005 each stay as one item
    guarded = GuardedDataset(sl)
    assert "failed" in guarded[bad[0]] and "failed" not in guarded[next(j for j in range(len(sl)) if j not in bad)]


# ------------------------------------------------------------------------------------------ data module
def test_predict_loader_is_guarded_and_check_files_can_be_off(tiny_l2r):
    json_path, _ = tiny_l2r
    (json_path.parent / "imagesTr" / "Tiny_0006_0000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="Tiny_0006_0000"):
        RegistrationDataModule(source=str(json_path)).setup()
    dm = RegistrationDataModule(source=str(json_path), eval_split="val", check_files=False)
    batches = list(dm.predict_dataloader())
    assert all("not found" in f["error"] for b in batches for f in b["failed"])
    assert [e[:2] for e in dm.eval_pairs()] == [("0005", "0006"), ("0006", "0005")]


def test_missing_registration_val_is_named(tmp_path):
    json_path, _ = make_learn2reg(tmp_path / "T", n_subjects=3, val_cases=())
    dm = RegistrationDataModule(source=str(json_path), eval_split="val")
    with pytest.raises(RuntimeError, match="no 'registration_val' key") as err:
        dm.predict_dataloader()
    assert "val_fraction" in str(err.value) and str(json_path) in str(err.value)


# ------------------------------------------------------------------------------------------ output files
def test_disp_names_must_be_unique():
    check_unique_disp_names([("a", "b", "p1"), ("b", "a", "p2")])
    with pytest.raises(ValueError, match=r"disp_a_b.nii.gz <- p1 and p3"):
        check_unique_disp_names([("a", "b", "p1"), ("b", "a", "p2"), ("a", "b", "p3")])


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        p1 = atomic_write_bytes(tmp_path / "a.txt", b"x")
        p2 = write_displacement(tmp_path / "disp" / "d.nii.gz", torch.zeros(2, 4, 4))
    finally:
        os.umask(old)
    for p in (p1, p2):
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask


def test_interrupted_write_leaves_no_nifti_temporary(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_displacement(tmp_path / "d.nii.gz", torch.zeros(2, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_temporaries_never_end_in_nii_gz_and_stale_ones_are_removed(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    u = torch.randn(3, 4, 5, 6)
    torch.testing.assert_close(read_displacement(write_displacement(tmp_path / "d.nii.gz", u)), u)
    assert seen and all(n.startswith(".") and n.endswith(".tmp") for n in seen)
    stale = [tmp_path / ".d.nii.gz.abc.tmp", tmp_path / ".d.nii.gz.xyz.tmp.nii.gz"]
    for s in stale:
        s.write_bytes(b"partial")
    keep = tmp_path / "notes.tmp"
    keep.write_text("mine")
    assert sorted(remove_stale_temporaries([tmp_path, tmp_path / "absent"])) == sorted(stale)
    assert keep.exists() and (tmp_path / "d.nii.gz").exists()


def test_repeated_displacement_writes_are_byte_identical(tmp_path):
    u = torch.randn(2, 6, 7)
    a = write_displacement(tmp_path / "a.nii.gz", u).read_bytes()
    b = write_displacement(tmp_path / "b.nii.gz", u).read_bytes()
    assert a == b


def test_json_named_twice_in_different_folders_gives_the_same_case_id(tiny_l2r):
    json_path, _ = tiny_l2r
    root = json_path.parent
    other = root / "other" / "imagesTr"
    other.mkdir(parents=True)
    (other / "Tiny_0005_0000.nii.gz").write_bytes((root / "imagesTr" / "Tiny_0005_0000.nii.gz").read_bytes())
    meta = json.loads(json_path.read_text())
    meta["registration_val"].append({"fixed": "./other/imagesTr/Tiny_0005_0000.nii.gz",
                                     "moving": "./imagesTr/Tiny_0006_0000.nii.gz"})
    json_path.write_text(json.dumps(meta))
    dm = RegistrationDataModule(source=str(json_path), eval_split="val")
    clash = r"disp_0005_0006.nii.gz <- registration_val\[0\].*and registration_val\[2\]"
    with pytest.raises(ValueError, match=clash):
        check_unique_disp_names(dm.eval_pairs())

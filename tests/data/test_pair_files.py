"""One pair from files (data/pair_files.py): resampling from affines, the sample, warping files, NIfTI writing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from data.io import read_displacement_grid, write_displacement, write_nifti
from data.pair_files import file_ndim, load_file_pair, resample_to_grid, same_grid, warp_file
from layers.warp import warp_image, warp_labels

from .nifti_pairs import SHAPE, oblique_affine, permuted_grid, save, synthetic_pair


def test_resample_to_grid_is_exact_for_a_permuted_flipped_copy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=SHAPE).astype(np.float32)
    lab = rng.integers(0, 5, size=SHAPE).astype(np.int16)
    aff = oblique_affine()
    b, aff_b = permuted_grid(a, aff)
    lb, _ = permuted_grid(lab, aff)
    back = resample_to_grid(b, aff_b, SHAPE, aff)
    assert back.dtype == np.float32 and back.shape == SHAPE
    np.testing.assert_allclose(back, a, atol=1e-5)
    back_lab = resample_to_grid(lb, aff_b, SHAPE, aff, nearest=True)
    assert back_lab.dtype == np.int16 and np.array_equal(back_lab, lab)
    # the same grid: the array itself, no interpolation
    assert resample_to_grid(a, aff, SHAPE, aff) is a
    assert same_grid(SHAPE, aff, SHAPE, aff + 1e-7) and not same_grid(SHAPE, aff, SHAPE, aff + 1e-2)


def test_resample_to_grid_other_spacing_uses_world_coordinates():
    # a linear ramp along world x sampled on two grids of different spacing agrees where both are defined
    aff_a = np.diag([1.0, 1.0, 1.0, 1.0])
    aff_b = np.diag([2.0, 1.0, 1.0, 1.0])
    a = np.broadcast_to(np.arange(16, dtype=np.float32)[:, None, None], (16, 4, 4)).copy()
    b = resample_to_grid(a, aff_a, (8, 4, 4), aff_b)
    np.testing.assert_allclose(b[:, 0, 0], np.arange(0, 16, 2), atol=1e-5)


def test_load_file_pair_resamples_the_moving_side_onto_the_fixed_grid(tmp_path):
    arrays = synthetic_pair()
    aff = oblique_affine()
    mov, aff_m = permuted_grid(arrays["moving"], aff)
    mlab, _ = permuted_grid(arrays["moving_label"], aff)
    f = save(tmp_path / "f.nii.gz", arrays["fixed"], aff)
    m = save(tmp_path / "m.nii.gz", mov, aff_m)
    ml = save(tmp_path / "ml.nii.gz", mlab, aff_m)
    s = load_file_pair(f, m, moving_labels=ml, intensity="none")
    same = load_file_pair(f, save(tmp_path / "m2.nii.gz", arrays["moving"], aff),
                          moving_labels=save(tmp_path / "ml2.nii.gz", arrays["moving_label"], aff), intensity="none")
    assert s["fixed"].shape == s["moving"].shape == (1, *SHAPE)
    torch.testing.assert_close(s["moving"], same["moving"], atol=1e-5, rtol=0)
    assert torch.equal(s["moving_label"], same["moving_label"]) and s["moving_label"].dtype == torch.int64
    torch.testing.assert_close(s["spacing"], torch.tensor([1.5, 1.0, 2.0]))
    assert torch.equal(s["spacing"], s["moving_spacing"])
    np.testing.assert_allclose(s["affine"].numpy(), aff)
    assert s["fixed_id"] == "f" and s["moving_id"] == "m"


def test_load_file_pair_refuses_bad_input_naming_the_file(tmp_path):
    arrays = synthetic_pair()
    aff = oblique_affine()
    f = save(tmp_path / "f.nii.gz", arrays["fixed"], aff)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_file_pair(f, tmp_path / "missing.nii.gz")
    flat = save(tmp_path / "flat.nii.gz", arrays["fixed"][0], aff)
    with pytest.raises(ValueError, match="flat.nii.gz is 2D"):
        load_file_pair(f, flat)
    bad = save(tmp_path / "lab.nii.gz", arrays["moving_label"][:5], aff)
    with pytest.raises(ValueError, match="lab.nii.gz"):
        load_file_pair(f, f, moving_labels=bad)
    series = save(tmp_path / "4d.nii.gz", np.zeros((4, 4, 4, 2), np.float32), aff)
    with pytest.raises(ValueError, match="4d.nii.gz"):
        file_ndim(series)


def test_warp_file_is_the_project_warp_of_the_raw_image(tmp_path):
    arrays = synthetic_pair()
    aff = oblique_affine()
    m = save(tmp_path / "m.nii.gz", arrays["moving"], aff)
    ml = save(tmp_path / "ml.nii.gz", arrays["moving_label"], aff)
    u = torch.from_numpy(arrays["true_disp"]).float()
    w = warp_file(m, u, aff)
    ref = warp_image(torch.from_numpy(arrays["moving"])[None, None], u[None])[0, 0].numpy()
    assert w.dtype == np.float32 and np.array_equal(w, ref)
    wl = warp_file(ml, u, aff, nearest=True)
    ref_l = warp_labels(torch.from_numpy(arrays["moving_label"]).long()[None, None], u[None])[0, 0].numpy()
    assert wl.dtype == np.int16 and np.array_equal(wl, ref_l)
    with pytest.raises(ValueError, match="2D"):
        warp_file(m, u[:2, 0], aff)


def test_write_nifti_and_displacement_grid_round_trip(tmp_path):
    aff = oblique_affine()
    lab = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    p = write_nifti(tmp_path / "x.nii.gz", lab, aff)
    img = nib.load(str(p))
    assert img.get_data_dtype() == np.int32 and np.array_equal(np.asanyarray(img.dataobj), lab)
    np.testing.assert_allclose(img.affine, aff, atol=1e-6)
    assert not list(tmp_path.glob(".*"))  # atomic: no temporary left
    u = torch.randn(3, 4, 5, 6)
    write_displacement(tmp_path / "d.nii.gz", u, aff)
    back, back_aff = read_displacement_grid(tmp_path / "d.nii.gz")
    assert torch.equal(back, u)
    np.testing.assert_allclose(back_aff, aff, atol=1e-6)

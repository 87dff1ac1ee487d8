"""ITK / ANTs displacement export (data/itk.py), checked against SimpleITK when it is installed."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from data.itk import ITK_INTENT, itk_displacement, read_itk_displacement, voxel_displacement, write_itk_displacement
from data.pair_files import warp_file

from .nifti_pairs import SHAPE, oblique_affine, permuted_grid, save, synthetic_pair


def test_itk_field_is_physical_lps_and_round_trips(tmp_path):
    aff = oblique_affine()
    u = torch.zeros(3, *SHAPE)
    u[0] = 1.0  # one voxel along array axis 0
    d = itk_displacement(u, aff)
    assert d.shape == (*SHAPE, 1, 3) and d.dtype == np.float32
    ras = aff[:3, 0]  # the first column of the affine: one voxel step along axis 0, in mm (RAS)
    np.testing.assert_allclose(d[0, 0, 0, 0], ras * [-1, -1, 1], atol=1e-6)
    assert np.linalg.norm(d[0, 0, 0, 0]) == pytest.approx(1.5)  # the axis-0 spacing
    u = torch.randn(3, *SHAPE)
    p = write_itk_displacement(tmp_path / "d.nii.gz", u, aff)
    img = nib.load(str(p))
    assert img.shape == (*SHAPE, 1, 3) and int(img.header["intent_code"]) == ITK_INTENT
    back, back_aff = read_itk_displacement(p)
    torch.testing.assert_close(back, u, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(back_aff, aff, atol=1e-6)
    u2 = torch.randn(2, 5, 6)
    torch.testing.assert_close(voxel_displacement(itk_displacement(u2, aff), aff), u2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moving_grid", ["same", "permuted"])
def test_simpleitk_applies_the_field_as_the_project_warps(tmp_path, moving_grid):
    sitk = pytest.importorskip("SimpleITK")
    arrays = synthetic_pair(magnitude=0.1)
    aff = oblique_affine()
    u = torch.from_numpy(arrays["true_disp"]).float()
    fixed = save(tmp_path / "fixed.nii.gz", arrays["fixed"], aff)
    mov_arr, mov_aff = (arrays["moving"], aff) if moving_grid == "same" else permuted_grid(arrays["moving"], aff)
    moving = save(tmp_path / "moving.nii.gz", mov_arr, mov_aff)
    ours = warp_file(moving, u, aff)
    field = write_itk_displacement(tmp_path / "disp_itk.nii.gz", u, aff)

    ref = sitk.ReadImage(str(fixed))
    disp = sitk.ReadImage(str(field), sitk.sitkVectorFloat64)
    assert disp.GetSize() == ref.GetSize()
    np.testing.assert_allclose(disp.GetDirection(), ref.GetDirection(), atol=1e-6)
    transform = sitk.DisplacementFieldTransform(disp)
    itk_out = sitk.Resample(sitk.ReadImage(str(moving), sitk.sitkFloat64), ref, transform, sitk.sitkLinear, 0.0)
    theirs = np.transpose(sitk.GetArrayFromImage(itk_out), (2, 1, 0))  # ITK arrays are (z, y, x)
    # compare where x + u(x) lies inside the moving image (ITK pads with 0 there, the project repeats the border)
    pos = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")) + arrays["true_disp"]
    inside = np.all([(pos[i] > 0.01) & (pos[i] < SHAPE[i] - 1.01) for i in range(3)], axis=0)
    assert inside.mean() > 0.7
    scale = np.abs(arrays["moving"]).max()
    np.testing.assert_allclose(theirs[inside] / scale, ours[inside] / scale, atol=1e-4)
    # and the field is not trivial: without it ITK would give a different image
    assert np.abs(arrays["moving"] - ours)[inside].max() / scale > 0.1

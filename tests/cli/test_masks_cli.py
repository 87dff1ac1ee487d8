"""eval.py --fixed-mask / --moving-mask on a pair from files: a mask file turns the method's ``use_masks`` on
(an all-ones mask gives the unmasked field, a partial one changes it), ``--method-arg use_masks=false`` turns it
off, and the fixed mask restricts the Jacobian metrics."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

import eval as eval_cli
from data.io import read_displacement
from tests.data.nifti_pairs import SHAPE, oblique_affine, save, write_pair

pytestmark = pytest.mark.filterwarnings("ignore")


def test_mask_files_restrict_the_similarity_terms(tmp_path):
    paths = write_pair(tmp_path)
    affine = oblique_affine()
    ones = save(tmp_path / "ones.nii.gz", np.ones(SHAPE, np.uint8), affine)
    part = np.ones(SHAPE, np.uint8)
    part[SHAPE[0] // 2:] = 0
    half = save(tmp_path / "half.nii.gz", part, affine)
    base = ["--method", "gn", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--figures", "0"]

    def field(name: str, *extra: str) -> torch.Tensor:
        out = tmp_path / name
        assert eval_cli.cli([*base, *extra, "--out", str(out)]) == 0
        return read_displacement(out / "disp.nii.gz")

    plain = field("plain")
    assert plain.abs().max() > 0.1
    torch.testing.assert_close(field("ones", "--fixed-mask", str(ones), "--moving-mask", str(ones)), plain,
                               rtol=0, atol=1e-5)
    masked = field("half", "--fixed-mask", str(half))
    assert (masked - plain).abs().max() > 1e-2
    assert torch.equal(field("off", "--fixed-mask", str(half), "--method-arg", "use_masks=false"), plain)
    # the fixed mask also restricts SDlogJ (docs/design.md §7): the same field measured over the whole image differs
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text())["metrics"] for name in ("off", "plain")}
    assert metrics["off"]["sdlogj"] != metrics["plain"]["sdlogj"]
    assert nib.load(str(tmp_path / "half" / "disp.nii.gz")).shape == (*SHAPE, 3)

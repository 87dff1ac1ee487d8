"""eval.py on one pair of files (--fixed/--moving), --apply and --deterministic: the README's commands as written,
outputs, exact re-application, equality with the dataset-JSON path, refusals and exit codes."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import eval as eval_cli
from data.io import read_displacement
from tests.data.nifti_pairs import oblique_affine, save, synthetic_pair, write_pair

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[2]


def readme_commands(heading: str) -> list[str]:
    """The commands of the first ``bash`` block after ``heading`` in the README (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    block = text[text.index("```bash\n", start) + len("```bash\n"):]
    block = block[: block.index("```")]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_readme_pair_commands_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_pair(tmp_path)
    commands = [c for c in readme_commands("## Registering two images from files") if c.startswith("python eval.py")]
    assert len(commands) == 3
    for command in commands:
        assert eval_cli.cli(shlex.split(command)[2:]) == 0, command
    out = tmp_path / "runs" / "pair"
    assert {p.name for p in out.iterdir()} == {"warped.nii.gz", "warped_labels.nii.gz", "disp.nii.gz",
                                               "disp_itk.nii.gz", "metrics.json", "figure.png",
                                               "labels_again.nii.gz", "moving_again.nii.gz"}
    fixed = nib.load(str(tmp_path / "fixed.nii.gz"))
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "disp.nii.gz"):
        img = nib.load(str(out / name))
        assert img.shape[:3] == fixed.shape, name
        np.testing.assert_allclose(img.affine, fixed.affine, atol=1e-6)
    assert nib.load(str(out / "disp.nii.gz")).shape == (*fixed.shape, 3)
    assert nib.load(str(out / "disp_itk.nii.gz")).shape == (*fixed.shape, 1, 3)
    # --apply reproduces what the registration wrote, bit for bit
    assert np.array_equal(_array(out / "labels_again.nii.gz"), _array(out / "warped_labels.nii.gz"))
    assert _array(out / "warped_labels.nii.gz").dtype == np.int16
    assert np.array_equal(_array(out / "moving_again.nii.gz"), _array(out / "warped.nii.gz"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["n_failed"] == 0 and metrics["method"] == "gn"
    assert metrics["metrics"]["dice"] >= metrics["initial"]["dice"] - 0.01
    assert "dice:" in capsys.readouterr().out
    # the ITK field, applied by SimpleITK, gives the registration's warped image
    sitk = pytest.importorskip("SimpleITK")
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / "disp_itk.nii.gz"), sitk.sitkVectorFloat64))
    ref = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"))
    res = sitk.Resample(sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat64), ref, transform,
                        sitk.sitkLinear, 0.0)
    theirs = np.transpose(sitk.GetArrayFromImage(res), (2, 1, 0))
    ours = _array(out / "warped.nii.gz")
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(theirs[inner], ours[inner], atol=1e-3 * np.abs(ours).max())


def _json_task(root: Path, paths: dict[str, Path]) -> Path:
    task = {
        "name": "Pair", "tensorImageSize": {"0": "3D"}, "modality": {"0": "MR"},
        "labels": {"0": "background", "1": "a"},
        "training": [{"image": str(paths["fixed"].relative_to(root)),
                      "label": str(paths["fixed_labels"].relative_to(root))},
                     {"image": str(paths["moving"].relative_to(root)),
                      "label": str(paths["moving_labels"].relative_to(root))}],
        "registration_val": [{"fixed": str(paths["fixed"].relative_to(root)),
                              "moving": str(paths["moving"].relative_to(root))}],
    }
    path = root / "Pair_dataset.json"
    path.write_text(json.dumps(task))
    return path


def test_pair_from_files_gives_the_field_of_the_dataset_path(tmp_path):
    paths = write_pair(tmp_path)
    dataset = _json_task(tmp_path, paths)
    assert eval_cli.cli(["--method", "gn", "--data", str(dataset), "--split", "val", "--out", str(tmp_path / "ds"),
                         "--figures", "0"]) == 0
    assert eval_cli.cli(["--method", "gn", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
                         "--intensity", "mr", "--out", str(tmp_path / "pair")]) == 0
    u_ds = read_displacement(tmp_path / "ds" / "disp" / "disp_fixed_moving.nii.gz")
    u_pair = read_displacement(tmp_path / "pair" / "disp.nii.gz")
    assert u_pair.abs().max() > 0.1
    assert torch.equal(u_ds, u_pair)


def test_deterministic_runs_are_bit_identical(tmp_path):
    paths = write_pair(tmp_path)
    files = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert eval_cli.cli(["--method", "adam", "--method-arg", "iterations=15", "--fixed", str(paths["fixed"]),
                             "--moving", str(paths["moving"]), "--deterministic", "--seed", "3", "--figures", "0",
                             "--out", str(out)]) == 0
        files.append({n: (out / n).read_bytes() for n in ("disp.nii.gz", "disp_itk.nii.gz", "warped.nii.gz")})
    assert files[0] == files[1]
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_pair_refusals_and_exit_codes(tmp_path, capsys):
    paths = write_pair(tmp_path)
    base = ["--method", "gn", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"])]
    # a missing input file: refused before registration, named
    assert eval_cli.cli(["--method", "gn", "--fixed", str(paths["fixed"]), "--moving", str(tmp_path / "nope.nii.gz"),
                         "--out", str(tmp_path / "o")]) == 2
    assert "nope.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "o" / "disp.nii.gz").exists()
    # an earlier result is kept unless --overwrite
    assert eval_cli.cli([*base, "--out", str(tmp_path / "o"), "--figures", "0"]) == 0
    assert eval_cli.cli([*base, "--out", str(tmp_path / "o")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert eval_cli.cli([*base, "--out", str(tmp_path / "o"), "--overwrite", "--figures", "0"]) == 0
    # options of one mode in another
    assert eval_cli.cli([*base, "--data", "synthetic3d", "--out", str(tmp_path / "p")]) == 2
    assert eval_cli.cli(["--method", "gn", "--moving-labels", str(paths["moving_labels"]), "--out",
                         str(tmp_path / "q")]) == 2
    assert "--moving-labels" in capsys.readouterr().err
    assert eval_cli.cli(["--method", "gn", "--fixed", str(paths["fixed"]), "--out", str(tmp_path / "q")]) == 2
    # --apply: missing companions, an existing output, a non-displacement file, a 2D image
    disp = tmp_path / "o" / "disp.nii.gz"
    assert eval_cli.cli(["--apply", str(disp), "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert eval_cli.cli(["--apply", str(disp), "--image", str(paths["moving"]), "--out",
                         str(tmp_path / "o" / "warped.nii.gz")]) == 2
    assert eval_cli.cli(["--apply", str(paths["moving"]), "--image", str(paths["moving"]), "--out",
                         str(tmp_path / "x.nii.gz")]) == 2
    assert "moving.nii.gz" in capsys.readouterr().err
    flat = save(tmp_path / "flat.nii.gz", np.zeros((20, 22), np.float32), oblique_affine())
    assert eval_cli.cli(["--apply", str(disp), "--image", str(flat), "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "2D" in capsys.readouterr().err


def test_a_failing_registration_exits_4_with_its_error(tmp_path, capsys):
    paths = write_pair(tmp_path)
    out = tmp_path / "o"
    # ConvexAdam's displacement window does not fit a 20-voxel image: the pair fails, the run reports it
    assert eval_cli.cli(["--method", "convexadam", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
                         "--out", str(out)]) == 4
    assert "disp_hw" in capsys.readouterr().err
    assert not (out / "disp.nii.gz").exists()


def test_moving_image_on_another_grid(tmp_path):
    """A moving image stored with other axes, flips and spacing is resampled onto the fixed grid; outputs are
    on the fixed grid and --apply reproduces them."""
    arrays = synthetic_pair()
    aff = oblique_affine()
    fixed = save(tmp_path / "fixed.nii.gz", arrays["fixed"], aff)
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = aff[:3, 3] - 3.0
    moving = save(tmp_path / "moving.nii.gz", arrays["moving"][::2, ::2, ::2].copy(), coarse)
    out = tmp_path / "o"
    assert eval_cli.cli(["--method", "identity", "--fixed", str(fixed), "--moving", str(moving), "--out", str(out),
                         "--figures", "0"]) == 0
    assert nib.load(str(out / "warped.nii.gz")).shape == arrays["fixed"].shape
    assert eval_cli.cli(["--apply", str(out / "disp.nii.gz"), "--image", str(moving), "--out",
                         str(tmp_path / "again.nii.gz")]) == 0
    assert np.array_equal(_array(tmp_path / "again.nii.gz"), _array(out / "warped.nii.gz"))


def test_affine_prealignment_from_files_and_on_a_dataset(tmp_path):
    from tests.layers.test_affine import affine_pair

    pair = affine_pair(deform=True)  # a known affine map (15°-20° rotation, scaling, shift) plus a deformation
    aff = oblique_affine()
    files = {k: save(tmp_path / f"{k}.nii.gz", pair[k][0, 0].numpy().astype(np.float32 if "label" not in k
                                                                               else np.int16), aff)
             for k in ("fixed", "moving", "fixed_label", "moving_label")}
    dice = {}
    for flag in ([], ["--affine"]):
        out = tmp_path / ("affine" if flag else "plain")
        assert eval_cli.cli(["--method", "gn", *flag, "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
                             "--fixed-labels", str(files["fixed_label"]), "--moving-labels", str(files["moving_label"]),
                             "--figures", "0", "--out", str(out)]) == 0
        dice[bool(flag)] = json.loads((out / "metrics.json").read_text())["metrics"]["dice"]
    assert dice[True] > dice[False] + 0.05 and dice[True] > 0.85
    out = tmp_path / "affine"
    assert eval_cli.cli(["--apply", str(out / "disp.nii.gz"), "--image", str(files["moving_label"]), "--nearest",
                         "--out", str(tmp_path / "again.nii.gz")]) == 0
    assert np.array_equal(_array(tmp_path / "again.nii.gz"), _array(out / "warped_labels.nii.gz"))
    # dataset mode: the pre-alignment wraps any method
    assert eval_cli.cli(["--method", "identity", "--affine", "--data", "synthetic2d", "--data-arg",
                         "synthetic_shape=[32, 32]", "--data-arg", "num_test=2", "--figures", "0",
                         "--out", str(tmp_path / "ds")]) == 0
    summary = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert summary["n_failed"] == 0
    fields = [read_displacement(f) for f in sorted((tmp_path / "ds" / "disp").glob("*.nii.gz"))]
    assert len(fields) == 2 and all(u.abs().max() > 0.05 for u in fields)  # identity alone would write zeros

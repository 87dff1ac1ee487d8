"""The README's own-data guide, run as written on a small folder of synthetic NIfTI files (training shortened by
extra overrides appended to the command)."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

import eval as eval_cli
import train
from data import make_dataset
from data.synthetic import SyntheticPairs
from tests.data.nifti_pairs import oblique_affine, save

from .test_pair_cli import ROOT, readme_commands

pytestmark = pytest.mark.filterwarnings("ignore")

#: appended to the README's training command: one short epoch on the CPU
QUICK_FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
             "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.batch_size", "1",
             "--trainer.num_sanity_val_steps", "0"]


def test_readme_own_data_commands_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the commands run from the repository root
    pairs = SyntheticPairs(3, seed=5, shape=(32, 32, 32), ndim=3, num_keypoints=4)
    for k in range(6):
        s = pairs[k // 2]
        key = "fixed" if k % 2 == 0 else "moving"
        save(tmp_path / "my_images" / f"case{k}.nii.gz", (s[key][0].numpy() * 800).astype(np.float32),
             oblique_affine())
        save(tmp_path / "my_labels" / f"case{k}.nii.gz", s[f"{key}_label"][0].numpy().astype(np.uint8),
             oblique_affine())
    commands = readme_commands("## Training on your own data")
    assert [c.split()[:3] for c in commands] == [
        ["python", "-m", "data.make_dataset"], ["python", "eval.py", "--method"], ["python", "train.py", "fit"],
        ["python", "eval.py", "--method"], ["python", "eval.py", "--compare"]]
    for command in commands:
        argv = shlex.split(command)
        if argv[1] == "-m":
            assert make_dataset.main(argv[3:]) == 0, command
        elif argv[1] == "train.py":
            assert train.cli(argv[2:] + QUICK_FIT) == 0, command
        else:
            assert eval_cli.cli(argv[2:]) == 0, command
    for method in ("gn", "learngn"):
        summary = json.loads((tmp_path / "runs" / "own" / method / "summary.json").read_text())
        assert summary["n_pairs"] == 4 and summary["n_failed"] == 0, method  # --val 4: four cyclic pairs
        assert summary["metrics"]["dice"] > 0.3

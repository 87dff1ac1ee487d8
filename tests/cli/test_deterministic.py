"""Reproducibility: ``trainer.deterministic`` in a training config and ``eval.py --deterministic`` on a dataset
give bit-identical results run after run (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import eval as eval_cli
import train

from .test_train_eval import TINY

pytestmark = pytest.mark.filterwarnings("ignore")


def _fit(root: Path) -> dict[str, torch.Tensor]:
    train.main(["fit", *TINY, "--trainer.deterministic", "true", "--seed_everything", "7",
                "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.default_root_dir", str(root),
                "--checkpoint.dirpath", str(root / "ckpt")])
    ckpt = torch.load(root / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]


def test_deterministic_training_is_bit_identical(tmp_path):
    try:
        first, second = _fit(tmp_path / "a"), _fit(tmp_path / "b")
    finally:  # Lightning turns deterministic algorithms on for the process; leave the suite as it was
        torch.use_deterministic_algorithms(False)
    assert first.keys() == second.keys() and first
    for k, v in first.items():
        assert torch.equal(v, second[k]), k


def test_deterministic_dataset_evaluation_is_bit_identical(tmp_path):
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert eval_cli.cli(["--method", "adam", "--method-arg", "iterations=10", "--data", "synthetic2d",
                             "--data-arg", "synthetic_shape=[32, 32]", "--data-arg", "num_test=2", "--figures", "0",
                             "--deterministic", "--accelerator", "cpu", "--out", str(out)]) == 0
        outs.append({p.name: p.read_bytes() for p in sorted((out / "disp").glob("*.nii.gz"))})
    assert len(outs[0]) == 2 and outs[0] == outs[1]
    assert not torch.are_deterministic_algorithms_enabled()

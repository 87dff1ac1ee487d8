"""GPU: ``train.py fit`` and ``eval.py`` on CUDA, end to end on tiny synthetic 2D data.

Marked ``gpu``: skips cleanly without CUDA. The GN solves take the default backend there (cupy when it is
installed, the torch backend otherwise); which one ran is recorded and checked.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import train

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore")]

gn_module = importlib.import_module("layers.gn")
REAL_SOLVE = importlib.import_module("layers.gn_solve").gn_solve  # never patched

TINY = [
    "--model.class_path", "lightning_modules.learngn.LearnGN",
    "--model.init_args.features", "mind",
    "--model.init_args.iterations", "2",
    "--model.init_args.hidden", "2",
    "--model.init_args.lr", "0.01",
    "--data.source", "synthetic2d",
    "--data.synthetic_shape", "[32, 32]",
    "--data.num_train", "4",
    "--data.num_val", "2",
    "--data.num_test", "2",
    "--data.batch_size", "2",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.logger", "false",
    "--trainer.max_epochs", "1",
]


def record_backends(monkeypatch) -> set:
    """Record the backend of every GN solve made through :mod:`layers.gn` from now on."""
    seen = set()

    def recording_solve(*args, **kwargs):
        x, info = REAL_SOLVE(*args, return_info=True, **kwargs)
        seen.add((info.backend, str(x.device.type)))
        return x

    monkeypatch.setattr(gn_module, "gn_solve", recording_solve)
    return seen


def fit_then_eval(root: Path, accelerator: str, monkeypatch) -> tuple[dict, float, dict, set]:
    """Fit one epoch, evaluate the last checkpoint on the val split with ``eval.py``; returns the raw checkpoint,
    the validation Dice logged by the fit, the evaluation summary and the ``(backend, device)`` of every GN solve
    that ran (fit and evaluation)."""
    seen = record_backends(monkeypatch)
    train.main(["fit", *TINY, "--trainer.accelerator", accelerator, "--trainer.devices", "1",
                "--trainer.default_root_dir", str(root), "--checkpoint.dirpath", str(root / "ckpt")])
    ckpt_path = root / "ckpt" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    val_dice = [v for k, v in ckpt["callbacks"].items() if "ModelCheckpoint" in k][0]["current_score"]
    out = root / "eval"
    summary = eval_cli.main(["--method", "learngn", "--ckpt", str(ckpt_path), "--split", "val", "--out", str(out),
                             "--figures", "1", "--accelerator", accelerator, "--devices", "1"])
    return ckpt, float(val_dice), summary, seen


def check_outputs(out: Path, summary: dict, n_pairs: int) -> None:
    """The evaluation output contract (docs/design.md §9) with every pair registered."""
    data = json.loads((out / "summary.json").read_text())
    assert data["n_pairs"] == n_pairs and data["n_failed"] == 0, data
    assert summary["n_failed"] == 0
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert len(rows) == n_pairs and all(r["status"] == "ok" or not r["error"] for r in rows), rows
    for name in ("dice", "sdlogj", "seconds"):
        assert math.isfinite(data["metrics"][name]), (name, data["metrics"])


def test_fit_and_eval_on_gpu(tmp_path, monkeypatch):
    """One epoch of ``train.py fit`` on the GPU (weights saved from CUDA, solves on CUDA with the default
    backend), then ``eval.py --accelerator gpu`` on the checkpoint reproduces the validation Dice of the fit."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA unavailable")
    ckpt, val_dice, summary, seen = fit_then_eval(tmp_path, "gpu", monkeypatch)
    assert ckpt["global_step"] == 2  # 4 training pairs in batches of 2
    assert seen == {("graph", "cuda")}, seen
    check_outputs(tmp_path / "eval", summary, n_pairs=2)
    assert len(list((tmp_path / "eval" / "disp").glob("disp_*.nii.gz"))) == 2
    # same weights, same device, same (deterministic) forward computations as the fit's validation loop
    assert summary["metrics"]["dice"] == pytest.approx(val_dice, abs=1e-5)


def test_eval_baseline_on_gpu(tmp_path, monkeypatch):
    """``eval.py`` with a baseline (handcrafted GN) on the GPU: every pair registered on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA unavailable")
    seen = record_backends(monkeypatch)
    out = tmp_path / "gn"
    summary = eval_cli.main(["--method", "gn", "--data", "synthetic2d", "--data-arg", "synthetic_shape=[32,32]",
                             "--data-arg", "num_test=2", "--split", "test", "--figures", "0", "--out", str(out),
                             "--accelerator", "gpu", "--devices", "1"])
    check_outputs(out, summary, n_pairs=2)
    assert seen and {device for _, device in seen} == {"cuda"}, seen

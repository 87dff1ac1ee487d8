"""The shipped Hippocampus LearnGN: it loads safely, is small, is the untrained-equals-handcrafted design with
learned semantic channels, and the README's command registers two real Hippocampus files with it (skipped when
``../shared/data/Hippocampus`` is absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import eval as eval_cli
from data.checkpoint import model_from_checkpoint
from lightning_modules.learngn import LearnGN

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "checkpoints" / "hippocampus_learngn.ckpt"
HIPPO = (Path(os.environ["L2O_SHARED_DATA"]) if os.environ.get("L2O_SHARED_DATA")
         else ROOT.parent / "shared" / "data") / "Hippocampus"


def test_shipped_checkpoint_is_small_and_loads_without_code():
    assert CKPT.stat().st_size < 5 * 2**20
    model, ckpt = model_from_checkpoint(CKPT, base=LearnGN)
    assert "optimizer_states" not in ckpt
    assert model.hparams.semantic and list(model.hparams.label_ids) == [1, 2]
    assert (model.semantic_weight > 0).all()  # the semantic channels were learned into use
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 32, 32, 32, generator=g)
    batch = {"fixed": image, "moving": torch.roll(image, 1, dims=2)}
    with torch.no_grad():
        u = model.register(batch)
    assert u.shape == (1, 3, 32, 32, 32) and torch.isfinite(u).all()


@pytest.mark.skipif(not HIPPO.is_dir(), reason=f"{HIPPO} not found (real data lives outside the repository)")
def test_shipped_model_registers_two_hippocampus_files(tmp_path):
    pair = json.loads((HIPPO / "Hippocampus_dataset.json").read_text())["registration_val"][0]
    files = {k: HIPPO / pair[k].lstrip("./") for k in ("fixed", "moving")}
    labels = {k: Path(str(v).replace("imagesTr", "labelsTr")) for k, v in files.items()}
    out = tmp_path / "pair"
    status = eval_cli.main(["--method", "learngn", "--ckpt", str(CKPT), "--fixed", str(files["fixed"]),
                            "--moving", str(files["moving"]), "--fixed-labels", str(labels["fixed"]),
                            "--moving-labels", str(labels["moving"]), "--out", str(out), "--threads", "1"])
    assert status in (None, 0) or isinstance(status, dict)
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "disp.nii.gz", "disp_itk.nii.gz"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["metrics"]["dice"] > metrics["initial"]["dice"] + 0.05, metrics

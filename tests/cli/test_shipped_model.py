"""The shipped Hippocampus LearnGN models (10 GN iterations, and the 5-iteration one): they load safely, are
small, are the untrained-equals-handcrafted design with learned semantic channels, and the README's commands
register two real Hippocampus files with them, alone, with the U-Net in bfloat16, and refined by Adam with the
model's segmentations (skipped when ``../shared/data/Hippocampus`` is absent)."""

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
FAST = ROOT / "checkpoints" / "hippocampus_learngn_fast.ckpt"
HIPPO = (Path(os.environ["L2O_SHARED_DATA"]) if os.environ.get("L2O_SHARED_DATA")
         else ROOT.parent / "shared" / "data") / "Hippocampus"


@pytest.mark.parametrize("path,iterations", [(CKPT, 10), (FAST, 5)], ids=["shipped", "fast"])
def test_shipped_checkpoint_is_small_and_loads_without_code(path, iterations):
    assert path.stat().st_size < 5 * 2**20
    model, ckpt = model_from_checkpoint(path, base=LearnGN)
    assert "optimizer_states" not in ckpt
    assert model.hparams.semantic and list(model.hparams.label_ids) == [1, 2]
    assert model.gn.iterations == iterations
    assert (model.semantic_weight > 0).all()  # the semantic channels were learned into use
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 32, 32, 32, generator=g)
    batch = {"fixed": image, "moving": torch.roll(image, 1, dims=2)}
    with torch.no_grad():
        u = model.register(batch)
    assert u.shape == (1, 3, 32, 32, 32) and torch.isfinite(u).all()


@pytest.mark.skipif(not HIPPO.is_dir(), reason=f"{HIPPO} not found (real data lives outside the repository)")
@pytest.mark.parametrize("method", [
    ["--method", "learngn", "--ckpt", str(CKPT), "--lam", "1.2"],
    ["--method", "learngn", "--ckpt", str(FAST), "--lam", "2.4", "--method-arg", "semantic_precision=bf16"],
    ["--method", "adam", "--method-config", str(ROOT / "configs/baselines/learngn_adam_semantic.yaml"),
     "--init-ckpt", str(CKPT), "--lam", "1.2"],
], ids=["shipped", "fast_bf16", "refined"])
def test_shipped_model_registers_two_hippocampus_files(tmp_path, method):
    pair = json.loads((HIPPO / "Hippocampus_dataset.json").read_text())["registration_val"][0]
    files = {k: HIPPO / pair[k].lstrip("./") for k in ("fixed", "moving")}
    labels = {k: Path(str(v).replace("imagesTr", "labelsTr")) for k, v in files.items()}
    out = tmp_path / "pair"
    status = eval_cli.main([*method, "--fixed", str(files["fixed"]),
                            "--moving", str(files["moving"]), "--fixed-labels", str(labels["fixed"]),
                            "--moving-labels", str(labels["moving"]), "--out", str(out), "--threads", "1"])
    assert status in (None, 0) or isinstance(status, dict)
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "disp.nii.gz", "disp_itk.nii.gz"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["metrics"]["dice"] > metrics["initial"]["dice"] + 0.05, metrics

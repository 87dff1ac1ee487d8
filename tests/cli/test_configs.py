"""Every training recipe in configs/ parses and instantiates through the LightningCLI of train.py."""

from pathlib import Path

import pytest
import torch
import yaml

import train
from data.checkpoint import qualname

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "model" in (yaml.safe_load(p.read_text()) or {}))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"synthetic2d_quick.yaml", "synthetic3d.yaml", "brainpair_slices2d.yaml", "nlst3d.yaml",
            "abdomenctct3d.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_instantiates(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # loggers and checkpoints would go to runs/ under the working directory
    extra = []
    init_from = ((yaml.safe_load(recipe.read_text())["model"] or {}).get("init_args") or {}).get("init_from")
    if init_from and not Path(init_from).is_absolute():  # a repository path, as run from the repository root
        path = ROOT / init_from
        if not path.exists():
            # the output of an earlier stage (e.g. runs/<stage 1>/checkpoints/last.ckpt), absent from a fresh
            # clone: stand in a checkpoint of the same model, so that the weights are still loaded through init_from
            base = train.main(["-c", str(recipe), "--model.init_args.init_from", "null"], run=False).model
            path = tmp_path / "stage1.ckpt"
            torch.save({"state_dict": base.state_dict(), "hyper_parameters": dict(base.hparams),
                        "model_class": qualname(base)}, path)
        extra = ["--model.init_args.init_from", str(path)]
    cli = train.main(["-c", str(recipe), *extra], run=False)
    assert cli.model.hparams is not None
    assert cli.datamodule is not None


BASELINE_CONFIGS = sorted((ROOT / "configs" / "baselines").glob("*.yaml"))


@pytest.mark.parametrize("config", BASELINE_CONFIGS, ids=lambda p: p.name)
def test_baseline_config_instantiates(config):
    # the way eval.py reads --method-config: the init_args (or the whole mapping) are the method's arguments
    from lightning_modules.baselines import make_baseline

    cfg = yaml.safe_load(config.read_text()) or {}
    args = dict(cfg.get("init_args", cfg))
    class_name = cfg.get("class_path", "").rsplit(".", 1)[-1]
    names = {"HandcraftedGN": "gn", "AdamIO": "adam", "ConvexAdam": "convexadam", "Identity": "identity"}
    assert class_name in names, f"{config.name}: unexpected class_path {cfg.get('class_path')!r}"
    model = make_baseline(names[class_name], **args)
    assert type(model).__name__ == class_name

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


def _stage_outputs() -> dict[str, Path]:
    """``<checkpoint.dirpath>/last.ckpt`` of each recipe (repository-relative) -> the recipe that writes it."""
    out = {}
    for recipe in RECIPES:
        dirpath = (yaml.safe_load(recipe.read_text()).get("checkpoint") or {}).get("dirpath")
        if dirpath:
            out[f"{dirpath}/last.ckpt"] = recipe
    return out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_instantiates(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # loggers and checkpoints would go to runs/ under the working directory
    extra = []
    init_from = ((yaml.safe_load(recipe.read_text())["model"] or {}).get("init_args") or {}).get("init_from")
    if init_from and not Path(init_from).is_absolute():  # a repository path, as run from the repository root
        producer = _stage_outputs().get(init_from)
        if producer is not None:
            # the output of an earlier stage (runs/<stage>/checkpoints/last.ckpt): never the local run's file, but a
            # checkpoint of the model that recipe builds, loaded through init_from (so the stages must fit)
            base = train.main(["-c", str(producer), "--model.init_args.init_from", "null"], run=False).model
            path = tmp_path / "stage.ckpt"
            torch.save({"state_dict": base.state_dict(), "hyper_parameters": dict(base.hparams),
                        "model_class": qualname(base)}, path)
        else:
            path = ROOT / init_from
            assert path.is_file(), f"{recipe.name}: init_from {init_from} is no repository file and no recipe's output"
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

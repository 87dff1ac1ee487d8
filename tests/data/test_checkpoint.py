"""The one checkpoint loader: no code runs from a file a user hands over, a recorded class is imported only from
the project's packages, and every failure names the file."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch

from data.checkpoint import (
    CheckpointError,
    checkpoint_class,
    import_project_class,
    load_checkpoint,
    model_from_checkpoint,
    require_state_dict,
)
from lightning_modules.baselines import HandcraftedGN
from lightning_modules.learngn import LearnGN

GN = dict(spatial_dims=2, features="mind", iterations=1, hidden=2)


class Payload:
    """Unpickling this would create ``marker`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A checkpoint-looking file whose unpickling would run ``open(marker, "w")``."""
    obj = {"state_dict": {}, "model_class": "lightning_modules.learngn.LearnGN", "payload": Payload(marker)}
    if legacy:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    else:
        torch.save(obj, path)
    return path


def saved_model(path: Path, model: torch.nn.Module, **extra) -> Path:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}", **extra}, path)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_crafted_pickle_is_refused_without_running_it(tmp_path, legacy):
    marker = tmp_path / "MARKER"
    path = crafted(tmp_path / "evil.ckpt", marker, legacy)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_checkpoint(path, what="--ckpt")
    assert str(path) in str(err.value) and "--ckpt" in str(err.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        model_from_checkpoint(path, base=LearnGN)
    assert not marker.exists()


def test_crafted_pickle_as_init_from_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    path = crafted(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="init_from .*evil.ckpt was refused"):
        LearnGN(**GN, init_from=str(path))
    assert not marker.exists()


def test_plain_data_and_paths_load(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"root": Path("/data/x"), "n": (1, 2)}},
               path)
    ckpt = load_checkpoint(path)
    assert ckpt["hyper_parameters"]["root"] == Path("/data/x") and ckpt["hyper_parameters"]["n"] == (1, 2)
    torch.testing.assert_close(ckpt["state_dict"]["w"], torch.ones(2))
    # the path class is allowed only during the project's loads, not process-wide
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("content", [b"", b"hello, I am not a checkpoint\n", "half"],
                         ids=["empty", "text", "truncated"])
def test_unreadable_files_are_named(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if content == "half":
        good = saved_model(tmp_path / "good.ckpt", LearnGN(**GN)).read_bytes()
        content = good[: len(good) // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot be read|not a readable") as err:
        load_checkpoint(path, what="--ckpt")
    assert str(path) in str(err.value) and "expected" in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="folder"):
        load_checkpoint(tmp_path)


def test_a_file_without_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        require_state_dict(load_checkpoint(path), path)
    torch.save({"weights": 1}, path)
    with pytest.raises(CheckpointError, match="weights"):
        model_from_checkpoint(path, base=LearnGN)


def test_model_class_outside_the_project_is_not_imported(tmp_path, monkeypatch):
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("evilmod.Model", "os.system", "builtins.eval", "lightning_modules", "x;import os", "..a.b"):
        with pytest.raises(CheckpointError, match="not one of this project's|malformed"):
            import_project_class(name, base=LearnGN, path="f.ckpt")
    assert not marker.exists() and "evilmod" not in sys.modules


def test_model_class_that_no_longer_exists_or_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="no module 'lightning_modules.gone'"):
        import_project_class("lightning_modules.gone.Model", base=LearnGN, path="f.ckpt")
    with pytest.raises(CheckpointError, match="has no 'Gone'"):
        import_project_class("lightning_modules.learngn.Gone", base=LearnGN, path="f.ckpt")
    with pytest.raises(CheckpointError, match="HandcraftedGN, not a LearnGN"):
        import_project_class("lightning_modules.baselines.gn.HandcraftedGN", base=LearnGN, path="f.ckpt")
    with pytest.raises(CheckpointError, match="no 'model_class'"):
        checkpoint_class({"state_dict": {}}, "f.ckpt", base=LearnGN)
    assert checkpoint_class({"state_dict": {}}, "f.ckpt", base=LearnGN, default=LearnGN) is LearnGN
    # LightningCLI's record of the class is used when model_class is absent
    ckpt = {"state_dict": {}, "hyper_parameters": {"_class_path": "lightning_modules.hyper.bilevel.BilevelLearnGN"}}
    assert checkpoint_class(ckpt, "f.ckpt", base=LearnGN).__name__ == "BilevelLearnGN"


def test_model_round_trip_and_mismatches(tmp_path):
    model = LearnGN(**GN)
    with torch.no_grad():
        model.heads.f_head.first.weight.mul_(1.5)
    path = saved_model(tmp_path / "m.ckpt", model)
    loaded, ckpt = model_from_checkpoint(path, base=LearnGN)
    assert type(loaded) is LearnGN and not loaded.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    # weights of another architecture
    other = saved_model(tmp_path / "other.ckpt", LearnGN(**{**GN, "hidden": 3}))
    ck = torch.load(other, weights_only=True)
    ck["hyper_parameters"] = dict(model.hparams)
    torch.save(ck, other)
    with pytest.raises(CheckpointError, match="weights do not fit LearnGN"):
        model_from_checkpoint(other, base=LearnGN)
    # hyper-parameters the class no longer accepts
    ck["hyper_parameters"] = {**dict(model.hparams), "iterations": 0}
    torch.save(ck, other)
    with pytest.raises(CheckpointError, match="no longer build a LearnGN.*iterations"):
        model_from_checkpoint(other, base=LearnGN)
    # a baseline checkpoint where a LearnGN is expected
    gn = saved_model(tmp_path / "gn.ckpt", HandcraftedGN(iterations=1))
    with pytest.raises(CheckpointError, match="not a LearnGN"):
        model_from_checkpoint(gn, base=LearnGN)


def test_retired_hyper_parameters_of_older_checkpoints_are_dropped(tmp_path):
    """A checkpoint that records a retired option (``fused_heads``, now the only behaviour) still builds its
    class, also a subclass whose ``__init__`` passes ``**kwargs`` on (where an unknown key would be a TypeError)."""
    from lightning_modules.hyper import BilevelLearnGN

    for model in (LearnGN(**GN), BilevelLearnGN(**GN)):
        path = saved_model(tmp_path / f"{type(model).__name__}.ckpt", model)
        ck = torch.load(path, weights_only=True)
        ck["hyper_parameters"] = {**dict(model.hparams), "fused_heads": True}
        torch.save(ck, path)
        loaded, _ = model_from_checkpoint(path, base=LearnGN)
        assert type(loaded) is type(model) and "fused_heads" not in loaded.hparams


def test_exported_weights_rebuild_the_same_model(tmp_path):
    from data.checkpoint import main, model_from_checkpoint
    from lightning_modules.learngn import LearnGN

    model = LearnGN(spatial_dims=2, features="mind", iterations=2, hidden=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    src = tmp_path / "train.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "model_class": "lightning_modules.learngn.LearnGN", "optimizer_states": [{"big": torch.zeros(10_000)}]},
               src)
    dst = tmp_path / "out" / "shipped.ckpt"
    main([str(src), str(dst)])  # python -m data.checkpoint SRC DST
    assert dst.stat().st_size < src.stat().st_size
    assert "optimizer_states" not in torch.load(dst, weights_only=True)
    loaded, _ = model_from_checkpoint(dst, base=LearnGN)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)

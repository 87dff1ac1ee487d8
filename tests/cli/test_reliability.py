"""Reliability of the two commands (docs/design.md §9), one class of bad input at a time:

* security: no code runs from a file a user hands over (checkpoint, schedule, ``init_from``, ``--ckpt_path``);
* one bad pair never costs the good ones: loading, preprocessing, registration, metrics and writing are
  guarded per pair, failures are recorded in ``pairs.csv`` and the exit status says so;
* every bad input ends in a message that names it (files, options, config values, JSON keys);
* output folders: earlier results are not overwritten silently, no stale or partial file stays behind, file
  names are unique, permissions follow the umask.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import train
from data.checkpoint import CheckpointError
from tests.data.conftest import make_learn2reg, write_nifti

pytestmark = pytest.mark.filterwarnings("ignore")

TINY_FIT = [
    "--model.class_path", "lightning_modules.learngn.LearnGN",
    "--model.init_args.features", "mind",
    "--model.init_args.iterations", "1",
    "--data.source", "synthetic2d",
    "--data.synthetic_shape", "[32, 32]",
    "--data.num_train", "2",
    "--data.num_val", "2",
    "--data.num_test", "2",
    "--data.batch_size", "2",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu",
    "--trainer.logger", "false",
]
QUIET = ["--accelerator", "cpu", "--figures", "0"]


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def crafted(path: Path, marker: Path, **content) -> Path:
    torch.save({"state_dict": {}, "model_class": "lightning_modules.learngn.LearnGN", **content,
                "payload": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real Lightning checkpoint of a tiny LearnGN (one epoch on 2 synthetic pairs)."""
    root = tmp_path_factory.mktemp("fit")
    train.main(["fit", *TINY_FIT, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root),
                "--checkpoint.dirpath", str(root / "ckpt")])
    return root / "ckpt" / "last.ckpt"


@pytest.fixture
def task(tmp_path) -> Path:
    """A tiny 3D Learn2Reg task with three val pairs: 0005<->0006 and 0003<-0004."""
    json_path, _ = make_learn2reg(tmp_path / "Tiny")
    meta = json.loads(json_path.read_text())
    meta["registration_val"].append({"fixed": "./imagesTr/Tiny_0003_0000.nii.gz",
                                     "moving": "./imagesTr/Tiny_0004_0000.nii.gz"})
    json_path.write_text(json.dumps(meta))
    return json_path


def run_eval(task: Path, out: Path, *extra: str, method: str = "identity"):
    return eval_cli.main(["--method", method, "--data", str(task), "--split", "val", "--out", str(out),
                          *QUIET, *extra])


def rows(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["fixed"], r["moving"]): r for r in csv.DictReader((out / "pairs.csv").open())}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ================================================================================= security
def test_real_checkpoint_loads_and_evaluates(trained, tmp_path):
    s = eval_cli.main(["--method", "learngn", "--ckpt", str(trained), "--split", "val", "--out",
                       str(tmp_path / "o"), *QUIET, "--no-disp"])
    assert s["n_pairs"] == 2 and s["n_failed"] == 0


def test_crafted_checkpoint_is_refused(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = crafted(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="--ckpt .*evil.ckpt was refused"):
        eval_cli.main(["--method", "learngn", "--ckpt", str(evil), "--out", str(tmp_path / "o")])
    assert eval_cli.cli(["--method", "learngn", "--ckpt", str(evil), "--out", str(tmp_path / "o")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_crafted_schedule_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    evil = crafted(tmp_path / "schedule.pt", marker, values=[1.0, 1.0])
    with pytest.raises(CheckpointError, match="schedule file .*schedule.pt was refused"):
        eval_cli.main(["--method", "adam", "--schedule", str(evil), "--data", "synthetic2d", "--out",
                       str(tmp_path / "o")])
    assert not marker.exists()


@pytest.mark.parametrize("cls", ["lightning_modules.learngn.LearnGN",
                                 "lightning_modules.hyper.bilevel.BilevelLearnGN",
                                 "lightning_modules.hyper.hypernet.HyperLearnGN"])
def test_crafted_init_from_is_refused_by_train(tmp_path, capsys, cls):
    marker = tmp_path / "MARKER"
    evil = crafted(tmp_path / "evil.ckpt", marker)
    args = ["fit", *TINY_FIT, "--model.class_path", cls, "--model.init_args.init_from", str(evil),
            "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(train.ConfigError, match="init_from .*evil.ckpt was refused"):
        train.main(args)
    assert train.cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error:") and "refused" in err[-1]
    assert not marker.exists()


def test_crafted_ckpt_path_is_refused_by_train(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = crafted(tmp_path / "evil.ckpt", marker)
    assert train.cli(["fit", *TINY_FIT, "--ckpt_path", str(evil), "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "--ckpt_path" in capsys.readouterr().err and not marker.exists()


def test_legacy_pickle_and_foreign_class_are_refused(trained, tmp_path):
    marker = tmp_path / "MARKER"
    legacy = tmp_path / "legacy.ckpt"
    with open(legacy, "wb") as fh:
        pickle.dump({"state_dict": {}, "payload": Payload(marker)}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        eval_cli.load_learngn(str(legacy))
    ck = torch.load(trained, weights_only=True)
    for name, match in (("subprocess.Popen", "not one of this project's"),
                        ("lightning_modules.learngn_old.LearnGN", "no module"),
                        ("lightning_modules.baselines.identity.Identity", "not a LearnGN")):
        path = tmp_path / "foreign.ckpt"
        torch.save({**ck, "model_class": name}, path)
        with pytest.raises(CheckpointError, match=match):
            eval_cli.load_learngn(str(path))
    assert not marker.exists()


# ================================================================================= bad checkpoints
@pytest.mark.parametrize("damage", ["truncated", "text", "empty", "no-state-dict"])
def test_bad_checkpoints_name_the_file(trained, tmp_path, damage, capsys):
    path = tmp_path / "bad.ckpt"
    if damage == "truncated":
        path.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    elif damage == "text":
        path.write_text("model: learngn\n")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError) as err:
        eval_cli.main(["--method", "learngn", "--ckpt", str(path), "--out", str(tmp_path / "o")])
    assert str(path) in str(err.value)
    # train.py --ckpt_path: the same file, the same kind of message as the last line
    assert train.cli(["fit", *TINY_FIT, "--ckpt_path", str(path), "--trainer.default_root_dir", str(tmp_path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: --ckpt_path") and str(path) in last


def test_resume_from_a_real_checkpoint_still_works(trained, tmp_path):
    train.main(["fit", *TINY_FIT, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path),
                "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--ckpt_path", str(trained)])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 1


# ================================================================================= one bad pair
@pytest.mark.parametrize("damage", ["truncated", "nan", "missing", "label-shape", "bad-keypoints"])
def test_one_bad_pair_is_recorded_and_the_rest_run(task, tmp_path, damage):
    root = task.parent
    img = root / "imagesTr" / "Tiny_0004_0000.nii.gz"
    if damage == "truncated":
        truncate(img)
        expected = "truncated"
    elif damage == "nan":
        import nibabel as nib

        arr = nib.load(str(img)).get_fdata().astype("float32")
        arr[1, 1, 1] = float("nan")
        write_nifti(img, arr)
        expected = "1 non-finite voxel"
    elif damage == "missing":
        img.unlink()
        expected = "not found"
    elif damage == "label-shape":
        write_nifti(root / "labelsTr" / "Tiny_0004_0000.nii.gz", torch.zeros(3, 3, 3).short().numpy())
        expected = "label map"
    else:
        (root / "keypointsTr" / "Tiny_0004_0000.csv").write_text("1,2\n3,4\n")
        expected = "Tiny_0004_0000.csv"
    out = tmp_path / "out"
    s = run_eval(task, out)
    assert s["n_pairs"] == 3 and s["n_failed"] == 1
    r = rows(out)
    assert r[("0003", "0004")]["status"] == "failed" and expected in r[("0003", "0004")]["error"]
    assert r[("0005", "0006")]["status"] == r[("0006", "0005")]["status"] == "ok"
    assert sorted(p.name for p in (out / "disp").iterdir()) == ["disp_0005_0006.nii.gz", "disp_0006_0005.nii.gz"]
    assert "0003 ← 0004" in (out / "summary.md").read_text()
    assert eval_cli.exit_status(s) == eval_cli.EXIT_SOME_FAILED


def test_a_bad_pair_in_a_batch_of_two(task, tmp_path):
    truncate(task.parent / "imagesTr" / "Tiny_0003_0000.nii.gz")
    out = tmp_path / "out"
    s = run_eval(task, out, "--data-arg", "eval_batch_size=2", "--figures", "3")
    assert s["n_failed"] == 1 and len(list((out / "disp").iterdir())) == 2
    assert len(list((out / "figures").glob("*.png"))) == 2


@pytest.mark.parametrize("stage", ["registration", "metrics", "writing"])
def test_failures_after_loading_are_recorded(task, tmp_path, monkeypatch, stage):
    from data.evaluation import writer as evaluation
    from lightning_modules import base
    from lightning_modules.baselines import Identity

    def boom(*a, **k):
        raise RuntimeError(f"{stage} exploded")

    if stage == "registration":
        monkeypatch.setattr(Identity, "register", boom)
    elif stage == "metrics":
        real = base.pair_metrics
        calls = []

        def second_call_fails(batch, u, *a, **k):  # the initial metrics pass, those after registration fail
            calls.append(1)
            if len(calls) % 2 == 0:
                boom()
            return real(batch, u, *a, **k)

        monkeypatch.setattr(base, "pair_metrics", second_call_fails)
    else:
        monkeypatch.setattr(evaluation, "write_pair_displacement", boom)
    out = tmp_path / "out"
    s = run_eval(task, out)
    assert s["n_pairs"] == 3 and s["n_failed"] == 3
    assert all(f"{stage} exploded" in r["error"] for r in rows(out).values())
    assert eval_cli.exit_status(s) == eval_cli.EXIT_ALL_FAILED


def test_exit_status(task, tmp_path, monkeypatch, capsys):
    base_args = ["--method", "identity", "--data", str(task), "--split", "val", *QUIET]
    assert eval_cli.cli([*base_args, "--out", str(tmp_path / "a")]) == 0
    truncate(task.parent / "imagesTr" / "Tiny_0004_0000.nii.gz")
    assert eval_cli.cli([*base_args, "--out", str(tmp_path / "b")]) == 3
    assert "1 of 3 pairs failed" in capsys.readouterr().err
    from lightning_modules.baselines import Identity

    monkeypatch.setattr(Identity, "register", lambda self, batch: 1 / 0)
    assert eval_cli.cli([*base_args, "--out", str(tmp_path / "c")]) == 4
    assert eval_cli.cli([*base_args, "--out", str(tmp_path / "c")]) == 2  # results exist: refused
    assert eval_cli.cli(["--method", "learngn", "--out", str(tmp_path / "d")]) == 2  # no --ckpt
    assert eval_cli.exit_status({"n_pairs": 0, "n_failed": 0}) == 4


# ================================================================================= output folder
def test_existing_results_are_refused_then_replaced_with_overwrite(task, tmp_path):
    out = tmp_path / "out"
    run_eval(task, out)
    stale = out / "disp" / "disp_9999_0001.nii.gz"
    stale.write_bytes(b"from an older run")
    mine = out / "notes.txt"
    mine.write_text("keep me")
    before = (out / "pairs.csv").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_eval(task, out)
    assert (out / "pairs.csv").read_bytes() == before and stale.exists()
    s = run_eval(task, out, "--overwrite", "--no-disp")
    assert s["n_pairs"] == 3 and not stale.exists() and mine.read_text() == "keep me"
    assert not list((out / "disp").glob("*.nii.gz"))  # no stale displacement beside the new table


def test_an_output_folder_without_results_is_used(task, tmp_path):
    out = tmp_path / "out"
    (out / "disp").mkdir(parents=True)
    (out / "README").write_text("my notes")
    assert run_eval(task, out)["n_failed"] == 0
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        run_eval(task, tmp_path / "file")


def test_stale_temporaries_are_removed(task, tmp_path):
    out = tmp_path / "out"
    leftovers = [out / ".pairs.csv.x1.tmp", out / "disp" / ".disp_0005_0006.nii.gz.x2.tmp",
                 out / "disp" / ".disp_0005_0006.nii.gz.x3.tmp.nii.gz", out / "figures" / "pair_000_a_b.tmp.png"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    run_eval(task, out)
    assert not any(p.exists() for p in leftovers)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_result_files_follow_the_umask(task, tmp_path):
    old = os.umask(0o022)
    try:
        run_eval(task, tmp_path / "out", "--figures", "1")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) >= 6 and all(p.stat().st_mode & 0o777 == 0o644 for p in files)


def test_duplicate_displacement_names_are_refused_before_the_first_pair(task, tmp_path):
    root = task.parent
    (root / "copy" / "imagesTr").mkdir(parents=True)
    (root / "copy" / "imagesTr" / "Tiny_0005_0000.nii.gz").write_bytes(
        (root / "imagesTr" / "Tiny_0005_0000.nii.gz").read_bytes())
    meta = json.loads(task.read_text())
    meta["registration_val"].append({"fixed": "./copy/imagesTr/Tiny_0005_0000.nii.gz",
                                     "moving": "./imagesTr/Tiny_0006_0000.nii.gz"})
    task.write_text(json.dumps(meta))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="disp_0005_0006.nii.gz"):
        run_eval(task, out)
    assert not out.exists()


# ================================================================================= options and config
@pytest.mark.parametrize("args,match", [
    (["--method", "gn", "--method-arg", "lam=-1"], "lam must be > 0"),
    (["--method", "gn", "--method-arg", "iterations=0"], "iterations must be >= 1"),
    (["--method", "gn", "--method-arg", "lam=[1, 0]"], r"lam\[1\] must be > 0"),
    (["--method", "gn", "--method-arg", "step=abc"], "step must be a number"),
    (["--method", "convexadam", "--method-arg", "diffusion_weight=-0.5"], "diffusion_weight must be >= 0"),
    (["--method", "convexadam", "--method-arg", "lam=0.5"], "has no option 'lam'.*diffusion_weight"),
    (["--method", "adam", "--method-arg", "lam=0.5"], "has no option 'lam'.*diffusion_weight"),
    (["--method", "convexadam", "--method-arg", "grid_sp=0"], "grid_sp must be >= 1"),
    (["--method", "adam", "--method-arg", "stride=0"], "stride must be >= 1"),
    (["--method", "adam", "--method-arg", "iterations=2.5"], "iterations must be an integer"),
    (["--method", "gn", "--method-arg", "lamda=1"], "has no option 'lamda'"),
    (["--method", "identity", "--method-arg", "lam=1"], "has no option 'lam'"),
])
def test_bad_method_options_are_named(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        eval_cli.main([*args, "--data", "synthetic2d", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_scalar_lam_for_handcrafted_gn_is_a_constant_schedule():
    from lightning_modules.baselines import HandcraftedGN

    a, b = HandcraftedGN(lam=0.2, iterations=3), HandcraftedGN(lam=[0.2, 0.2, 0.2], iterations=3)
    torch.testing.assert_close(a.gn.lam.values().detach(), b.gn.lam.values().detach())
    assert HandcraftedGN(lam="0.5", iterations=2).gn.lam.values().detach().tolist() == [0.5, 0.5]


@pytest.mark.parametrize("text,match", [
    ("lam: [0.3, 0.03\niterations: 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("init_args: {lam: -1}\n", "lam must be > 0"),
])
def test_method_config_errors_name_the_file(tmp_path, text, match):
    cfg = tmp_path / "method.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        eval_cli.main(["--method", "gn", "--method-config", str(cfg), "--data", "synthetic2d", "--out",
                       str(tmp_path / "o")])
    if "lam" not in match:
        assert str(cfg) in str(err.value)
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        eval_cli.main(["--method", "gn", "--method-config", str(tmp_path / "absent.yaml"), "--out", str(tmp_path)])


@pytest.mark.parametrize("extra,match", [
    (["--model.init_args.lam_start", "-1"], r"LearnGN: .*must be .*-1\.0"),
    (["--model.init_args.iterations", "0"], "LearnGN: iterations must be >= 1"),
    (["--model.init_args.features", "pixels"], "features must be one of .*got 'pixels'"),
    (["--data.batch_size", "0"], "RegistrationDataModule: batch sizes must be >= 1"),
    (["--model.class_path", "lightning_modules.hyper.bilevel.BilevelLearnGN",
      "--model.init_args.hyper_lr", "-1"], "BilevelLearnGN: hyper_lr must be > 0"),
])
def test_train_surfaces_the_projects_message_last(tmp_path, capsys, extra, match):
    args = ["fit", *TINY_FIT, *extra, "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(train.ConfigError, match=match):
        train.main(args)
    assert train.cli(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and len(last) < 400


def test_train_init_from_of_the_wrong_class(tmp_path, capsys):
    from lightning_modules.baselines import HandcraftedGN

    other = tmp_path / "gn.ckpt"
    torch.save({"state_dict": HandcraftedGN().state_dict(),
                "model_class": "lightning_modules.baselines.gn.HandcraftedGN"}, other)
    args = ["fit", *TINY_FIT, "--model.init_args.init_from", str(other), "--trainer.default_root_dir", str(tmp_path)]
    assert train.cli(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "belongs to lightning_modules.baselines.gn.HandcraftedGN" in last and str(other) in last


def test_missing_registration_val_is_named_by_eval(tmp_path):
    json_path, _ = make_learn2reg(tmp_path / "T", n_subjects=3, val_cases=())
    with pytest.raises(RuntimeError, match="no 'registration_val' key"):
        eval_cli.main(["--method", "identity", "--data", str(json_path), "--split", "val", "--out",
                       str(tmp_path / "o"), *QUIET])

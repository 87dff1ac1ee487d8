"""End-to-end CLI behaviour on tiny synthetic data: fit, resume, fine-tune, eval.py."""

import csv
import json
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import train
from data.io import read_displacement
from layers.grid import pool_to_grid, upsample_field

pytestmark = pytest.mark.filterwarnings("ignore")

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
    "--trainer.accelerator", "cpu",
]


def _fit(root: Path, *extra: str) -> None:
    train.main(["fit", *TINY, "--trainer.default_root_dir", str(root), "--checkpoint.dirpath", str(root / "ckpt"),
                "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.save_dir", str(root), *extra])


def test_fast_dev_run(tmp_path):
    _fit(tmp_path, "--trainer.fast_dev_run", "true")


def test_fit_then_eval_reproduces_validation_metrics(tmp_path):
    _fit(tmp_path, "--trainer.max_epochs", "1")
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    logged = torch.load(ckpt, map_location="cpu", weights_only=False)
    best_dice = [v for k, v in logged["callbacks"].items() if "ModelCheckpoint" in k][0]["current_score"]
    out = tmp_path / "eval"
    summary = eval_cli.main(["--method", "learngn", "--ckpt", str(ckpt), "--split", "val", "--out", str(out),
                             "--figures", "1", "--accelerator", "cpu"])
    # the output contract
    data = json.loads((out / "summary.json").read_text())
    assert set(data) == {"method", "n_pairs", "n_failed", "initial", "metrics", "timings"}
    assert data["n_pairs"] == 2 and data["n_failed"] == 0
    assert set(data["metrics"]) == {"dice", "dice30", "hd95", "tre", "sdlogj", "sdlogj_l2r", "folding", "seconds"}
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert {"fixed", "moving", "status", "error", "dice", "tre", "seconds"} <= set(rows[0])
    # per-stage timings (seconds): per pair in pairs.csv, means in summary.json
    stages = ("load", "initial_metrics", "register", "metrics", "write", "total")
    assert set(data["timings"]) == {*stages, "overhead"}
    for row in rows:
        t = {k: float(row[f"timings_{k}"]) for k in stages}
        assert all(v >= 0 for v in t.values()), t
        assert t["register"] == float(row["seconds"])
        assert t["total"] >= t["register"] + t["initial_metrics"] + t["metrics"] + t["write"], t
    assert all(data["timings"][k] >= 0 for k in (*stages, "overhead")), data["timings"]
    assert data["timings"]["register"] == pytest.approx(data["metrics"]["seconds"], rel=1e-12)
    assert data["timings"]["overhead"] == pytest.approx(data["timings"]["total"] - data["timings"]["register"],
                                                        rel=1e-9)
    assert len(list((out / "disp").glob("disp_*.nii.gz"))) == 2
    assert len(list((out / "figures").glob("*.png"))) == 1
    assert (out / "summary.md").read_text().count("|") > 10
    # eval.py reproduces the validation Dice logged when the checkpoint was saved
    assert summary["metrics"]["dice"] == pytest.approx(float(best_dice), abs=1e-5)


def test_resume_reaches_the_same_state(tmp_path):
    _fit(tmp_path / "full", "--trainer.max_epochs", "2")
    _fit(tmp_path / "part", "--trainer.max_epochs", "1")
    _fit(tmp_path / "part", "--trainer.max_epochs", "2", "--ckpt_path", str(tmp_path / "part" / "ckpt" / "last.ckpt"))
    full = torch.load(tmp_path / "full" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    part = torch.load(tmp_path / "part" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert full["global_step"] == part["global_step"] == 4
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(part["state_dict"][k], v, rtol=0, atol=0, msg=k)


def test_last_ckpt_is_the_last_epoch_even_when_it_is_not_the_best(tmp_path):
    """The monitored quantity (here the step, minimised) is best after the first epoch and never again: the best
    checkpoint stays at epoch 0 while last.ckpt must hold the end of training (Lightning alone would leave it a
    copy of the best one, and a resume from it would repeat the second epoch)."""
    _fit(tmp_path, "--trainer.max_epochs", "2", "--checkpoint.monitor", "step", "--checkpoint.mode", "min")
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (1, 4)
    assert [p.name for p in (tmp_path / "ckpt").glob("best-*.ckpt")] == ["best-000-00002.ckpt"]


def test_fine_tuning_uses_the_new_learning_rate(tmp_path):
    _fit(tmp_path / "base", "--trainer.max_epochs", "1")
    base = tmp_path / "base" / "ckpt" / "last.ckpt"
    _fit(tmp_path / "ft", "--trainer.max_epochs", "1", "--model.init_args.init_from", str(base),
         "--model.init_args.lr", "0.0005")
    ft = torch.load(tmp_path / "ft" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ft["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0005)
    assert ft["hyper_parameters"]["lr"] == pytest.approx(0.0005)
    # the weights started from the base checkpoint, not from the handcrafted initialisation
    base_sd = torch.load(base, map_location="cpu", weights_only=False)["state_dict"]
    from lightning_modules.learngn import LearnGN

    fresh = LearnGN(features="mind", iterations=2, hidden=2).state_dict()
    key = "gn.jf.j_head.first.weight"
    assert not torch.equal(base_sd[key], fresh[key])
    started = LearnGN(features="mind", iterations=2, hidden=2, init_from=str(base)).state_dict()
    torch.testing.assert_close(started[key], base_sd[key])


def test_unknown_config_key_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["fit", *TINY, "--model.init_args.no_such_option", "1"])


def test_eval_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        eval_cli.main(["--method", "learngn", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)])


def test_eval_baseline_records_failures(tmp_path, monkeypatch):
    from lightning_modules.baselines import Identity

    def boom(self, batch):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(Identity, "register", boom)
    out = tmp_path / "id"
    summary = eval_cli.main(["--method", "identity", "--data", "synthetic2d", "--data-arg", "synthetic_shape=[32,32]",
                             "--data-arg", "num_test=2", "--out", str(out), "--accelerator", "cpu"])
    assert summary["n_pairs"] == 2 and summary["n_failed"] == 2
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert all(r["status"] == "failed" and "solver exploded" in r["error"] for r in rows)
    # the stages a failed pair finished are in its row; the summary averages registered pairs only (none)
    assert all(float(r["timings_initial_metrics"]) >= 0 and r["timings_register"] == "" for r in rows)
    assert all(v is None for v in summary["timings"].values())


def test_ddp_fit_and_eval_on_cpu(tmp_path):
    """Lightning's DDP (2 CPU processes, gloo) through both CLIs: the validation Dice logged during the
    distributed fit (MeanMetric states synchronised over the ranks) equals a single-process evaluation of the
    same checkpoint, and the distributed evaluation writes every pair exactly once with the same numbers."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    common = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    tiny = [a for a in TINY if a not in ("--trainer.accelerator", "cpu")]
    tiny[tiny.index("--data.num_val") + 1] = "4"
    def run(*argv: str) -> None:
        proc = subprocess.run([sys.executable, *argv], cwd=root, timeout=300, capture_output=True, text=True)
        assert proc.returncode == 0, f"{argv[0]} failed:\n{proc.stderr[-4000:]}"

    run(str(root / "train.py"), "fit", *tiny, *common, "--trainer.max_epochs", "1",
        "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        "--trainer.logger", "false")
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    logged = torch.load(ckpt, map_location="cpu", weights_only=False)
    val_dice = [v for k, v in logged["callbacks"].items() if "ModelCheckpoint" in k][0]["current_score"]
    args = ["--method", "learngn", "--ckpt", str(ckpt), "--split", "val", "--figures", "0", "--no-disp",
            "--accelerator", "cpu"]
    run(str(root / "eval.py"), *args, "--out", str(tmp_path / "ddp"), "--devices", "2", "--strategy", "ddp")
    single = eval_cli.main([*args, "--out", str(tmp_path / "single")])
    assert single["n_pairs"] == 4
    assert single["metrics"]["dice"] == pytest.approx(float(val_dice), abs=1e-5)
    rows = {name: sorted(csv.DictReader((tmp_path / name / "pairs.csv").open()), key=lambda r: r["fixed"])
            for name in ("ddp", "single")}
    assert [r["fixed"] for r in rows["ddp"]] == [r["fixed"] for r in rows["single"]]  # each pair once
    for a, b in zip(rows["ddp"], rows["single"]):
        assert float(a["dice"]) == pytest.approx(float(b["dice"]), abs=1e-6)
        assert float(a["tre"]) == pytest.approx(float(b["tre"]), abs=1e-5)
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["n_pairs"] == 4 and ddp["metrics"]["dice"] == pytest.approx(single["metrics"]["dice"], abs=1e-6)


def test_eval_refines_a_learngn_field_with_adam(tmp_path):
    """--init-ckpt: the Adam baselines start from the checkpoint's field; with 0 Adam steps they return it, so
    the metrics equal the LearnGN evaluation's, and with steps they move on from it."""
    _fit(tmp_path, "--trainer.max_epochs", "1")
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    common = ["--split", "val", "--figures", "0", "--accelerator", "cpu", "--data", "synthetic2d",
              "--data-arg", "synthetic_shape=[32,32]", "--data-arg", "num_val=2"]
    learned = eval_cli.main(["--method", "learngn", "--ckpt", ckpt, "--out", str(tmp_path / "l"), *common])
    for method in ("adam", "convexadam"):
        eval_cli.main(["--method", method, "--init-ckpt", ckpt, "--method-arg", "iterations=0",
                       "--out", str(tmp_path / f"{method}0"), *common])
        for file in sorted((tmp_path / "l" / "disp").glob("disp_*.nii.gz")):
            u = read_displacement(file)[None]  # (1, n, *S)
            # AdamIO holds the field on its half-resolution grid (stride 2), upsampled linearly; ConvexAdam with
            # no Adam step returns the field that replaced its convex stage
            pooled = upsample_field(pool_to_grid(u, 2), u.shape[2:], 2)
            assert (u - pooled).abs().max() > 1e-3  # the check can tell the two apart
            got = read_displacement(tmp_path / f"{method}0" / "disp" / file.name)[None]
            torch.testing.assert_close(got, pooled if method == "adam" else u, rtol=0, atol=1e-5)
    refined = eval_cli.main(["--method", "adam", "--init-ckpt", ckpt, "--method-arg", "iterations=5",
                             "--method-arg", "preset=constant", "--out", str(tmp_path / "a5"), *common])
    assert refined["metrics"]["sdlogj"] != pytest.approx(learned["metrics"]["sdlogj"], abs=1e-6)
    # --lam reaches the initialising LearnGN: ConvexAdam with no Adam step returns its field at that λ
    eval_cli.main(["--method", "learngn", "--ckpt", ckpt, "--lam", "0.05", "--out", str(tmp_path / "l5"), *common])
    eval_cli.main(["--method", "convexadam", "--init-ckpt", ckpt, "--lam", "0.05", "--method-arg", "iterations=0",
                   "--out", str(tmp_path / "c5"), *common])
    for file in sorted((tmp_path / "l5" / "disp").glob("disp_*.nii.gz")):
        torch.testing.assert_close(read_displacement(tmp_path / "c5" / "disp" / file.name), read_displacement(file),
                                   rtol=0, atol=0)
        assert (read_displacement(file) - read_displacement(tmp_path / "l" / "disp" / file.name)).abs().max() > 1e-3
    assert "First-iteration λ 0.05 (`--lam`)." in (tmp_path / "l5" / "summary.md").read_text()
    # a setting the loaded model does not have is refused before any pair runs (it used to be ignored)
    with pytest.raises(ValueError, match="no option 'iterations'.*semantic_precision"):
        eval_cli.main(["--method", "learngn", "--ckpt", ckpt, "--method-arg", "iterations=3",
                       "--out", str(tmp_path / "bad"), *common])
    assert not (tmp_path / "bad" / "summary.json").exists()
    # ... while use_masks (the documented switch of --fixed-mask) is one (no masks here: the same result)
    off = eval_cli.main(["--method", "learngn", "--ckpt", ckpt, "--method-arg", "use_masks=false",
                         "--out", str(tmp_path / "nomask"), *common])
    assert off["metrics"]["dice"] == learned["metrics"]["dice"]
    # the refinement with the model's segmentations needs a LearnGN with semantic maps: refused before any pair
    with pytest.raises(ValueError, match="semantic_weight"):
        eval_cli.main(["--method", "adam", "--init-ckpt", ckpt, "--method-arg", "semantic_weight=1",
                       "--out", str(tmp_path / "nosem"), *common])
    assert not (tmp_path / "nosem" / "summary.json").exists()
    with pytest.raises(SystemExit, match="--lam applies"):
        eval_cli.main(["--method", "gn", "--lam", "0.05", "--out", str(tmp_path / "g5"), *common])
    with pytest.raises(SystemExit, match="--init-ckpt applies"):
        eval_cli.main(["--method", "gn", "--init-ckpt", ckpt, "--out", str(tmp_path / "g"), *common])


def test_eval_lam_auto_chooses_on_the_named_split(tmp_path, monkeypatch):
    """--lam auto --lam-split train: λ is selected on the training pairs (not on the split evaluated), with the
    --lam-guard* selection loss; a split the data does not have is refused by name."""
    from lightning_modules.hyper import lam_selection

    _fit(tmp_path, "--trainer.max_epochs", "1")
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    common = ["--split", "val", "--figures", "0", "--accelerator", "cpu", "--data", "synthetic2d", "--no-disp",
              "--data-arg", "synthetic_shape=[32,32]", "--data-arg", "num_val=2", "--data-arg", "num_train=6"]
    seen = {}
    real = lam_selection.select_lambda

    def spy(model, loader, **kwargs):
        seen["n_pairs"], seen["kwargs"] = len(loader.dataset), kwargs
        return real(model, loader, **{**kwargs, "steps": 2, "sweep_points": 2, "max_batches": 1})

    monkeypatch.setattr(lam_selection, "select_lambda", spy)
    eval_cli.main(["--method", "learngn", "--ckpt", ckpt, "--lam", "auto", "--lam-split", "train",
                   "--lam-guard", "sdlogj", "--lam-guard-margin", "0.2", "--lam-guard-weight", "10",
                   "--out", str(tmp_path / "auto"), *common])
    assert seen["n_pairs"] == 6  # the 6 training pairs, not the 2 val pairs
    assert seen["kwargs"] == {"guard": "sdlogj", "guard_margin": 0.2, "w_guard": 10.0, "sweep_points": 9,
                              "steps": 20}
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["n_pairs"] == 2
    assert "chosen by `--lam auto` on the `train` split" in (tmp_path / "auto" / "summary.md").read_text()
    for bad, message in ((["--lam", "auto", "--lam-search", "0", "0"], "--lam-search"),
                         (["--lam", "auto", "--lam-guard-weight", "-1"], "--lam-guard-weight"),
                         (["--lam", "0.1", "--lam-split", "train"], "--lam-split applies to --lam auto only"),
                         (["--lam-guard", "sdlogj", "--lam-guard-margin", "0.2"], "--lam-guard, --lam-guard-margin")):
        with pytest.raises(SystemExit, match=message):
            eval_cli.main(["--method", "learngn", "--ckpt", ckpt, *bad, "--out", str(tmp_path / "s"), *common])
    assert not (tmp_path / "s").exists()  # refused before any work
    with pytest.raises(SystemExit, match="--lam-split hyper"):
        eval_cli.main(["--method", "learngn", "--ckpt", ckpt, "--lam", "auto", "--lam-split", "hyper",
                       "--out", str(tmp_path / "h"), *common])


def test_displacement_files_are_parallel_gzip_members_any_reader_decompresses(tmp_path):
    """eval.py's displacement files are compressed in parallel as several gzip members (data.io.gzip_bytes):
    the bytes decompress to the uncompressed NIfTI with Python's gzip and nibabel, round-trip the field
    exactly, and do not depend on the number of threads."""
    import gzip

    import nibabel as nib

    from data.io import GZIP_MEMBER_BYTES, write_displacement

    u = torch.randn(3, 40, 130, 200, generator=torch.Generator().manual_seed(0))  # 12.5 MB: two members
    assert u.numel() * 4 > GZIP_MEMBER_BYTES
    threads = torch.get_num_threads()
    try:
        paths = []
        for t in (1, 2):
            torch.set_num_threads(t)
            paths.append(write_displacement(tmp_path / f"disp{t}.nii.gz", u, None))
    finally:
        torch.set_num_threads(threads)
    one, two = (p.read_bytes() for p in paths)
    assert one == two
    raw = nib.Nifti1Image(u.permute(1, 2, 3, 0).numpy(), None).to_bytes()
    assert len(gzip.decompress(one)) == len(raw)
    torch.testing.assert_close(read_displacement(paths[0]), u, rtol=0, atol=0)

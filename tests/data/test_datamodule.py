"""RegistrationDataModule: sources, disjoint splits, loaders, slice mode and LightningCLI-style parsing."""

from __future__ import annotations

import pytest
import torch

from data.datamodule import RegistrationDataModule

from .conftest import make_learn2reg

SMALL2D = [32, 32]


def _subjects(ds) -> set[str]:
    return {p.fixed.case for p in ds.pairs} | {p.moving.case for p in ds.pairs}


def test_synthetic2d_loaders():
    dm = RegistrationDataModule(
        "synthetic2d",
        batch_size=2,
        num_train=4,
        num_val=2,
        num_test=2,
        num_hyper=2,
        synthetic_shape=SMALL2D,
        seed=3,
    )
    assert dm.spatial_dims == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["fixed"].shape == (2, 1, 32, 32) and batch["true_disp"].shape == (2, 2, 32, 32)
    assert batch["fixed_keypoints"].shape == (2, 64, 2) and len(batch["fixed_id"]) == 2
    assert batch["spacing"].shape == (2, 2) and batch["label_ids"].shape == (2, 6)
    assert len(dm.val_dataloader()) == 2 and len(dm.test_dataloader()) == 2
    assert next(iter(dm.hyper_dataloader()))["fixed"].shape[0] == 2
    # disjoint seeds: every split is its own stream, so no pair repeats across splits
    streams = {name: ds.stream for name, ds in dm.datasets.items()}
    assert len(set(streams.values())) == 4
    fixed = {name: [ds[i]["fixed"] for i in range(2)] for name, ds in dm.datasets.items()}
    names = list(fixed)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not any(torch.equal(x, y) for x in fixed[a] for y in fixed[b])
    ids = next(iter(dm.predict_dataloader()))["fixed_id"]
    assert ids == [dm.datasets["val"][0]["fixed_id"]]


def test_train_order_is_seeded():
    kwargs = dict(num_train=6, synthetic_shape=[16, 16], synthetic_num_keypoints=4)
    ids = [
        [b["fixed_id"][0] for b in RegistrationDataModule("synthetic2d", **kwargs).train_dataloader()]
        for _ in range(2)
    ]
    assert ids[0] == ids[1]  # same seed, same order
    assert sorted(ids[0]) == [f"s0_{i:04d}_fix" for i in range(6)] and ids[0] != sorted(ids[0])  # shuffled


def test_no_hyper_split_is_a_clear_error():
    dm = RegistrationDataModule("synthetic2d", num_train=1, synthetic_shape=[16, 16])
    with pytest.raises(RuntimeError, match="hyper"):
        dm.hyper_dataloader()
    with pytest.raises(ValueError, match="eval_split"):
        RegistrationDataModule("synthetic2d", eval_split="validation")


def test_synthetic3d_slice_mode():
    dm = RegistrationDataModule(
        "synthetic3d",
        slice_mode=True,
        slice_indices=[4, 6],
        batch_size=3,
        num_train=2,
        synthetic_shape=[12, 16, 20],
    )
    assert dm.spatial_dims == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["fixed"].shape == (3, 1, 16, 20) and batch["spacing"].shape == (3, 2)
    assert len(dm.datasets["train"]) == 4
    with pytest.raises(ValueError, match="slice_mode"):
        RegistrationDataModule("synthetic2d", slice_mode=True).setup()


def test_learn2reg_json_val_pairs_and_disjoint_subjects(tmp_path):
    json_path, _ = make_learn2reg(tmp_path / "T", n_subjects=8, val_cases=("0007", "0008"))
    dm = RegistrationDataModule(str(json_path), hyper_fraction=0.34, intensity="none", batch_size=2, seed=1)
    dm.setup()
    splits = dm.subject_splits()
    assert splits["val"] == splits["test"] == ["0007", "0008"]
    assert len(splits["hyper"]) == 2 and len(splits["train"]) == 4
    assert set(splits["train"]).isdisjoint(splits["hyper"]) and set(splits["train"]).isdisjoint(splits["val"])
    assert dm.datasets["val"] is dm.datasets["test"]
    assert [p.key for p in dm.datasets["val"].pairs] == ["registration_val[0]", "registration_val[1]"]
    assert _subjects(dm.datasets["train"]) == set(splits["train"])
    assert _subjects(dm.datasets["hyper"]) == set(splits["hyper"])
    assert len(dm.datasets["train"]) == 4 * 3 and len(dm.datasets["hyper"]) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["fixed"].shape == (2, 1, 6, 7, 8) and batch["fixed_keypoints"].shape == (2, 5, 3)
    assert next(iter(dm.predict_dataloader()))["fixed_id"] == ["0007"]
    # the splits share one volume cache
    assert dm.datasets["train"].cache is dm.datasets["hyper"].cache is dm.datasets["val"].cache


def test_learn2reg_subject_split_without_json_pairs(tmp_path):
    json_path, _ = make_learn2reg(tmp_path / "T", n_subjects=10, val_cases=(), keypoints=False, masks=False)
    dm = RegistrationDataModule(
        str(json_path.parent),
        val_fraction=0.2,
        test_fraction=0.2,
        hyper_fraction=0.2,
        max_pairs=5,
        seed=0,
        eval_split="test",
    )
    dm.setup()
    splits = dm.subject_splits()
    seen: set[str] = set()
    for name in ("train", "val", "test", "hyper"):
        assert seen.isdisjoint(splits[name])
        seen |= set(splits[name])
        assert _subjects(dm.datasets[name]) <= set(splits[name])
    assert seen == {f"{k:04d}" for k in range(1, 11)}
    assert len(dm.datasets["train"]) == 5  # capped (4 subjects -> 12 ordered pairs)
    assert len(dm.datasets["val"]) == 2
    assert dm.spatial_dims == 3
    assert RegistrationDataModule(str(json_path), seed=1).subject_splits() != splits


def test_learn2reg_empty_train_split_is_a_clear_error(tmp_path):
    json_path, _ = make_learn2reg(tmp_path / "T", n_subjects=2, val_cases=("0001", "0002"))
    dm = RegistrationDataModule(str(json_path))
    assert len(dm.val_dataloader()) == 2
    with pytest.raises(RuntimeError, match="empty"):
        dm.train_dataloader()


def test_learn2reg_slice_mode(tmp_path):
    json_path, _ = make_learn2reg(tmp_path / "T", n_subjects=4, val_cases=("0003", "0004"))
    dm = RegistrationDataModule(str(json_path), slice_mode=True, slice_axis=2, eval_batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    assert batch["fixed"].shape == (4, 1, 6, 7) and batch["fixed_id"][0] == "0003_s000"


def test_constructor_parses_like_lightning_cli():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(RegistrationDataModule, "data")
    cfg = parser.parse_string(
        "data:\n  source: synthetic3d\n  batch_size: 2\n  target_spacing: [1.5, 1.5, 1.5]\n"
        "  synthetic_shape: [16, 16, 16]\n  ct_window: [-500, 500]\n  slice_indices: null\n"
    )
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, RegistrationDataModule)
    assert dm.hparams.target_spacing == [1.5, 1.5, 1.5] and tuple(dm.hparams.ct_window) == (-500, 500)
    assert dm.spatial_dims == 3


def test_train_order_depends_only_on_seed_and_epoch():
    from data.samplers import EpochShuffleSampler

    a, b = EpochShuffleSampler(10, seed=3), EpochShuffleSampler(10, seed=3)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    b.set_epoch(1)
    assert second == list(b)  # a fresh sampler at epoch 1 (as after a resume) gives the same order
    assert first != second and sorted(first) == list(range(10))


def test_learn2reg_slice_holdout_splits_by_slice_index(tmp_path):
    json_path, _ = make_learn2reg(tmp_path / "T", n_subjects=2, val_cases=("0001", "0002"))
    dm = RegistrationDataModule(str(json_path), slice_mode=True, slice_axis=2, slice_holdout=4)
    dm.setup()
    idx = {name: [int(dm.datasets[name][j]["fixed_id"].split("_s")[-1]) for j in range(len(dm.datasets[name]))]
           for name in ("train", "val", "test")}
    assert idx["val"] and idx["test"] and idx["train"]
    assert all(i % 4 == 0 for i in idx["val"]) and all(i % 4 == 2 for i in idx["test"])
    assert not set(idx["train"]) & (set(idx["val"]) | set(idx["test"]))
    with pytest.raises(ValueError, match="slice_mode"):
        RegistrationDataModule(str(json_path), slice_holdout=4).setup()


def test_learn2reg_slice_ranges_split_by_contiguous_ranges(tmp_path):
    json_path, _ = make_learn2reg(tmp_path / "T", n_subjects=2, val_cases=("0001", "0002"))
    ranges = {"train": [0, 4], "val": [6, 8]}  # the volumes have 8 foreground slices along axis 2
    dm = RegistrationDataModule(str(json_path), slice_mode=True, slice_axis=2, slice_holdout=4, slice_ranges=ranges)
    dm.setup()
    idx = {name: sorted({int(dm.datasets[name][j]["fixed_id"].split("_s")[-1]) for j in range(len(dm.datasets[name]))})
           for name in ("train", "val", "test")}
    assert idx["train"] == [0, 1, 2, 3]
    assert idx["val"] == [6, 7]
    assert idx["test"] == idx["val"]
    for bad, match in [({"train": [0, 7], "val": [6, 8]}, "overlaps"), ({"train": [5, 5], "val": [6, 8]}, "lo < hi"),
                       ({"val": [6, 8]}, "needs 'train'"), ({"train": [0, 2], "val": [6, 8], "x": [1, 2]}, "needs")]:
        with pytest.raises(ValueError, match=match):
            RegistrationDataModule(str(json_path), slice_mode=True, slice_axis=2, slice_holdout=4,
                                   slice_ranges=bad).setup()

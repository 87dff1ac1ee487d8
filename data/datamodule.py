"""``RegistrationDataModule``: one LightningDataModule for the synthetic default and Learn2Reg datasets.

Splits: ``train``, ``val``, ``test`` and an optional ``hyper`` split (for learned hyper-parameters), with
disjoint subjects. Synthetic data: each split is its own seed stream (``SyntheticPairs(stream=k)``).
Learn2Reg data: the subjects (case ids of ``training``) are split first and pairs are formed within each
split; when the JSON has ``registration_val`` (and ``use_json_pairs``), those pairs are the val *and* test
split and their subjects are removed from the others.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from .cache import VolumeCache
from .collate import collate_pairs
from .guard import GuardedDataset, collate_guarded, pair_info
from .learn2reg import Learn2RegDataset
from .learn2reg_task import Learn2RegTask
from .samplers import EpochShuffleSampler
from .slices import SliceDataset
from .splits import split_subjects
from .synthetic import DEFAULT_SHAPES, SyntheticPairs

__all__ = ["RegistrationDataModule", "SPLITS"]

log = logging.getLogger(__name__)

#: split names; the stream index of a synthetic split is its position here
SPLITS = ("train", "val", "test", "hyper")
SYNTHETIC_SOURCES = {"synthetic2d": 2, "synthetic3d": 3}


class RegistrationDataModule(LightningDataModule):
    """Registration pairs for training, validation, testing, hyper-parameter learning and prediction.

    Batches follow :mod:`data.batch` (collated by :func:`data.collate.collate_pairs`).

    Args:
        source: ``"synthetic2d"``, ``"synthetic3d"`` or the path of a Learn2Reg ``<TASK>_dataset.json``
            (or of the folder holding it).
        batch_size: batch size of the train and hyper loaders.
        eval_batch_size: batch size of the val, test and predict loaders.
        num_workers: DataLoader worker processes (persistent when > 0).
        seed: seed of the synthetic streams, the subject split, the pair subsets and the train shuffling.
        eval_split: the split served by ``predict_dataloader``: ``"val"``, ``"test"``, ``"hyper"`` or
            ``"train"``.
        val_fraction: Learn2Reg: fraction of subjects held out for val (when the JSON pairs are not used).
        test_fraction: Learn2Reg: fraction of subjects held out for test (when the JSON pairs are not used).
        hyper_fraction: Learn2Reg: fraction of subjects held out for the hyper split (0 = no hyper split).
        use_json_pairs: Learn2Reg: use the JSON ``registration_val`` pairs for val and test when present.
        max_pairs: Learn2Reg: cap on the pairs of each subject split (seeded subset; ``None`` = all pairs).
        intensity: Learn2Reg intensity handling: ``"auto"``, ``"ct"``, ``"mr"`` or ``"none"`` (min-max).
        ct_window: CT window ``[low, high]`` in HU.
        percentiles: MR scaling percentiles ``[low, high]`` in %.
        target_spacing: Learn2Reg: resample to this spacing (mm per voxel, array order).
        target_shape: Learn2Reg: resample to this shape (exclusive with ``target_spacing``).
        require_labels: Learn2Reg: every image must have a non-empty label map.
        cache_size: Learn2Reg: volumes kept in memory per process (``None`` = all, 0 = none).
        slice_mode: serve 2D slices of 3D pairs (:class:`data.slices.SliceDataset`).
        slice_axis: the sliced spatial axis (array order).
        slice_indices: slices taken from each pair; ``None`` = every slice with fixed foreground.
        slice_holdout: slice mode on a dataset with too few subjects for disjoint splits (e.g. BrainPair):
            every split uses the evaluation pairs, split by slice index ``i``: val ``i % k == 0``, test
            ``i % k == k // 2``, train the rest (a within-subject split; 0 = off).
        slice_ranges: with ``slice_holdout``: contiguous slice ranges per split instead of the interleaved rule,
            ``{"train": [lo, hi], "val": [lo, hi], "test": [lo, hi]}`` (half-open; ``test`` defaults to
            ``val``), so the held-out slices are far from the training slices (the ranges must not overlap).
        num_train: synthetic: pairs in train.
        num_val: synthetic: pairs in val.
        num_test: synthetic: pairs in test.
        num_hyper: synthetic: pairs in the hyper split (0 = none).
        synthetic_shape: synthetic grid (``None`` = 128x128 or 64x64x64).
        synthetic_magnitude: largest displacement as a fraction of the smallest image size.
        synthetic_smoothness: velocity smoothing sigma as a fraction of the image size.
        synthetic_noise: Gaussian noise std (intensities in ~[0, 1]).
        synthetic_multimodal: a different intensity mapping for the moving image.
        synthetic_num_organs: organ labels per phantom.
        synthetic_num_keypoints: keypoints per pair.
        synthetic_spacing: mm per voxel (``None`` = 1).
        synthetic_cache: keep generated synthetic pairs in memory (later epochs reuse them; the items are the
            same, and must not be modified in place). ``None``: only for splits of at most about 256 MB
            (each worker process and DDP rank keeps its own copy).
        check_files: Learn2Reg: refuse at setup a JSON that names a missing image (``FileNotFoundError`` with the
            path and the JSON key). ``eval.py`` sets it to False: a missing image then fails only its own pairs
            when they load.
    """

    def __init__(
        self,
        source: str = "synthetic2d",
        batch_size: int = 1,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        eval_split: str = "val",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        hyper_fraction: float = 0.0,
        use_json_pairs: bool = True,
        max_pairs: int | None = 200,
        intensity: str = "auto",
        ct_window: tuple[float, float] = (-1000.0, 1000.0),
        percentiles: tuple[float, float] = (0.5, 99.5),
        target_spacing: list[float] | None = None,
        target_shape: list[int] | None = None,
        require_labels: bool = False,
        cache_size: int | None = 128,
        slice_mode: bool = False,
        slice_axis: int = 0,
        slice_indices: list[int] | None = None,
        slice_holdout: int = 0,
        slice_ranges: dict[str, list[int]] | None = None,
        num_train: int = 64,
        num_val: int = 8,
        num_test: int = 8,
        num_hyper: int = 0,
        synthetic_shape: list[int] | None = None,
        synthetic_magnitude: float = 0.15,
        synthetic_smoothness: float = 0.12,
        synthetic_noise: float = 0.02,
        synthetic_multimodal: bool = False,
        synthetic_num_organs: int = 5,
        synthetic_num_keypoints: int = 64,
        synthetic_spacing: list[float] | None = None,
        synthetic_cache: bool | None = None,
        check_files: bool = True,
    ) -> None:
        super().__init__()
        if eval_split not in SPLITS:
            raise ValueError(f"eval_split must be one of {SPLITS}; got {eval_split!r}")
        if batch_size < 1 or eval_batch_size < 1 or num_workers < 0:
            raise ValueError("batch sizes must be >= 1 and num_workers >= 0")
        self.save_hyperparameters()
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.eval_split = eval_split
        self.datasets: dict[str, Dataset | None] = {}
        self._task: Learn2RegTask | None = None

    # ------------------------------------------------------------------ properties
    def _cache_split(self, length: int, shape, ndim: int) -> bool:
        """Whether a synthetic split of ``length`` pairs is cached (see ``synthetic_cache``)."""
        if self.hparams.synthetic_cache is not None:
            return bool(self.hparams.synthetic_cache)
        voxels = 1
        for v in (shape or DEFAULT_SHAPES[ndim]):
            voxels *= int(v)
        # per pair: 2 images + 2 masks (4 B), 2 label maps (8 B), the true field (n x 4 B)
        return length * voxels * (4 * 4 + 2 * 8 + 4 * ndim) <= 256 * 2**20

    @property
    def is_synthetic(self) -> bool:
        """True for the synthetic sources."""
        return self.source in SYNTHETIC_SOURCES

    @property
    def task(self) -> Learn2RegTask:
        """The Learn2Reg task of a JSON source."""
        if self.is_synthetic:
            raise AttributeError(f"source {self.source!r} is synthetic; it has no Learn2Reg task")
        if self._task is None:
            self._task = Learn2RegTask(Path(self.source), check_files=self.hparams.check_files)
        return self._task

    @property
    def spatial_dims(self) -> int:
        """``n`` of the served samples (2 in slice mode)."""
        if self.hparams.slice_mode:
            return 2
        return SYNTHETIC_SOURCES[self.source] if self.is_synthetic else self.task.ndim

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: str | None = None) -> None:
        """Build every split (cheap: volumes load lazily). Idempotent."""
        if self.datasets:
            return
        base = self._synthetic_splits() if self.is_synthetic else self._learn2reg_splits()
        if self.hparams.slice_holdout > 0:
            self.datasets = self._slice_holdout_splits(base)
            return
        if self.hparams.slice_mode:
            base = {
                k: None
                if ds is None
                else SliceDataset(ds, self.hparams.slice_axis, self.hparams.slice_indices)
                for k, ds in base.items()
            }
        self.datasets = base

    def _slice_holdout_splits(self, base: dict[str, Dataset | None]) -> dict[str, Dataset | None]:
        h = self.hparams
        if not h.slice_mode:
            raise ValueError("slice_holdout needs slice_mode=true")
        k = int(h.slice_holdout)
        if k < 3:
            raise ValueError(f"slice_holdout must be 0 (off) or >= 3; got {k}")
        source = base.get("val") or base.get("test")
        if source is None or len(source) == 0:
            raise RuntimeError(f"slice_holdout: {self.source} has no evaluation pairs to slice")
        slices = SliceDataset(source, h.slice_axis, h.slice_indices)
        # slice -1: a pair that could not be loaded to list its slices; every split keeps it (and fails on it)
        if h.slice_ranges:
            rule = self._slice_range_rule(dict(h.slice_ranges))
        else:
            rule = {"val": lambda i: i < 0 or i % k == 0, "test": lambda i: i < 0 or i % k == k // 2,
                    "train": lambda i: i < 0 or i % k not in (0, k // 2)}
        out: dict[str, Dataset | None] = {
            name: Subset(slices, [j for j, (_, i) in enumerate(slices.index) if keep(i)])
            for name, keep in rule.items()
        }
        out["hyper"] = None
        return out

    @staticmethod
    def _slice_range_rule(ranges: dict[str, list[int]]) -> dict:
        unknown = sorted(set(ranges) - {"train", "val", "test"})
        if unknown or not {"train", "val"} <= set(ranges):
            raise ValueError(f"slice_ranges needs 'train' and 'val' (and optionally 'test') ranges [lo, hi]; got "
                             f"keys {sorted(ranges)}")
        ranges.setdefault("test", ranges["val"])
        for name, r in ranges.items():
            if len(r) != 2 or int(r[0]) >= int(r[1]):
                raise ValueError(f"slice_ranges[{name!r}] must be [lo, hi] with lo < hi; got {r}")
        tr, va, te = (tuple(int(v) for v in ranges[k]) for k in ("train", "val", "test"))
        for name, (lo, hi) in (("val", va), ("test", te)):
            if lo < tr[1] and tr[0] < hi:
                raise ValueError(f"slice_ranges: the {name} range {[lo, hi]} overlaps the train range {list(tr)}")
        return {name: (lambda i, lo=lo, hi=hi: i < 0 or lo <= i < hi)
                for name, (lo, hi) in (("train", tr), ("val", va), ("test", te))}

    def _synthetic_splits(self) -> dict[str, Dataset | None]:
        h = self.hparams
        ndim = SYNTHETIC_SOURCES[self.source]
        if h.slice_mode and ndim != 3:
            raise ValueError("slice_mode needs 3D data; use source='synthetic3d' or 'synthetic2d' without it")
        sizes = {"train": h.num_train, "val": h.num_val, "test": h.num_test, "hyper": h.num_hyper}
        out: dict[str, Dataset | None] = {}
        for stream, name in enumerate(SPLITS):
            if name == "hyper" and sizes[name] <= 0:
                out[name] = None
                continue
            out[name] = SyntheticPairs(
                sizes[name],
                self.seed,
                shape=h.synthetic_shape,
                ndim=ndim,
                max_displacement=h.synthetic_magnitude,
                smoothness=h.synthetic_smoothness,
                noise=h.synthetic_noise,
                multimodal=h.synthetic_multimodal,
                num_organs=h.synthetic_num_organs,
                num_keypoints=h.synthetic_num_keypoints,
                spacing=h.synthetic_spacing,
                stream=stream,
                cache=self._cache_split(sizes[name], h.synthetic_shape, ndim),
            )
        return out

    def subject_splits(self) -> dict[str, list[str]]:
        """Learn2Reg: split name -> subject (case) ids, disjoint across splits.

        Val and test hold the subjects of the JSON ``registration_val`` pairs when those are used.
        """
        h = self.hparams
        task = self.task
        subjects = task.subjects()
        if h.use_json_pairs and "registration_val" in task.meta:
            pairs = task.section_pairs("registration_val")
            held = sorted({p.fixed.case for p in pairs} | {p.moving.case for p in pairs})
            rest = [s for s in subjects if s not in set(held)]
            splits = (
                split_subjects(rest, {"hyper": h.hyper_fraction}, self.seed)
                if rest
                else {"hyper": [], "train": []}
            )
            splits["val"] = splits["test"] = held
        else:
            splits = split_subjects(
                subjects,
                {"val": h.val_fraction, "test": h.test_fraction, "hyper": h.hyper_fraction},
                self.seed,
            )
        return {name: splits.get(name, []) for name in SPLITS}

    def _learn2reg_splits(self) -> dict[str, Dataset | None]:
        h = self.hparams
        task = self.task
        common = dict(
            intensity=h.intensity,
            ct_window=h.ct_window,
            percentiles=h.percentiles,
            target_spacing=h.target_spacing,
            target_shape=h.target_shape,
            require_labels=h.require_labels,
            cache=VolumeCache(h.cache_size),
        )
        splits = self.subject_splits()
        json_eval = h.use_json_pairs and "registration_val" in task.meta
        out: dict[str, Dataset | None] = {}
        for name in SPLITS:
            if name == "hyper" and h.hyper_fraction <= 0:
                out[name] = None
            elif name in ("val", "test") and json_eval:
                out[name] = out.get("val") or Learn2RegDataset(task, "registration_val", **common)
            else:
                pairs = task.training_pairs(splits[name], h.max_pairs, self.seed)
                out[name] = Learn2RegDataset(task, pairs, **common)
            if out[name] is not None and len(out[name]) == 0:
                log.warning(
                    "Learn2Reg split %r of %s has no pairs (subjects: %s)", name, task.name, splits[name]
                )
        return out

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        ds = self.datasets.get(split)
        if ds is None:
            raise RuntimeError(
                f"no {split!r} split: set hyper_fraction > 0 (Learn2Reg) or num_hyper > 0 (synthetic)"
            )
        if len(ds) == 0:
            raise RuntimeError(self._empty_split_message(split))
        batch = self.batch_size if split in ("train", "hyper") else self.eval_batch_size
        # an epoch-seeded sampler makes the order a function of (seed, epoch): exact resume
        sampler = EpochShuffleSampler(len(ds), self.seed) if shuffle else None
        return DataLoader(
            ds,
            batch_size=batch,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            persistent_workers=self.num_workers > 0,
        )

    def _empty_split_message(self, split: str) -> str:
        text = f"the {split!r} split of {self.source} is empty"
        if self.is_synthetic:
            return f"{text}: set num_{split} > 0"
        h, task = self.hparams, self.task
        subjects = len(task.subjects()) if "training" in task.meta else 0
        if split in ("val", "test") and "registration_val" not in task.meta:
            fraction = h.val_fraction if split == "val" else h.test_fraction
            return (f"{text}: {task.json_path} has no 'registration_val' key (the pairs val and test use when "
                    f"present), and its {subjects} training subject(s) leave no {split} pairs at "
                    f"{split}_fraction={fraction}; add 'registration_val' to the JSON or raise {split}_fraction")
        return f"{text} (too few subjects or pairs: {subjects} training subject(s))"

    def eval_pairs(self) -> list[tuple[str, str, str]] | None:
        """``(fixed_id, moving_id, source)`` of every pair of ``eval_split`` in order, without loading images
        (:func:`data.guard.pair_info`); None when the split's dataset cannot tell."""
        self.setup()
        ds = self.datasets.get(self.eval_split)
        if ds is None:
            return []
        infos = [pair_info(ds, i) for i in range(len(ds))]
        return None if any(info is None for info in infos) else infos

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training pairs."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation pairs, in order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test pairs, in order."""
        return self._loader("test")

    def hyper_dataloader(self) -> DataLoader:
        """Pairs of the hyper split (for learned hyper-parameters), shuffled (seeded)."""
        return self._loader("hyper", shuffle=True)

    def predict_dataloader(self) -> DataLoader:
        """The ``eval_split`` pairs, in order, guarded (:mod:`data.guard`): a pair that fails to load is a
        failed sample in the batch (recorded by the evaluation with its error), not an exception."""
        loader = self._loader(self.eval_split)
        return DataLoader(
            GuardedDataset(loader.dataset),
            batch_size=loader.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_guarded,
            persistent_workers=self.num_workers > 0,
        )

"""Per-pair guarding of evaluation data: a pair that cannot be loaded becomes a *failed sample* instead of an
exception that would end the whole evaluation (``eval.py``; :meth:`RegistrationDataModule.predict_dataloader`).

A failed sample is ``{"fixed_id": str, "moving_id": str, "failed": "<error>"}`` (:data:`data.batch.FAILED_KEY`);
:func:`collate_guarded` puts the failed samples of a batch under ``batch["failed"]`` and stacks the others
as usual (see :mod:`data.batch`), and the evaluation records each failed pair with its error.

:func:`pair_info` gives the ids (and a human-readable source) of a pair without loading it, for the messages
of failed pairs and for the check that no two pairs write the same displacement file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch.utils.data import Dataset, Subset

from .batch import FAILED_KEY
from .collate import collate_pairs

__all__ = ["GuardedDataset", "collate_guarded", "failed_sample", "pair_info"]

log = logging.getLogger(__name__)


def pair_info(dataset: Dataset, index: int) -> tuple[str, str, str] | None:
    """``(fixed_id, moving_id, source)`` of item ``index`` without loading it, or None when the dataset cannot
    tell (datasets of this package define ``pair_info``; ``Subset`` and :class:`GuardedDataset` are looked
    through)."""
    if isinstance(dataset, Subset):
        return pair_info(dataset.dataset, int(dataset.indices[index]))
    if isinstance(dataset, GuardedDataset):
        return pair_info(dataset.base, index)
    fn = getattr(dataset, "pair_info", None)
    return None if fn is None else fn(index)


def failed_sample(fixed_id: str, moving_id: str, error: str) -> dict:
    """The sample that stands for a pair that could not be loaded."""
    return {"fixed_id": str(fixed_id), "moving_id": str(moving_id), FAILED_KEY: str(error)}


class GuardedDataset(Dataset):
    """Wrap a pair dataset so that an item that raises (a missing, truncated or invalid file, bad voxels,
    keypoints or labels) comes back as :func:`failed_sample` with the error, its ids from :func:`pair_info`
    (``"item<i>"`` when unknown). ``KeyboardInterrupt`` and other non-``Exception`` errors still propagate."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.base[index]
        except Exception as exc:
            error = f"loading: {type(exc).__name__}: {exc}"
            try:
                info = pair_info(self.base, index)
            except Exception:  # the ids of a pair that cannot even be described
                info = None
            fixed_id, moving_id = (info[0], info[1]) if info else (f"item{index}", f"item{index}")
            log.warning("pair %s <- %s (item %d) failed to load: %s", fixed_id, moving_id, index, error)
            return failed_sample(fixed_id, moving_id, error)


def collate_guarded(samples: Sequence[dict]) -> dict:
    """:func:`data.collate.collate_pairs` that keeps failed samples apart and never raises on one bad pair.

    Without failed samples the batch is exactly ``collate_pairs(samples)``. Otherwise the loaded samples are
    collated (when there are any), ``batch["failed"]`` lists ``{"fixed_id", "moving_id", "error", "position"}``
    for the others and ``batch["positions"]`` gives the position in ``samples`` of each stacked sample. If the
    loaded samples cannot be stacked (shapes differ), they all become failed with that error.
    """
    failed = [dict(position=i, fixed_id=s["fixed_id"], moving_id=s["moving_id"], error=s[FAILED_KEY])
              for i, s in enumerate(samples) if FAILED_KEY in s]
    ok = [(i, s) for i, s in enumerate(samples) if FAILED_KEY not in s]
    if not failed:
        try:
            return collate_pairs(samples)
        except Exception as exc:
            return collate_guarded([failed_sample(s.get("fixed_id", f"item{i}"), s.get("moving_id", f"item{i}"),
                                                  f"batching: {type(exc).__name__}: {exc}")
                                    for i, s in enumerate(samples)])
    batch: dict = {}
    if ok:
        try:
            batch = collate_pairs([s for _, s in ok])
            batch["positions"] = [i for i, _ in ok]
        except Exception as exc:
            failed += [dict(position=i, fixed_id=s.get("fixed_id", f"item{i}"),
                            moving_id=s.get("moving_id", f"item{i}"), error=f"batching: {type(exc).__name__}: {exc}")
                       for i, s in ok]
            batch = {}
    batch["failed"] = sorted(failed, key=lambda f: f["position"])
    return batch

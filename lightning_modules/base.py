"""The base LightningModule of every registration method (learned models and evaluation-only baselines).

A subclass implements :meth:`RegistrationModule.register`, mapping a batch (``data/batch.py``) to the
full-resolution displacement ``u`` ``(B, n, *S)`` (voxel units, fixed grid, pointing into the moving image).
This class provides the shared validation / test / predict steps: metrics of docs/design.md §7 through the one
implementation in :mod:`data.evaluation.metrics`, accumulated with torchmetrics (synchronised under DDP),
and the per-pair records that ``eval.py`` writes (seconds around the registration only, CUDA-synchronised,
and the time of each evaluation stage in ``timings``; a pair that fails is recorded with its error instead of
stopping the run).
"""

from __future__ import annotations

import logging
import math
import numbers
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric

from data.evaluation.metrics import METRIC_NAMES, pair_metrics
from data.evaluation.writer import synchronise

log = logging.getLogger(__name__)

__all__ = ["EvaluationOnlyError", "RegistrationModule", "check_number", "check_numbers"]


def check_number(name: str, value: Any, *, low: float | None = None, strict: bool = False,
                 integer: bool = False) -> Any:
    """Validate the numeric option ``name`` at construction and return it as ``int`` / ``float``.

    ``value`` must be a finite real number (a numeric string such as ``"1e-3"``, which YAML reads as text, is
    accepted), an integer when ``integer``, and ``> low`` (``strict``) or ``>= low``; otherwise ``ValueError``
    names the option, the rule and the value given.
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, str):
        try:
            value = float(value) if not integer else int(value)
        except ValueError:
            raise ValueError(f"{name} must be {kind}; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {kind}; got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if integer and float(value) != int(value):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if low is not None and (float(value) < low or (strict and float(value) <= low)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low:g}; got {value!r}")
    return int(value) if integer else float(value)


def check_numbers(name: str, values: Any, *, low: float | None = None, strict: bool = False) -> list[float]:
    """:func:`check_number` for a number or a non-empty sequence of numbers (``name[i]`` in messages)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, torch.Tensor)):
        return [check_number(name, values, low=low, strict=strict)]
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    return [check_number(f"{name}[{i}]", v, low=low, strict=strict) for i, v in enumerate(values)]


class EvaluationOnlyError(RuntimeError):
    """Raised when ``fit`` is called on a method that has no trainable parameters."""


def _metric_dict() -> nn.ModuleDict:
    return nn.ModuleDict({k: MeanMetric(nan_strategy="ignore") for k in METRIC_NAMES})


class RegistrationModule(LightningModule):
    """Base class: shared evaluation of a registration method.

    Subclasses set ``evaluation_only = True`` when they have nothing to train (``fit`` then stops at once
    with :class:`EvaluationOnlyError`).
    """

    evaluation_only: bool = False
    method_name: str = "registration"

    def __init__(self) -> None:
        super().__init__()
        self.val_metrics = _metric_dict()
        self.test_metrics = _metric_dict()

    # --- the one thing a method implements -----------------------------------------------------------
    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """Return the displacement ``(B, n, *S)`` (voxel units) for a batch."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.register(batch)

    # --- Lightning hooks ------------------------------------------------------------------------------
    def _evaluation_only_error(self) -> EvaluationOnlyError:
        return EvaluationOnlyError(
            f"{type(self).__name__} is evaluation-only (no trainable parameters): use validate, test or "
            "predict (eval.py), not fit"
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.evaluation_only:
            raise self._evaluation_only_error()

    # Lightning checks that these exist before ``setup`` runs; a trainable subclass overrides both, and an
    # evaluation-only method inherits them, so ``fit`` stops at once with EvaluationOnlyError.
    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.evaluation_only:
            raise self._evaluation_only_error()
        raise NotImplementedError(f"{type(self).__name__} does not implement training_step")

    def configure_optimizers(self):
        if self.evaluation_only:
            raise self._evaluation_only_error()
        raise NotImplementedError(f"{type(self).__name__} does not implement configure_optimizers")

    def _evaluate(self, batch: dict[str, Any], metrics: nn.ModuleDict, stage: str) -> dict[str, torch.Tensor]:
        u = self.register(batch)
        values = pair_metrics(batch, u.detach())
        bsz = u.shape[0]
        for k, v in values.items():
            metrics[k].update(v.detach())
            self.log(f"{stage}/{k}", metrics[k], on_step=False, on_epoch=True, batch_size=bsz)
        return values

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Register a batch and return one record per pair (see :func:`timed_register`)."""
        return self.timed_register(batch)

    @torch.no_grad()
    def timed_register(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Register a batch; one record per pair:

        ``fixed``, ``moving`` (ids), ``status`` (``"ok"`` / ``"failed"``), ``error`` (``""`` or the message),
        ``seconds`` (registration only, divided evenly over the batch), ``initial`` and ``metrics``
        (``{name: float}``, before and after), ``disp`` (``(n, *S)`` float32 CPU tensor, or None on failure),
        ``position`` (the pair's position in the batch as loaded), ``timings`` (seconds per stage, each divided
        evenly over the batch, CUDA-synchronised: ``initial_metrics``, ``register`` (= ``seconds``),
        ``metrics`` (after registration) and ``write`` (so far: copying the field to the host); a failed pair
        has the stages it finished; ``eval.py``'s writer adds ``load``, the file writing and ``total``).

        Every step is guarded per pair: a pair that failed to load (``batch["failed"]``, :mod:`data.guard`)
        is recorded as failed with its error, and an error in the initial metrics, the registration, a
        non-finite field or the metrics after it fails the pairs of this batch with that error; nothing is
        raised. The records of the stacked pairs come first, in batch order (record ``i`` is
        ``batch["fixed"][i]``), then those of the pairs that failed to load.
        """
        failed = [self._failed_record(f["fixed_id"], f["moving_id"], f["error"], position=f["position"])
                  for f in batch.get("failed", [])]
        if "fixed" not in batch:  # every pair of the batch failed to load
            return failed
        bsz = batch["fixed"].shape[0]
        device = batch["fixed"].device
        fixed_ids = [str(v) for v in batch.get("fixed_id", [str(i) for i in range(bsz)])]
        moving_ids = [str(v) for v in batch.get("moving_id", [str(i) for i in range(bsz)])]
        positions = list(batch.get("positions", range(bsz)))
        initial: dict[str, torch.Tensor] = {}
        timings: dict[str, float] = {}
        stage = "initial metrics"
        try:
            n = batch["fixed"].dim() - 2
            start = synchronise(device)
            zero = batch["fixed"].new_zeros(bsz, n, *batch["fixed"].shape[2:])
            initial = pair_metrics(batch, zero)
            stage = "registration"
            mark = synchronise(device)
            timings["initial_metrics"] = (mark - start) / bsz
            u = self.register(batch)
            stamp = synchronise(u.device)
            seconds = timings["register"] = (stamp - mark) / bsz
            if not torch.isfinite(u).all():
                raise FloatingPointError("the displacement field has non-finite values")
            stage = "metrics"
            after = pair_metrics(batch, u)
            mark = synchronise(u.device)
            timings["metrics"] = (mark - stamp) / bsz
            disp = u.detach().float().cpu()
            timings["write"] = (time.perf_counter() - mark) / bsz
        except Exception as exc:  # a failing pair is recorded, not fatal
            log.warning("%s failed for %s: %s", stage, list(zip(fixed_ids, moving_ids)), exc)
            err = f"{stage}: {type(exc).__name__}: {exc}"
            log.debug(traceback.format_exc())
            records = []
            for i in range(bsz):
                rec = self._failed_record(fixed_ids[i], moving_ids[i], err, position=positions[i])
                rec["initial"] = {k: float(v[i]) for k, v in initial.items()}
                rec["timings"] = dict(timings)
                records.append(rec)
            return records + failed
        records = []
        for i in range(bsz):
            records.append({
                "fixed": fixed_ids[i], "moving": moving_ids[i], "status": "ok", "error": "",
                "seconds": seconds,
                "initial": {k: float(v[i]) for k, v in initial.items()},
                "metrics": {k: float(v[i]) for k, v in after.items()},
                "disp": disp[i],
                "position": positions[i],
                "timings": dict(timings),
            })
        return records + failed

    @staticmethod
    def _failed_record(fixed_id: str, moving_id: str, error: str, position: int | None = None) -> dict[str, Any]:
        return {"fixed": str(fixed_id), "moving": str(moving_id), "status": "failed", "error": str(error),
                "seconds": float("nan"), "initial": {}, "metrics": {}, "disp": None, "position": position,
                "timings": {}}

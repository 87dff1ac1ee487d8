"""What the learned hyper-parameter benchmarks (docs/design.md §5) share: the synthetic 2D data, a quiet
Trainer, the JSON results, the AdamIO evaluation with its references, and the training callbacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

from benchmarks.common import RESULTS, CachedDataModule, paired_difference
from data.collate import collate_pairs
from data.datamodule import RegistrationDataModule
from data.evaluation.metrics import pair_metrics
from layers.optim import PiecewiseLR
from lightning_modules.baselines import AdamIO

#: the constant learning rates compared with the learned schedules, in the piecewise preset's unit (1/15 voxel):
#: 0.033 .. 2 voxels per step
CONSTANT_LRS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0)

#: how the commands are invoked (recorded in the JSON results); before the package, ``python benchmarks/hyper.py``
INVOCATION = "python -m benchmarks.hyper"
OLD_INVOCATION = "python benchmarks/hyper.py"


def make_data(noise: float = 0.02, shape: int = 64, magnitude: float = 0.15, seed: int = 0,
              **sizes: int) -> CachedDataModule:
    """Synthetic 2D data module (``seed``: 0 for every run but the fresh confirmation pairs), ``shape²`` images,
    displacements up to ``magnitude`` of the size, split sizes from ``sizes`` (num_train, ...)."""
    kw = {
        "num_train": 16,
        "num_val": 8,
        "num_test": 16,
        "num_hyper": 0,
        "batch_size": 4,
        "eval_batch_size": 8,
    }
    kw.update(sizes)
    dm = CachedDataModule(
        source="synthetic2d", synthetic_shape=[shape, shape], synthetic_noise=noise, synthetic_magnitude=magnitude,
        seed=seed, **kw
    )
    dm.setup()
    return dm


def batches(dm: RegistrationDataModule, split: str, size: int = 8) -> list[dict]:
    """All pairs of a split as a list of batches of ``size``."""
    ds = dm.datasets[split]
    return [collate_pairs([ds[j] for j in range(i, min(i + size, len(ds)))]) for i in range(0, len(ds), size)]


def mean_metrics(records: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean over pairs (NaN ignored) of per-batch ``pair_metrics`` dicts."""
    keys = records[0].keys()
    return {k: float(torch.nanmean(torch.cat([r[k].double() for r in records]))) for k in keys}


def trainer(
    max_epochs: int | None = None, max_steps: int = -1, root: Path | None = None, **kw: Any
) -> Trainer:
    """A quiet CPU Trainer (no checkpoints unless ``root``; CSV logs there)."""
    from lightning.pytorch.loggers import CSVLogger

    return Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        logger=CSVLogger(str(root), name="logs") if root else False,
        limit_val_batches=0,
        **kw,
    )


def write_json(name: str, data: dict) -> Path:
    """``benchmarks/results/hyper_<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"hyper_{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def load_json(name: str) -> dict | None:
    """The results ``hyper_<name>.json``, or None when that run has not been made."""
    path = RESULTS / f"hyper_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def evaluate_adam(
    schedule: Any, iterations: int, test: list[dict], step_unit: float = 1.0 / 15.0, per_pair: bool = False
) -> dict[str, Any]:
    """AdamIO (the baseline class, as ``eval.py --method adam``) with ``schedule`` on batches ``test``;
    learning rates in ``step_unit`` voxels (1/15: the piecewise preset's unit). Mean metrics, plus the
    per-pair TRE list ``"tre_pairs"`` with ``per_pair`` (for paired comparisons)."""
    model = AdamIO(schedule=schedule, iterations=iterations, step_unit=step_unit)
    records = [pair_metrics(b, model.register(b), hd95=False) for b in test]
    out: dict[str, Any] = mean_metrics(records)
    if per_pair:
        out["tre_pairs"] = [float(v) for r in records for v in r["tre"]]
    return out


def best_constant(steps: int, pairs: list[dict], step_unit: float) -> tuple[float, float]:
    """``(lr, tre)``: the constant of :data:`CONSTANT_LRS` with the lowest mean TRE of AdamIO (``steps`` steps) on
    ``pairs``, and that TRE."""
    tre = {lr: evaluate_adam(float(lr), steps, pairs, step_unit)["tre"] for lr in CONSTANT_LRS}
    best = min(tre, key=tre.get)
    return best, tre[best]


def compare_with_references(learned: dict[str, Any], steps: int, test: list[dict], step_unit: float) -> dict:
    """The references on the pairs ``test`` — the piecewise schedule compressed to ``steps`` and every constant of
    :data:`CONSTANT_LRS` (per-pair TREs kept) — the best constant *on these pairs*, and the paired differences of
    ``learned`` (an :func:`evaluate_adam` result with ``per_pair=True`` on the same pairs) to both."""
    pw = evaluate_adam(PiecewiseLR.compressed(steps), steps, test, step_unit, per_pair=True)
    const = {lr: evaluate_adam(float(lr), steps, test, step_unit, per_pair=True) for lr in CONSTANT_LRS}
    best = min(const, key=lambda k: const[k]["tre"])
    return {
        "piecewise": pw,
        "constants": {str(k): v for k, v in const.items()},
        "best_constant": best,
        "paired": {"piecewise": paired_difference(learned["tre_pairs"], pw["tre_pairs"]),
                   "best_constant": paired_difference(learned["tre_pairs"], const[best]["tre_pairs"])},
    }


class LambdaTrace(Callback):
    """Records λ (first iteration) after every training batch."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(pl_module.lam_values()[0].detach()))


class LossTrace(Callback):
    """Records the training loss after every training batch."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.values.append(float(loss))


class BestOnValidation(Callback):
    """Model selection for the schedule meta-learner: after every epoch, the current schedule runs through the
    baseline loop (``AdamIO``, not the differentiable copy) on the validation pairs; the schedule network's
    weights with the lowest mean TRE are kept and restored at the end of the fit (the meta-gradient through
    many Adam steps is noisy, and the last epoch is not necessarily the best)."""

    def __init__(self, val: list[dict], steps: int, step_unit: float) -> None:
        self.val, self.steps, self.step_unit = val, steps, step_unit
        self.history: list[float] = []
        self.untrained: float | None = None
        self.best: tuple[float, int, dict] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # the untrained network (= the baseline) is a candidate too, as "epoch -1"
        self.untrained = self._score(pl_module, -1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.history.append(self._score(pl_module, trainer.current_epoch))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.best is not None:
            pl_module.schedule.load_state_dict(self.best[2])

    def _score(self, pl_module, epoch: int) -> float:
        tre = evaluate_adam(pl_module.as_schedule(), self.steps, self.val, self.step_unit)["tre"]
        if self.best is None or tre < self.best[0]:
            state = {k: v.detach().clone() for k, v in pl_module.schedule.state_dict().items()}
            self.best = (tre, epoch, state)
        return tre

"""Meta-learned learning-rate schedules for Adam instance optimisation (docs/design.md §5).

* :class:`ScheduleMetaLearner`: a LightningModule that meta-trains a :class:`~layers.optim.FourierSchedule` by
  backpropagating a registration error at the end of the ``T`` steps of the functional, differentiable Adam
  :func:`layers.optim.differentiable_adam` (optionally also along the way, against short-horizon bias) on training
  pairs; it evaluates with the baseline's own loop (:func:`layers.optim.refine_field`).
* :func:`save_schedule` / :func:`load_schedule`: the learned schedule as a ``.pt`` file (or straight from the
  Lightning checkpoint) -> a :class:`~layers.optim.schedules.ValuesLR` that :class:`~lightning_modules.baselines.AdamIO`
  takes as ``schedule`` (``eval.py --method adam --schedule``); :func:`adam_settings` gives all of AdamIO's
  arguments for it. Files are read by :func:`data.checkpoint.load_checkpoint` (``weights_only``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from data.checkpoint import CheckpointError, load_checkpoint
from layers.enums import StrEnum
from layers.features import mind_ssc
from layers.grid import pool_to_grid, upsample_field
from layers.losses import keypoint_loss, label_loss, outer_loss
from layers.metrics.labels import batch_label_ids
from layers.optim import (
    FourierSchedule,
    ValuesLR,
    baseline_values,
    differentiable_adam,
    refine_field,
    resolve_preset,
)
from lightning_modules.base import RegistrationModule
from lightning_modules.baselines import check_pair, renamed_options

log = logging.getLogger(__name__)

__all__ = ["Outer", "ScheduleMetaLearner", "adam_settings", "load_schedule", "save_schedule"]


class Outer(StrEnum):
    """The meta-objective of :class:`ScheduleMetaLearner` (its ``outer`` option)."""

    TRE = "tre"  #: keypoint distance (mm)
    LABEL = "label"  #: 1 − soft Dice of the warped labels
    EPE = "epe"  #: mean end-point error to ``true_disp`` (voxels; synthetic data)
    MIXED = "mixed"  #: tre + label


# ------------------------------------------------------------------------------------ meta-learning


class ScheduleMetaLearner(RegistrationModule):
    """Meta-learns the learning-rate schedule of the Adam instance optimisation (AdamIO, docs/design.md §6).

    Trainable parameters: a :class:`FourierSchedule` of ``steps`` values around ``baseline``. A training step
    runs :func:`differentiable_adam` for ``steps`` steps on the MIND-SSC features of the batch (pooled by
    ``stride``), upsamples the field and backpropagates the registration error to the schedule. Validation
    and test run the baseline's own loop with the current schedule (``refine_field``).

    Args:
        preset: the AdamIO preset whose iteration count and step unit apply (``"piecewise"``: 270 steps,
            learning rates in 1/15 voxel; ``"constant"``: 100 steps, in voxels), so that the learned schedule
            means the same in ``AdamIO(preset=..., schedule=...)``.
        steps: the horizon ``T`` (None: the preset's iterations).
        step_unit: coarse-grid voxels per unit of the Adam parameter (None: the preset's).
        baseline: the schedule the network starts from: ``"piecewise"``, ``"constant"``, a number or values.
        n_freq, hidden, depth, max_log_delta, frozen_steps: :class:`FourierSchedule` options.
        outer: the meta-objective at the end: ``"tre"`` (keypoint distance, mm), ``"label"`` (1 − soft Dice of
            the warped labels), ``"epe"`` (mean end-point error to ``true_disp``, voxels; synthetic data) or
            ``"mixed"`` (tre + label).
        w_path: weight of the same error along the way (mean over the ends of all checkpoint segments but the
            last), against short-horizon bias; 0 disables.
        checkpoint_every: steps per gradient-checkpoint segment.
        diffusion_weight, stride, smooth_passes, weight, mind_radius, mind_dilation: the AdamIO settings (1.25,
            2, 2, 12, 1, 2; ``diffusion_weight`` was ``lam``, which is refused with a message naming it).
        lr: Adam learning rate of the schedule network (meta-optimiser). Adam moves every MLP weight by about
            ``lr`` per step, so ``log η_t`` can move by tens of times ``lr``: keep it small, the instance
            optimisation has an instability cliff in η (the meta-gradient is unreliable beyond it).
        export_path: where :meth:`on_fit_end` writes the schedule (:func:`save_schedule`); None: no file.
    """

    method_name = "adam_learned_schedule"

    @renamed_options(lam="diffusion_weight")
    def __init__(
        self,
        preset: str = "piecewise",
        steps: int | None = None,
        step_unit: float | None = None,
        baseline: str | float | list[float] = "piecewise",
        n_freq: int = 4,
        hidden: int = 32,
        depth: int = 2,
        max_log_delta: float | None = 1.0,
        frozen_steps: int = 0,
        outer: str = "tre",
        w_path: float = 0.0,
        checkpoint_every: int = 10,
        diffusion_weight: float = 1.25,
        stride: int = 2,
        smooth_passes: int = 2,
        weight: float = 12.0,
        mind_radius: int = 1,
        mind_dilation: int = 2,
        lr: float = 1e-3,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        Outer.lookup(outer, "outer")
        chosen = resolve_preset(preset)
        self.steps = int(chosen.iterations if steps is None else steps)
        self.step_unit = float(chosen.step_unit if step_unit is None else step_unit)
        if self.steps < 1 or not self.step_unit > 0:
            raise ValueError(f"need steps >= 1 and step_unit > 0; got {steps}, {step_unit}")
        self.save_hyperparameters()
        self.schedule = FourierSchedule(
            baseline_values(baseline, self.steps), n_freq, hidden, depth, max_log_delta, frozen_steps
        )

    # --- the schedule ------------------------------------------------------------------------------------
    def schedule_values(self) -> torch.Tensor:
        """The current learning rates ``(T,)`` float64 (in ``step_unit`` coarse-grid voxels, as AdamIO's)."""
        return self.schedule.values()

    def as_schedule(self) -> ValuesLR:
        """The current schedule as the baseline's :class:`ValuesLR` (detached)."""
        return ValuesLR(tuple(float(v) for v in self.schedule_values().detach().cpu()))

    # --- registration -------------------------------------------------------------------------------------
    def _coarse_features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        fixed, moving = check_pair(batch)
        with torch.no_grad():
            f = mind_ssc(fixed, hp.mind_radius, hp.mind_dilation)
            m = mind_ssc(moving, hp.mind_radius, hp.mind_dilation)
        return f, m

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """AdamIO with the current schedule (the baseline loop); ``(B, n, *S)`` voxel units."""
        hp = self.hparams
        f, m = self._coarse_features(batch)
        return refine_field(
            f,
            m,
            f.shape[2:],
            hp.stride,
            iterations=self.steps,
            schedule=self.as_schedule(),
            diffusion_weight=hp.diffusion_weight,
            weight=hp.weight,
            smooth_passes=hp.smooth_passes,
            step_unit=self.step_unit,
        )

    def unrolled(self, batch: dict[str, Any], lrs: torch.Tensor | None = None, return_path: bool = False):
        """Differentiable AdamIO on a batch with learning rates ``lrs`` ``(T,)`` (default: the schedule).

        Returns the full-resolution field ``(B, n, *S)`` (and the intermediate full-resolution fields with
        ``return_path``).
        """
        hp = self.hparams
        f, m = self._coarse_features(batch)
        shape = tuple(f.shape[2:])
        lrs = self.schedule_values() if lrs is None else lrs
        out = differentiable_adam(
            pool_to_grid(f, hp.stride),
            pool_to_grid(m, hp.stride),
            hp.stride,
            lrs,
            diffusion_weight=hp.diffusion_weight,
            weight=hp.weight,
            smooth_passes=hp.smooth_passes,
            step_unit=self.step_unit,
            checkpoint_every=hp.checkpoint_every,
            return_path=return_path,
        )
        if return_path:
            coarse, path = out
            return upsample_field(coarse, shape, hp.stride), [
                upsample_field(p, shape, hp.stride) for p in path
            ]
        return upsample_field(out, shape, hp.stride)

    def error(self, batch: dict[str, Any], u: torch.Tensor) -> torch.Tensor:
        """The meta-objective of a full-resolution field ``u`` ``(B, n, *S)`` (see ``outer``); scalar."""
        kind = Outer.lookup(self.hparams.outer, "outer")
        if kind == Outer.EPE:
            if batch.get("true_disp") is None:
                raise ValueError("outer='epe' needs true_disp in the batch (synthetic data)")
            return (u - batch["true_disp"].to(u.dtype)).norm(dim=1).mean()
        if kind == Outer.LABEL:
            return outer_loss(batch, u, guard="none")["label"]
        if kind == Outer.MIXED:
            ids = batch_label_ids(batch)
            return keypoint_loss(
                u, batch["fixed_keypoints"], batch["moving_keypoints"], batch.get("moving_spacing")
            ) + label_loss(u, batch["moving_label"], batch["fixed_label"], ids, "dice")
        if batch.get("fixed_keypoints") is None:
            raise ValueError("outer='tre' needs keypoints in the batch")
        return keypoint_loss(
            u, batch["fixed_keypoints"], batch["moving_keypoints"], batch.get("moving_spacing")
        )

    # --- training -----------------------------------------------------------------------------------------
    def meta_loss(
        self, batch: dict[str, Any], lrs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, final error)`` of one unroll with learning rates ``lrs`` (default: the schedule): the
        final error plus ``w_path`` × the mean error at the ends of the checkpoint segments."""
        w_path = self.hparams.w_path
        if w_path > 0:
            u, path = self.unrolled(batch, lrs, return_path=True)
            final = self.error(batch, u)
            return final + (w_path * torch.stack([self.error(batch, p) for p in path]).mean()
                            if path else 0.0), final
        final = self.error(batch, self.unrolled(batch, lrs))
        return final, final

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        bsz = batch["fixed"].shape[0]
        values = self.schedule_values()
        loss, final = self.meta_loss(batch, values)
        lrs = values.detach()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bsz)
        self.log("train/error_final", final, on_step=False, on_epoch=True, batch_size=bsz)
        for name, t in (("first", 0), ("mid", lrs.numel() // 2), ("last", lrs.numel() - 1)):
            self.log(f"schedule/lr_{name}", float(lrs[t]), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.schedule.parameters(), lr=self.hparams.lr)

    def on_fit_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            path = save_schedule(self, self.hparams.export_path)
            log.info("learned schedule written to %s", path)


# ------------------------------------------------------------------------------------------ persistence


def save_schedule(
    source: ScheduleMetaLearner | FourierSchedule | Sequence[float],
    path: str | Path,
    *,
    step_unit: float | None = None,
    **meta: Any,
) -> Path:
    """Write a learned schedule to ``path`` (``.pt``).

    The file holds ``{"values": [η_0 .. η_{T−1}], "iterations": T, "step_unit": u, "baseline": [...],
    "log_delta": [...], "state_dict": ..., "config": ..., "meta": {...}}`` (``step_unit`` from a
    :class:`ScheduleMetaLearner`, else the argument, else None = the AdamIO preset's); :func:`load_schedule`
    and :func:`adam_settings` read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"kind": "learned_lr_schedule", "meta": dict(meta), "step_unit": step_unit}
    net = source.schedule if isinstance(source, ScheduleMetaLearner) else source
    if isinstance(net, FourierSchedule):
        with torch.no_grad():
            record["values"] = [float(v) for v in net.values().cpu()]
            record["baseline"] = [float(v) for v in net.base.cpu()]
            record["log_delta"] = [float(v) for v in net.log_delta().cpu()]
        record["state_dict"] = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        record["config"] = {
            "n_freq": net.n_freq,
            "hidden": net.mlp[0].out_features,
            "depth": (len(net.mlp) - 1) // 2,
            "max_log_delta": net.max_log_delta,
            "frozen_steps": net.frozen_steps,
        }
        if isinstance(source, ScheduleMetaLearner):
            record["step_unit"] = source.step_unit
            record["meta"].setdefault("hparams", dict(source.hparams))
    else:
        record["values"] = [float(v) for v in source]
    record["iterations"] = len(record["values"])
    torch.save(record, path)
    return path


def _read_schedule(path: str | Path) -> tuple[list[float], float | None]:
    """``(values, step_unit)`` of a :func:`save_schedule` file or a ScheduleMetaLearner checkpoint, read by
    :func:`data.checkpoint.load_checkpoint` (no code runs from the file; errors name it)."""
    path = Path(path)
    expected = "a learned schedule written by save_schedule (.pt) or a ScheduleMetaLearner checkpoint"
    obj = load_checkpoint(path, what="schedule file", expected=expected)
    if isinstance(obj, dict) and "values" in obj:
        try:
            values = [float(v) for v in obj["values"]]
            unit = None if obj.get("step_unit") is None else float(obj["step_unit"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"schedule file {path}: 'values' must be numbers ({exc})") from None
        if not values or not all(math.isfinite(v) and v >= 0 for v in values):
            raise CheckpointError(f"schedule file {path}: 'values' must be finite learning rates >= 0; got {values}")
        return values, unit
    if isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj:
        hp = dict(obj["hyper_parameters"])
        sd = {k[len("schedule.") :]: v for k, v in obj["state_dict"].items() if k.startswith("schedule.")}
        if "base" not in sd:
            raise ValueError(
                f"{path} is a Lightning checkpoint without a learned schedule (no 'schedule.base')"
            )
        try:
            net = FourierSchedule(
                sd["base"],
                hp.get("n_freq", 4),
                hp.get("hidden", 32),
                hp.get("depth", 2),
                hp.get("max_log_delta", 3.0),
                hp.get("frozen_steps", 0),
            )
            net.load_state_dict(sd)
        except Exception as exc:
            raise CheckpointError(
                f"schedule file {path}: its schedule network does not load ({type(exc).__name__}: {exc})"
            ) from exc
        unit = hp.get("step_unit")
        if unit is None:
            unit = resolve_preset(hp.get("preset", "piecewise")).step_unit
        with torch.no_grad():
            return [float(v) for v in net.values()], float(unit)
    raise CheckpointError(f"schedule file {path} is neither a saved schedule nor a ScheduleMetaLearner checkpoint "
                          f"(expected {expected})")


def load_schedule(path: str | Path) -> ValuesLR:
    """Read a learned schedule: a file of :func:`save_schedule` or a Lightning checkpoint of
    :class:`ScheduleMetaLearner`.

    Returns:
        a :class:`~layers.optim.schedules.ValuesLR` (callable ``step -> lr``; ``.values`` the
        ``T`` learning rates), accepted by ``AdamIO(schedule=...)``. The values are read in the step unit the
        schedule was learned with: pass :func:`adam_settings` to AdamIO to get the iteration count and the
        unit too.
    """
    return ValuesLR(tuple(_read_schedule(path)[0]))


def adam_settings(path: str | Path) -> dict[str, Any]:
    """``AdamIO`` keyword arguments for a learned schedule: ``{"schedule": ValuesLR, "iterations": T}`` plus
    ``"step_unit"`` when the file records it (else AdamIO's preset unit applies). Usage:
    ``AdamIO(**adam_settings(path))``."""
    values, unit = _read_schedule(path)
    out: dict[str, Any] = {"schedule": ValuesLR(tuple(values)), "iterations": len(values)}
    if unit is not None:
        out["step_unit"] = float(unit)
    return out

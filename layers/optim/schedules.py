"""Learning-rate schedules of the Adam instance optimisation (docs/design.md §6), reusable by learned schedules.

A schedule is any callable ``step -> learning rate`` (``step`` = 0, 1, ..., ``iterations - 1``; learning rates in
``step_unit`` coarse-grid voxels, :mod:`layers.optim.objective`). This module provides the published piecewise
schedule as a pure function (:func:`piecewise_lr`), picklable schedule objects (:class:`ConstantLR`,
:class:`PiecewiseLR`, :class:`ValuesLR`), the named presets of the Adam baseline (:data:`PRESETS`),
:func:`make_schedule`, which turns a configuration value (a preset name, a number, a list of values or a
callable) into a schedule, and :func:`baseline_values`, the starting values of a learned schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..enums import PresetName

__all__ = [
    "PRESETS",
    "ConstantLR",
    "PiecewiseLR",
    "Preset",
    "Schedule",
    "ValuesLR",
    "baseline_values",
    "make_schedule",
    "piecewise_lr",
    "resolve_preset",
    "schedule_values",
]

#: A learning-rate schedule: ``step`` (int, 0-based) -> learning rate (float).
Schedule = Callable[[int], float]


def piecewise_lr(
    step: int,
    *,
    peak: float = 15.0,
    low: float = 0.1,
    end: float = 0.5,
    hold: int = 70,
    period: int = 200,
    cut: int = 180,
    total: int = 270,
) -> float:
    """The piecewise learning rate of the Adam baseline (Vujovic et al.), for ``step`` = 0 .. ``total``.

    With the defaults::

        η(s) = 15                                        for s <= 70
        η(s) = 0.1 + 14.9 (1 + cos(π (s - 70) / 200)) / 2 for 70 < s <= 180   (η(180) ≈ 6.385)
        η(s) = η(180) + (0.5 - η(180)) (s - 180) / 90     for 180 < s <= 270  (linear down to 0.5)

    i.e. ``peak`` held for ``hold`` steps, a cosine from ``peak`` towards ``low`` with half-period ``period``
    cut at ``cut``, then linear to ``end`` at ``total``. Steps beyond ``total`` keep ``end``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")

    def cosine(s: float) -> float:
        return low + (peak - low) * (1.0 + math.cos(math.pi * (s - hold) / period)) / 2.0

    if step <= hold:
        return float(peak)
    if step <= cut:
        return float(cosine(step))
    if step <= total:
        at_cut = cosine(cut)
        return float(at_cut + (end - at_cut) * (step - cut) / (total - cut))
    return float(end)


@dataclass(frozen=True)
class ConstantLR:
    """Constant learning rate ``lr``."""

    lr: float

    def __call__(self, step: int) -> float:
        return float(self.lr)


@dataclass(frozen=True)
class PiecewiseLR:
    """:func:`piecewise_lr` with its parameters bound (picklable, usable as a config value)."""

    peak: float = 15.0
    low: float = 0.1
    end: float = 0.5
    hold: int = 70
    period: int = 200
    cut: int = 180
    total: int = 270

    @classmethod
    def compressed(cls, steps: int) -> PiecewiseLR:
        """The published schedule compressed to ``steps`` steps: hold, cosine period, cut and total scaled by
        ``steps / 270`` (integer division; ``compressed(270)`` is the published schedule)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        return cls(hold=steps * 70 // 270, period=max(1, steps * 200 // 270), cut=steps * 180 // 270, total=steps)

    def __call__(self, step: int) -> float:
        return piecewise_lr(step, peak=self.peak, low=self.low, end=self.end, hold=self.hold,
                            period=self.period, cut=self.cut, total=self.total)


@dataclass(frozen=True)
class ValuesLR:
    """An explicit list of learning rates, one per step (the last value is held beyond the list)."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.values) == 0:
            raise ValueError("a schedule given as a list needs at least one value")
        if not all(math.isfinite(v) and v >= 0 for v in self.values):
            raise ValueError(f"learning rates must be finite and >= 0; got {list(self.values)}")

    def __call__(self, step: int) -> float:
        return float(self.values[min(int(step), len(self.values) - 1)])


@dataclass(frozen=True)
class Preset:
    """A named setting of the Adam baseline: its schedule, number of iterations and step unit.

    ``step_unit`` is the displacement (in voxels of the optimisation grid) per unit of the Adam parameter, so
    Adam's first steps move the field by about ``lr · step_unit`` voxels (Adam's steps scale with the
    parameter's unit, not with the loss).
    """

    schedule: Schedule
    iterations: int
    step_unit: float = 1.0


#: Named presets: ``piecewise`` (Vujovic et al.: 270 iterations of :func:`piecewise_lr`) and ``constant``
#: (the ConvexAdam-style setting: learning rate 1, 100 iterations).
#:
#: Step units: ``constant`` reads its learning rate in voxels of the half-resolution grid, the unit of the
#: published ConvexAdam code. The piecewise values (15 … 0.5) diverge in that unit (Adam moves every
#: parameter by about 15 voxels per step; on synthetic 48³ pairs the field runs off, Dice 0) and the unit of
#: the original code could not be found, so ``piecewise`` reads them in 1/15 voxel: its peak step equals the
#: ``constant`` preset's (1 voxel), annealed to 0.43 voxel at step 180 and 0.033 at 270. A sweep on
#: BrainPair (0001←0002) gave Dice 0.701 with 1/15 and 0.696 with 1/5.
PRESETS: dict[str, Preset] = {
    PresetName.PIECEWISE.value: Preset(PiecewiseLR(), 270, step_unit=1.0 / 15.0),
    PresetName.CONSTANT.value: Preset(ConstantLR(1.0), 100, step_unit=1.0),
}


def resolve_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name`` (a :class:`layers.enums.PresetName` or its string), or ``ValueError``
    listing the known names."""
    try:
        return PRESETS[PresetName.lookup(name, "preset").value]
    except ValueError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def make_schedule(schedule: str | float | Sequence[float] | Schedule) -> Schedule:
    """Turn a configuration value into a schedule ``step -> lr``.

    Args:
        schedule: a preset name (``"piecewise"``, ``"constant"``), a number (constant learning rate), a
            list/tuple of per-step values (:class:`ValuesLR`) or any callable ``step -> lr``.
    """
    if isinstance(schedule, str):
        return resolve_preset(schedule).schedule
    if isinstance(schedule, bool):
        raise ValueError(f"a schedule cannot be a bool; got {schedule!r}")
    if isinstance(schedule, (int, float)):
        if not (math.isfinite(schedule) and schedule >= 0):
            raise ValueError(f"learning rate must be finite and >= 0; got {schedule}")
        return ConstantLR(float(schedule))
    if callable(schedule):
        return schedule
    if isinstance(schedule, (Sequence, torch.Tensor)):
        return ValuesLR(tuple(float(v) for v in schedule))
    raise ValueError(f"cannot make a learning-rate schedule from {schedule!r}")


def schedule_values(schedule: Schedule, iterations: int) -> torch.Tensor:
    """The learning rates of steps ``0 .. iterations - 1`` as a float64 tensor ``(iterations,)``."""
    return torch.tensor([float(schedule(s)) for s in range(int(iterations))], dtype=torch.float64)


def baseline_values(baseline: str | float | Sequence[float], steps: int) -> torch.Tensor:
    """The baseline schedule's values for steps ``0 .. steps − 1``, float64 ``(steps,)``.

    ``baseline``: ``"piecewise"`` (the published schedule compressed to ``steps`` steps,
    :meth:`PiecewiseLR.compressed`; the published one at 270), another
    preset name of :data:`PRESETS` (``"constant"``), a number (constant) or per-step
    values (the last is held).
    """
    if baseline == "piecewise":
        values = schedule_values(PiecewiseLR.compressed(steps), steps)
    else:
        values = schedule_values(
            make_schedule(baseline if not isinstance(baseline, list) else tuple(baseline)), steps
        )
    if not torch.all(values > 0):
        raise ValueError("a log-parametrised schedule needs a strictly positive baseline")
    return values

"""Adam instance optimisation on a coarse grid (docs/design.md §6), pure torch (no Lightning, no data).

==================  ==========================================================================================
module              contents
==================  ==========================================================================================
``objective``       :class:`InstanceObjective`, the one objective: diffusion + optional log-Jacobian + feature
                    MSE (:class:`FeatureMSE`) + optional extra terms (:class:`ImageLNCC`,
                    :class:`SegmentationDice`), additive or stationary-velocity (scaling-and-squaring) increments
``adam``            :func:`adam_optimise`, the ``torch.optim.Adam`` stepper (AdamIO, ConvexAdam's Adam stage),
                    and its full-resolution wrapper :func:`refine_field`
``functional``      :func:`differentiable_adam`, a functional Adam differentiable in the learning rates
                    (meta-learned schedules, docs/design.md §5)
``schedules``       learning-rate schedules and the AdamIO presets (:data:`PRESETS`, :func:`make_schedule`)
``fourier``         :class:`FourierSchedule`, a learned schedule around a baseline
==================  ==========================================================================================
"""

from .adam import adam_optimise, refine_field
from .fourier import FourierSchedule
from .functional import differentiable_adam
from .objective import (
    FeatureMSE,
    ImageLNCC,
    InstanceObjective,
    SegmentationDice,
    apply_increment,
    grad_ready,
    smooth,
)
from .schedules import (
    PRESETS,
    ConstantLR,
    PiecewiseLR,
    Preset,
    Schedule,
    ValuesLR,
    baseline_values,
    make_schedule,
    piecewise_lr,
    resolve_preset,
    schedule_values,
)

__all__ = [
    "PRESETS",
    "ConstantLR",
    "FeatureMSE",
    "FourierSchedule",
    "ImageLNCC",
    "InstanceObjective",
    "PiecewiseLR",
    "Preset",
    "Schedule",
    "SegmentationDice",
    "ValuesLR",
    "adam_optimise",
    "apply_increment",
    "baseline_values",
    "differentiable_adam",
    "grad_ready",
    "make_schedule",
    "piecewise_lr",
    "refine_field",
    "resolve_preset",
    "schedule_values",
    "smooth",
]

"""Evaluation-only instance-optimisation baselines (docs/design.md §6), selectable by name.

==============  =====================================================================================
name            class
==============  =====================================================================================
``identity``    :class:`Identity` — ``u = 0``
``gn``          :class:`HandcraftedGN` — Gauss-Newton with handcrafted ``J``, ``f`` (:mod:`layers.gn`)
``adam``        :class:`AdamIO` — Adam instance optimisation on MIND-SSC at half resolution
``convexadam``  :class:`ConvexAdam` — coupled convex discrete optimisation + Adam fine-tuning
==============  =====================================================================================

The Adam instance optimisation itself (objective, steppers, schedules) is :mod:`layers.optim`. All are
:class:`~lightning_modules.base.RegistrationModule` subclasses with ``evaluation_only = True``
(``Trainer.fit`` stops at once with :class:`~lightning_modules.base.EvaluationOnlyError`).
"""

from __future__ import annotations

from typing import Any

from layers.optim import PRESETS, make_schedule, piecewise_lr

from ..base import RegistrationModule
from .adam import AdamIO
from .common import check_pair, renamed_options
from .convex import ConvexAdam
from .gn import HandcraftedGN
from .identity import Identity

__all__ = [
    "BASELINES",
    "PRESETS",
    "AdamIO",
    "ConvexAdam",
    "HandcraftedGN",
    "Identity",
    "check_pair",
    "make_baseline",
    "make_schedule",
    "piecewise_lr",
    "renamed_options",
]

#: Baselines by the name ``eval.py --method`` uses.
BASELINES: dict[str, type[RegistrationModule]] = {
    "identity": Identity,
    "gn": HandcraftedGN,
    "adam": AdamIO,
    "convexadam": ConvexAdam,
}


def make_baseline(name: str, **kwargs: Any) -> RegistrationModule:
    """Instantiate the baseline called ``name`` (see :data:`BASELINES`) with ``kwargs`` as init arguments.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    key = str(name).lower()
    if key not in BASELINES:
        raise ValueError(f"unknown baseline method {name!r}; known methods: {', '.join(BASELINES)}")
    return BASELINES[key](**kwargs)

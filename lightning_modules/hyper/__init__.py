"""Learned hyper-parameters (docs/design.md §5).

* :class:`BilevelLearnGN` — λ (scalar, per iteration or a schedule; optionally GN step sizes) learned on the
  ``hyper`` split by bilevel optimisation (manual optimisation, two optimisers);
* :class:`HyperLearnGN` — heads conditioned on ``log λ`` (FiLM), amortised over a range;
* :mod:`~lightning_modules.hyper.lam_selection` — λ of any LearnGN at test time: :func:`select_lambda` chooses it
  for a dataset, :func:`resolve_lambda` is ``eval.py --lam <value|auto>``;
* :class:`ScheduleMetaLearner` — a learned learning-rate schedule for Adam instance optimisation, meta-trained
  through the differentiable Adam of :mod:`layers.optim`; :func:`load_schedule` gives what
  ``AdamIO(schedule=...)`` takes.
"""

from .bilevel import BilevelLearnGN
from .hypernet import HyperLearnGN
from .lam_selection import LambdaSelection, apply_lambda, current_lambda, resolve_lambda, select_lambda
from .schedule import ScheduleMetaLearner, adam_settings, load_schedule, save_schedule

__all__ = [
    "BilevelLearnGN",
    "HyperLearnGN",
    "LambdaSelection",
    "ScheduleMetaLearner",
    "adam_settings",
    "apply_lambda",
    "current_lambda",
    "load_schedule",
    "resolve_lambda",
    "save_schedule",
    "select_lambda",
]

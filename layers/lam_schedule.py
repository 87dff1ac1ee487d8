"""The one home of λ: :class:`LambdaSchedule`, the per-iteration regularisation weight of the GN iterations
(docs/design.md §5, "The λ schedule").

λ_t, ``t = 0 .. K − 1``, weighs the Laplacian energy of GN iteration ``t`` (docs/design.md §3; dimensionless,
in the scale of the data term). Every kind starts from a reference schedule ``λ_t^ref`` (``(start, end)``:
geometric, :func:`geometric_schedule`) whose shape is ``r_t = λ_t^ref / λ_0^ref`` (:func:`schedule_ratio`):

* ``fixed``: ``λ_t = λ_t^ref`` (a buffer, not learned);
* ``per_iteration``: ``λ_t = exp(log_lam_t)``, ``log_lam`` ``(K,)`` a parameter initialised at the reference;
* ``scalar``: ``λ_t = exp(log_lam) · r_t``, ``log_lam`` ``(1,)`` a parameter (λ is the first-iteration value);
* ``fourier``: a :class:`layers.optim.FourierSchedule` of the iteration index around the reference (``net``);
* ``conditioned``: ``λ_t = exp(log_lam) · r_t`` with ``log_lam`` ``()`` a buffer, the conditioning input of a
  λ-conditioned model, replaced per call by :meth:`LambdaSchedule.values` ``(log_lam=...)``.

:meth:`LambdaSchedule.values` is what the GN module (:class:`layers.gn.GNRegistration`) reads;
:meth:`LambdaSchedule.set_lambda` rescales any kind to a new first-iteration value, the shape kept
(``eval.py --lam``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from .enums import LamKind
from .optim.fourier import FourierSchedule

log = logging.getLogger(__name__)

__all__ = ["LambdaSchedule", "geometric_schedule", "schedule_ratio"]


class LambdaSchedule(nn.Module):
    """λ per GN iteration, ``(K,)`` positive values (docs/design.md §5).

    Args:
        lam: the reference schedule: ``(start, end)`` (geometric over the K iterations, unless ``iterations``
            is 2) or K values, all > 0.
        iterations: K.
        kind: a :class:`layers.enums.LamKind` (``"fixed"``, ``"per_iteration"``, ``"scalar"``, ``"fourier"``,
            ``"conditioned"``; see the module docstring).
        lam_init: the first-iteration λ of the learned / conditioned kinds (the reference's shape scaled to
            it, computed in float64). None: the reference itself (``per_iteration``: the log of the float32
            reference values; the other kinds: ``λ_0^ref``).
        log_range: ``(log λ_min, log λ_max)``, the trained range of a ``conditioned`` schedule (:meth:`set_lambda`
            warns outside it); ``(lo, hi)`` also clamps the learned kinds in :meth:`clamp_`.

    State (float32 unless the module is converted): ``fixed`` ``(K,)`` buffer (``fixed``), ``ratio`` ``(K,)``
    buffer (``scalar``, ``conditioned``; not saved, rebuilt from the reference), ``log_lam`` (parameter ``(K,)``
    / ``(1,)``, or the buffer ``()`` of ``conditioned``, saved) and ``net`` (``fourier``).
    """

    def __init__(
        self,
        lam: Sequence[float],
        iterations: int,
        kind: str = LamKind.FIXED,
        lam_init: float | None = None,
        log_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.kind = LamKind.lookup(kind, "lam kind")
        reference = _reference(lam, iterations)
        self.iterations = len(reference)
        self.log_range = None if log_range is None else (float(log_range[0]), float(log_range[1]))
        base = torch.tensor(reference).double()  # (K,) the float32 reference, in float64
        lam0 = float(base[0]) if lam_init is None else float(lam_init)
        if not (math.isfinite(lam0) and lam0 > 0):
            raise ValueError(f"lam_init must be a finite positive number; got {lam_init}")
        self.net: FourierSchedule | None = None
        if self.kind == LamKind.FIXED:
            self.register_buffer("fixed", torch.tensor(reference), persistent=False)
        elif self.kind == LamKind.PER_ITERATION:
            init = torch.tensor(reference).log() if lam_init is None else (lam0 * schedule_ratio(base)).log().float()
            self.log_lam = nn.Parameter(init)
        elif self.kind == LamKind.FOURIER:
            self.net = FourierSchedule(lam0 * schedule_ratio(base), n_freq=2, hidden=16)
        else:
            self.register_buffer("ratio", schedule_ratio(base).float(), persistent=False)
            if self.kind == LamKind.SCALAR:
                self.log_lam = nn.Parameter(torch.tensor([math.log(lam0)]))
            else:
                self.register_buffer("log_lam", torch.tensor(math.log(lam0)))

    def values(self, log_lam: torch.Tensor | None = None) -> torch.Tensor:
        """λ per iteration ``(K,)``, differentiable in the learned parameters.

        ``log_lam``: a first-iteration ``log λ`` ``()`` (or ``(B,)``, one per batch item) that replaces the
        schedule's own scale, the shape kept (the conditioning input; the variable of test-time λ selection,
        :func:`lightning_modules.hyper.lam_selection.select_lambda`); returns ``(K,)`` (or ``(K, B)``),
        differentiable in ``log_lam``.
        """
        if log_lam is not None:
            ratio = self.shape().to(log_lam.device)
            return log_lam.exp() * ratio if log_lam.dim() == 0 else ratio[:, None] * log_lam.exp()[None, :]
        if self.kind == LamKind.FIXED:
            return self.fixed
        if self.kind == LamKind.PER_ITERATION:
            return self.log_lam.exp()
        if self.kind == LamKind.FOURIER:
            return self.net.values().float()
        return self.log_lam.exp() * self.ratio

    def forward(self, log_lam: torch.Tensor | None = None) -> torch.Tensor:
        return self.values(log_lam)

    def shape(self) -> torch.Tensor:
        """The schedule's shape ``r_t = λ_t / λ_0`` ``(K,)`` (dimensionless, detached)."""
        if self.kind == LamKind.CONDITIONED:
            return self.ratio
        return schedule_ratio(self.values().detach())

    def first(self) -> float:
        """The first-iteration λ ``λ_0`` (a float)."""
        return float(self.values()[0].detach())

    @torch.no_grad()
    def set_lambda(self, lam: float) -> None:
        """Rescale the schedule so that its first-iteration value is ``lam`` (> 0; the shape kept); a
        ``conditioned`` schedule warns when ``lam`` is outside ``log_range``."""
        lam = float(lam)
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"λ must be a finite positive number; got {lam}")
        if self.kind == LamKind.CONDITIONED:
            if self.log_range is not None:
                lo, hi = self.log_range
                if not lo - 1e-9 <= math.log(lam) <= hi + 1e-9:
                    log.warning("λ = %.4g is outside the trained range [%.4g, %.4g]", lam, math.exp(lo),
                                math.exp(hi))
            self.log_lam.fill_(math.log(lam))
            return
        ratio = lam / self.first()
        if self.kind == LamKind.FIXED:
            self.fixed.mul_(ratio)
        elif self.kind == LamKind.FOURIER:
            self.net.base.mul_(math.exp(math.log(ratio)))  # exp(log(·)): the rounding of the earlier homes
        else:
            self.log_lam.add_(math.log(ratio))

    @torch.no_grad()
    def clamp_(self, log_min: float, log_max: float) -> None:
        """Clamp a learned ``log_lam`` (``per_iteration``, ``scalar``) to ``[log_min, log_max]``."""
        if self.kind in (LamKind.PER_ITERATION, LamKind.SCALAR):
            self.log_lam.clamp_(log_min, log_max)

    def extra_repr(self) -> str:
        return f"kind={self.kind.value}, iterations={self.iterations}"


def geometric_schedule(start: float, end: float, steps: int) -> list[float]:
    """``steps`` values from ``start`` to ``end`` in geometric progression (``[start]`` when steps == 1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if start <= 0 or end <= 0:
        raise ValueError(f"schedule ends must be > 0; got start={start}, end={end}")
    if steps == 1:
        return [float(start)]
    return [float(start * (end / start) ** (t / (steps - 1))) for t in range(steps)]


def schedule_ratio(schedule: torch.Tensor) -> torch.Tensor:
    """The shape ``r_t = λ_t / λ_0`` ``(K,)`` of a λ schedule ``(K,)`` (dimensionless, ``r_0 = 1``)."""
    return schedule / schedule[:1]


def _reference(lam: Sequence[float], iterations: int) -> list[float]:
    """The reference values (K floats) of ``(start, end)`` or K values; ``ValueError`` otherwise."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1; got {iterations}")
    lam = [float(v) for v in lam]
    if len(lam) == 2 and iterations != 2:
        lam = geometric_schedule(lam[0], lam[1], iterations)
    if len(lam) != iterations or min(lam) <= 0:
        raise ValueError(f"lam must be (start, end) or {iterations} positive values; got {lam}")
    return lam

"""Test-time λ of any LearnGN model (docs/design.md §5): read it, set it, or choose it for a dataset.

λ is the first-iteration GN weight of the model's ``gn.lam`` schedule (:class:`layers.lam_schedule.LambdaSchedule`,
whatever its kind); setting it keeps the schedule's shape. :func:`select_lambda` chooses λ for a dataset by
gradient descent on a validation loss over ``log λ``, cross-checked by a sweep; :func:`resolve_lambda` is the
entry point of ``eval.py --lam <value|auto>``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from layers.enums import Guard
from layers.losses import outer_loss
from lightning_modules.learngn import LearnGN

log = logging.getLogger(__name__)

__all__ = ["LambdaSelection", "apply_lambda", "current_lambda", "is_auto", "resolve_lambda", "run_with_log_lam",
           "select_lambda"]


def current_lambda(model: LearnGN) -> float:
    """The first-iteration λ any LearnGN model registers with (``gn.lam``)."""
    return model.gn.lam.first()


def run_with_log_lam(model: LearnGN, batch: dict[str, Any], log_lam: torch.Tensor) -> torch.Tensor:
    """Full-resolution field ``(B, n, *S)`` of ``model`` with first-iteration λ = ``exp(log_lam)`` (``()``),
    the schedule shape kept; differentiable in ``log_lam``."""
    return model.run(batch, log_lam=log_lam).disp


@torch.no_grad()
def apply_lambda(model: LearnGN, lam: float) -> None:
    """Make ``model`` register with first-iteration λ = ``lam`` (the schedule shape kept)."""
    lam = float(lam)
    if not lam > 0:
        raise ValueError(f"λ must be > 0; got {lam}")
    model.set_lambda(lam)


@dataclass
class LambdaSelection:
    """Result of :func:`select_lambda` (λ values are first-iteration GN weights; losses are outer losses).

    Attributes:
        lam: the chosen λ (the gradient-descent one unless the sweep found a clearly lower loss).
        source: ``"gd"`` or ``"sweep"``.
        lam_gd, loss_gd: gradient descent's final λ and its loss.
        lam_sweep, loss_sweep: the best sweep point and its loss.
        sweep: ``[(λ, loss), ...]`` over the sweep.
        trace: ``[(λ, loss), ...]`` along gradient descent (loss before each update).
    """

    lam: float
    source: str
    lam_gd: float
    loss_gd: float
    lam_sweep: float
    loss_sweep: float
    sweep: list[tuple[float, float]] = field(default_factory=list)
    trace: list[tuple[float, float]] = field(default_factory=list)


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def select_lambda(
    model: LearnGN,
    dataloader: Iterable[dict[str, Any]],
    *,
    lam_range: tuple[float, float] | None = None,
    objective: Callable[[dict[str, Any], torch.Tensor], torch.Tensor] | None = None,
    label_kind: str = "dice",
    w_label: float = 1.0,
    w_keypoint: float = 0.0,
    guard: str = "diffusion",
    w_guard: float = 1.0,
    guard_margin: float = 0.0,
    steps: int = 20,
    lr: float = 0.15,
    sweep_points: int = 9,
    max_batches: int | None = 4,
    rel_tol: float = 0.01,
    lam_init: float | None = None,
) -> LambdaSelection:
    """Choose λ for a dataset: gradient descent on a validation loss over ``log λ``, cross-checked by a sweep.

    Args:
        model: a LearnGN, BilevelLearnGN or HyperLearnGN (weights frozen here; λ keeps its schedule shape).
        dataloader: validation batches (the first ``max_batches`` are used, on the model's device).
        lam_range: ``(λ_min, λ_max)``; default: ``gn.lam``'s trained range (a HyperLearnGN's), else 1/30 .. 30 ×
            the current λ.
        objective: ``(batch, u (B, n, *S)) -> scalar`` to minimise; default the outer loss of
            :func:`~layers.losses.outer_loss` (label term + regularity guard) with the
            following arguments.
        label_kind, w_label, w_keypoint, guard, w_guard, guard_margin: the default objective's terms
            (``guard="sdlogj", guard_margin=0.2, w_guard=10``: the best overlap with SDlogJ ≤ 0.2).
        steps, lr: Adam steps on ``log λ`` and their step size (natural-log units); 0: the sweep's best λ.
        sweep_points: log-spaced λ values of the sweep over the range (0: no sweep).
        max_batches: number of batches used (None: all).
        rel_tol: the sweep's λ is taken instead when its loss is lower by more than ``rel_tol`` (relative).
        lam_init: where gradient descent starts (default: the middle of the range in log scale).

    Returns:
        :class:`LambdaSelection`. The model is left unchanged (use :func:`apply_lambda`).
    """
    Guard.lookup(guard, "guard")
    if steps < 0 or sweep_points < 0 or steps + sweep_points == 0:
        raise ValueError(f"select_lambda needs steps, sweep_points >= 0, not both 0; got {steps}, {sweep_points}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 0):
        raise ValueError(f"select_lambda: max_batches must be None or an integer >= 0; got {max_batches!r}")
    device = next(model.parameters()).device
    cached = [_to_device(b, device) for b in itertools.islice(dataloader, max_batches)]
    if not cached:
        raise ValueError("select_lambda needs at least one validation batch")
    if lam_range is None:
        lam0 = current_lambda(model)
        lo, hi = model.gn.lam.log_range or (math.log(lam0 / 30), math.log(lam0 * 30))
    else:
        lo, hi = math.log(lam_range[0]), math.log(lam_range[1])

    def loss_fn(batch: dict[str, Any], u: torch.Tensor) -> torch.Tensor:
        if objective is not None:
            return objective(batch, u)
        terms = outer_loss(
            batch,
            u,
            label_kind=label_kind,
            w_label=w_label,
            w_keypoint=w_keypoint,
            guard=guard,
            w_guard=w_guard,
            guard_margin=guard_margin,
        )
        return torch.stack(list(terms.values())).sum()

    def total(log_lam: torch.Tensor) -> torch.Tensor:
        return torch.stack([loss_fn(b, run_with_log_lam(model, b, log_lam)) for b in cached]).mean()

    start = 0.5 * (lo + hi) if lam_init is None else min(max(math.log(lam_init), lo), hi)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), _frozen(model):
            sweep = _sweep(total, lo, hi, sweep_points, device)
            lam_gd, loss_gd, trace = _descend(total, start, lo, hi, steps, lr, device)
    finally:
        model.train(was_training)
    lam_sw, loss_sw = min(sweep, key=lambda t: t[1]) if sweep else (lam_gd, loss_gd)
    source, lam = "gd", lam_gd
    if steps == 0 and sweep:  # no descent: its "λ" is only the starting point
        source, lam = "sweep", lam_sw
    elif loss_sw < loss_gd - rel_tol * abs(loss_gd):
        log.warning(
            "select_lambda: the sweep's λ = %.4g (loss %.5g) beats gradient descent's λ = %.4g (loss %.5g); "
            "using the sweep's",
            lam_sw,
            loss_sw,
            lam_gd,
            loss_gd,
        )
        source, lam = "sweep", lam_sw
    return LambdaSelection(lam, source, lam_gd, loss_gd, lam_sw, loss_sw, sweep, trace)


@torch.no_grad()
def _sweep(total: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float, points: int,
           device: torch.device) -> list[tuple[float, float]]:
    """``[(λ, loss)]`` at ``points`` log-spaced λ over ``[exp(lo), exp(hi)]``."""
    out = []
    for k in range(points):
        ll = lo + (hi - lo) * k / max(points - 1, 1)
        out.append((math.exp(ll), float(total(torch.tensor(ll, device=device)))))
    return out


def _descend(total: Callable[[torch.Tensor], torch.Tensor], start: float, lo: float, hi: float, steps: int,
             lr: float, device: torch.device) -> tuple[float, float, list[tuple[float, float]]]:
    """Adam on ``log λ`` from ``start``, clamped to ``[lo, hi]``: the final λ, its loss (inf without steps) and
    the trace ``[(λ, loss before the update)]``."""
    log_lam = torch.tensor(start, device=device, requires_grad=True)
    opt = torch.optim.Adam([log_lam], lr=lr)
    trace: list[tuple[float, float]] = []
    for _ in range(steps):
        loss = total(log_lam)
        trace.append((math.exp(float(log_lam.detach())), float(loss.detach())))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            log_lam.clamp_(lo, hi)
    lam, loss = math.exp(float(log_lam.detach())), math.inf
    if steps:
        with torch.no_grad():
            loss = float(total(log_lam))
    return lam, loss, trace


def is_auto(lam: Any) -> bool:
    """Whether a ``--lam`` value asks for automatic selection (the string ``"auto"``, any case)."""
    return isinstance(lam, str) and lam.strip().lower() == "auto"


def resolve_lambda(
    model: LearnGN, lam: str | float | None, dataloader: Iterable[dict[str, Any]] | None = None, **kwargs: Any
) -> float:
    """``eval.py --lam <value|auto>``: set the model's λ and return it.

    Args:
        model: a LearnGN, BilevelLearnGN or HyperLearnGN.
        lam: a positive number (or its string), ``"auto"`` (:func:`select_lambda` on ``dataloader``, which
            should be a validation split, not the test split), or None (keep the model's λ).
        dataloader: batches for ``"auto"``.
        kwargs: :func:`select_lambda` options.

    Returns:
        the first-iteration λ the model now registers with.
    """
    if lam is None:
        return current_lambda(model)
    if is_auto(lam):
        if dataloader is None:
            raise ValueError("--lam auto needs a dataloader of validation pairs")
        choice = select_lambda(model, dataloader, **kwargs)
        log.info(
            "λ selected: %.5g (%s; gradient descent %.5g with loss %.5g, sweep best %.5g with loss %.5g)",
            choice.lam,
            choice.source,
            choice.lam_gd,
            choice.loss_gd,
            choice.lam_sweep,
            choice.loss_sweep,
        )
        value = choice.lam
    else:
        try:
            value = float(lam)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--lam must be a positive number or 'auto'; got {lam!r}") from exc
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"λ must be a finite positive number; got {value}")
    apply_lambda(model, value)
    return current_lambda(model)

"""Amortised λ: LearnGN with λ-conditioned heads (HyperMorph-style), and test-time λ selection (docs/design.md §5).

:class:`HyperLearnGN` modulates the compact heads with a FiLM MLP of ``log λ``
(:class:`layers.conditioning.FiLMHeads`, identity at initialisation) and trains with ``log λ`` drawn
log-uniformly in ``[log λ_min, log λ_max]`` for every batch (plus a fraction of draws exactly at the two
ends). λ itself lives where every LearnGN keeps it, ``gn.lam``, here a ``conditioned``
:class:`~layers.lam_schedule.LambdaSchedule`: ``λ_t = λ · r_t`` with ``r_t = λ_t^ref / λ_0^ref``, so λ is the
first-iteration value; this module only feeds its ``log λ`` to the heads as well.
With ``reg_scaling`` the regularity term of the training loss is weighted by ``λ / lam_start``, so that each
λ corresponds to a different trade-off (as in HyperMorph, where λ weighs the loss); without it the heads could
learn to undo λ.

At test time λ is chosen for a dataset by gradient descent on a validation loss over ``log λ``
(:func:`select_lambda`), cross-checked by a sweep. :func:`resolve_lambda` is the entry point of
``eval.py --lam <value|auto>``; :func:`apply_lambda` sets λ on any LearnGN model (``LearnGN.set_lambda``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from layers.conditioning import FiLMHeads
from layers.gn import GNOutput
from layers.heads import CompactHeads
from layers.lam_schedule import LambdaSchedule
from lightning_modules.base import check_number
from lightning_modules.checkpoint import load_init_weights
from lightning_modules.learngn import LearnGN

from .objectives import Guard, outer_loss

log = logging.getLogger(__name__)

__all__ = [
    "HyperLearnGN",
    "LambdaSelection",
    "apply_lambda",
    "current_lambda",
    "is_auto",
    "resolve_lambda",
    "run_with_log_lam",
    "select_lambda",
]


def _into_film_heads(key: str) -> str:
    """Checkpoint key of a plain LearnGN head (``gn.jf.<x>``) -> the wrapped one (``gn.jf.heads.<x>``)."""
    if key.startswith("gn.jf.") and not key.startswith(("gn.jf.heads.", "gn.jf.film.")):
        return "gn.jf.heads." + key[len("gn.jf.") :]
    return key


class HyperLearnGN(LearnGN):
    """LearnGN amortised over λ: FiLM-conditioned heads trained with log-uniformly sampled λ.

    Args:
        lam_min, lam_max: the trained range of λ (first-iteration GN weight, dimensionless).
        p_end: probability that a batch's λ is drawn exactly at one end of the range (half each).
        film_hidden, film_depth: size of the conditioning MLP.
        reg_scaling: weight the regularity term of the training loss (``w_reg``) by ``λ / lam_start``.
        lam_eval: λ used by :meth:`register` (validation, ``eval.py``) until :meth:`set_lambda`; default: the
            geometric mean of the range (``gn.lam.log_lam``, a buffer).
        anneal: cosine-anneal the learning rate to ``0.1 · lr`` over the training steps (the λ draws make the
            gradients noisy; without annealing the last updates favour the last draws).
        init_from: a LearnGN or HyperLearnGN checkpoint whose weights initialise the model (the FiLM MLP stays
            at the identity for a LearnGN one).
        **kwargs: :class:`~lightning_modules.learngn.LearnGN` arguments.
    """

    method_name = "learngn_hyper"

    def __init__(
        self,
        lam_min: float = 0.01,
        lam_max: float = 10.0,
        p_end: float = 0.2,
        film_hidden: int = 32,
        film_depth: int = 2,
        reg_scaling: bool = True,
        lam_eval: float | None = None,
        anneal: bool = True,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("learn_schedule"):
            raise ValueError("HyperLearnGN takes λ from its conditioning: learn_schedule is not supported")
        lam_min = check_number("lam_min", lam_min, low=0, strict=True)
        if not lam_min < check_number("lam_max", lam_max, low=0, strict=True):
            raise ValueError(f"need 0 < lam_min < lam_max; got {lam_min}, {lam_max}")
        if lam_eval is not None:
            check_number("lam_eval", lam_eval, low=0, strict=True)
        super().__init__(**kwargs)
        if not 0 <= check_number("p_end", p_end) <= 1:
            raise ValueError(f"p_end must be in [0, 1]; got {p_end}")
        film_hidden = check_number("film_hidden", film_hidden, low=1, integer=True)
        film_depth = check_number("film_depth", film_depth, low=1, integer=True)
        if reg_scaling and self.hparams.w_reg <= 0:
            log.warning(
                "HyperLearnGN with w_reg = 0: the training loss does not depend on λ, so the "
                "conditioned heads may learn to undo λ"
            )
        self.gn.jf = FiLMHeads(self.heads, self.gn.lam.log_range, film_hidden, film_depth)
        if init_from:
            fresh = ("gn.jf.film.", "gn.lam.")
            load_init_weights(self, init_from, classes=(type(self), LearnGN), allowed_missing=fresh,
                              allowed_extra=fresh, rename=_into_film_heads)
            log.info("initialised HyperLearnGN weights from %s", init_from)

    @property
    def heads(self) -> CompactHeads:
        """The learned ``J`` / ``f`` heads (inside the FiLM conditioning)."""
        jf = self.gn.jf
        return jf.heads if isinstance(jf, FiLMHeads) else jf

    @property
    def film_heads(self) -> FiLMHeads:
        """The conditioned heads (``self.heads`` wrapped with the FiLM MLP)."""
        return self.gn.jf

    # --- λ ------------------------------------------------------------------------------------------------
    def make_lam_schedule(self) -> LambdaSchedule:
        """``gn.lam``: the reference schedule's shape scaled by a set (or per call given) ``log λ``, first value
        ``lam_eval``, trained range ``[lam_min, lam_max]``."""
        hp = self.hparams
        lam_eval = math.sqrt(hp.lam_min * hp.lam_max) if hp.lam_eval is None else float(hp.lam_eval)
        return LambdaSchedule((hp.lam_start, hp.lam_end), hp.iterations, kind="conditioned", lam_init=lam_eval,
                              log_range=(math.log(hp.lam_min), math.log(hp.lam_max)))

    def sample_log_lam(self) -> torch.Tensor:
        """One ``log λ`` draw ``()``: log-uniform in the range, or an end with probability ``p_end``."""
        lo, hi = self.gn.lam.log_range
        r = torch.rand(2, device=self.device)
        if float(r[0]) < self.hparams.p_end:
            return torch.tensor(lo if float(r[1]) < 0.5 else hi, device=self.device)
        return lo + (hi - lo) * r[1]

    def run(self, batch: dict[str, Any], lam: torch.Tensor | None = None, step: torch.Tensor | None = None, *,
            log_lam: torch.Tensor | float | None = None, **kwargs: Any) -> GNOutput:
        """K GN iterations with the heads conditioned on ``log λ`` (``()`` or ``(B,)``; default ``gn.lam``'s).

        The GN schedule is ``gn.lam.values(log λ) = exp(log λ) · r_t`` unless ``lam`` (``(K,)`` / ``(K, B)``)
        overrides it (:meth:`LearnGN.run`).
        """
        log_lam = self.gn.lam.log_lam if log_lam is None else torch.as_tensor(log_lam, device=self.device)
        with self.film_heads.condition(log_lam):
            return super().run(batch, lam=lam, step=step, log_lam=log_lam, **kwargs)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.run(batch).disp

    # --- training -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = super().configure_optimizers()
        if not self.hparams.anneal or self._trainer is None:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        # cosine annealing of every group's own rate down to 10 % of it (CosineAnnealingLR's eta_min would be one
        # absolute value for all groups, wrong for an encoder group with its own rate)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def registration_terms(self, batch: dict[str, Any], maps: tuple[torch.Tensor, torch.Tensor] | None = None
                           ) -> dict[str, torch.Tensor]:
        """The registration's loss terms at a drawn ``log λ`` (:meth:`sample_log_lam`), the diffusion term
        weighted by ``λ / lam_start`` with ``reg_scaling``; :meth:`LearnGN.training_step` adds the semantic
        network's own loss and logs."""
        log_lam = self.sample_log_lam()
        u = self.run(batch, log_lam=log_lam, maps=maps).disp
        terms = self.loss_terms(batch, u)
        if self.hparams.reg_scaling and "reg" in terms:
            terms["reg"] = terms["reg"] * (log_lam.exp() / self.hparams.lam_start)
        self.log("train/log_lam", float(log_lam), on_step=True, on_epoch=False)
        return terms


# ------------------------------------------------------------------------------------------ λ of any model


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
            :func:`~lightning_modules.hyper.objectives.outer_loss` (label term + regularity guard) with the
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
    device = next(model.parameters()).device
    cached = []
    for i, b in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        cached.append(_to_device(b, device))
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

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), _frozen(model):
            sweep: list[tuple[float, float]] = []
            with torch.no_grad():
                for k in range(sweep_points):
                    ll = lo + (hi - lo) * k / max(sweep_points - 1, 1)
                    sweep.append((math.exp(ll), float(total(torch.tensor(ll, device=device)))))
            start = 0.5 * (lo + hi) if lam_init is None else min(max(math.log(lam_init), lo), hi)
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
            lam_gd, loss_gd = math.exp(float(log_lam.detach())), math.inf
            if steps:
                with torch.no_grad():
                    loss_gd = float(total(log_lam))
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

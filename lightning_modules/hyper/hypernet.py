"""Amortised λ: LearnGN with λ-conditioned heads (HyperMorph-style; docs/design.md §5).

:class:`HyperLearnGN` modulates the compact heads with a FiLM MLP of ``log λ``
(:class:`layers.conditioning.FiLMHeads`, identity at initialisation) and trains with ``log λ`` drawn
log-uniformly in ``[log λ_min, log λ_max]`` for every batch (plus a fraction of draws exactly at the two
ends). λ itself lives where every LearnGN keeps it, ``gn.lam``, here a ``conditioned``
:class:`~layers.lam_schedule.LambdaSchedule`: ``λ_t = λ · r_t`` with ``r_t = λ_t^ref / λ_0^ref``, so λ is the
first-iteration value; this module only feeds its ``log λ`` to the heads as well.
With ``reg_scaling`` the regularity term of the training loss is weighted by ``λ / lam_start``, so that each
λ corresponds to a different trade-off (as in HyperMorph, where λ weighs the loss); without it the heads could
learn to undo λ.

At test time λ is chosen for a dataset by :mod:`lightning_modules.hyper.lam_selection` (any LearnGN model).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from data.checkpoint import load_init_weights
from layers.conditioning import FiLMHeads
from layers.gn import GNOutput
from layers.heads import CompactHeads
from layers.lam_schedule import LambdaSchedule
from lightning_modules.base import check_number
from lightning_modules.learngn import LearnGN

log = logging.getLogger(__name__)

__all__ = ["HyperLearnGN"]


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

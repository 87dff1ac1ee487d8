"""Bilevel learning of the GN regularisation weight λ for LearnGN (docs/design.md §5).

λ lives where every LearnGN keeps it, the :class:`~layers.lam_schedule.LambdaSchedule` ``gn.lam``, here of kind
``lam_mode`` (one learned scalar that scales the reference λ schedule, one value per GN iteration, or a
:class:`~layers.optim.FourierSchedule` of the iterations); optionally the GN step sizes α are learned too. This
module only decides which optimiser updates what. Manual optimisation with two optimisers:

* **inner** (every training step, ``train`` split): the network weights minimise the LearnGN training loss
  with λ held fixed (detached);
* **outer** (every ``hyper_every`` steps after ``hyper_warmup`` steps, ``hyper`` split): ``log λ`` minimises
  the outer loss (label / keypoint error + a regularity guard,
  :func:`~layers.losses.outer_loss`) with the network weights held fixed. The
  hypergradient reaches λ through every GN iteration: each solve returns ``λ̄ = −yᵀ (L⊗I) x`` by
  implicit differentiation (:func:`layers.gn_solve`).

The hyper batches come from ``trainer.datamodule.hyper_dataloader()`` (cycled), or from any iterable assigned
to :attr:`BilevelLearnGN.hyper_source`. λ, the outer loss terms and the folding fraction of the hyper batch
(:func:`layers.metrics.jacobian_stats`) are logged under ``hyper/``; λ's parameters are in the
checkpoint (and so is the inner step counter, a buffer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from data.checkpoint import load_init_weights
from layers.enums import Guard, LabelLoss, LamKind
from layers.gn import GNOutput
from layers.lam_schedule import LambdaSchedule
from layers.losses import outer_loss
from layers.metrics import jacobian_stats
from layers.optim import FourierSchedule
from lightning_modules.base import check_number
from lightning_modules.learngn import LearnGN

log = logging.getLogger(__name__)

__all__ = ["LAM_MODES", "BilevelLearnGN"]

#: Parametrisations of λ: one scalar scaling the schedule, one value per iteration, or a Fourier schedule.
LAM_MODES = (LamKind.SCALAR.value, LamKind.PER_ITERATION.value, LamKind.FOURIER.value)


class BilevelLearnGN(LearnGN):
    """LearnGN whose λ (optionally also the GN step sizes) is learned on the ``hyper`` split (bilevel).

    Args:
        lam_mode: the kind of ``gn.lam`` (:class:`~layers.lam_schedule.LambdaSchedule`): ``"scalar"`` (one
            ``log λ``; λ_t = λ·r_t with ``r_t`` the shape of the reference geometric schedule
            ``lam_start → lam_end``, so λ is the first-iteration value), ``"per_iteration"`` (K values
            ``log λ_t``) or ``"fourier"`` (a :class:`FourierSchedule` of the iteration index, initialised to the
            reference schedule).
        lam_init: initial λ (first iteration; default ``lam_start``).
        learn_step: also learn the GN step sizes α_t (a :class:`FourierSchedule` around ``step``) on the hyper
            split.
        hyper_lr: Adam learning rate of the hyper-parameters (units of ``log λ`` per step).
        hyper_warmup: inner steps before the first λ update.
        hyper_every: one λ update every ``hyper_every`` inner steps.
        outer_label: ``"dice"`` or ``"mse"``, the label term of the outer loss.
        w_outer_label, w_outer_keypoint: outer loss weights of the label term and the keypoint distance (mm).
        outer_guard: ``"diffusion"``, ``"negjac"`` (mean ``relu(margin − det J)``), ``"sdlogj"`` (mean
            ``relu(SDlogJ − margin)``, the evaluation metric) or ``"none"`` (no guard: a Dice-only outer loss
            pulls λ down, towards 0 where rougher fields keep improving the overlap).
        w_guard: weight of the guard; guard_margin: the Jacobian margin of ``"negjac"``, the SDlogJ bound of
            ``"sdlogj"``.
        folding_threshold: folding fraction above which a warning is logged (and ``hyper/folding_ok`` is 0).
        log_lam_min, log_lam_max: ``log λ`` is clamped to this range after every update.
        train_network: False: only λ is learned (the inner step is skipped; e.g. tuning a trained model).
        init_from: a LearnGN or BilevelLearnGN checkpoint whose weights initialise the model (λ from a
            BilevelLearnGN checkpoint; kept at ``lam_init`` for a LearnGN one).
        **kwargs: :class:`~lightning_modules.learngn.LearnGN` arguments (``features``, ``iterations``, ...).
    """

    method_name = "learngn_bilevel"

    def __init__(
        self,
        lam_mode: str = "scalar",
        lam_init: float | None = None,
        learn_step: bool = False,
        hyper_lr: float = 0.05,
        hyper_warmup: int = 0,
        hyper_every: int = 1,
        outer_label: str = "dice",
        w_outer_label: float = 1.0,
        w_outer_keypoint: float = 0.0,
        outer_guard: str = "diffusion",
        w_guard: float = 1.0,
        guard_margin: float = 0.0,
        folding_threshold: float = 0.01,
        log_lam_min: float = -9.0,
        log_lam_max: float = 9.0,
        train_network: bool = True,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("learn_schedule"):
            raise ValueError(
                "BilevelLearnGN learns λ on the hyper split: use lam_mode / learn_step, not "
                "learn_schedule (which would train λ on the train split)"
            )
        if lam_mode not in LAM_MODES:
            raise ValueError(f"unknown lam_mode {lam_mode!r}; known: {', '.join(LAM_MODES)}")
        if lam_init is not None:
            check_number("lam_init", lam_init, low=0, strict=True)
        super().__init__(**kwargs)
        Guard.lookup(outer_guard, "outer_guard")
        LabelLoss.lookup(outer_label, "outer_label")
        hyper_every = check_number("hyper_every", hyper_every, low=1, integer=True)
        hyper_warmup = check_number("hyper_warmup", hyper_warmup, low=0, integer=True)
        check_number("hyper_lr", hyper_lr, low=0, strict=True)
        for name, value in (("w_outer_label", w_outer_label), ("w_outer_keypoint", w_outer_keypoint),
                            ("w_guard", w_guard), ("folding_threshold", folding_threshold)):
            check_number(name, value, low=0)
        check_number("guard_margin", guard_margin)
        if not check_number("log_lam_min", log_lam_min) < check_number("log_lam_max", log_lam_max):
            raise ValueError(f"need log_lam_min < log_lam_max; got {log_lam_min}, {log_lam_max}")
        self.automatic_optimization = False
        self.step_net = (
            FourierSchedule(self.gn.step_schedule.double(), n_freq=2, hidden=16) if learn_step else None
        )
        self.register_buffer("inner_steps", torch.zeros((), dtype=torch.long))
        self.hyper_source: Iterable[Any] | None = None
        self._hyper_iter: Iterator[Any] | None = None
        if init_from:
            fresh = ("gn.lam.", "step_net.", "inner_steps", "log_step")
            load_init_weights(self, init_from, classes=(type(self), LearnGN), allowed_missing=fresh,
                              allowed_extra=fresh)
            log.info("initialised BilevelLearnGN weights from %s", init_from)

    def make_lam_schedule(self) -> LambdaSchedule:
        """``gn.lam`` of kind ``lam_mode`` around the reference schedule, first value ``lam_init`` (default
        ``lam_start``)."""
        hp = self.hparams
        # lam_init given explicitly (also as the float32 lam_start): initialised in float64 from the shape
        lam0 = float(torch.tensor(float(hp.lam_start))) if hp.lam_init is None else float(hp.lam_init)
        return LambdaSchedule((hp.lam_start, hp.lam_end), hp.iterations, kind=hp.lam_mode, lam_init=lam0)

    # --- hyper-parameters ---------------------------------------------------------------------------------
    def hyper_parameters(self) -> list[nn.Parameter]:
        """The parameters updated on the hyper split (λ's, ``gn.lam``, and the step schedule network)."""
        params = list(self.gn.lam.parameters())
        if self.step_net is not None:
            params += list(self.step_net.parameters())
        return params

    def network_parameters(self) -> list[nn.Parameter]:
        """The parameters updated on the train split (everything but :meth:`hyper_parameters`)."""
        hyper = {id(p) for p in self.hyper_parameters()}
        return [p for p in self.parameters() if id(p) not in hyper]

    def step_values(self) -> torch.Tensor | None:
        """GN step sizes α per iteration ``(K,)`` when learned, else None (the fixed schedule)."""
        return None if self.step_net is None else self.step_net.values().float()

    def clamp_hyper_(self) -> None:
        """Clamp a learned ``log λ`` to ``[log_lam_min, log_lam_max]``
        (:meth:`~layers.lam_schedule.LambdaSchedule.clamp_`)."""
        self.gn.lam.clamp_(self.hparams.log_lam_min, self.hparams.log_lam_max)

    # --- registration ---------------------------------------------------------------------------------------
    def run(self, batch: dict[str, Any], lam: torch.Tensor | None = None, step: torch.Tensor | None = None,
            **kwargs: Any) -> GNOutput:
        """K GN iterations with λ from ``gn.lam`` (``lam``: ``(K,)`` / ``(K, B)`` override; ``kwargs``:
        :meth:`LearnGN.run`'s) and the learned step sizes."""
        step = self.step_values() if step is None else step
        return super().run(batch, lam=lam, step=step, **kwargs)

    # --- hyper batches --------------------------------------------------------------------------------------
    def next_hyper_batch(self) -> dict[str, Any]:
        """The next batch of the hyper split, on this module's device (the source is cycled)."""
        if self._hyper_iter is None:
            if self.hyper_source is not None:
                source: Any = self.hyper_source
            else:
                dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
                if dm is None or not hasattr(dm, "hyper_dataloader"):
                    raise RuntimeError(
                        "BilevelLearnGN needs a hyper split: fit with a datamodule that has "
                        "hyper_dataloader() (RegistrationDataModule with num_hyper > 0 or "
                        "hyper_fraction > 0), or set model.hyper_source"
                    )
                source = dm.hyper_dataloader
            self._hyper_iter = _cycle(source)
        batch = next(self._hyper_iter)
        return self.transfer_batch_to_device(batch, self.device, 0)

    def outer_terms(self, batch: dict[str, Any], u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Terms of the outer loss for a batch and its full-resolution field ``u`` ``(B, n, *S)``."""
        hp = self.hparams
        ids = self._label_ids(batch) if batch.get("fixed_label") is not None else None
        return outer_loss(
            batch,
            u,
            label_ids=ids,
            label_kind=hp.outer_label,
            w_label=hp.w_outer_label,
            w_keypoint=hp.w_outer_keypoint,
            guard=hp.outer_guard,
            w_guard=hp.w_guard,
            guard_margin=hp.guard_margin,
        )

    # --- training -----------------------------------------------------------------------------------------
    def hyper_due(self) -> bool:
        """Whether the current inner step (after its increment) is followed by a λ update."""
        hp = self.hparams
        k = int(self.inner_steps)
        return k > hp.hyper_warmup and (k - hp.hyper_warmup) % hp.hyper_every == 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        opt_net, _ = self.optimizers()
        hp = self.hparams
        bsz = batch["fixed"].shape[0]
        loss = batch["fixed"].new_zeros(())
        if hp.train_network:
            with self.toggled_optimizer(opt_net):
                lam = self.lam_values().detach()
                step = self.step_values()
                u = self.run(batch, lam=lam, step=None if step is None else step.detach()).disp
                terms = self.loss_terms(batch, u)
                loss = torch.stack(list(terms.values())).sum()
                opt_net.zero_grad()
                self.manual_backward(loss)
                opt_net.step()
            self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=bsz)
            for k, v in terms.items():
                self.log(f"train/{k}", v.detach(), on_step=False, on_epoch=True, batch_size=bsz)
        self.inner_steps += 1
        if self.hyper_due():
            self.hyper_step()
        lam = self.lam_values().detach()
        self.log("hyper/lam", float(lam[0]), prog_bar=True, on_step=True, on_epoch=False)
        self.log("hyper/lam_last", float(lam[-1]), on_step=True, on_epoch=False)
        return loss.detach()

    def hyper_step(self) -> dict[str, torch.Tensor]:
        """One update of the hyper-parameters on the next hyper batch; returns the outer terms (detached)."""
        _, opt_hyper = self.optimizers()
        batch = self.next_hyper_batch()
        bsz = batch["fixed"].shape[0]
        with self.toggled_optimizer(opt_hyper):
            u = self.run(batch).disp
            terms = self.outer_terms(batch, u)
            outer = torch.stack(list(terms.values())).sum()
            opt_hyper.zero_grad()
            self.manual_backward(outer)
            opt_hyper.step()
        self.clamp_hyper_()
        folding = float(jacobian_stats(u.detach(), batch.get("fixed_mask"))["folding"].nanmean())
        if folding > self.hparams.folding_threshold:
            log.warning(
                "hyper batch folding fraction %.4f above the threshold %.4f (λ = %.4g)",
                folding,
                self.hparams.folding_threshold,
                float(self.lam_values()[0].detach()),
            )
        self.log("hyper/outer_loss", outer.detach(), on_step=True, on_epoch=True, batch_size=bsz)
        for k, v in terms.items():
            self.log(f"hyper/{k}", v.detach(), on_step=False, on_epoch=True, batch_size=bsz)
        self.log("hyper/folding", folding, on_step=True, on_epoch=True, batch_size=bsz)
        self.log(
            "hyper/folding_ok",
            float(folding <= self.hparams.folding_threshold),
            on_step=False,
            on_epoch=True,
            batch_size=bsz,
        )
        return {k: v.detach() for k, v in terms.items()}

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.run(batch).disp

    def configure_optimizers(self):
        hp = self.hparams
        opt_net = torch.optim.Adam(self.param_groups(self.network_parameters()), lr=hp.lr,
                                   weight_decay=hp.weight_decay)
        opt_hyper = torch.optim.Adam(self.hyper_parameters(), lr=hp.hyper_lr)
        return [opt_net, opt_hyper]


def _cycle(make_iterable: Any) -> Iterator[Any]:
    """Endless iterator over ``make_iterable()`` (e.g. a DataLoader factory), restarted when exhausted.

    ``make_iterable`` is a zero-argument callable returning an iterable (called again at every pass, so a
    shuffled DataLoader reshuffles) or an iterable that can be iterated repeatedly.
    """
    while True:
        source: Iterable[Any] = make_iterable() if callable(make_iterable) else make_iterable
        empty = True
        for item in source:
            empty = False
            yield item
        if empty:
            raise RuntimeError("cannot cycle over an empty iterable")

"""LearnGN: Gauss-Newton registration whose Jacobians and residuals come from compact CNN heads (docs/design.md §4).

K GN iterations at stride ``s`` (``layers.gn.GNRegistration``) with :class:`layers.heads.CompactHeads`
initialised to the handcrafted operators, so an untrained model equals handcrafted GN. Training
backpropagates through every iteration (warps and implicit-differentiated solves); labels are warped with
the field *after* the last update.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from data.batch import batch_masks
from data.checkpoint import load_init_weights, qualname, rename_legacy_keys
from data.features import FeatureKind, batch_features
from layers.encoder import FeatureEncoder
from layers.enums import LabelLoss, Precision
from layers.gn import GNOutput, GNRegistration
from layers.heads import CompactHeads
from layers.lam_schedule import LambdaSchedule
from layers.losses import keypoint_loss, label_loss, mind_loss, regularity_loss
from layers.metrics import dice_per_label
from layers.metrics.labels import batch_label_ids
from layers.semantic import SemanticNet, semantic_loss, semantic_targets

from .base import RegistrationModule

log = logging.getLogger(__name__)

__all__ = ["LearnGN"]


#: parameters that may be absent from a checkpoint loaded with ``init_from``: an optional module added for
#: fine-tuning (the residual feature encoder starts as the identity, so the loaded model is unchanged)
_FRESH_PREFIXES = ("encoder.",)
#: the options :meth:`LearnGN.configure_inference` changes on a loaded model
INFERENCE_OPTIONS = ("semantic_precision", "use_masks")


class LearnGN(RegistrationModule):
    """Learned Gauss-Newton registration.

    Args:
        spatial_dims: 2 or 3 (data of the other dimensionality is refused).
        features: ``"sdm"`` (signed distance maps of ``label_ids``), ``"mind"`` or ``"intensity"``.
        label_ids: labels encoded by ``"sdm"`` features and supervised by the label loss (default: those of
            the batch, which must then agree with the channel count).
        sdm_scale: divisor of the distance-map features.
        iterations: K GN iterations.
        stride: grid stride ``s``.
        lam_start, lam_end: the reference geometric λ schedule over the iterations (docs/design.md §5): the
            model's λ is ``self.gn.lam``, a :class:`layers.lam_schedule.LambdaSchedule` built from it (fixed;
            learned per iteration with ``learn_schedule``; subclasses choose other kinds in
            :meth:`make_lam_schedule`).
        step: GN step size α.
        coupling: ``"full"`` or ``"diagonal"``.
        hidden: width of the optional nonlinear branch of each head (0 = linear heads, the reference).
        encoder_hidden: width of an optional learned residual feature encoder
            (:class:`layers.encoder.FeatureEncoder`, zero-initialised, shared by fixed and moving; 0 = none).
        encoder_depth: hidden layers of that encoder.
        encoder_lr: Adam learning rate of the encoder (None: ``lr``).
        semantic: add semantic feature channels: a :class:`layers.semantic.SemanticNet` predicts the signed
            square-root distance maps of ``label_ids`` from each image, trained on the training labels by the
            regression loss ``w_semantic`` (and by the registration loss through GN); the maps enter GN as
            extra channels whose data-term weights (one per label, :func:`layers.gn.assemble_normal_equations`)
            start at ``semantic_weight_init`` (0: the untrained model is still handcrafted GN on ``features``).
            Labels are used in the losses only; at test time the network sees the images alone.
        semantic_widths: the six :class:`~monai.networks.nets.BasicUNet` widths of that network.
        semantic_lr: Adam learning rate of the semantic network (None: ``lr``).
        semantic_precision: arithmetic of that network, ``"float32"`` or ``"bf16"`` (bfloat16 autocast,
            :class:`layers.semantic.SemanticNet`); also settable on a loaded model (:meth:`configure_inference`).
        semantic_warmup: epochs at the start that train the semantic network alone (the registration is not
            run in those training steps; the registration heads and weights do not change).
        semantic_weight_init: initial data-term weight of the semantic channels.
        w_semantic: weight of the semantic regression loss (mean squared error of the maps, in mm).
        weight_lr: Adam learning rate of the semantic channels' data-term weights.
        learn_schedule: also learn the per-iteration λ (a ``per_iteration`` :class:`LambdaSchedule`) and step
            size (``log_step``), as logarithms initialised at the schedules, so the untrained model is still
            handcrafted GN.
        detach_warp: warp with a detached copy of the current field (truncated backpropagation,
            :class:`layers.gn.GNRegistration`).
        recompute: recompute each GN iteration's full-resolution part (warp of the ``(B, C, *S)`` moving
            features, heads, normal equations) during the backward pass instead of storing it, so a training
            step keeps only the stride-``s`` systems ``H`` ``(B, n, n, *G)``, ``g`` ``(B, n, *G)`` per
            iteration (docs/design.md §3; :class:`layers.gn.GNRegistration`): less memory, one more forward of
            that part per iteration, the same values and gradients. No effect on inference.
        rtol, maxiter: CG tolerance and iteration cap of each solve.
        w_label, w_keypoint, w_mind, w_reg: loss weights (label supervision, keypoint distance in mm, MIND
            MSE, diffusion regularity guard).
        label_loss: ``"mse"`` (class-weighted) or ``"dice"``.
        use_masks: restrict the similarity terms to the batch's ``fixed_mask`` / ``moving_mask`` when present
            (:func:`data.batch.batch_masks`): the GN data term (per-node weights, :func:`layers.gn.gn_step`) and
            the MIND loss. The attribute ``use_masks`` may be switched after loading (``eval.py`` does when mask
            files are given).
        lr, weight_decay: Adam settings (LightningCLI's ``--optimizer``/``--lr_scheduler`` override them).
        init_from: a checkpoint of this class whose weights initialise the model (fine-tuning: the new
            hyper-parameters apply).
    """

    method_name = "learngn"

    def __init__(
        self,
        spatial_dims: int = 2,
        features: str = "sdm",
        label_ids: list[int] | None = None,
        sdm_scale: float = 1.0,
        iterations: int = 10,
        stride: int = 4,
        lam_start: float = 1.0,
        lam_end: float = 0.5,
        step: float = 1.0,
        coupling: str = "full",
        hidden: int = 0,
        encoder_hidden: int = 0,
        encoder_depth: int = 4,
        encoder_lr: float | None = None,
        semantic: bool = False,
        semantic_widths: list[int] | None = None,
        semantic_lr: float | None = None,
        semantic_precision: str = "float32",
        semantic_warmup: int = 0,
        semantic_weight_init: float = 0.0,
        w_semantic: float = 1.0,
        weight_lr: float = 0.01,
        learn_schedule: bool = False,
        detach_warp: bool = False,
        recompute: bool = False,
        rtol: float = 1e-3,
        maxiter: int = 500,
        w_label: float = 1.0,
        w_keypoint: float = 0.0,
        w_mind: float = 0.0,
        w_reg: float = 0.0,
        label_loss: str = "mse",
        use_masks: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims}")
        features = FeatureKind.lookup(features, "features").value
        if features == "sdm" and not label_ids:
            raise ValueError("features='sdm' needs label_ids (the labels whose distance maps are the features)")
        label_loss = LabelLoss.lookup(label_loss, "label_loss").value
        semantic_precision = Precision.lookup(semantic_precision, "semantic_precision").value
        if semantic and not label_ids:
            raise ValueError("semantic=True needs label_ids (the labels whose distance maps are predicted)")
        if semantic_warmup < 0 or semantic_weight_init < 0 or w_semantic < 0:
            raise ValueError(f"semantic_warmup, semantic_weight_init and w_semantic must be >= 0; got "
                             f"{semantic_warmup}, {semantic_weight_init}, {w_semantic}")
        self.save_hyperparameters(ignore=["init_from"])
        self.use_masks = bool(use_masks)
        channels = {"sdm": len(label_ids or []), "intensity": 1, "mind": 12 if spatial_dims == 3 else 4}[features]
        n_semantic = len(label_ids) if semantic else 0
        self.gn = GNRegistration(
            iterations=iterations, stride=stride, lam=(lam_start, lam_end), step=step, coupling=coupling,
            jf=CompactHeads(spatial_dims, channels + n_semantic, stride, hidden),
            solver={"rtol": rtol, "maxiter": maxiter}, detach_warp=detach_warp, recompute=recompute,
        )
        self.encoder = (FeatureEncoder(spatial_dims, 1, channels, encoder_hidden, encoder_depth)
                        if encoder_hidden > 0 else None)
        if semantic:
            self.semantic_net = SemanticNet(spatial_dims, n_semantic, semantic_widths or (8, 16, 24, 32, 48, 8),
                                            precision=semantic_precision)
            self.semantic_weight = torch.nn.Parameter(torch.full((n_semantic,), float(semantic_weight_init)))
            self.register_buffer("base_weight", torch.ones(channels), persistent=False)
        else:
            self.semantic_net = self.semantic_weight = None
        # built here, after the other modules, so that a learned schedule draws its initial weights last
        self.gn.lam = self.make_lam_schedule()
        self.log_step = torch.nn.Parameter(self.gn.step_schedule.clone().log()) if learn_schedule else None
        if init_from:
            load_init_weights(self, init_from, classes=(type(self),), allowed_missing=_FRESH_PREFIXES)
            log.info("initialised LearnGN weights from %s", init_from)

    def make_lam_schedule(self) -> LambdaSchedule:
        """The model's λ schedule (docs/design.md §5), from its hyper-parameters: the geometric
        ``lam_start → lam_end`` over the iterations, learned per iteration with ``learn_schedule``. Subclasses
        choose other kinds (:class:`lightning_modules.hyper.BilevelLearnGN`,
        :class:`lightning_modules.hyper.HyperLearnGN`)."""
        hp = self.hparams
        return LambdaSchedule((hp.lam_start, hp.lam_end), hp.iterations,
                              kind="per_iteration" if hp.learn_schedule else "fixed")

    @property
    def heads(self) -> CompactHeads:
        """The learned ``J`` / ``f`` heads."""
        return self.gn.jf

    # --- registration ------------------------------------------------------------------------------------
    def _check_batch(self, batch: dict[str, Any]) -> None:
        n = batch["fixed"].dim() - 2
        if n != self.hparams.spatial_dims:
            raise ValueError(
                f"this LearnGN model is {self.hparams.spatial_dims}D (spatial_dims) but the batch is {n}D: "
                "use a config whose model.spatial_dims matches the data"
            )

    def semantic_maps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The semantic network's maps of the fixed and the moving image, ``(B, L, *S)`` each (``sqrt(mm)``).

        Images of one shape go through the network as one batch of ``2B`` (its instance norms act per item, so
        the maps are those of two calls up to rounding; on the CPU a batch above one also takes PyTorch's
        faster oneDNN convolutions: 1.5 s against 2.2 s for a 64³ pair on 2 heavily shared CPU cores)."""
        if self.semantic_net is None:
            raise ValueError("semantic_maps() needs a model with semantic=True")
        dtype = self.semantic_weight.dtype
        fixed, moving = batch["fixed"].to(dtype), batch["moving"].to(dtype)
        if fixed.shape != moving.shape:
            return self.semantic_net(fixed), self.semantic_net(moving)
        return self.semantic_net(torch.cat([fixed, moving])).chunk(2)

    def features(self, batch: dict[str, Any], maps: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed and moving feature maps ``(B, C, *S)`` (``maps``: the :meth:`semantic_maps` of the batch when
        already computed)."""
        hp = self.hparams
        batch = dict(batch)
        if hp.features == "sdm":
            batch["label_ids"] = list(hp.label_ids)
        fixed, moving = batch_features(batch, hp.features, sdm_scale=hp.sdm_scale)
        if self.encoder is not None:
            fixed = self.encoder(batch["fixed"], fixed)
            moving = self.encoder(batch["moving"], moving)
        if self.semantic_net is not None:
            fixed_maps, moving_maps = self.semantic_maps(batch) if maps is None else maps
            fixed = torch.cat([fixed, fixed_maps.to(fixed.dtype)], dim=1)
            moving = torch.cat([moving, moving_maps.to(moving.dtype)], dim=1)
        return fixed, moving

    def channel_weights(self) -> torch.Tensor | None:
        """Data-term weights ``(C,)`` of the GN feature channels (None: all 1): 1 for the base features, the
        learned non-negative weights for the semantic channels."""
        if self.semantic_weight is None:
            return None
        return torch.cat([self.base_weight.to(self.semantic_weight.dtype), self.semantic_weight.clamp_min(0.0)])

    def run(self, batch: dict[str, Any], lam: torch.Tensor | None = None, step: torch.Tensor | None = None, *,
            log_lam: torch.Tensor | None = None, maps: tuple[torch.Tensor, torch.Tensor] | None = None) -> GNOutput:
        """Run the K GN iterations on a batch.

        λ comes from ``self.gn.lam`` (docs/design.md §5) unless ``lam`` (``(K,)`` / ``(K, B)``) overrides it or
        ``log_lam`` (``()`` / ``(B,)``, a first-iteration ``log λ``) rescales it, the shape kept
        (:meth:`layers.lam_schedule.LambdaSchedule.values`); ``step``: optional ``(K,)`` / ``(K, B)`` step sizes;
        ``maps``: the batch's :meth:`semantic_maps` when already computed."""
        self._check_batch(batch)
        fixed, moving = self.features(batch, maps)
        if lam is None and log_lam is not None:
            lam = self.gn.lam.values(log_lam)
        if self.log_step is not None and step is None:
            step = self.log_step.exp()
        weights = self.channel_weights()
        fixed_mask, moving_mask = batch_masks(batch, self.use_masks)
        return self.gn(fixed, moving, lam=lam, step=step,
                       channel_weights=None if weights is None else weights.to(fixed.dtype),
                       mask=fixed_mask, moving_mask=moving_mask)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.run(batch).disp

    def lam_values(self) -> torch.Tensor:
        """λ per GN iteration ``(K,)`` that :meth:`run` uses: ``self.gn.lam.values()`` (differentiable)."""
        return self.gn.lam.values()

    def set_lambda(self, lam: float) -> None:
        """Rescale the λ schedule, whatever its kind, so that its first-iteration value is ``lam`` (shape kept;
        ``eval.py --lam``; :meth:`layers.lam_schedule.LambdaSchedule.set_lambda`)."""
        self.gn.lam.set_lambda(lam)

    def configure_inference(self, **options: Any) -> None:
        """Change settings of a loaded model that leave its weights alone (``eval.py --method-arg`` /
        ``--method-config`` with ``--method learngn``): ``semantic_precision`` (``"float32"`` or ``"bf16"``, see
        :class:`layers.semantic.SemanticNet`) and ``use_masks`` (restrict the data term to the batch's masks).
        ``ValueError`` naming an unknown option or value, or ``semantic_precision`` for a model without a
        semantic network."""
        unknown = sorted(set(options) - set(INFERENCE_OPTIONS))
        if unknown:
            raise ValueError(f"--method learngn has no option {', '.join(map(repr, unknown))} (--method-arg / "
                             f"--method-config); its options: {', '.join(INFERENCE_OPTIONS)}")
        if "semantic_precision" in options:
            precision = Precision.lookup(options["semantic_precision"], "semantic_precision")
            if self.semantic_net is None:
                raise ValueError("semantic_precision applies to a model with a semantic network (semantic: true)")
            self.semantic_net.precision = precision
            self.hparams.semantic_precision = precision.value
        if "use_masks" in options:
            self.use_masks = self.hparams.use_masks = bool(options["use_masks"])

    # --- training ------------------------------------------------------------------------------------------
    def _label_ids(self, batch: dict[str, Any]) -> list[int]:
        """The supervised labels: ``label_ids`` of the model, else those of the batch (:func:`batch_label_ids`)."""
        if self.hparams.label_ids:
            return list(self.hparams.label_ids)
        return batch_label_ids(batch)

    def loss_terms(self, batch: dict[str, Any], u: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted loss terms for a batch and its full-resolution field ``u`` ``(B, n, *S)``."""
        hp = self.hparams
        terms: dict[str, torch.Tensor] = {}
        if hp.w_label > 0:
            if "fixed_label" not in batch or "moving_label" not in batch:
                raise ValueError("w_label > 0 needs a dataset with labels (fixed_label, moving_label); set "
                                 "model.w_label 0 and use keypoints or MIND instead")
            terms["label"] = hp.w_label * label_loss(u, batch["moving_label"], batch["fixed_label"],
                                                     self._label_ids(batch), hp.label_loss)
        if hp.w_keypoint > 0 and "fixed_keypoints" in batch:
            terms["keypoint"] = hp.w_keypoint * keypoint_loss(
                u, batch["fixed_keypoints"], batch["moving_keypoints"], batch.get("moving_spacing"))
        if hp.w_mind > 0:
            terms["mind"] = hp.w_mind * mind_loss(u, batch["fixed"], batch["moving"],
                                                  *batch_masks(batch, self.use_masks))
        if hp.w_reg > 0:
            terms["reg"] = hp.w_reg * regularity_loss(u)
        if not terms:
            raise ValueError("no loss term applies: set at least one of w_label, w_keypoint, w_mind, w_reg > 0")
        return terms

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """The segmentation implied by the semantic maps of ``image`` ``(B, 1, *S)``: ``(B, 1, *S)`` integer
        labels (the label of the most negative map where one is negative, else 0)."""
        if self.semantic_net is None:
            raise ValueError("segment() needs a model with semantic=True")
        maps = self.semantic_net(image.to(self.semantic_weight.dtype))
        low, idx = maps.min(dim=1, keepdim=True)
        ids = torch.as_tensor(list(self.hparams.label_ids), device=maps.device)
        return torch.where(low < 0, ids[idx], torch.zeros_like(idx))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        out = super().validation_step(batch, batch_idx)
        if self.semantic_net is not None and "fixed_label" in batch:
            with torch.no_grad():
                dice = dice_per_label(self.segment(batch["fixed"]), batch["fixed_label"],
                                      list(self.hparams.label_ids))
            self.log("val/semantic_dice", dice.nanmean(), batch_size=dice.shape[0], sync_dist=True)
        return out

    def semantic_term(self, batch: dict[str, Any], maps: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """The semantic regression loss of a batch (both images' maps against their labels' distance maps;
        ``maps``: the batch's :meth:`semantic_maps` when already computed for the registration)."""
        if "fixed_label" not in batch or "moving_label" not in batch:
            raise ValueError("semantic=True needs a training set with labels (fixed_label, moving_label)")
        ids = list(self.hparams.label_ids)
        pred = torch.cat(self.semantic_maps(batch) if maps is None else maps)
        labels = torch.cat([batch["fixed_label"], batch["moving_label"]])
        spacing = batch.get("spacing")
        sp = tuple(float(v) for v in spacing[0]) if spacing is not None else None
        target = semantic_targets(labels, ids, sp)
        return self.hparams.w_semantic * semantic_loss(pred, target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        semantic = self.semantic_net is not None
        warmup = semantic and self.current_epoch < self.hparams.semantic_warmup
        # the semantic maps are computed once per step, for the registration and for their own loss
        maps = self.semantic_maps(batch) if semantic else None
        terms = {} if warmup else self.registration_terms(batch, maps)
        bsz = batch["fixed"].shape[0]
        if semantic and self.hparams.w_semantic > 0:
            terms["semantic"] = self.semantic_term(batch, maps)
        loss = torch.stack(list(terms.values())).sum()
        if self.semantic_weight is not None:
            for k, w in enumerate(self.semantic_weight.detach().clamp_min(0.0)):
                self.log(f"train/semantic_weight{k}", w, on_step=False, on_epoch=True, batch_size=bsz)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bsz, sync_dist=True)
        for k, v in terms.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=bsz, sync_dist=True)
        return loss

    def registration_terms(self, batch: dict[str, Any], maps: tuple[torch.Tensor, torch.Tensor] | None = None
                           ) -> dict[str, torch.Tensor]:
        """The registration's loss terms (:meth:`loss_terms`) of a training step, the field at the model's λ
        (``maps``: the batch's :meth:`semantic_maps` when already computed); subclasses choose the λ."""
        u = self.register(batch) if maps is None else self.run(batch, maps=maps).disp
        return self.loss_terms(batch, u)

    def param_groups(self, params) -> list[dict[str, Any]]:
        """Adam parameter groups for ``params``: the encoder's parameters (when ``encoder_lr`` is set), the
        semantic network's (when ``semantic_lr`` is set) and the semantic channels' weights (``weight_lr``) in
        groups of their own with those learning rates, the rest in a group without an explicit rate, λ's parameters
        (``gn.lam``) first in it (their order when they were the model's own attributes, so that the optimiser
        state of checkpoints written then still lines up)."""
        lam_ids = {id(p) for p in self.gn.lam.parameters()}
        params = list(params)
        params = [p for p in params if id(p) in lam_ids] + [p for p in params if id(p) not in lam_ids]
        hp = self.hparams
        own: list[tuple[set[int], float]] = []
        if self.encoder is not None and hp.encoder_lr is not None:
            own.append(({id(p) for p in self.encoder.parameters()}, hp.encoder_lr))
        if self.semantic_net is not None:
            if hp.semantic_lr is not None:
                own.append(({id(p) for p in self.semantic_net.parameters()}, hp.semantic_lr))
            own.append(({id(self.semantic_weight)}, hp.weight_lr))
        taken = set().union(*(ids for ids, _ in own)) if own else set()
        groups = [{"params": [p for p in params if id(p) not in taken]}]
        groups += [{"params": [p for p in params if id(p) in ids], "lr": lr} for ids, lr in own]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.Adam(self.param_groups(self.parameters()), lr=hp.lr, weight_decay=hp.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_class"] = qualname(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints written before λ had one home: their λ keys renamed in place, before the children load
        rename_legacy_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

"""Adam instance-optimisation baseline (docs/design.md §6; Vujovic et al., "Continuous Optimization for Medical
Image Registration of Large Displacement Datasets")."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from data.batch import batch_masks
from layers.features import mind_ssc
from layers.optim import Schedule, SegmentationDice, make_schedule, refine_field, resolve_preset
from layers.semantic import soft_segmentation

from .common import BaselineModule, check_number, check_pair, renamed_options

log = logging.getLogger(__name__)

__all__ = ["AdamIO"]

InitFn = Callable[[dict[str, Any]], torch.Tensor]


class AdamIO(BaselineModule):
    """Adam instance optimisation of a half-resolution displacement on MIND-SSC features (evaluation only).

    MIND-SSC (``r = mind_radius``, ``d = mind_dilation``) of both images, averaged over ``stride^n`` blocks;
    the field on that grid starts at zero or at a given field and is optimised by Adam on
    ``weight · MSE(MIND) + λ · diffusion`` (λ = ``diffusion_weight``) with ``smooth_passes`` ``3^n`` average pools
    (replicate padding) of the increment per step (:mod:`layers.optim.objective` states the units). The result is
    upsampled linearly to full resolution.

    Refining a LearnGN field (:meth:`set_initialiser`, ``eval.py --init-ckpt``) whose model predicts semantic maps,
    ``semantic_weight > 0`` adds ``semantic_weight · (1 − soft Dice)`` of the two images' soft segmentations
    (:func:`layers.semantic.soft_segmentation` of the model's maps, sharpness ``semantic_sharpness``) on the
    optimisation grid (:class:`~layers.optim.objective.SegmentationDice`): the refinement then keeps, and
    improves, the agreement of the structures the model was trained on, which MIND-SSC alone pulls away from
    (``benchmarks/results/hippocampus.md``). The maps are computed once and also start the model's registration.

    Args:
        preset: ``"piecewise"`` (270 iterations of
            :func:`~layers.optim.schedules.piecewise_lr`: 15 held to step 70, cosine, then
            linear to 0.5) or ``"constant"`` (learning rate 1, 100 iterations).
        lr: a constant learning rate replacing the preset's schedule (None: the preset's).
        iterations: number of Adam steps replacing the preset's (None: the preset's).
        schedule: a schedule replacing the preset's and ``lr``: a preset name, a list of per-step values or a
            callable ``step -> lr`` (e.g. a learned schedule). Learning rates are read in ``step_unit``.
        diffusion_weight: weight λ of the diffusion term of the field in optimisation-grid voxels (1.25;
            formerly ``lam``, which is refused with a message naming this option).
        stride: optimisation grid stride (2: half resolution).
        smooth_passes: ``3^n`` average pools per step (2).
        weight: weight of the MIND MSE (12).
        step_unit: optimisation-grid voxels per unit of the Adam parameter, i.e. the unit in which all
            learning rates are read (None: the preset's, also when ``lr`` or ``schedule`` replace its
            schedule; ``constant``: 1 voxel, the published ConvexAdam unit; ``piecewise``: 1/15 voxel, see
            :data:`~layers.optim.schedules.PRESETS`).
        mind_radius, mind_dilation: MIND-SSC ``r`` and ``d`` (1, 2).
        init: optional callable ``batch -> (B, n, *S)`` giving the initial full-resolution field (voxel
            units); a batch key ``"init_disp"`` takes precedence.
        logj_weight: weight of a log-Jacobian volume-change term (:func:`layers.diff.log_jacobian_energy` of
            the field on the optimisation grid; 0: none, the published recipe).
        use_masks: restrict the MIND MSE to the batch's ``fixed_mask`` / ``moving_mask`` when present
            (:mod:`layers.optim.objective`). Off by default; ``eval.py`` turns it on when mask
            files are given.
        semantic_weight: weight of the soft Dice term of the initialising model's segmentations (0: none; > 0
            needs an initialiser with semantic maps, see above).
        semantic_sharpness: sharpness of those soft segmentations (2).

    Raises:
        ValueError: an unknown preset, a bad schedule, or a numeric option out of range (named in the message:
            ``iterations >= 0`` (0: the initial field is returned), ``diffusion_weight, weight, logj_weight >= 0``
            (λ 0: no diffusion term), ``stride, mind_dilation >= 1``, ``smooth_passes, mind_radius >= 0``,
            ``step_unit > 0``, ``semantic_weight >= 0``, ``semantic_sharpness > 0``); at registration,
            ``semantic_weight > 0`` without an initialiser that has semantic maps.
    """

    evaluation_only = True
    method_name = "adam"

    @renamed_options(lam="diffusion_weight")
    def __init__(
        self,
        preset: str = "piecewise",
        lr: float | None = None,
        iterations: int | None = None,
        schedule: str | Sequence[float] | Schedule | None = None,
        diffusion_weight: float = 1.25,
        stride: int = 2,
        smooth_passes: int = 2,
        weight: float = 12.0,
        step_unit: float | None = None,
        mind_radius: int = 1,
        mind_dilation: int = 2,
        init: InitFn | None = None,
        logj_weight: float = 0.0,
        use_masks: bool = False,
        semantic_weight: float = 0.0,
        semantic_sharpness: float = 2.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["init"] + ([] if schedule is None or isinstance(
            schedule, (str, list, tuple)) else ["schedule"]))
        chosen = resolve_preset(preset)
        if schedule is not None:
            self.schedule = make_schedule(schedule)
        elif lr is not None:
            self.schedule = make_schedule(check_number("lr", lr, low=0))
        else:
            self.schedule = chosen.schedule
        self.iterations = check_number("iterations", chosen.iterations if iterations is None else iterations,
                                       low=0, integer=True)
        self.step_unit = check_number("step_unit", chosen.step_unit if step_unit is None else step_unit, low=0,
                                      strict=True)
        self.preset = preset
        self.diffusion_weight = check_number("diffusion_weight", diffusion_weight, low=0)
        self.stride = check_number("stride", stride, low=1, integer=True)
        self.smooth_passes = check_number("smooth_passes", smooth_passes, low=0, integer=True)
        self.weight = check_number("weight", weight, low=0)
        self.mind_radius = check_number("mind_radius", mind_radius, low=0, integer=True)
        self.mind_dilation = check_number("mind_dilation", mind_dilation, low=1, integer=True)
        self.init_fn = init
        self.logj_weight = check_number("logj_weight", logj_weight, low=0)
        self.use_masks = bool(use_masks)
        self.semantic_weight = check_number("semantic_weight", semantic_weight, low=0)
        self.semantic_sharpness = check_number("semantic_sharpness", semantic_sharpness, low=0, strict=True)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """MIND-SSC of ``(B, 1, *S)`` -> ``(B, 12 | 4, *S)`` (full resolution, no gradient)."""
        with torch.no_grad():
            return mind_ssc(image, self.mind_radius, self.mind_dilation)

    def optimise(
        self,
        fixed_feat: torch.Tensor,
        moving_feat: torch.Tensor,
        init: torch.Tensor | None = None,
        *,
        iterations: int | None = None,
        schedule: Schedule | None = None,
        smooth_passes: int | None = None,
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
        extra: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the optimisation on full-resolution features ``(B, C, *S)``.

        Args:
            fixed_feat, moving_feat: full-resolution features (MIND-SSC), pooled here by ``stride``.
            init: optional initial field ``(B, n, *S)`` (full-resolution voxel units).
            iterations, schedule, smooth_passes: overrides of this module's settings.
            fixed_mask, moving_mask: optional full-resolution masks ``(B, 1, *S)`` restricting the MIND MSE.
            extra: optional further loss term of the field (:class:`~layers.optim.objective.InstanceObjective`).

        Returns:
            ``(B, n, *S)`` displacement (voxel units).
        """
        return refine_field(
            fixed_feat, moving_feat, fixed_feat.shape[2:], self.stride, init=init,
            iterations=self.iterations if iterations is None else int(iterations),
            schedule=self.schedule if schedule is None else schedule,
            diffusion_weight=self.diffusion_weight, weight=self.weight, step_unit=self.step_unit,
            smooth_passes=self.smooth_passes if smooth_passes is None else int(smooth_passes),
            logj_weight=self.logj_weight, fixed_mask=fixed_mask, moving_mask=moving_mask, extra=extra,
        )

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """Displacement ``(B, n, *S)`` (voxel units) of a batch; see the class docstring."""
        fixed, moving = check_pair(batch)
        maps = self.semantic_maps(batch)
        init = self.initial_field(batch, maps=maps)
        fixed_mask, moving_mask = batch_masks(batch, self.use_masks)
        extra = None
        if maps is not None:
            fixed_seg, moving_seg = (soft_segmentation(m, self.semantic_sharpness) for m in maps)
            extra = SegmentationDice(fixed_seg, moving_seg, self.stride, stride=self.stride,
                                     weight=self.semantic_weight)
        return self.optimise(self.features(fixed), self.features(moving), init, fixed_mask=fixed_mask,
                             moving_mask=moving_mask, extra=extra)

    def semantic_maps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The initialiser's semantic maps of the fixed and the moving image (``(B, L, *S)`` each, no gradient)
        when ``semantic_weight > 0``, else None; ``ValueError`` when there is no initialiser with such maps."""
        if self.semantic_weight == 0:
            return None
        self.check_initialiser()
        with torch.no_grad():
            return self.initialiser.semantic_maps(batch)

    def check_initialiser(self) -> None:
        """``ValueError`` when ``semantic_weight > 0`` and there is no initialiser with semantic maps (``eval.py``
        calls this before any pair runs)."""
        if self.semantic_weight > 0 and getattr(getattr(self, "initialiser", None), "semantic_net", None) is None:
            raise ValueError("semantic_weight > 0 refines with the semantic maps of the initialising model: start "
                             "from a LearnGN checkpoint trained with semantic: true (eval.py --init-ckpt)")

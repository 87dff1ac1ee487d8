"""ConvexAdam (Siebert, Hansen, Heinrich 2021; docs/design.md §6): a discrete SSD cost volume of MIND-SSC features on a
coarse grid, coupled convex optimisation, optional inverse consistency, then Adam fine-tuning.

Units: on the coarse grid of stride ``grid_sp`` (node ``g`` at full-resolution position ``grid_sp*g +
(grid_sp-1)/2``, :func:`layers.grid.pool_to_grid`), the discrete displacements are integer shifts of whole nodes,
``d ∈ [-disp_hw, disp_hw]^n`` (so up to ``disp_hw · grid_sp`` full-resolution voxels); the convex stage works in
these node units (the coupling weights θ refer to them, as in the published code; the discrete stage is in
:mod:`layers.convex`). The field is converted to full-resolution voxels (× ``grid_sp``) *whether or not* inverse
consistency is used (the published code forgets the conversion and the upsampling without it), then upsampled
linearly (:func:`layers.grid.upsample_field`). All smoothing uses replicate padding
(:func:`layers.features.box_filter`), so the border is not pulled towards zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from data.batch import batch_masks
from layers.convex import THETAS, check_window, coupled_convex, inverse_consistency, ssd_cost_volume
from layers.features import mind_ssc
from layers.grid import pool_to_grid, upsample_field
from layers.optim import ImageLNCC, make_schedule, refine_field

from .common import BaselineModule, check_number, check_numbers, check_pair, renamed_options

log = logging.getLogger(__name__)

__all__ = ["ConvexAdam"]


class ConvexAdam(BaselineModule):
    """ConvexAdam: coupled convex discrete optimisation followed by Adam fine-tuning (evaluation only).

    Steps (see the module docstring for units): MIND-SSC (``r``, ``d``) of both images; features averaged
    over ``grid_sp^n`` blocks; SSD cost volume over integer node shifts in ``[-disp_hw, disp_hw]^n``,
    box-filtered twice; coupled convex optimisation (``u₀`` = hard argmin smoothed by a ``3^n`` average pool,
    then the θ sequence); optionally inverse consistency with the backward field (``ic_iterations``
    iterations); conversion to full-resolution voxels and linear upsampling; then the Adam loop of
    :mod:`layers.optim` at stride ``adam_stride`` started from that field (``smooth_passes`` pools,
    ``12·MSE(MIND) + λ·diffusion``, λ = ``diffusion_weight``, ``iterations`` steps at learning rate ``lr``).

    Options beyond the published method: ``lncc_weight > 0`` adds ``lncc_weight · (1 − mean LNCC)``
    of the raw intensities (:class:`~layers.optim.objective.ImageLNCC`: images averaged over
    ``lncc_stride^n`` blocks, window ``(2·lncc_radius+1)^n``) to the Adam loss, and ``weight = 0`` drops the MIND
    term; ``velocity_steps > 0`` makes the Adam stage diffeomorphic (stationary velocity increment integrated by
    scaling and squaring and composed with the convex field, see
    :class:`~layers.optim.objective.InstanceObjective`); ``logj_weight > 0`` adds the log-Jacobian
    volume-change term (:func:`layers.diff.log_jacobian_energy`), which gives a smaller spread of log J than a
    larger λ at the same Dice. On BrainPair (both directions, ``benchmarks/results/baselines.md``, 2 CPU
    threads):

    * published settings: Dice 0.705, SDlogJ 0.45, 0.03 % folding, 26 s;
    * LNCC r 3 at half resolution, stride-4 velocity (5 squarings), λ 0.2, 60 iterations
      (``configs/baselines/convexadam_lncc.yaml``): 0.725, SDlogJ 0.33, no folding, 15 s;
    * LNCC r 5 at half resolution, half-resolution velocity (2 squarings, 2 smoothing passes), λ 0.2,
      ``logj_weight`` 0.35, 22 iterations (``configs/baselines/convexadam_logj.yaml``): 0.735, SDlogJ 0.19, no
      folding, 15 s.

    These settings were chosen by probing on the two BrainPair directions themselves
    (``benchmarks/results/baseline_probes.md``), so they are in-sample there, and they are brain-MRI settings: on
    the 64³ synthetic pairs the published settings are clearly better (Dice 0.963 vs 0.918 for
    ``convexadam_logj.yaml``; narrower LNCC windows or full-resolution LNCC recover only part of the gap).

    An initial field (:meth:`~lightning_modules.baselines.common.BaselineModule.initial_field`: e.g. a trained
    LearnGN's, ``eval.py --init-ckpt``) replaces the convex stage: the Adam stage then refines that field.

    Args:
        grid_sp: stride of the coarse grid of the convex stage (6).
        disp_hw: half-width of the shift window in coarse nodes (4).
        inverse_consistency: also solve moving→fixed and make the two fields inverse consistent (True).
        ic_iterations: iterations of the inverse-consistency fixed point (15).
        thetas: coupling weights (0.003, 0.01, 0.03, 0.1, 0.3, 1).
        diffusion_weight: diffusion weight λ of the Adam stage (1.25; formerly ``lam``, which is refused with a
            message naming this option); 0 iterations skips the stage.
        iterations: Adam steps (80).
        lr: Adam learning rate (1), or a list of per-step values.
        adam_stride: grid stride of the Adam stage (2: half resolution).
        smooth_passes: ``3^n`` average pools per Adam step (3).
        weight: MIND MSE weight (12).
        mind_radius, mind_dilation: MIND-SSC ``r`` and ``d`` (1, 2).
        lncc_weight: weight of the intensity LNCC term of the Adam stage (0: none).
        lncc_radius: LNCC window half-width in voxels of the LNCC grid (3).
        lncc_stride: stride of the LNCC image grid (2: half resolution; must divide ``adam_stride``).
        velocity_steps: scaling-and-squaring steps of a diffeomorphic Adam stage (0: additive, published).
        logj_weight: weight of the log-Jacobian volume-change term of the Adam stage
            (:func:`layers.diff.log_jacobian_energy` on its grid; 0: none, published).
        use_masks: restrict the similarity terms of the Adam stage (MIND MSE and LNCC) to the batch's
            ``fixed_mask`` / ``moving_mask`` when present (:mod:`layers.optim.objective`); the
            discrete convex stage is not masked (a node without data would have no preferred shift). Off by
            default; ``eval.py`` turns it on when mask files are given.

    Raises:
        ValueError: at construction, a numeric option out of range (named in the message: ``grid_sp,
            adam_stride, mind_dilation, lncc_radius, lncc_stride >= 1``; ``disp_hw, ic_iterations, iterations,
            smooth_passes, mind_radius, velocity_steps >= 0``; ``diffusion_weight, lr, weight, thetas,
            lncc_weight, logj_weight >= 0``, λ 0 meaning no diffusion term) or ``lncc_stride`` not dividing
            ``adam_stride``; at registration, when ``2 disp_hw + 1`` exceeds the coarse grid along some axis.
    """

    evaluation_only = True
    method_name = "convexadam"

    @renamed_options(lam="diffusion_weight")
    def __init__(
        self,
        grid_sp: int = 6,
        disp_hw: int = 4,
        inverse_consistency: bool = True,
        ic_iterations: int = 15,
        thetas: Sequence[float] = THETAS,
        diffusion_weight: float = 1.25,
        iterations: int = 80,
        lr: float | Sequence[float] = 1.0,
        adam_stride: int = 2,
        smooth_passes: int = 3,
        weight: float = 12.0,
        mind_radius: int = 1,
        mind_dilation: int = 2,
        lncc_weight: float = 0.0,
        lncc_radius: int = 3,
        lncc_stride: int = 2,
        velocity_steps: int = 0,
        logj_weight: float = 0.0,
        use_masks: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        num = check_number
        self.grid_sp, self.disp_hw = num("grid_sp", grid_sp, low=1, integer=True), num("disp_hw", disp_hw, low=0,
                                                                                         integer=True)
        self.use_ic = bool(inverse_consistency)
        self.ic_iterations = num("ic_iterations", ic_iterations, low=0, integer=True)
        self.thetas = tuple(check_numbers("thetas", thetas, low=0)) if len(thetas) else ()
        self.diffusion_weight = num("diffusion_weight", diffusion_weight, low=0)
        self.iterations = num("iterations", iterations, low=0, integer=True)
        self.schedule = make_schedule(num("lr", lr, low=0) if isinstance(lr, (int, float)) else lr)
        self.adam_stride = num("adam_stride", adam_stride, low=1, integer=True)
        self.smooth_passes = num("smooth_passes", smooth_passes, low=0, integer=True)
        self.weight = num("weight", weight, low=0)
        self.mind_radius = num("mind_radius", mind_radius, low=0, integer=True)
        self.mind_dilation = num("mind_dilation", mind_dilation, low=1, integer=True)
        self.lncc_weight = num("lncc_weight", lncc_weight, low=0)
        self.lncc_radius = num("lncc_radius", lncc_radius, low=1, integer=True)
        self.lncc_stride = num("lncc_stride", lncc_stride, low=1, integer=True)
        self.velocity_steps = num("velocity_steps", velocity_steps, low=0, integer=True)
        self.logj_weight = num("logj_weight", logj_weight, low=0)
        self.use_masks = bool(use_masks)
        if self.lncc_weight > 0 and self.adam_stride % self.lncc_stride:
            raise ValueError(f"lncc_stride must divide adam_stride; got lncc_stride={lncc_stride}, "
                             f"adam_stride={adam_stride}")

    def coarse_field(self, fixed_feat: torch.Tensor, moving_feat: torch.Tensor) -> torch.Tensor:
        """The convex stage on full-resolution features ``(B, C, *S)``.

        Returns:
            ``(B, n, *S)`` full-resolution displacement (voxel units) before the Adam stage.
        """
        shape = tuple(fixed_feat.shape[2:])
        fixed_c, moving_c = pool_to_grid(fixed_feat, self.grid_sp), pool_to_grid(moving_feat, self.grid_sp)
        check_window(fixed_c.shape[2:], self.disp_hw)
        u = coupled_convex(ssd_cost_volume(fixed_c, moving_c, self.disp_hw), self.disp_hw, self.thetas)
        if self.use_ic:
            v = coupled_convex(ssd_cost_volume(moving_c, fixed_c, self.disp_hw), self.disp_hw, self.thetas)
            u, _ = inverse_consistency(u, v, self.ic_iterations)
        return upsample_field(u * self.grid_sp, shape, self.grid_sp)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """Displacement ``(B, n, *S)`` (voxel units) of a batch; see the class docstring."""
        fixed, moving = check_pair(batch)
        with torch.no_grad():
            fixed_feat = mind_ssc(fixed, self.mind_radius, self.mind_dilation)
            moving_feat = mind_ssc(moving, self.mind_radius, self.mind_dilation)
        init = self.initial_field(batch)  # a given field replaces the convex stage
        if init is None:
            with torch.no_grad():
                init = self.coarse_field(fixed_feat, moving_feat)
        if self.iterations == 0:
            return init
        fixed_mask, moving_mask = batch_masks(batch, self.use_masks)
        extra = None
        if self.lncc_weight > 0:
            extra = ImageLNCC(fixed, moving, self.adam_stride, stride=self.lncc_stride, radius=self.lncc_radius,
                              weight=self.lncc_weight, fixed_mask=fixed_mask, moving_mask=moving_mask)
        return refine_field(
            fixed_feat, moving_feat, fixed.shape[2:], self.adam_stride, init=init,
            iterations=self.iterations, schedule=self.schedule, diffusion_weight=self.diffusion_weight,
            weight=self.weight, smooth_passes=self.smooth_passes, extra=extra, velocity_steps=self.velocity_steps,
            logj_weight=self.logj_weight, fixed_mask=fixed_mask, moving_mask=moving_mask,
        )

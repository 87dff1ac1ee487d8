"""The one objective of Adam instance optimisation on a coarse grid (docs/design.md §6), shared by both steppers:
:func:`layers.optim.adam.adam_optimise` (``torch.optim.Adam``; the AdamIO baseline and ConvexAdam's fine-tuning
stage) and :func:`layers.optim.functional.differentiable_adam` (a functional Adam, differentiable in the
learning rates; meta-learned schedules, docs/design.md §5).

On a grid of stride ``s`` (``s = 2``: half resolution) with node ``g`` at full-resolution position
``s*g + (s-1)/2`` (:func:`layers.grid.pool_to_grid`):

* parameter ``δ`` ``(B, n, *G)``, zero-initialised, in units of ``step_unit`` voxels of the coarse grid
  (1 by default, the published unit; Adam's step sizes scale with this unit, so it sets what a learning rate
  means);
* field ``u = u₀ + s · step_unit · box^k(δ)`` in full-resolution voxel units, ``u₀`` the initial field
  and ``box^k`` ``k`` passes of a ``3^n`` average pool with replicate padding
  (:func:`layers.features.box_filter`). The smoothing acts on the increment, so the optimisation starts
  exactly at ``u₀`` (the published ConvexAdam code smooths the whole field, initial part included; from a zero
  start the two are the same). With ``velocity_steps = q > 0`` the smoothed increment is instead a stationary
  velocity, integrated by ``q`` scaling-and-squaring steps and composed with ``u₀`` (:func:`apply_increment`);
* loss ``λ · diffusion(u / s) + μ · logJ(u / s) + weight · MSE(F, M ∘ (id + u/s)) + extra(u)``: the coarse
  features are warped with the field in coarse-grid voxels (:func:`layers.warp.warp_image`) and the diffusion
  term (:func:`layers.diff.diffusion`, mean squared forward difference summed over axes; λ =
  ``diffusion_weight``) is taken of the field in coarse-grid voxels between neighbouring coarse nodes, the scale
  convention of the published ConvexAdam code (there the optimised tensor is the half-resolution field in
  half-resolution voxels and λ = 1.25 multiplies the mean squared difference of neighbours). In
  full-resolution voxels the regulariser is therefore ``λ / s² · diffusion(u)``. ``logJ`` is the optional
  volume-change term :func:`layers.diff.log_jacobian_energy` (μ = ``logj_weight``, 0: none) and ``extra`` an
  optional further term of the full-resolution-unit field (e.g. :class:`ImageLNCC`, :class:`SegmentationDice`);
* the loss terms are means over the batch and the voxels (as in the published code for one pair). With
  ``B > 1`` each pair's gradient is divided by ``B``; Adam is invariant to that except through its ε, which is
  not negligible against the tiny per-voxel gradients of a mean, so a pair registered in a batch differs
  slightly from the same pair alone (≈ 0.01–0.04 voxel on a 40² test pair).

Masks (``fixed_mask`` / ``moving_mask``, optional, :mod:`layers.masks`): averaged to the grid of each similarity
term like the features, they restrict the MSE (and :class:`ImageLNCC`) to a weighted mean with the weight
``m_F · m_M ∘ (id + v)`` (the moving mask warped with the current field, without gradient); the regularisers
are not masked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from layers.diff import diffusion, log_jacobian_energy
from layers.features import box_filter
from layers.grid import channels_last, coarse_shape, pool_to_grid, spatial_dims, upsample_field
from layers.losses import soft_dice
from layers.masks import check_mask, masked_mean, similarity_weight
from layers.similarity import LNCC
from layers.warp import compose, integrate_velocity, warp_image

__all__ = ["FeatureMSE", "ImageLNCC", "InstanceObjective", "SegmentationDice", "apply_increment", "grad_ready",
           "smooth"]


class InstanceObjective:
    """The loss of Adam instance optimisation as a function of the Adam parameter ``δ`` (module docstring).

    Args:
        fixed, moving: coarse features ``(B, C, *G)`` (e.g. MIND-SSC pooled by ``stride``), constants.
        stride: stride ``s`` of the grid ``G`` relative to full resolution.
        init: initial field ``(B, n, *G)`` in full-resolution voxel units (zeros when None).
        diffusion_weight: weight λ of the diffusion term (of the field in coarse-grid voxels; 1.25 published).
        weight: weight of the feature MSE (12 in the published recipes); 0: the MSE is not computed at all.
        smooth_passes: ``3^n`` average pools applied to the increment.
        step_unit: coarse-grid voxels per unit of the Adam parameter (> 0).
        velocity_steps: 0: additive increment; ``q > 0``: the smoothed increment ``w = step_unit · box^k(δ)`` is
            a stationary velocity (coarse-grid voxels), integrated by ``q`` scaling-and-squaring steps
            (:func:`layers.warp.integrate_velocity`) and composed with the initial field,
            ``v = exp(w) − id + u₀/s ∘ exp(w)`` (:func:`layers.warp.compose`: first ``exp(w)``, then ``u₀``), so
            the coarse map is invertible whenever ``u₀``'s is; the diffusion term is still taken of the whole
            field ``v``.
        logj_weight: weight μ of ``μ · mean(log det(I + ∇v)²)`` of the whole coarse field
            (:func:`layers.diff.log_jacobian_energy`; 0: none). It penalises expansion and compression but not
            shears; central differences do not see a node-to-node checkerboard, so use it with
            ``smooth_passes >= 1``.
        extra: optional further loss term, called with the field ``(B, n, *G)`` in full-resolution voxel units
            (differentiable), returning a scalar (e.g. :class:`ImageLNCC`).
        fixed_mask, moving_mask: optional masks ``(B, 1, *G)`` (or batch 1) in ``[0, 1]`` on the coarse grid
            restricting the feature MSE (:class:`FeatureMSE`).

    Raises:
        ValueError: mismatched features or ``init``, ``step_unit <= 0``, ``velocity_steps < 0`` or
            ``logj_weight < 0``.
    """

    def __init__(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        stride: int,
        *,
        init: torch.Tensor | None = None,
        diffusion_weight: float = 1.25,
        weight: float = 12.0,
        smooth_passes: int = 2,
        step_unit: float = 1.0,
        velocity_steps: int = 0,
        logj_weight: float = 0.0,
        extra: Callable[[torch.Tensor], torch.Tensor] | None = None,
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
    ) -> None:
        self.shape = _check_objective(fixed, moving, init, step_unit, velocity_steps, logj_weight)
        self.stride = float(stride)
        self.diffusion_weight, self.weight, self.logj_weight = diffusion_weight, weight, logj_weight
        self.smooth_passes, self.step_unit, self.velocity_steps = smooth_passes, step_unit, velocity_steps
        self.extra = extra
        # under Lightning's test/predict the inputs are inference tensors: make ordinary ones autograd may save
        with torch.inference_mode(False):
            fixed = grad_ready(fixed.detach())
            moving = grad_ready(moving.detach())
            #: the initial field ``(B, n, *G)`` in full-resolution voxel units
            self.base = fixed.new_zeros(self.shape) if init is None else grad_ready(init.detach()).to(fixed.dtype)
            self.u_coarse = self.base / self.stride  # in coarse-grid voxels
            self.similarity = None
            if weight != 0:
                self.similarity = FeatureMSE(fixed, moving, *(None if m is None else grad_ready(m.detach())
                                                              for m in (fixed_mask, moving_mask)))

    def zeros(self) -> torch.Tensor:
        """A fresh zero parameter ``δ`` ``(B, n, *G)`` that requires grad."""
        return torch.zeros(self.shape, dtype=self.base.dtype, device=self.base.device, requires_grad=True)

    def field(self, delta: torch.Tensor) -> torch.Tensor:
        """The coarse field ``v`` ``(B, n, *G)`` in coarse-grid voxels for the parameter ``δ``."""
        return apply_increment(self.u_coarse, self.step_unit * smooth(delta, self.smooth_passes),
                               self.velocity_steps)

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, v)``: the scalar loss (differentiable in ``δ``) and the coarse field ``v`` (coarse voxels)."""
        v = self.field(delta)
        loss = self.diffusion_weight * diffusion(v)
        if self.logj_weight:
            loss = loss + self.logj_weight * log_jacobian_energy(v)
        if self.similarity is not None:
            loss = loss + self.weight * self.similarity(v)
        if self.extra is not None:
            loss = loss + self.extra(v * self.stride)
        return loss, v


class FeatureMSE:
    """``MSE(fixed, moving ∘ (id + v))`` for a field ``v`` ``(B, n, *G)`` in voxels of the feature grid.

    Warping goes through :func:`layers.warp.warp_image` (which spreads one 3D volume over the CPU threads,
    :func:`layers.grid.grid_sample`). The moving features go through :func:`layers.grid.channels_last`
    (channels-last layout for 3D multi-channel CPU features above a size threshold: the same values, a slightly
    faster warp).

    Args:
        fixed, moving: ``(B, C, *G)`` features (constants).
        fixed_mask, moving_mask: optional masks ``(B, 1, *G)`` (or batch 1) in ``[0, 1]`` on the same grid: the
            MSE becomes the weighted mean :func:`layers.masks.masked_mean` with the weight
            :func:`layers.masks.similarity_weight` (moving mask warped with ``v``).
    """

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, fixed_mask: torch.Tensor | None = None,
                 moving_mask: torch.Tensor | None = None) -> None:
        spatial_dims(fixed, "fixed")
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} features differ")
        self.fixed, self.moving = fixed, channels_last(moving)
        self.fixed_mask, self.moving_mask = (None if m is None else check_mask(m, fixed, name)
                                             for m, name in ((fixed_mask, "fixed_mask"), (moving_mask, "moving_mask")))

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """The (masked) MSE (a scalar, differentiable in ``v``)."""
        warped = warp_image(self.moving, v)
        if self.fixed_mask is None and self.moving_mask is None:
            return F.mse_loss(warped, self.fixed)
        return masked_mean((warped - self.fixed).pow(2), similarity_weight(self.fixed_mask, self.moving_mask, v))


class ImageLNCC:
    """``weight · (1 − mean LNCC(F, M ∘ (id + u)))`` on the images averaged over ``stride^n`` blocks, for a
    field ``u`` on a coarser grid: an ``extra`` term of :class:`InstanceObjective`.

    The field ``(B, n, *G_s)`` (full-resolution voxel units, grid stride ``field_stride = s``, a multiple of
    ``stride = t``) is upsampled linearly to the image grid of stride ``t`` (the cell-centred grids are nested,
    :func:`layers.grid.upsample_field`), converted to its voxels (÷ ``t``), and the pooled moving image warped
    with it (:func:`layers.warp.warp_image`); the similarity is the squared LNCC of :class:`layers.similarity.LNCC`
    (window ``(2·radius+1)^n`` voxels of the stride-``t`` grid), averaged over batch, channels and voxels.

    Args:
        fixed, moving: full-resolution images ``(B, C, *S)`` (constants).
        field_stride: stride ``s`` of the field's grid.
        stride: stride ``t`` of the image grid (1: full resolution; ``s % t == 0``).
        radius: LNCC window half-width in voxels of the stride-``t`` grid.
        weight: factor of ``1 − mean LNCC``.
        eps: LNCC variance offset (squared intensity units).
        fixed_mask, moving_mask: optional full-resolution masks ``(B, 1, *S)`` (or batch 1) in ``[0, 1]``,
            averaged to the stride-``t`` grid: the mean over voxels becomes the weighted mean
            :func:`layers.masks.masked_mean` (moving mask warped with the field, without gradient).

    Raises:
        ValueError: mismatched images or masks, ``field_stride`` not a multiple of ``stride``, or bad LNCC
            arguments.
    """

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, field_stride: int, *, stride: int = 1,
                 radius: int = 2, weight: float = 1.0, eps: float = 1e-5, fixed_mask: torch.Tensor | None = None,
                 moving_mask: torch.Tensor | None = None) -> None:
        spatial_dims(fixed, "fixed")
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} images differ")
        if stride < 1 or field_stride < 1 or field_stride % stride:
            raise ValueError(f"field_stride must be a multiple of stride >= 1; got {field_stride}, {stride}")
        self.shape = tuple(fixed.shape[2:])
        self.stride, self.ratio, self.weight = int(stride), int(field_stride) // int(stride), float(weight)
        self.grid = coarse_shape(self.shape, self.stride)
        # built outside the steppers' inference_mode(False) block (e.g. under Lightning's test/predict): make
        # the pooled images and the fixed window statistics ordinary tensors that autograd may save
        with torch.inference_mode(False):
            fixed_t = pool_to_grid(grad_ready(fixed.detach()), self.stride)
            self.moving = pool_to_grid(grad_ready(moving.detach()), self.stride)
            self.lncc = LNCC(fixed_t, radius, eps)
            self.fixed_mask, self.moving_mask = (
                None if m is None else pool_to_grid(grad_ready(check_mask(m, fixed, name)), self.stride)
                for m, name in ((fixed_mask, "fixed_mask"), (moving_mask, "moving_mask")))

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """The weighted loss (a scalar, differentiable in ``u`` ``(B, n, *G_s)``)."""
        v = upsample_field(u, self.grid, self.ratio) / self.stride
        cc = self.lncc(warp_image(self.moving, v))
        return self.weight * (1.0 - masked_mean(cc, similarity_weight(self.fixed_mask, self.moving_mask, v)))


class SegmentationDice:
    """``weight · (1 − mean soft Dice(F, M ∘ (id + u)))`` of two soft segmentations averaged over ``stride^n``
    blocks, for a field ``u`` on a coarser grid: an ``extra`` term of :class:`InstanceObjective`.

    The segmentations are maps ``(B, L, *S)`` in ``[0, 1]``, one channel per label (e.g. the
    :func:`layers.semantic.soft_segmentation` of a LearnGN model's semantic maps of the two images); the field
    ``(B, n, *G_s)`` (full-resolution voxel units, grid stride ``field_stride = s``, a multiple of ``stride = t``)
    is upsampled linearly to the stride-``t`` grid and converted to its voxels, the pooled moving segmentation
    warped with it (:func:`layers.warp.warp_image`), and the soft Dice (:func:`layers.losses.soft_dice`) averaged
    over the items and labels.

    Args:
        fixed, moving: full-resolution soft segmentations ``(B, L, *S)`` (constants).
        field_stride: stride ``s`` of the field's grid.
        stride: stride ``t`` of the segmentation grid (``s % t == 0``; 2 by default, half resolution).
        weight: factor of ``1 − mean soft Dice``.

    Raises:
        ValueError: mismatched maps, values outside ``[0, 1]``, or ``field_stride`` not a multiple of ``stride``.
    """

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, field_stride: int, *, stride: int = 2,
                 weight: float = 1.0) -> None:
        spatial_dims(fixed, "fixed")
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} segmentations differ")
        if stride < 1 or field_stride < 1 or field_stride % stride:
            raise ValueError(f"field_stride must be a multiple of stride >= 1; got {field_stride}, {stride}")
        for name, x in (("fixed", fixed), ("moving", moving)):
            if not bool(((x >= 0) & (x <= 1)).all()):
                raise ValueError(f"the {name} segmentation must have values in [0, 1]")
        self.stride, self.ratio, self.weight = int(stride), int(field_stride) // int(stride), float(weight)
        self.grid = coarse_shape(tuple(fixed.shape[2:]), self.stride)
        with torch.inference_mode(False):  # see ImageLNCC
            self.fixed = pool_to_grid(grad_ready(fixed.detach()), self.stride)
            self.moving = pool_to_grid(grad_ready(moving.detach()), self.stride)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """The weighted loss (a scalar, differentiable in ``u`` ``(B, n, *G_s)``)."""
        v = upsample_field(u, self.grid, self.ratio) / self.stride
        return self.weight * (1.0 - soft_dice(self.fixed, warp_image(self.moving, v)).mean())


def apply_increment(base: torch.Tensor, inc: torch.Tensor, velocity_steps: int = 0) -> torch.Tensor:
    """The field after an increment, both ``(B, n, *G)`` in voxels of the same grid: ``base + inc``
    (``velocity_steps = 0``), or, with ``q = velocity_steps > 0``, ``inc`` taken as a stationary velocity and
    ``exp(inc)`` (``q`` squarings, :func:`layers.warp.integrate_velocity`) applied first, then ``base``:
    the map ``x ↦ x + e(x) + base(x + e(x))``, ``e = exp(inc) − id`` (:func:`layers.warp.compose`)."""
    if velocity_steps:
        return compose(integrate_velocity(inc, velocity_steps), base)
    return base + inc


def smooth(x: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` applications of a ``3^n`` average pool with replicate padding; ``(B, C, *S)`` -> same."""
    for _ in range(int(passes)):
        x = box_filter(x, 1)
    return x


def grad_ready(x: torch.Tensor) -> torch.Tensor:
    """A tensor that autograd may save: a clone of an inference-mode tensor, else ``x`` itself.

    Lightning runs validate/test/predict under :func:`torch.inference_mode`; tensors created there cannot take
    part in autograd even inside ``torch.inference_mode(False)`` unless they are cloned first.
    """
    return x.clone() if x.is_inference() else x


def _check_objective(fixed: torch.Tensor, moving: torch.Tensor, init: torch.Tensor | None, step_unit: float,
                     velocity_steps: int, logj_weight: float) -> tuple[int, ...]:
    """Validate the objective's inputs; the parameter shape ``(B, n, *G)``."""
    n = spatial_dims(fixed, "fixed")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} features differ")
    shape = (fixed.shape[0], n, *fixed.shape[2:])
    if init is not None and tuple(init.shape) != shape:
        raise ValueError(f"init must be {shape} on the coarse grid; got {tuple(init.shape)}")
    if not step_unit > 0:
        raise ValueError(f"step_unit must be > 0; got {step_unit}")
    if velocity_steps < 0:
        raise ValueError(f"velocity_steps must be >= 0; got {velocity_steps}")
    if not logj_weight >= 0:
        raise ValueError(f"logj_weight must be >= 0; got {logj_weight}")
    return shape

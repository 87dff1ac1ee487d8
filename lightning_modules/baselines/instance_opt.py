"""Adam instance optimisation of a displacement field on a coarse grid: the one loop shared by the
:class:`~lightning_modules.baselines.AdamIO` baseline and the fine-tuning stage of
:class:`~lightning_modules.baselines.ConvexAdam` (docs/design.md §6).

The loop, on a grid of stride ``s`` (``s = 2``: half resolution) with node ``g`` at full-resolution position
``s*g + (s-1)/2`` (:func:`layers.grid.pool_to_grid`):

* parameter ``δ`` ``(B, n, *G)``, zero-initialised, in units of ``step_unit`` voxels of the coarse grid
  (1 by default, the published unit; Adam's step sizes scale with this unit, so it sets what a learning rate
  means);
* field ``u = u₀ + s · step_unit · box^k(δ)`` in full-resolution voxel units, ``u₀`` the initial field
  and ``box^k`` ``k`` passes of a ``3^n`` average pool with replicate padding
  (:func:`layers.features.box_filter`). The smoothing acts on the increment, so the optimisation starts
  exactly at ``u₀`` (the published ConvexAdam code smooths the whole field, initial part included; from a zero
  start the two are the same);
* loss ``weight · MSE(F, M ∘ (id + u/s)) + λ · diffusion(u / s)``: the coarse features are warped with the
  field in coarse-grid voxels (:func:`layers.warp.warp_image`) and the diffusion term
  (:func:`layers.diff.diffusion`, mean squared forward difference summed over axes) is taken of the field in
  coarse-grid voxels between neighbouring coarse nodes, the scale convention of the published ConvexAdam code
  (there the optimised tensor is the half-resolution field in half-resolution voxels and λ = 1.25 multiplies
  the mean squared difference of neighbours). In full-resolution voxels the regulariser is therefore
  ``λ / s² · diffusion(u)``. With ``step_unit = 1`` the parameter unit (coarse voxels) is the published
  one, so a learning rate means the same step size as there;
* Adam over ``δ`` with the learning rate ``schedule(step)`` at each step. The loss terms are means over the
  batch and the voxels (as in the published code for one pair). With ``B > 1`` each pair's gradient is
  divided by ``B``; Adam is invariant to that except through its ε, which is not negligible against the tiny
  per-voxel gradients of a mean, so a pair registered in a batch differs slightly from the same pair alone
  (≈ 0.01–0.04 voxel on a 40² test pair).

Masks (``fixed_mask`` / ``moving_mask``, optional, :mod:`layers.masks`): averaged to the grid of each similarity
term like the features, they restrict the MSE (and :class:`ImageLNCC`) to a weighted mean with the weight
``m_F · m_M ∘ (id + v)`` (the moving mask warped with the current field, without gradient); the regularisers
are not masked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from layers.diff import diffusion, log_jacobian_energy
from layers.features import box_filter
from layers.grid import channels_last, coarse_shape, pool_to_grid, spatial_dims, upsample_field
from layers.masks import check_mask, masked_mean, similarity_weight
from layers.similarity import LNCC
from layers.warp import compose, integrate_velocity, warp_image

from .common import grad_ready
from .schedules import Schedule

log = logging.getLogger(__name__)

__all__ = ["FeatureMSE", "ImageLNCC", "adam_optimise", "apply_increment", "refine_field", "smooth"]


def smooth(x: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` applications of a ``3^n`` average pool with replicate padding; ``(B, C, *S)`` -> same."""
    for _ in range(int(passes)):
        x = box_filter(x, 1)
    return x


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
    field ``u`` on a coarser grid: an ``extra`` term of :func:`adam_optimise`.

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
        # built outside adam_optimise's inference_mode(False) block (e.g. under Lightning's test/predict): make
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


def apply_increment(base: torch.Tensor, inc: torch.Tensor, velocity_steps: int = 0) -> torch.Tensor:
    """The field after an increment, both ``(B, n, *G)`` in voxels of the same grid: ``base + inc``
    (``velocity_steps = 0``), or, with ``q = velocity_steps > 0``, ``inc`` taken as a stationary velocity and
    ``exp(inc)`` (``q`` squarings, :func:`layers.warp.integrate_velocity`) applied first, then ``base``:
    the map ``x ↦ x + e(x) + base(x + e(x))``, ``e = exp(inc) − id`` (:func:`layers.warp.compose`)."""
    if velocity_steps:
        return compose(integrate_velocity(inc, velocity_steps), base)
    return base + inc


def adam_optimise(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    stride: int,
    *,
    init: torch.Tensor | None = None,
    iterations: int,
    schedule: Schedule,
    lam: float = 1.25,
    weight: float = 12.0,
    smooth_passes: int = 2,
    step_unit: float = 1.0,
    extra: Callable[[torch.Tensor], torch.Tensor] | None = None,
    velocity_steps: int = 0,
    logj_weight: float = 0.0,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adam instance optimisation on the coarse grid (see the module docstring).

    Args:
        fixed, moving: coarse features ``(B, C, *G)`` (e.g. MIND-SSC pooled by ``stride``), constants.
        stride: stride ``s`` of the grid ``G`` relative to full resolution.
        init: initial field ``(B, n, *G)`` in full-resolution voxel units (zeros when None).
        iterations: number of Adam steps (0 returns ``init``).
        schedule: ``step -> learning rate``.
        lam: weight λ of the diffusion term (of the field in coarse-grid voxels).
        weight: weight of the feature MSE (12 in the published recipes).
        smooth_passes: ``3^n`` average pools applied to the increment at every step.
        step_unit: coarse-grid voxels per unit of the Adam parameter (see the module docstring).
        extra: optional further loss term, called at every step with the field ``(B, n, *G)`` in
            full-resolution voxel units (differentiable) and returning a scalar added to the loss (e.g.
            :class:`ImageLNCC`). With ``weight = 0`` the feature MSE is not computed at all.
        velocity_steps: 0 (default): the additive parametrisation above. ``q > 0``: the smoothed increment
            ``w = step_unit · box^smooth_passes(δ)`` is a stationary velocity (coarse-grid voxels), integrated by
            ``q`` scaling-and-squaring steps (:func:`layers.warp.integrate_velocity`) and composed with the
            initial field, ``v = exp(w) − id + u₀/s ∘ exp(w)`` (:func:`layers.warp.compose`: first ``exp(w)``,
            then ``u₀``), so the coarse map is invertible whenever ``u₀``'s is (the linear upsampling of the
            result to full resolution preserves that only approximately); the diffusion term is still taken of
            the whole field ``v``.
        logj_weight: weight μ of a volume-change term ``μ · mean(log det(I + ∇v)²)`` of the whole coarse field
            (:func:`layers.diff.log_jacobian_energy`; 0: none). It penalises expansion and compression but
            not shears; on BrainPair it gave a smaller spread of log J than a larger λ at the same Dice. Central
            differences do not see a node-to-node checkerboard, so use it with ``smooth_passes >= 1``.
        callback: called after every step with ``(step, loss, u)``, ``u`` detached (for logging or tracing).
        fixed_mask, moving_mask: optional masks ``(B, 1, *G)`` (or batch 1) in ``[0, 1]`` on the coarse grid
            restricting the feature MSE (:class:`FeatureMSE`; the module docstring).

    Returns:
        The optimised coarse field ``(B, n, *G)`` in full-resolution voxel units (detached).
    """
    n = spatial_dims(fixed, "fixed")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} features differ")
    shape = (fixed.shape[0], n, *fixed.shape[2:])
    if init is not None and tuple(init.shape) != shape:
        raise ValueError(f"init must be {shape} on the coarse grid; got {tuple(init.shape)}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0; got {iterations}")
    if not step_unit > 0:
        raise ValueError(f"step_unit must be > 0; got {step_unit}")
    if velocity_steps < 0:
        raise ValueError(f"velocity_steps must be >= 0; got {velocity_steps}")
    if not logj_weight >= 0:
        raise ValueError(f"logj_weight must be >= 0; got {logj_weight}")
    with torch.inference_mode(False), torch.enable_grad():
        fixed = grad_ready(fixed.detach())
        moving = grad_ready(moving.detach())
        base = fixed.new_zeros(shape) if init is None else grad_ready(init.detach()).to(fixed.dtype)
        if iterations == 0:
            return base.clone()
        delta = torch.zeros(shape, dtype=fixed.dtype, device=fixed.device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=float(schedule(0)))
        s = float(stride)
        u_coarse = base / s  # in coarse-grid voxels
        similarity = None
        if weight != 0:
            similarity = FeatureMSE(fixed, moving, *(None if m is None else grad_ready(m.detach())
                                                     for m in (fixed_mask, moving_mask)))

        def field(d: torch.Tensor) -> torch.Tensor:
            return apply_increment(u_coarse, step_unit * smooth(d, smooth_passes), velocity_steps)

        for step in range(int(iterations)):
            lr = float(schedule(step))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            v = field(delta)
            loss = lam * diffusion(v)
            if logj_weight:
                loss = loss + logj_weight * log_jacobian_energy(v)
            if similarity is not None:
                loss = loss + weight * similarity(v)
            if extra is not None:
                loss = loss + extra(v * s)
            loss.backward()
            opt.step()
            if callback is not None:
                callback(step, float(loss.detach()), (v.detach() * s))
        with torch.no_grad():
            out = field(delta) * s
    log.debug("adam_optimise: %d steps, final loss %.5g", iterations, float(loss.detach()))
    return out.detach()


def refine_field(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    shape: Sequence[int],
    stride: int = 2,
    *,
    init: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Full-resolution wrapper of :func:`adam_optimise`.

    Args:
        fixed, moving: full-resolution features ``(B, C, *S)`` (e.g. MIND-SSC), averaged over ``stride^n``
            blocks here (:func:`layers.grid.pool_to_grid`).
        shape: the full-resolution shape ``S``.
        stride: optimisation grid stride (2: half resolution).
        init: optional initial full-resolution field ``(B, n, *S)`` (voxel units); it is averaged to the grid
            the same way (exact at the nodes for an affine field), kept in full-resolution voxel units.
        fixed_mask, moving_mask: optional full-resolution masks ``(B, 1, *S)`` (or batch 1) in ``[0, 1]``,
            averaged to the grid the same way, restricting the feature MSE (the module docstring).
        kwargs: :func:`adam_optimise` arguments (``iterations``, ``schedule``, ``lam``, ...).

    Returns:
        ``(B, n, *S)`` full-resolution field (voxel units), the coarse result upsampled linearly
        (:func:`layers.grid.upsample_field`).
    """
    shape = tuple(int(v) for v in shape)
    fixed_c, moving_c = pool_to_grid(fixed, stride), pool_to_grid(moving, stride)
    masks = [None if m is None else pool_to_grid(check_mask(m, fixed, name), stride)
             for m, name in ((fixed_mask, "fixed_mask"), (moving_mask, "moving_mask"))]
    init_c = None
    if init is not None:
        expected = (fixed.shape[0], len(shape), *shape)
        if tuple(init.shape) != expected:
            raise ValueError(f"init must be a full-resolution field {expected}; got {tuple(init.shape)}")
        if not torch.isfinite(init).all():
            raise ValueError("init has non-finite values")
        init_c = pool_to_grid(init.to(fixed.dtype), stride)
    assert tuple(fixed_c.shape[2:]) == coarse_shape(shape, stride)
    u_c = adam_optimise(fixed_c, moving_c, stride, init=init_c, fixed_mask=masks[0], moving_mask=masks[1],
                        **kwargs)
    return upsample_field(u_c, shape, stride)

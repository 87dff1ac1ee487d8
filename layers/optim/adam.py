"""The ``torch.optim.Adam`` stepper of Adam instance optimisation (docs/design.md §6): the loop of the AdamIO
baseline and of ConvexAdam's fine-tuning stage, on the objective :class:`layers.optim.objective.InstanceObjective`
(units, parametrisation and loss stated there). :func:`refine_field` is its full-resolution wrapper.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from layers.grid import coarse_shape, pool_to_grid, upsample_field
from layers.masks import check_mask

from .objective import InstanceObjective
from .schedules import Schedule

log = logging.getLogger(__name__)

__all__ = ["adam_optimise", "refine_field"]


def adam_optimise(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    stride: int,
    *,
    iterations: int,
    schedule: Schedule,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    **objective: Any,
) -> torch.Tensor:
    """Adam instance optimisation on the coarse grid with ``torch.optim.Adam`` (default β, ε).

    Args:
        fixed, moving: coarse features ``(B, C, *G)`` (e.g. MIND-SSC pooled by ``stride``), constants.
        stride: stride ``s`` of the grid ``G`` relative to full resolution.
        iterations: number of Adam steps (0 returns the initial field).
        schedule: ``step -> learning rate`` (in ``step_unit`` coarse-grid voxels), set before every step.
        callback: called after every step with ``(step, loss, u)``, ``u`` the field ``(B, n, *G)`` in
            full-resolution voxels, detached (for logging or tracing).
        objective: the keyword arguments of :class:`~layers.optim.objective.InstanceObjective` (``init``,
            ``diffusion_weight``, ``weight``, ``smooth_passes``, ``step_unit``, ``velocity_steps``,
            ``logj_weight``, ``extra``, ``fixed_mask``, ``moving_mask``).

    Returns:
        The optimised coarse field ``(B, n, *G)`` in full-resolution voxel units (detached).
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0; got {iterations}")
    with torch.inference_mode(False), torch.enable_grad():
        obj = InstanceObjective(fixed, moving, stride, **objective)
        if iterations == 0:
            return obj.base.clone()
        delta = obj.zeros()
        opt = torch.optim.Adam([delta], lr=float(schedule(0)))
        for step in range(int(iterations)):
            lr = float(schedule(step))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss, v = obj(delta)
            loss.backward()
            opt.step()
            if callback is not None:
                callback(step, float(loss.detach()), (v.detach() * obj.stride))
        with torch.no_grad():
            out = obj.field(delta) * obj.stride
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
            averaged to the grid the same way, restricting the feature MSE (:mod:`layers.optim.objective`).
        kwargs: :func:`adam_optimise` arguments (``iterations``, ``schedule``, ``diffusion_weight``, ...).

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

"""The functional, differentiable Adam stepper of Adam instance optimisation (docs/design.md §5, §6).

:func:`differentiable_adam` runs the same objective (:class:`layers.optim.objective.InstanceObjective`) with the
update formulas of ``torch.optim.Adam``, written with tensors so that autograd reaches the per-step learning
rates through all ``T`` steps (second-order terms included). Gradient checkpointing
(:func:`torch.utils.checkpoint.checkpoint`, non-reentrant) over segments of steps makes memory grow with
``T / checkpoint_every`` instead of ``T``. Its use: meta-learning learning-rate schedules
(:class:`lightning_modules.hyper.ScheduleMetaLearner`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..grid import second_order_warps
from .objective import InstanceObjective

__all__ = ["differentiable_adam"]


def differentiable_adam(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    stride: int,
    lrs: torch.Tensor,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    checkpoint_every: int = 10,
    return_path: bool = False,
    **objective: Any,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Adam instance optimisation on a coarse grid, differentiable in the learning rates ``lrs``.

    Same parametrisation, objective and update as :func:`layers.optim.adam.adam_optimise` with
    ``torch.optim.Adam`` (``β``, ``ε``); segments of ``checkpoint_every`` steps are recomputed in the backward
    pass.

    Args:
        fixed, moving: coarse features ``(B, C, *G)`` (not differentiated).
        stride: grid stride ``s`` (full-resolution voxels per node).
        lrs: ``(T,)`` learning rates per step (in ``step_unit`` coarse-grid voxels, as in the baseline);
            differentiable.
        betas, eps: Adam's.
        checkpoint_every: steps per checkpointed segment (``<= 0``: no checkpointing).
        return_path: also return the field after every segment but the last.
        objective: the keyword arguments of :class:`~layers.optim.objective.InstanceObjective` (``init``,
            ``diffusion_weight``, ``weight``, ``smooth_passes``, ``step_unit``, ...).

    Returns:
        the optimised coarse field ``(B, n, *G)`` in full-resolution voxels (and the list of intermediate
        fields with ``return_path``).
    """
    obj = InstanceObjective(fixed.detach(), moving.detach(), stride, **objective)
    steps = int(lrs.shape[0])
    create_graph = lrs.requires_grad and torch.is_grad_enabled()
    seg = steps if checkpoint_every <= 0 else int(checkpoint_every)
    delta = obj.zeros()
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)
    consts = (obj, betas, eps, create_graph)
    path = []
    with torch.enable_grad():
        for t0 in range(0, steps, seg):
            chunk = lrs[t0 : t0 + seg]
            if create_graph and checkpoint_every > 0:
                # the segment draws no random numbers: not stashing RNG states keeps the recomputation
                # independent of the process's CUDA state (checkpoint otherwise saves/restores device RNG
                # states when CUDA is initialised and refuses a CUDA initialisation inside the segment)
                delta, m, v = checkpoint(_adam_segment, t0, *consts, delta, m, v, chunk, use_reentrant=False,
                                         preserve_rng_state=False)
            else:
                delta, m, v = _adam_segment(t0, *consts, delta, m, v, chunk)
            if return_path and t0 + seg < steps:
                path.append(obj.field(delta) * obj.stride)
        out = obj.field(delta) * obj.stride
    if not create_graph:
        out = out.detach()
    return (out, path) if return_path else out


def _adam_segment(
    t0: int,
    objective: InstanceObjective,
    betas: tuple[float, float],
    eps: float,
    create_graph: bool,
    delta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    lrs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam steps ``t0 .. t0 + len(lrs) − 1`` from state ``(δ, m, v)``; the update of ``torch.optim.Adam``."""
    b1, b2 = betas
    for j in range(lrs.shape[0]):
        step = t0 + j + 1
        if not delta.requires_grad:
            delta = delta.detach().requires_grad_(True)
        with second_order_warps(create_graph):  # the meta-gradient differentiates through the warps twice
            loss, _ = objective(delta)
        (g,) = torch.autograd.grad(loss, delta, create_graph=create_graph)
        m = torch.lerp(m, g, 1 - b1)
        v = v * b2 + (1 - b2) * g * g
        step_size = lrs[j].to(delta.dtype) / (1 - b1**step)
        denom = _SafeSqrt.apply(v) / math.sqrt(1 - b2**step) + eps
        delta = delta - step_size * (m / denom)
        if not create_graph:
            delta, m, v = delta.detach(), m.detach(), v.detach()
    return delta, m, v


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(x)`` with derivative 0 at ``x = 0`` (Adam's second moment is 0 where all gradients were)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D401
        y = x.sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, grad * 0.5 / y.clamp_min(torch.finfo(y.dtype).tiny), torch.zeros_like(grad))

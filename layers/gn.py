"""Gauss-Newton registration: K GN steps on a coarse grid with λ and step-size schedules (docs/design.md §3).

One step, on a grid of stride ``s`` (``G = Sp / s`` nodes, ``Sp`` the feature shape padded to a multiple of
``s``), with ``u`` the coarse displacement in full-resolution voxel units:

1. upsample ``u`` to ``Sp`` and warp the moving features: ``W = moving(x + u(x))``;
2. ``J`` ``(B, C, n, *G)`` and ``f`` ``(B, C, *G)`` from ``(fixed, W)`` (handcrafted or learned heads);
3. ``H = Σ_c J_cᵀ J_c`` ``(B, n, n, *G)``, ``g = Σ_c J_cᵀ f_c`` ``(B, n, *G)`` (with masks, each node's
   terms weighted by the masks' similarity weight averaged over its block, :mod:`layers.masks`);
4. solve ``(H + λ L⊗I) δ = −(g + λ (L⊗I) u)`` with :func:`layers.gn_solve` (differentiable);
5. ``u ← u + α δ``.

Steps 1-3 map the coarse field and the full-resolution features to the stride-``s`` system ``(H, g)``; with
``recompute=True`` (:class:`GNRegistration`, :func:`gn_step`) they run under activation checkpointing, so that
backpropagation stores only their inputs and the stride-``s`` outputs instead of the full-resolution
intermediates (warped features, the heads' padded inputs) of every iteration, and recomputes those during the
backward pass; the solve (step 4) stays outside the recomputed region. The stages are marked with
``torch.profiler.record_function`` ranges ``gn.warp``, ``gn.jf``, ``gn.normal_equations`` and ``gn.solve``
(no cost beyond a few microseconds when no profiler runs).

A ``jf`` module with a ``prepare(fixed)`` method (:class:`layers.heads.CompactHeads`) has it called once per
registration (:class:`GNRegistration`), and its result passed as ``prepared=`` to every iteration's call: the
parts of the heads that do not change over the iterations (the composed kernels, the fixed features' share of
``f``) are computed once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from .enums import Update
from .gn_solve import gn_solve
from .grid import channels_last, coarse_shape, pool_to_grid, spatial_dims, upsample_field
from .heads import handcrafted_jf
from .lam_schedule import LambdaSchedule, geometric_schedule
from .laplacian import laplacian_apply
from .masks import check_mask, similarity_weight
from .warp import compose, warp_image

__all__ = ["UPDATES", "GNRegistration", "assemble_normal_equations", "geometric_schedule", "gn_step",
           "pad_to_multiple"]  # geometric_schedule: re-exported from layers.lam_schedule

JFFunction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


#: GN update rules (see :func:`gn_step`)
UPDATES = tuple(u.value for u in Update)


def assemble_normal_equations(
    jac: torch.Tensor, res: torch.Tensor, weights: torch.Tensor | None = None,
    node_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = Σ_c ω w_c J_cᵀ J_c`` ``(B, n, n, *G)`` and ``g = Σ_c ω w_c J_cᵀ f_c`` ``(B, n, *G)`` from
    ``J`` ``(B, C, n, *G)`` and ``f`` ``(B, C, *G)``.

    ``weights`` ``(C,)`` (default all 1) weight each channel's data term ``½ w_c |f_c|²``; they must be >= 0.
    Both ``H`` and ``g`` are *linear* in ``w_c``, so a channel whose weight starts at 0 still receives a
    gradient (scaling the channel's features by ``sqrt(w_c)`` would give the same system, but its gradient at
    0 would vanish). ``node_weights`` ``ω`` ``(B, 1, *G)`` / ``(1, 1, *G)`` (default 1, >= 0) weight each node's
    data term the same way (the masks' similarity weight pooled to the grid, :func:`gn_step`); a node of weight
    0 contributes nothing, so ``H`` and ``g`` do not depend on its ``J`` and ``f``.
    """
    if jac.dim() != res.dim() + 1 or jac.shape[:2] != res.shape[:2] or jac.shape[3:] != res.shape[2:]:
        raise ValueError(f"J {tuple(jac.shape)} and f {tuple(res.shape)} do not match (B, C, n, *G)/(B, C, *G)")
    wj = jac
    if weights is not None:
        if weights.shape != (jac.shape[1],):
            raise ValueError(f"channel weights must be ({jac.shape[1]},); got {tuple(weights.shape)}")
        wj = wj * weights.to(jac.dtype).view(1, -1, *([1] * (jac.dim() - 2)))
    if node_weights is not None:
        if node_weights.dim() != res.dim() or node_weights.shape[1] != 1 \
                or node_weights.shape[0] not in (1, res.shape[0]) or node_weights.shape[2:] != res.shape[2:]:
            raise ValueError(f"node_weights must be {(res.shape[0], 1, *res.shape[2:])}; "
                             f"got {tuple(node_weights.shape)}")
        wj = wj * node_weights.to(jac.dtype).unsqueeze(2)
    hess = torch.einsum("bci...,bcj...->bij...", wj, jac)
    grad = torch.einsum("bci...,bc...->bi...", wj, res)
    return hess, grad


def pad_to_multiple(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Replicate-pad ``(B, C, *S)`` at the far end of each axis to a multiple of ``stride``."""
    n = spatial_dims(x)
    pad: list[int] = []
    for s in reversed(x.shape[2:]):
        pad += [0, (-int(s)) % stride]
    if not any(pad):
        return x
    if n == 2 and x.dim() == 4 or n == 3 and x.dim() == 5:
        return F.pad(x, pad, mode="replicate")
    raise ValueError(f"cannot pad a tensor of shape {tuple(x.shape)}")


def gn_step(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    u: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    stride: int = 4,
    step: float | torch.Tensor = 1.0,
    jf: JFFunction | None = None,
    coupling: str = "full",
    detach_warp: bool = False,
    update: str = "add",
    channel_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    recompute: bool = False,
    **solver_kwargs,
) -> torch.Tensor:
    """One Gauss-Newton step; returns the updated coarse field.

    Args:
        fixed, moving: features ``(B, C, *Sp)`` with ``Sp`` a multiple of ``stride``.
        u: coarse displacement ``(B, n, *G)`` (full-resolution voxel units), ``G = Sp / stride``.
        lam: regularisation weight λ > 0 (float, ``()`` or ``(B,)``).
        step: step size α.
        jf: ``(fixed, warped) -> (J, f)``; default :func:`layers.heads.handcrafted_jf` at ``stride``.
        coupling: ``"full"`` or ``"diagonal"`` (see :func:`layers.gn_solve`).
        detach_warp: warp with ``u.detach()`` (no gradient through the warp into earlier iterations).
        update: ``"add"`` (docs/design.md §3: the system regularises the whole field, ``(H + λL) δ = −(g + λLu)``,
            ``u ← u + α δ``) or ``"compose"`` (the regulariser acts on the increment only, ``(H + λL) δ = −g``,
            and the maps are composed, ``u ← α δ + u ∘ (id + α δ)`` via :func:`layers.warp.compose`: each
            step is a small smooth map, so the total field can grow large without folding, like fluid /
            demons-type registration).
        channel_weights: ``(C,)`` weights ``>= 0`` of the feature channels' data terms (default 1; see
            :func:`assemble_normal_equations`).
        mask: optional fixed mask ``(B, 1, *Sp)`` (or batch 1) in ``[0, 1]`` on the feature grid;
        moving_mask: optional moving mask, the same shape, warped with the current field (no gradient). Each
            node's data term is weighted by ``m_F · m_M ∘ (id + u)`` averaged over its ``stride^n`` block
            (:func:`layers.masks.similarity_weight`, :func:`layers.grid.pool_to_grid`); all-ones masks give the
            unmasked step.
        recompute: when gradients are recorded, run steps 1-3 (warp, ``J``/``f``, normal equations) under
            :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): the backward pass keeps only ``u``, the
            features and ``H``, ``g`` ``(B, n, n, *G)``, ``(B, n, *G)`` of this step (and, once per registration,
            what the heads' ``prepare`` made outside the checkpoint: the padded fixed features at full
            resolution and the fixed share of ``f``) and recomputes the full-resolution intermediates when it
            reaches them (the same values and gradients; one more forward of those steps per backward). ``jf``
            must then be deterministic (no dropout).
        solver_kwargs: passed to :func:`layers.gn_solve` (``rtol``, ``maxiter``, ``backend``, ...).
    """
    update = Update.lookup(update, "update")
    masks = [None if m is None else check_mask(m, fixed, name, check_values=False)
             for m, name in ((mask, "mask"), (moving_mask, "moving_mask"))]
    args = (fixed, moving, u, masks[0], masks[1], channel_weights)
    system_kwargs = {"stride": stride, "jf": jf, "detach_warp": detach_warp}
    if recompute and torch.is_grad_enabled():
        hess, grad = checkpoint(_normal_system, *args, use_reentrant=False, **system_kwargs)
    else:
        hess, grad = _normal_system(*args, **system_kwargs)
    lam_b = lam.reshape(-1, *([1] * (u.dim() - 1))) if torch.is_tensor(lam) else lam
    rhs = -(grad + lam_b * laplacian_apply(u)) if update == "add" else -grad
    with record_function("gn.solve"):
        delta = gn_solve(hess, rhs, lam, coupling=coupling, **solver_kwargs)
    step_b = step.reshape(-1, *([1] * (u.dim() - 1))) if torch.is_tensor(step) else step
    if update == "add":
        return u + step_b * delta
    # both fields are in full-resolution voxels on the coarse grid of spacing `stride`
    return compose(step_b * delta / stride, u / stride) * stride


def _normal_system(
    fixed: torch.Tensor, moving: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None,
    moving_mask: torch.Tensor | None, channel_weights: torch.Tensor | None, *, stride: int,
    jf: JFFunction | None, detach_warp: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of :func:`gn_step`: ``H`` ``(B, n, n, *G)`` and ``g`` ``(B, n, *G)`` from the features
    ``(B, C, *Sp)``, the coarse field ``u`` ``(B, n, *G)`` (voxels) and the checked masks ``(B, 1, *Sp)``."""
    with record_function("gn.warp"):
        disp = upsample_field(u.detach() if detach_warp else u, fixed.shape[2:], stride)
        warped = warp_image(moving, disp)
    with record_function("gn.jf"):
        jac, res = jf(fixed, warped) if jf is not None else handcrafted_jf(fixed, warped, stride)
    with record_function("gn.normal_equations"):
        weight = similarity_weight(mask, moving_mask, disp)
        node_weights = None if weight is None else pool_to_grid(weight, stride)
        return assemble_normal_equations(jac, res, channel_weights, node_weights)


@dataclass
class GNOutput:
    """Result of :class:`GNRegistration`: the full-resolution field ``(B, n, *S)`` and the coarse one
    ``(B, n, *G)`` (both voxel units), and the coarse field after each iteration when requested."""

    disp: torch.Tensor
    coarse: torch.Tensor
    history: list[torch.Tensor] = field(default_factory=list)


class GNRegistration(nn.Module):
    """K Gauss-Newton iterations on a stride-``s`` grid, returning the full-resolution field.

    Args:
        iterations: K.
        stride: grid stride ``s``.
        lam: λ per iteration (docs/design.md §5): a :class:`layers.lam_schedule.LambdaSchedule` (its owner,
            e.g. :class:`lightning_modules.learngn.LearnGN`, chooses its kind), or a pair ``(start, end)``
            (geometric decay over the K iterations) or K values for a fixed one. Held as :attr:`lam`, the one
            name this module reads λ by.
        step: step-size schedule α: a float (constant) or K values.
        coupling: ``"full"`` (n×n blocks) or ``"diagonal"`` (the reference simplification).
        jf: optional module ``(fixed, warped) -> (J, f)`` (the learned heads); handcrafted when None. When it
            has a ``prepare(fixed)`` method, each :meth:`forward` calls it once on the padded fixed features and
            passes the result as ``jf(fixed, warped, prepared=...)`` (module docstring).
        solver: keyword arguments for :func:`layers.gn_solve` (``rtol``, ``maxiter``, ``backend``, ...).
        detach_warp: warp with a detached copy of the current field, so gradients reach each iteration's
            ``J`` and ``f`` directly and not back through earlier warps (truncated backpropagation; the
            forward result is unchanged).
        update: ``"add"`` (the reference) or ``"compose"`` (see :func:`gn_step`).
        recompute: recompute, during the backward pass, each iteration's full-resolution part (warp, ``J``/``f``,
            normal equations; :func:`gn_step`) instead of storing it: training memory then grows with the
            iterations by the stride-``s`` system only (``(n² + n)·G`` values per item and iteration) instead of
            several full-resolution ``C``-channel tensors, at the price of one more forward of that part per
            iteration. Same values and gradients; no effect without gradients (inference).
    """

    def __init__(
        self,
        iterations: int = 10,
        stride: int = 4,
        lam: Sequence[float] | LambdaSchedule = (1.0, 0.5),
        step: float | Sequence[float] = 1.0,
        coupling: str = "full",
        jf: nn.Module | None = None,
        solver: dict | None = None,
        detach_warp: bool = False,
        update: str = "add",
        recompute: bool = False,
    ) -> None:
        super().__init__()
        self.recompute = bool(recompute)
        update = Update.lookup(update, "update")
        self.update = update
        self.detach_warp = bool(detach_warp)
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1; got {iterations}")
        self.iterations, self.stride, self.coupling = int(iterations), int(stride), coupling
        if not isinstance(lam, LambdaSchedule):
            lam = LambdaSchedule(lam, iterations)
        if lam.iterations != iterations:
            raise ValueError(f"the λ schedule has {lam.iterations} values for {iterations} iterations")
        steps = [float(step)] * iterations if isinstance(step, (int, float)) else [float(v) for v in step]
        if len(steps) != iterations:
            raise ValueError(f"step must be a float or {iterations} values; got {steps}")
        self.register_buffer("step_schedule", torch.tensor(steps), persistent=False)
        self.jf = jf
        self.lam = lam
        self.solver = dict(solver or {})

    def forward(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        u0: torch.Tensor | None = None,
        lam: torch.Tensor | None = None,
        step: torch.Tensor | None = None,
        return_history: bool = False,
        channel_weights: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
    ) -> GNOutput:
        """Register ``moving`` to ``fixed``.

        Args:
            fixed, moving: features ``(B, C, *S)``.
            u0: initial coarse field ``(B, n, *G)`` with ``G = ceil(S / s)`` (zeros by default).
            lam: λ per iteration overriding :attr:`lam`: ``(K,)`` or ``(K, B)`` tensor (differentiable).
            step: α per iteration overriding the schedule: ``(K,)`` or ``(K, B)``.
            return_history: keep the coarse field after each iteration.
            channel_weights: ``(C,)`` data-term weights of the feature channels (default 1; see
                :func:`assemble_normal_equations`).
            mask, moving_mask: optional fixed / moving masks ``(B, 1, *S)`` (or batch 1) in ``[0, 1]`` on the
                feature grid: they restrict the data term (:func:`gn_step`; replicate-padded like the
                features). ``ValueError`` naming the argument for a wrong shape or values.
        """
        n = spatial_dims(fixed, "fixed")
        if fixed.shape[0] != moving.shape[0] or fixed.shape[2:] != moving.shape[2:]:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must share B and S")
        if fixed.shape[1] != moving.shape[1]:
            raise ValueError(f"fixed and moving features differ in channels: {fixed.shape[1]} vs {moving.shape[1]}")
        shape = tuple(fixed.shape[2:])
        s = self.stride
        grid = coarse_shape(shape, s)
        fixed_p, moving_p = pad_to_multiple(fixed, s), channels_last(pad_to_multiple(moving, s))  # warped K times
        mask_p, moving_mask_p = (None if m is None else pad_to_multiple(check_mask(m, fixed, name), s)
                                 for m, name in ((mask, "mask"), (moving_mask, "moving_mask")))
        if u0 is None:
            u = fixed.new_zeros(fixed.shape[0], n, *grid)
        else:
            if tuple(u0.shape) != (fixed.shape[0], n, *grid):
                raise ValueError(f"u0 must be {(fixed.shape[0], n, *grid)}; got {tuple(u0.shape)}")
            u = u0
        lams = self.lam.values().to(fixed.dtype) if lam is None else lam
        steps = self.step_schedule.to(fixed.dtype) if step is None else step
        if lams.shape[0] != self.iterations or steps.shape[0] != self.iterations:
            raise ValueError(f"lam and step need {self.iterations} rows; got {tuple(lams.shape)}, {tuple(steps.shape)}")
        jf = self.jf
        if hasattr(jf, "prepare"):
            with record_function("gn.jf"):
                jf = partial(jf, prepared=jf.prepare(fixed_p))
        history = []
        for t in range(self.iterations):
            u = gn_step(fixed_p, moving_p, u, lams[t], stride=s, step=steps[t], jf=jf,
                        coupling=self.coupling, detach_warp=self.detach_warp, update=self.update,
                        channel_weights=channel_weights, mask=mask_p, moving_mask=moving_mask_p,
                        recompute=self.recompute, **self.solver)
            if return_history:
                history.append(u)
        padded_shape = fixed_p.shape[2:]
        disp = upsample_field(u, padded_shape, s)
        disp = disp[(slice(None), slice(None)) + tuple(slice(0, v) for v in shape)]
        return GNOutput(disp=disp, coarse=u, history=history)

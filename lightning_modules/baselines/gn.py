"""Handcrafted Gauss-Newton baseline: :class:`layers.gn.GNRegistration` with the handcrafted ``J`` and ``f``
(docs/design.md §3, §6) on the features of :func:`data.features.batch_features`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from data.batch import batch_masks
from data.features import FeatureKind, batch_features
from layers.enums import Coupling
from layers.gn import GNRegistration
from layers.grid import pool_to_grid, upsample_field

from .common import BaselineModule, check_number, check_numbers, check_pair

log = logging.getLogger(__name__)

__all__ = ["HandcraftedGN"]


class HandcraftedGN(BaselineModule):
    """Handcrafted GN registration (evaluation only).

    Features (``features``: ``"mind"`` MIND-SSC, ``"sdm"`` signed distance maps of the label maps — an oracle
    setting that needs labels — or ``"intensity"``) are multiplied by ``feature_scale``, optionally averaged
    over ``feature_stride^n`` blocks, and registered by ``iterations`` GN steps
    (:class:`layers.gn.GNRegistration`) on a grid with nodes every ``stride`` full-resolution voxels
    (``stride / feature_stride`` feature voxels) with a geometric λ schedule from ``lam[0]`` to ``lam[1]``
    (or ``iterations`` explicit values). The field is returned in full-resolution voxels: with
    ``feature_stride > 1`` it is multiplied by ``feature_stride`` and upsampled linearly
    (:func:`layers.grid.upsample_field`).

    The defaults keep the reference structure (full-resolution features, stride 4, 10 iterations), so that an
    untrained :class:`~lightning_modules.learngn.LearnGN` equals this class with the same λ; the λ schedule
    0.3 → 0.03 was chosen for MIND by a sweep: on a synthetic 48³ pair with 7-voxel displacements λ_end
    0.03 gave Dice 0.855 (0.01: 0.812 with SDlogJ 0.75; 0.1: 0.829; 0.3: 0.789) and on BrainPair (0001←0002)
    Dice 0.675 / SDlogJ 0.18 (λ 1 → 0.1: 0.639 / 0.10). ``feature_stride=2`` with λ 1 → 0.1
    (``configs/baselines/gn_mind.yaml``) is 3–5× faster and slightly better (synthetic Dice 0.88, BrainPair
    0.677 / 0.18: pooled features widen the capture range); with it, λ_end trades Dice for regularity on
    BrainPair: 0.2 → 0.661 / 0.13, 0.1 → 0.677 / 0.18, 0.05 → 0.692 / 0.24, 0.01 → 0.703 / 1.47.
    The reference settings for distance maps scaled ×20 (``feature_scale=20``) are λ 150→70 in 2D and
    125→25 in 3D.

    Args:
        features: ``"mind"``, ``"sdm"`` or ``"intensity"``.
        iterations: GN steps K.
        stride: node spacing of the GN grid in full-resolution voxels (a multiple of ``feature_stride``).
        lam: ``(start, end)`` geometric λ schedule, K values, or one number (a constant λ); every value > 0.
        step: step size α > 0 (float or K values).
        coupling: ``"full"`` or ``"diagonal"``.
        feature_scale: factor applied to the features (e.g. 20 for distance maps).
        feature_stride: average the features over ``feature_stride^n`` blocks first (1: full resolution).
        mind_radius, mind_dilation: MIND-SSC ``r`` and ``d``.
        solver: keyword arguments for :func:`layers.gn_solve` (``rtol``, ``maxiter``, ``backend``, ...).
        update: ``"add"`` (the reference: regularise the whole field, add the increments) or ``"compose"``
            (regularise each increment and compose the maps, :func:`layers.gn.gn_step`): on BrainPair with
            MIND pooled ×2 and λ 1 → 0.3 over 25 iterations it reaches ConvexAdam's Dice without folding
            (``configs/baselines/gn_compose.yaml``, ``benchmarks/results/baselines.md``).
        use_masks: restrict the GN data term to the batch's ``fixed_mask`` / ``moving_mask`` when present
            (per-node weights, :func:`layers.gn.gn_step`; masks averaged by ``feature_stride`` like the features).
            Off by default; ``eval.py`` turns it on when mask files are given.

    Raises:
        ValueError: unknown features, coupling or update, ``stride`` not a multiple of ``feature_stride``, or a
            numeric option out of range (named in the message: ``iterations >= 1``, ``lam > 0``, ``step > 0``,
            ``stride, feature_stride, mind_dilation >= 1``, ``mind_radius >= 0``, ``feature_scale > 0``).
    """

    evaluation_only = True
    method_name = "gn"

    def __init__(
        self,
        features: str = "mind",
        iterations: int = 10,
        stride: int = 4,
        lam: Sequence[float] = (0.3, 0.03),
        step: float | Sequence[float] = 1.0,
        coupling: str = "full",
        feature_scale: float = 1.0,
        feature_stride: int = 1,
        mind_radius: int = 1,
        mind_dilation: int = 2,
        solver: dict[str, Any] | None = None,
        update: str = "add",
        use_masks: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        features = FeatureKind.lookup(features, "features").value
        iterations = check_number("iterations", iterations, low=1, integer=True)
        stride = check_number("stride", stride, low=1, integer=True)
        feature_stride = check_number("feature_stride", feature_stride, low=1, integer=True)
        lam = check_numbers("lam", lam, low=0, strict=True)
        if len(lam) == 1:  # one number: a constant λ
            lam = lam * iterations
        step = check_numbers("step", step, low=0, strict=True)
        step = step[0] if len(step) == 1 else step
        feature_scale = check_number("feature_scale", feature_scale, low=0, strict=True)
        mind_radius = check_number("mind_radius", mind_radius, low=0, integer=True)
        mind_dilation = check_number("mind_dilation", mind_dilation, low=1, integer=True)
        if stride % feature_stride:
            raise ValueError(
                f"need feature_stride >= 1 and stride a multiple of it; got stride={stride}, "
                f"feature_stride={feature_stride}"
            )
        coupling = Coupling.lookup(coupling, "coupling").value
        self.kind, self.feature_scale = features, float(feature_scale)
        self.feature_stride = int(feature_stride)
        self.use_masks = bool(use_masks)
        self.mind_radius, self.mind_dilation = int(mind_radius), int(mind_dilation)
        self.gn = GNRegistration(iterations=iterations, stride=stride // feature_stride, lam=tuple(lam),
                                 step=step, coupling=coupling, solver=solver, update=update)

    def features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed and moving features ``(B, C, *S')``, ``S' = ceil(S / feature_stride)``, scaled."""
        f, m = batch_features(batch, self.kind, mind_radius=self.mind_radius,
                              mind_dilation=self.mind_dilation)
        if self.feature_stride > 1:
            f, m = pool_to_grid(f, self.feature_stride), pool_to_grid(m, self.feature_stride)
        return f * self.feature_scale, m * self.feature_scale

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """Displacement ``(B, n, *S)`` (voxel units) of a batch; see the class docstring."""
        fixed, _ = check_pair(batch)
        with torch.no_grad():
            f, m = self.features(batch)
            masks = [None if x is None else pool_to_grid(x, self.feature_stride)
                     for x in batch_masks(batch, self.use_masks)]
            u = self.gn(f, m, mask=masks[0], moving_mask=masks[1]).disp
            if self.feature_stride > 1:
                u = upsample_field(u * self.feature_stride, fixed.shape[2:], self.feature_stride)
        return u

"""The metrics of a registered batch (docs/design.md §7) and their mean over a run.

:func:`pair_metrics` is the single entry point: every metric that applies to a batch (``data/batch.py``) and its
field, from the functional definitions in :mod:`layers.metrics`. :class:`RegistrationMetrics` accumulates them
across batches and processes (torchmetrics, exact under DDP): what training's validation and ``eval.py`` log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from layers.grid import check_field
from layers.metrics import dice30, dice_per_label, hd95_per_label, jacobian_stats, tre
from layers.metrics.labels import batch_label_ids, spacing_tensor
from layers.warp import warp_labels

__all__ = ["METRIC_NAMES", "RegistrationMetrics", "pair_metrics"]

#: Every metric name :func:`pair_metrics` can return (docs/design.md §9 output contract, less ``seconds``).
METRIC_NAMES: tuple[str, ...] = ("dice", "dice30", "hd95", "tre", "sdlogj", "sdlogj_l2r", "folding")

_NAN = float("nan")


@torch.no_grad()
def pair_metrics(batch: Mapping[str, Any], u: torch.Tensor, *, hd95: bool = True) -> dict[str, torch.Tensor]:
    """Every metric of docs/design.md §7 that applies to a batch (the single entry point).

    Args:
        batch: a batch dict (``data/batch.py``). Used keys: ``fixed_label``/``moving_label`` (dice, dice30,
            hd95), ``label_ids`` (``(L,)`` or ``(B, L)``; default: the non-zero labels present in the fixed
            label maps of the batch), ``fixed_keypoints``/``moving_keypoints`` (tre), ``spacing`` (fixed grid,
            for hd95), ``moving_spacing`` (for tre; default ``spacing``), ``fixed_mask`` (Jacobian region).
        u: ``(B, n, *S)`` displacement, voxel units, fixed grid (not differentiated through).
        hd95: set False to skip the (CPU, slow on large volumes) surface distances.

    Returns:
        ``{name: (B,) float64 tensor on u's device}`` with names from :data:`METRIC_NAMES`: ``dice``,
        ``dice30`` and ``hd95`` (mm) only when both label maps are in the batch; ``tre`` (mm) only when both
        keypoint sets are; ``sdlogj``, ``sdlogj_l2r`` and ``folding`` always. Metrics that do not apply are
        absent.
    """
    n = check_field(u)
    u = u.detach()
    bsz, shape = u.shape[0], tuple(u.shape[2:])
    out: dict[str, torch.Tensor] = {}

    if batch.get("fixed_label") is not None and batch.get("moving_label") is not None:
        fixed_label = batch["fixed_label"].to(u.device)
        moving_label = batch["moving_label"].to(u.device)
        if tuple(fixed_label.shape[2:]) != shape or fixed_label.shape[0] != bsz:
            raise ValueError(f"fixed_label {tuple(fixed_label.shape)} does not match u {tuple(u.shape)}")
        warped = warp_labels(moving_label, u)
        ids = batch_label_ids(batch, per_pair=True)
        spacing = batch.get("spacing")
        if ids and isinstance(ids[0], list):  # a different label list per pair
            spacing_b = spacing_tensor(spacing, bsz, n, dtype=torch.float64, device=torch.device("cpu"))
            rows_dice, rows_hd = [], []
            for b in range(bsz):
                sl = slice(b, b + 1)
                rows_dice.append(dice_per_label(warped[sl], fixed_label[sl], ids[b], moving_label[sl]))
                if hd95:
                    rows_hd.append(hd95_per_label(warped[sl], fixed_label[sl], ids[b], spacing_b[sl],
                                                  moving_label[sl]))
            per_label = [r[0] for r in rows_dice]
            out["dice"] = torch.stack([torch.nanmean(r) for r in per_label])
            out["dice30"] = torch.cat([dice30(r) for r in rows_dice])
            if hd95:
                out["hd95"] = torch.stack([torch.nanmean(r[0]) for r in rows_hd])
        else:
            per_label = dice_per_label(warped, fixed_label, ids, moving_label)
            out["dice"] = torch.nanmean(per_label, dim=1)
            out["dice30"] = dice30(per_label)
            if hd95:
                per_hd = hd95_per_label(warped, fixed_label, ids, spacing, moving_label)
                out["hd95"] = torch.nanmean(per_hd, dim=1)

    if batch.get("fixed_keypoints") is not None and batch.get("moving_keypoints") is not None:
        spacing_moving = batch.get("moving_spacing", batch.get("spacing"))
        out["tre"] = tre(batch["fixed_keypoints"], batch["moving_keypoints"], u, spacing_moving)[0]

    out.update(jacobian_stats(u, batch.get("fixed_mask")))
    return {k: v.to(device=u.device, dtype=torch.float64) for k, v in out.items()}


class RegistrationMetrics(Metric):
    """Mean of each metric over pairs, ignoring NaN, accumulated across batches and processes.

    The state is a ``sum`` and a ``count`` (float64 scalars, ``dist_reduce_fx="sum"``) per metric name, so it
    reduces exactly under DDP. ``update(values)`` takes ``{name: (B,) tensor}`` (e.g. from
    :func:`pair_metrics`); ``update(batch, u)`` computes :func:`pair_metrics` first. Names missing from an
    update are simply not counted for it. ``compute()`` returns ``{name: scalar float64 tensor}``: the mean
    of the non-NaN per-pair values seen, NaN for a name that never had one.

    Args:
        names: the metric names to accumulate (default :data:`METRIC_NAMES`; add e.g. ``"seconds"``).
        **kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, names: Sequence[str] = METRIC_NAMES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate metric names: {self.names}")
        for name in self.names:
            for part in ("sum", "count"):
                self.add_state(f"{name}_{part}", default=torch.zeros((), dtype=torch.float64),
                               dist_reduce_fx="sum")

    def update(self, values: Mapping[str, Any], u: torch.Tensor | None = None) -> None:
        """Accumulate per-pair values ``{name: (B,)}``, or ``pair_metrics(values, u)`` when ``u`` is given."""
        if u is not None:
            values = pair_metrics(values, u)
        for name, value in values.items():
            if name not in self.names:
                raise ValueError(f"unknown metric {name!r}; this RegistrationMetrics tracks {self.names}")
            v = torch.as_tensor(value).detach().to(device=self.device, dtype=torch.float64).reshape(-1)
            valid = ~torch.isnan(v)
            setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + v[valid].sum())
            setattr(self, f"{name}_count", getattr(self, f"{name}_count") + valid.sum())

    def compute(self) -> dict[str, torch.Tensor]:
        """``{name: mean over pairs}`` (NaN where no non-NaN value was seen)."""
        out = {}
        for name in self.names:
            total, count = getattr(self, f"{name}_sum"), getattr(self, f"{name}_count")
            out[name] = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, _NAN))
        return out

"""Registration metrics of one field (docs/design.md §7): Dice, Dice30, TRE and the Jacobian statistics, the one
implementation behind training, ``eval.py`` and the baselines (HD95: :mod:`layers.metrics.hausdorff`; a batch's
metrics in one call: :func:`data.evaluation.metrics.pair_metrics`).

Conventions (docs/design.md §2): a displacement ``u`` is ``(B, n, *S)`` in voxel units on the fixed grid and points
into the moving image (``warped(x) = moving(x + u(x))``); label maps are ``(B, 1, *S)`` integer (0 =
background, never evaluated); keypoints are ``(B, K, n)`` voxel indices in array order, padded with NaN;
spacings are mm per voxel, ``(n,)`` or ``(B, n)``.

Definitions and the choices made here:

* **TRE** (mm): ``|(p_fix + u(p_fix) - p_mov) * spacing_moving|`` with ``u`` sampled linearly at the fixed
  keypoints (:func:`layers.warp.warp_keypoints`); the mean per pair is over the valid (non-NaN) points.
* **Dice** per label: ``2|W ∩ F| / (|W| + |F|)`` between the warped moving label (nearest-neighbour warp,
  :func:`layers.warp.warp_labels`) and the fixed label. A label is NaN when it is absent from the fixed label
  map or from the moving label map (the *unwarped* moving map when it is given, as the Learn2Reg evaluation
  code does; otherwise the warped one). A label present in both but lost by the warp therefore scores 0, not
  NaN. ``dice`` is the mean over the non-NaN labels.
* **Dice30**: the mean of the lowest 30 % of a pair's non-NaN per-label Dice values: sort ascending and take
  ``ceil(0.3 * L)`` values (``L`` = number of non-NaN labels; at least one value when ``L >= 1``), computed
  in exact integer arithmetic, ``(3 L + 9) // 10``.
* **HD95** (mm, with the *fixed* image spacing; Learn2Reg reports it in voxels, i.e. unit spacing): the
  symmetric 95th-percentile surface distance, ``max(P95(d(∂W -> ∂F)), P95(d(∂F -> ∂W)))`` over edge voxels
  (voxels of the mask with a face neighbour outside it, image border included), linear-interpolated
  percentile of the distances rounded to float32, the values of MONAI's
  :func:`monai.metrics.compute_hausdorff_distance` (``include_background=True``, with ``spacing``), computed
  here for every label in one pass (:func:`layers.metrics.hausdorff.hd95_per_label`). NaN when the label is
  absent from the fixed map, the warped moving map or (when given) the unwarped moving map (MONAI would return
  ``inf`` / NaN with a warning in those cases).
* **Jacobian** (:func:`layers.diff.jacobian_determinant`, central differences): statistics over the interior
  (a crop of 2 voxels on each side of every axis; fewer on an axis too short to keep a voxel) intersected
  with the fixed mask when one is given. ``sdlogj`` = std of ``log(clip(J, 1e-9))``; ``sdlogj_l2r`` = std of
  ``log(clip(J + 3, 1e-9, 1e9))`` (the official challenge code's variant); ``folding`` = fraction of
  ``J <= 0``. Standard deviations are population ones (``ddof = 0``, as ``numpy.std`` in the challenge code).
* A metric that does not apply to a batch (no labels, no keypoints) is **absent** from the dict returned by
  :func:`data.evaluation.metrics.pair_metrics` (``eval.py`` writes it as ``null``). A metric that applies but
  is undefined for one pair (e.g. all its keypoints are NaN) is NaN for that pair;
  :class:`data.evaluation.metrics.RegistrationMetrics` ignores NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..diff import jacobian_determinant
from ..grid import check_field
from ..warp import warp_keypoints
from .labels import check_label_map, check_label_pair, same_shape, spacing_tensor

__all__ = ["dice30", "dice_per_label", "jacobian_stats", "tre"]

_NAN = float("nan")


# ----------------------------------------------------------------------------------------------------
# label overlap
# ----------------------------------------------------------------------------------------------------
def dice_per_label(
    warped_label: torch.Tensor,
    fixed_label: torch.Tensor,
    label_ids: torch.Tensor | Sequence[int],
    moving_label: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dice per label between the warped moving and the fixed label maps.

    Args:
        warped_label: ``(B, 1, *S)`` integer, the moving label map warped onto the fixed grid.
        fixed_label: ``(B, 1, *S)`` integer.
        label_ids: ``(L,)`` the labels to evaluate (0 is dropped).
        moving_label: optional ``(B, 1, *S_m)`` integer, the unwarped moving map: when given, a label absent
            from it is NaN (Learn2Reg); otherwise presence is judged on ``warped_label``.

    Returns:
        ``(B, L)`` float64 on ``fixed_label``'s device: Dice in ``[0, 1]``, NaN where the label is absent
        from the fixed map or from the moving map.
    """
    ids = check_label_pair(warped_label, fixed_label, label_ids)
    bsz = fixed_label.shape[0]
    device = fixed_label.device
    w = warped_label.to(device).reshape(bsz, -1).long()
    f = fixed_label.reshape(bsz, -1).long()
    ref = w
    if moving_label is not None:
        check_label_map(moving_label, "moving_label")
        if moving_label.shape[0] != bsz:
            raise ValueError(f"moving_label has batch {moving_label.shape[0]}, fixed_label {bsz}")
        ref = moving_label.to(device).reshape(bsz, -1).long()
    out = torch.full((bsz, len(ids)), _NAN, dtype=torch.float64, device=device)
    if not ids:
        return out
    lo = min(int(w.min()), int(f.min()), int(ref.min()), min(ids))
    if lo < 0:  # bincount needs non-negative values
        w, f, ref, ids = w - lo, f - lo, ref - lo, [k - lo for k in ids]
    size = max(int(w.max()), int(f.max()), int(ref.max()), max(ids)) + 1
    sel = torch.as_tensor(ids, dtype=torch.long, device=device)
    for b in range(bsz):  # one pass per map: label histograms and the histogram of the agreeing voxels
        size_w = torch.bincount(w[b], minlength=size)[sel].double()
        size_f = torch.bincount(f[b], minlength=size)[sel].double()
        in_ref = torch.bincount(ref[b], minlength=size)[sel] > 0
        inter = torch.bincount(f[b][f[b] == w[b]], minlength=size)[sel].double()
        dice = 2.0 * inter / (size_w + size_f).clamp_min(1.0)
        out[b] = torch.where((size_f > 0) & in_ref, dice, out[b])
    return out


def dice30(per_label: torch.Tensor) -> torch.Tensor:
    """Mean of the lowest 30 % of the non-NaN per-label values of each pair.

    Args:
        per_label: ``(B, L)`` per-label Dice (NaN = absent label).

    Returns:
        ``(B,)``: the mean of the ``ceil(0.3 * L_b)`` smallest non-NaN values of row ``b`` (``L_b`` = its
        number of non-NaN values); NaN when a row has none.
    """
    if per_label.dim() != 2:
        raise ValueError(f"per_label must be (B, L); got shape {tuple(per_label.shape)}")
    out = torch.full((per_label.shape[0],), _NAN, dtype=per_label.dtype, device=per_label.device)
    for b in range(per_label.shape[0]):
        row = per_label[b]
        vals = torch.sort(row[~torch.isnan(row)]).values
        count = int(vals.numel())
        if count:
            out[b] = vals[: (3 * count + 9) // 10].mean()
    return out


# ----------------------------------------------------------------------------------------------------
# keypoints
# ----------------------------------------------------------------------------------------------------
def tre(
    fixed_kp: torch.Tensor,
    moving_kp: torch.Tensor,
    u: torch.Tensor,
    spacing_moving: torch.Tensor | Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target registration error in mm.

    Args:
        fixed_kp: ``(B, K, n)`` fixed keypoints (voxel indices, array order, NaN-padded).
        moving_kp: ``(B, K, n)`` the corresponding moving keypoints (voxels of the moving grid).
        u: ``(B, n, *S)`` displacement (voxel units), sampled linearly at the fixed keypoints.
        spacing_moving: ``(n,)`` or ``(B, n)`` mm per voxel of the moving grid (``None``: 1).

    Returns:
        ``(mean (B,), per_point (B, K))`` in ``u``'s dtype: ``|(p_fix + u(p_fix) - p_mov) * spacing|``;
        per-point NaN where either keypoint row has a NaN; the mean is over the valid points (NaN if none).
    """
    n = check_field(u)
    same_shape(fixed_kp, moving_kp, "fixed_kp", "moving_kp")
    bsz = u.shape[0]
    mapped = warp_keypoints(fixed_kp.to(device=u.device, dtype=u.dtype), u)  # (B, K, n), NaN rows stay NaN
    sp = spacing_tensor(spacing_moving, bsz, n, dtype=u.dtype, device=u.device)
    diff = (mapped - moving_kp.to(device=u.device, dtype=u.dtype)) * sp[:, None, :]
    per_point = torch.linalg.vector_norm(diff, dim=-1)  # NaN propagates from either side
    return torch.nanmean(per_point, dim=1), per_point


# ----------------------------------------------------------------------------------------------------
# Jacobian
# ----------------------------------------------------------------------------------------------------
def _masked_std(x: torch.Tensor, region: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Population std of ``x`` ``(B, N)`` over ``region`` ``(B, N)`` bool; ``count`` ``(B,)``."""
    zero = torch.zeros_like(x)
    denom = count.clamp_min(1).to(x.dtype)
    mean = torch.where(region, x, zero).sum(1) / denom
    var = torch.where(region, (x - mean[:, None]) ** 2, zero).sum(1) / denom
    # the same values as var.sqrt(), with a zero (not NaN) gradient where the spread is exactly 0
    spread = var > 0
    return torch.where(spread, torch.where(spread, var, torch.ones_like(var)).sqrt(), zero[:, 0])


def jacobian_stats(
    u: torch.Tensor, mask: torch.Tensor | None = None, crop: int = 2
) -> dict[str, torch.Tensor]:
    """SDlogJ, SDlogJ-L2R and the folding fraction of a displacement.

    Args:
        u: ``(B, n, *S)`` displacement in voxel units.
        mask: optional ``(B, 1, *S)`` (or ``(B, *S)``) fixed mask; voxels with ``mask > 0.5`` are kept.
        crop: voxels removed on each side of every axis (at most ``(S_i - 1) // 2``, so one voxel remains).

    Returns:
        ``{"sdlogj", "sdlogj_l2r", "folding"}``, each ``(B,)`` in ``u``'s dtype (dimensionless; folding is a
        fraction in ``[0, 1]``); NaN for a pair whose region is empty. A batch of zero fields (the identity,
        as for the initial metrics) gives exact zeros without computing ``J`` (``J = 1`` everywhere; the
        general path returns the rounding of its sums there, ~1e-7 in float32).
    """
    n = check_field(u)
    if not u.any():
        jac = u[:, 0]  # no determinant needed: J = 1, log J = 0, std 0, no folding
        zero = True
    else:
        jac = jacobian_determinant(u)  # (B, *S)
        zero = False
    bsz, shape = jac.shape[0], jac.shape[1:]
    region = torch.zeros_like(jac, dtype=torch.bool)
    inner = tuple(slice(min(crop, (s - 1) // 2), s - min(crop, (s - 1) // 2)) for s in shape)
    region[(slice(None),) + inner] = True
    if mask is not None:
        if mask.dim() == n + 2:
            if mask.shape[1] != 1:
                raise ValueError(f"mask must be (B, 1, *S); got shape {tuple(mask.shape)}")
            mask = mask[:, 0]
        if tuple(mask.shape[1:]) != tuple(shape) or mask.shape[0] not in (1, bsz):
            raise ValueError(f"mask {tuple(mask.shape)} does not match the field {tuple(u.shape)}")
        region = region & (mask.to(jac.device) > 0.5)
    jac, region = jac.reshape(bsz, -1), region.reshape(bsz, -1)
    count = region.sum(1)
    if zero:
        empty = torch.where(count == 0, _NAN, 0.0).to(u.dtype)
        return {"sdlogj": empty, "sdlogj_l2r": empty.clone(), "folding": empty.clone()}
    logj = torch.log(jac.clamp_min(1e-9))
    logj_l2r = torch.log((jac + 3.0).clamp(1e-9, 1e9))
    folding = (region & (jac <= 0)).sum(1).to(jac.dtype) / count.clamp_min(1).to(jac.dtype)
    stats = {
        "sdlogj": _masked_std(logj, region, count),
        "sdlogj_l2r": _masked_std(logj_l2r, region, count),
        "folding": folding,
    }
    empty = count == 0
    return {k: torch.where(empty, torch.full_like(v, _NAN), v) for k, v in stats.items()}

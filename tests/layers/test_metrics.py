"""Tests of :mod:`layers.metrics` (Dice, Dice30, TRE, HD95, the Jacobian statistics) against hand-computed
values, brute force and MONAI (docs/design.md §7)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from layers.metrics import dice30, dice_per_label, hd95_per_label, jacobian_stats, label_id_list, tre

F64 = torch.float64
NAN = float("nan")


def _grid(shape: tuple[int, ...]) -> torch.Tensor:
    axes = [torch.arange(s, dtype=F64) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)  # (n, *S)


def _affine_field(a: np.ndarray, t: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """u(x) = A x + t, ``(1, n, *S)`` float64."""
    x = _grid(shape)
    u = torch.einsum("ij,j...->i...", torch.as_tensor(a, dtype=F64), x)
    return (u + torch.as_tensor(t, dtype=F64).view(-1, *([1] * len(shape))))[None]


def _box(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...], value: int = 1) -> torch.Tensor:
    lab = torch.zeros((1, 1, *shape), dtype=torch.int64)
    lab[(0, 0) + tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return lab


def _brute_hd(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...], q: float = 95.0) -> float:
    """Independent reference: edge voxels (a face neighbour outside the mask or the image), all pairwise
    distances in mm, max of the two directed q-th percentiles (linear interpolation)."""

    def edges(m: np.ndarray) -> np.ndarray:
        padded = np.pad(m, 1, constant_values=False)
        inner = np.ones_like(m)
        for ax in range(m.ndim):
            for step in (-1, 1):
                sl = [slice(1, -1)] * m.ndim
                sl[ax] = slice(1 + step, padded.shape[ax] - 1 + step)
                inner &= padded[tuple(sl)]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    ea, eb = edges(a), edges(b)
    d = np.sqrt(((ea[:, None, :] - eb[None, :, :]) ** 2).sum(-1))
    return float(max(np.percentile(d.min(1), q), np.percentile(d.min(0), q)))


# ---------------------------------------------------------------------------------------------------
# Jacobian
# ---------------------------------------------------------------------------------------------------
def test_jacobian_stats_affine_field_3d():
    a = np.array([[0.10, -0.05, 0.02], [0.03, -0.20, 0.04], [-0.01, 0.06, 0.15]])
    u = _affine_field(a, np.array([1.5, -2.0, 0.25]), (7, 8, 9))
    stats = jacobian_stats(u)
    assert set(stats) == {"sdlogj", "sdlogj_l2r", "folding"}
    for v in stats.values():
        assert v.shape == (1,)
    assert stats["sdlogj"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["sdlogj_l2r"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["folding"].item() == 0.0


def test_jacobian_stats_fully_folded_affine():
    # u_0 = -2 x_0: J = 1 - 2 = -1 everywhere -> everything folds; log(clip(J)) is constant -> std 0
    a = np.diag([-2.0, 0.0, 0.0])
    stats = jacobian_stats(_affine_field(a, np.zeros(3), (6, 6, 6)))
    assert stats["folding"].item() == 1.0
    assert stats["sdlogj"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["sdlogj_l2r"].item() == pytest.approx(0.0, abs=1e-12)


def _fold_field() -> torch.Tensor:
    """2D (12, 8) field with u_0[i] = -2 i for rows i >= 6, 0 above; u_1 = 0.

    Central differences (one-sided at the ends) give J per row:
    rows 0-4: 1; row 5: 1 + (-12 - 0)/2 = -5; row 6: 1 + (-14 - 0)/2 = -6; rows 7-11: 1 - 2 = -1.
    """
    u = torch.zeros(1, 2, 12, 8, dtype=F64)
    rows = torch.arange(12, dtype=F64)
    u[0, 0] = torch.where(rows >= 6, -2.0 * rows, torch.zeros_like(rows))[:, None]
    return u


def test_jacobian_stats_fold_fraction_and_sdlogj():
    stats = jacobian_stats(_fold_field())
    # interior = rows 2..9 (8 rows): rows 2-4 have J = 1, rows 5-9 have J <= 0
    assert stats["folding"].item() == pytest.approx(5 / 8, abs=1e-15)
    p = 5 / 8
    assert stats["sdlogj"].item() == pytest.approx(abs(math.log(1e-9)) * math.sqrt(p * (1 - p)), rel=1e-12)
    l2r_rows = [math.log(4.0)] * 3 + [math.log(1e-9)] * 2 + [math.log(2.0)] * 3  # J + 3 per interior row
    assert stats["sdlogj_l2r"].item() == pytest.approx(statistics.pstdev(l2r_rows), rel=1e-12)


def test_jacobian_stats_mask_and_batch():
    fold = _fold_field()
    u = torch.cat([fold, torch.zeros_like(fold)])  # item 1: identity
    mask = torch.zeros(2, 1, 12, 8)
    mask[:, :, :6] = 1.0  # interior ∩ mask = rows 2..5: J = 1, 1, 1, -5
    stats = jacobian_stats(u, mask)
    assert stats["folding"].tolist() == pytest.approx([0.25, 0.0], abs=1e-15)
    assert stats["sdlogj"][0].item() == pytest.approx(abs(math.log(1e-9)) * math.sqrt(0.25 * 0.75), rel=1e-12)
    assert stats["sdlogj"][1].item() == 0.0
    empty = jacobian_stats(u, torch.zeros(2, 1, 12, 8))
    assert all(torch.isnan(v).all() for v in empty.values())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_jacobian_stats_of_a_zero_field_are_exact_zeros(dtype):
    # a batch of zero fields skips the determinant (J = 1): exact zeros, which the general path reproduces to
    # the rounding of its sums: a pair with a zero field in a batch that also holds a non-zero one goes the
    # general way (float64 here: |error| <= N eps log(4) ~ 1e-13 for N < 1e3 voxels; float32 ~1e-6)
    shape = (9, 10, 11)
    zero = torch.zeros(2, 3, *shape, dtype=dtype)
    mask = torch.ones(2, 1, *shape)
    mask[1] = 0.0  # pair 1: empty region -> NaN
    fast = jacobian_stats(zero, mask)
    assert all(v.dtype == dtype for v in fast.values())
    assert [v[0].item() for v in fast.values()] == [0.0, 0.0, 0.0]
    assert all(math.isnan(v[1].item()) for v in fast.values())
    bump = torch.zeros(1, 3, *shape, dtype=dtype)
    bump[0, 0, 4, 5, 5] = 0.3
    general = jacobian_stats(torch.cat([zero[:1], bump]))  # not all zero: J computed for both pairs
    tol = 1e-12 if dtype == F64 else 1e-6
    for k in ("sdlogj", "sdlogj_l2r", "folding"):
        assert general[k][0].item() == pytest.approx(fast[k][0].item(), abs=tol), k
        assert general[k][1].item() > 0 if k != "folding" else general[k][1].item() == 0.0


# ---------------------------------------------------------------------------------------------------
# TRE
# ---------------------------------------------------------------------------------------------------
def test_tre_known_shift_anisotropic_spacing():
    u = torch.zeros(1, 3, 8, 8, 8, dtype=F64)
    u[:, 0], u[:, 1] = 1.0, 2.0  # shift (1, 2, 0) voxels
    spacing = torch.tensor([2.0, 1.0, 3.0], dtype=F64)
    fixed = torch.tensor([[[2.5, 3.25, 4.0], [5.0, 5.0, 5.0], [NAN, NAN, NAN], [1.0, 1.5, 2.0]]], dtype=F64)
    shift = torch.tensor([1.0, 2.0, 0.0], dtype=F64)
    # residual vectors (voxels) -(0,0,1), -(1,0,0), -, -(0.5,-1,0) -> mm: 3, 2, NaN, sqrt(1 + 1)
    delta = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, -1.0, 0.0]]], dtype=F64)
    moving = fixed + shift + delta
    mean, per_point = tre(fixed, moving, u, spacing)
    assert per_point.shape == (1, 4) and mean.shape == (1,)
    assert per_point[0, [0, 1, 3]].tolist() == pytest.approx([3.0, 2.0, math.sqrt(2.0)], rel=1e-12)
    assert torch.isnan(per_point[0, 2])
    assert mean.item() == pytest.approx((5.0 + math.sqrt(2.0)) / 3.0, rel=1e-12)
    # no correction: |(1, 2, 0) * (2, 1, 3)| = sqrt(8) for every valid point
    mean0, per0 = tre(fixed, fixed, u, spacing)
    assert mean0.item() == pytest.approx(math.sqrt(8.0), rel=1e-12)
    assert torch.isnan(per0[0, 2])


def test_tre_affine_field_per_pair_spacing_and_nan_rows():
    a = np.array([[0.1, 0.0], [0.05, -0.1]])
    t = np.array([0.5, -1.0])
    u = torch.cat([_affine_field(a, t, (10, 12)), torch.zeros(1, 2, 10, 12, dtype=F64)])
    fixed = torch.tensor([[[3.3, 4.7], [6.0, 2.5]], [[1.0, 1.0], [NAN, NAN]]], dtype=F64)
    # item 0: moving = exact image of p under x + A x + t -> 0 error; item 1: moving off by (1, 1)
    exact = fixed[0] + fixed[0] @ torch.as_tensor(a, dtype=F64).T + torch.as_tensor(t, dtype=F64)
    moving = torch.stack([exact, fixed[1] + 1.0])
    moving[0, 1, 0] = NAN  # a NaN on the moving side only also invalidates the point
    spacing = torch.tensor([[1.0, 1.0], [3.0, 4.0]], dtype=F64)
    mean, per_point = tre(fixed, moving, u, spacing)
    assert per_point[0, 0].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isnan(per_point[0, 1])
    assert per_point[1, 0].item() == pytest.approx(5.0, rel=1e-12)  # |(3, 4)|
    assert mean.tolist() == pytest.approx([0.0, 5.0], abs=1e-12)
    all_nan = torch.full((1, 2, 2), NAN, dtype=F64)
    assert torch.isnan(tre(all_nan, all_nan, u[:1])[0]).all()


# ---------------------------------------------------------------------------------------------------
# Dice and Dice30
# ---------------------------------------------------------------------------------------------------
def test_dice_two_squares_exact():
    fixed = _box((10, 10), (2, 2), (6, 6))  # 16 voxels
    warped = _box((10, 10), (3, 3), (7, 7))  # 16 voxels, overlap 3 x 3 = 9
    d = dice_per_label(warped, fixed, [1])
    assert d.shape == (1, 1) and d.dtype == F64
    assert d.item() == pytest.approx(2 * 9 / 32, abs=1e-15)
    assert dice_per_label(fixed, fixed, torch.tensor([1])).item() == 1.0


def test_dice_absent_labels_nan_and_mean():
    shape = (12, 12)
    one = _box(shape, (0, 0), (4, 4), 1)
    five = _box(shape, (10, 0), (12, 3), 5)
    fixed = one + _box(shape, (6, 6), (10, 10), 2) + _box(shape, (0, 8), (2, 12), 3)
    # warped: label 1 identical; label 2 lost by the warp; 3 absent from the moving image; 5 only there
    warped = one + five
    moving = one + _box(shape, (5, 5), (9, 9), 2) + five
    ids = [0, 1, 2, 3, 4, 5]  # 0 (background) is dropped
    d = dice_per_label(warped, fixed, ids, moving_label=moving)
    assert d.shape == (1, 5)
    # label 1: 1; label 2: in fixed and moving, lost by the warp -> 0; 3: absent from moving -> NaN;
    # 4: absent everywhere -> NaN; 5: absent from fixed -> NaN
    assert d[0, :2].tolist() == [1.0, 0.0]
    assert torch.isnan(d[0, 2:]).all()
    assert torch.nanmean(d, 1).item() == pytest.approx(0.5)
    # without the unwarped moving map, presence is judged on the warped map: label 2 becomes NaN
    d2 = dice_per_label(warped, fixed, ids)
    assert d2[0, 0].item() == 1.0 and torch.isnan(d2[0, 1:]).all()


def test_dice_rejects_bad_inputs():
    lab = _box((6, 6), (1, 1), (3, 3))
    with pytest.raises(ValueError):
        dice_per_label(lab.float(), lab, [1])
    with pytest.raises(ValueError):
        dice_per_label(lab, lab[:, :, :5], [1])


def test_dice30_known_vectors():
    v = torch.tensor(
        [
            [0.9, 0.1, 0.5, NAN, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4, 1.0],  # 10 valid: ceil(3.0) = 3 -> .1 .2 .3
            [0.5, 0.9, 0.1, 0.7, NAN, 0.3, 0.6, 0.2, NAN, NAN, NAN],  # 7 valid: ceil(2.1) = 3 -> .1 .2 .3
            [0.4, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN],  # 1 valid: ceil(0.3) = 1
            [NAN] * 11,
        ],
        dtype=F64,
    )
    out = dice30(v)
    assert out.shape == (4,)
    assert out[:3].tolist() == pytest.approx([0.2, 0.2, 0.4], abs=1e-15)
    assert torch.isnan(out[3])
    four = torch.tensor([[0.8, 0.2, 0.6, 0.4]], dtype=F64)  # ceil(1.2) = 2 -> (0.2 + 0.4) / 2
    assert dice30(four).item() == pytest.approx(0.3, abs=1e-15)


# ---------------------------------------------------------------------------------------------------
# HD95
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (2.0, 0.5), (0.7, 3.0)])
def test_hd95_offset_squares(spacing):
    # squares of side 6 offset by k = 2 along axis 0: each directed distance is k * s_0 on >= 30 % of the
    # edge voxels (the leading face) and never more -> the 95th percentile is k * s_0
    fixed = _box((14, 14), (4, 4), (10, 10))
    warped = _box((14, 14), (6, 4), (12, 10))
    hd = hd95_per_label(warped, fixed, [1], spacing=torch.tensor(spacing))
    assert hd.shape == (1, 1)
    assert hd.item() == pytest.approx(2 * spacing[0], rel=1e-6)
    assert hd.item() == pytest.approx(_brute_hd(warped[0, 0].numpy() == 1, fixed[0, 0].numpy() == 1, spacing),
                                      rel=1e-6)


def test_hd95_offset_cubes_3d_batch_spacing():
    fixed = _box((11, 11, 11), (3, 3, 3), (8, 8, 8))
    w0 = _box((11, 11, 11), (4, 3, 3), (9, 8, 8))  # k = 1 along axis 0
    w1 = _box((11, 11, 11), (3, 3, 5), (8, 8, 10))  # k = 2 along axis 2
    spacing = torch.tensor([[2.5, 1.0, 0.7], [1.0, 1.0, 3.0]])
    hd = hd95_per_label(torch.cat([w0, w1]), torch.cat([fixed, fixed]), [1], spacing=spacing)
    assert hd[:, 0].tolist() == pytest.approx([2.5, 6.0], rel=1e-6)


def test_hd95_irregular_shapes_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = _grid((16, 18))
    r_f = ((x[0] - 7.3) ** 2 / 16 + (x[1] - 8.1) ** 2 / 30) < 1
    r_w = ((x[0] - 8.0) ** 2 / 20 + (x[1] - 9.5) ** 2 / 12) < 1
    noise = torch.rand(16, 18, generator=gen) < 0.05
    fixed = (r_f | (noise & (x[0] > 12))).long()[None, None]
    warped = r_w.long()[None, None]
    spacing = (1.3, 0.6)
    hd = hd95_per_label(warped, fixed, [1], spacing=spacing)
    ref = _brute_hd(r_w.numpy(), fixed[0, 0].numpy() == 1, spacing)
    assert hd.item() == pytest.approx(ref, rel=1e-5)


def test_hd95_masks_touching_the_image_border_match_brute_force():
    # voxels on the image border count as edge voxels (outside the image is background)
    fixed = _box((12, 15), (0, 0), (6, 15))
    warped = _box((12, 15), (0, 3), (9, 15))
    spacing = (1.0, 2.0)
    ref = _brute_hd(warped[0, 0].numpy() == 1, fixed[0, 0].numpy() == 1, spacing)
    assert hd95_per_label(warped, fixed, [1], spacing=spacing).item() == pytest.approx(ref, rel=1e-6)


def test_hd95_absent_labels_nan():
    shape = (10, 10)
    fixed = _box(shape, (1, 1), (4, 4), 1) + _box(shape, (6, 6), (9, 9), 2)
    warped = _box(shape, (1, 1), (4, 4), 1) + _box(shape, (0, 6), (2, 9), 3)
    moving = _box(shape, (1, 1), (4, 4), 1) + _box(shape, (6, 6), (9, 9), 2) + _box(shape, (0, 6), (2, 9), 3)
    hd = hd95_per_label(warped, fixed, [1, 2, 3], moving_label=moving)
    assert hd[0, 0].item() == 0.0
    assert torch.isnan(hd[0, 1:]).all()  # 2: lost by the warp (distance undefined); 3: absent from fixed


def _edt_hd(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...], q: float = 95.0) -> float:
    """Independent float64 reference by distance transforms: edges = mask minus its face erosion (outside the
    image = background), scipy's exact Euclidean distance transform of the other edge set's complement (in
    mm), max of the two directed q-th percentiles (numpy, linear interpolation)."""
    from scipy import ndimage

    ea, eb = (m & ~ndimage.binary_erosion(m, border_value=0) for m in (a, b))
    da = ndimage.distance_transform_edt(~eb, sampling=spacing)[ea]
    db = ndimage.distance_transform_edt(~ea, sampling=spacing)[eb]
    return float(max(np.percentile(da, q), np.percentile(db, q)))


def _blob_labels(shape: tuple[int, ...], n_labels: int, seed: int) -> torch.Tensor:
    """A ``(1, 1, *S)`` map of ``n_labels`` adjacent smooth regions (nearest of random centres), some touching
    the image border, label values not contiguous (3 k + 2) and background 0 around one of them."""
    gen = np.random.default_rng(seed)
    x = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    centres = gen.uniform(0, 1, (n_labels, len(shape))) * np.asarray(shape)
    nearest = ((x[..., None, :] - centres) ** 2).sum(-1).argmin(-1)
    lab = 3 * nearest + 2
    lab[nearest == 0] = 0
    return torch.from_numpy(lab)[None, None]


@pytest.mark.parametrize("shape, spacing", [((23, 19), (1.0, 1.0)), ((17, 21), (0.7, 2.3)),
                                            ((13, 11, 15), (1.0, 1.0, 1.0)), ((12, 14, 9), (1.2, 0.8, 2.5))])
def test_hd95_many_labels_match_distance_transforms_and_monai(shape, spacing):
    # the one-pass implementation (edges of every label at once, KD-tree distances) against (a) an
    # independent float64 reference by scipy distance transforms per label and (b) MONAI's
    # compute_hausdorff_distance per label (the previous implementation). The metric rounds each distance to
    # float32 and interpolates in float32 (MONAI's convention), so the reference agrees to float32 rounding:
    # relative error <= a few 2^-24 (rel 1e-6 here); MONAI does the same arithmetic (rel 1e-6, in practice 0).
    from monai.metrics import compute_hausdorff_distance

    fixed = _blob_labels(shape, 7, seed=1)
    warped = _blob_labels(shape, 7, seed=2)
    moving = warped.clone()
    moving[moving == 11] = 0  # label 11: absent from the moving map -> NaN
    ids = [2, 5, 8, 11, 14, 17, 20, 99]  # 99: absent everywhere -> NaN
    sp = torch.tensor(spacing, dtype=F64)
    for q in (95.0, 50.0, 100.0):
        hd = hd95_per_label(warped, fixed, ids, spacing=sp, moving_label=moving, percentile=q)[0]
        assert hd.dtype == F64
        for j, k in enumerate(ids):
            w, f = warped[0, 0].numpy() == k, fixed[0, 0].numpy() == k
            if k in (11, 99) or not (w.any() and f.any()):
                assert math.isnan(hd[j]), k
                continue
            assert hd[j].item() == pytest.approx(_edt_hd(w, f, spacing, q), rel=1e-6, abs=0), (k, q)
            ref = compute_hausdorff_distance(torch.from_numpy(w)[None, None], torch.from_numpy(f)[None, None],
                                             include_background=True, percentile=q, spacing=list(spacing))
            assert hd[j].item() == pytest.approx(float(ref.reshape(-1)[0]), rel=1e-6, abs=0), (k, q)


def test_hd95_quantile_is_torch_quantile():
    # the partial-sort percentile reproduces torch.quantile (linear, float32) exactly
    from layers.metrics.hausdorff import _quantile

    gen = np.random.default_rng(0)
    for _ in range(300):
        n = int(gen.integers(1, 3000))
        d = np.sqrt(gen.integers(0, 500, n).astype(np.float64) * gen.choice([1.0, 0.49, 1.69])).astype(np.float32)
        for q in (95.0, 50.0, 99.9, 100.0, 1.0):
            assert _quantile(d, q) == torch.quantile(torch.from_numpy(d), q / 100).item()
        assert _quantile(d, 0.0) == d.max()


# ---------------------------------------------------------------------------------------------------
# pair_metrics
# ---------------------------------------------------------------------------------------------------
def test_label_id_list_drops_background_padding_and_repeats():
    assert label_id_list(torch.tensor([3, 0, -1, 3, 7, -1])) == [3, 7]
    assert label_id_list([0, 2, 2, 5]) == [2, 5]

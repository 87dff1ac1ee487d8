"""Warping conventions (docs/design.md §2): ``warped(x) = moving(x + u(x))``, u channel i = array axis i."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from layers.grid import identity_grid
from layers.warp import compose, one_hot, warp_image, warp_keypoints, warp_labels, warp_onehot

F64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert_close(actual, expected, atol=1e-12, rtol=0)


def _constant_field(shape: tuple[int, ...], vec: tuple[float, ...], batch: int = 1) -> torch.Tensor:
    return torch.tensor(vec, dtype=F64).view(1, -1, *([1] * len(shape))).expand(batch, -1, *shape).clone()


def _smooth_field(shape: tuple[int, ...], amplitude: float, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A smooth random displacement: a few low-frequency sines per component (voxel units)."""
    gen = torch.Generator().manual_seed(seed)
    x = identity_grid(shape, dtype=F64)[0]
    comps = []
    for _ in range(batch * len(shape)):
        k = torch.rand(len(shape), generator=gen, dtype=F64) * 0.4 + 0.1
        ph = torch.rand((), generator=gen, dtype=F64) * 6.0
        comps.append(amplitude * torch.sin((k.view(-1, *([1] * len(shape))) * x).sum(0) + ph))
    return torch.stack(comps).view(batch, len(shape), *shape)


def _ramp(shape: tuple[int, ...], coeffs: tuple[float, ...], offset: float = 0.0) -> torch.Tensor:
    x = identity_grid(shape, dtype=F64)
    c = torch.tensor(coeffs, dtype=F64).view(1, -1, *([1] * len(shape)))
    return (x * c).sum(1, keepdim=True) + offset


# ---------------------------------------------------------------------------------------------------
# axis and direction conventions
# ---------------------------------------------------------------------------------------------------
def test_unit_shift_2d_each_axis():
    gen = torch.Generator().manual_seed(1)
    moving = torch.rand(1, 1, 5, 7, generator=gen, dtype=F64)
    w0 = warp_image(moving, _constant_field((5, 7), (1.0, 0.0)))
    # warped[i, j] = moving[i + 1, j]; the last row samples past the border -> repeats the edge
    _close(w0[..., :-1, :], moving[..., 1:, :])
    _close(w0[..., -1, :], moving[..., -1, :])
    w1 = warp_image(moving, _constant_field((5, 7), (0.0, 1.0)))
    _close(w1[..., :, :-1], moving[..., :, 1:])
    wm = warp_image(moving, _constant_field((5, 7), (-2.0, 0.0)))
    _close(wm[..., 2:, :], moving[..., :-2, :])


def test_unit_shift_ramp_values_2d_and_3d():
    ramp2 = _ramp((6, 5), (10.0, 1.0))  # value = 10 i + j
    w = warp_image(ramp2, _constant_field((6, 5), (1.0, 0.0)))
    assert w[0, 0, 2, 3].item() == pytest.approx(33.0, abs=1e-12)  # moving(3, 3)
    ramp3 = _ramp((4, 5, 6), (100.0, 10.0, 1.0))  # value = 100 i + 10 j + k
    for axis, expected in ((0, 234.0), (1, 144.0), (2, 135.0)):  # moving at (1, 3, 4) + e_axis
        vec = [0.0, 0.0, 0.0]
        vec[axis] = 1.0
        w3 = warp_image(ramp3, _constant_field((4, 5, 6), tuple(vec)))
        assert w3[0, 0, 1, 3, 4].item() == pytest.approx(expected, abs=1e-12)


def test_unit_shift_3d_random_image():
    gen = torch.Generator().manual_seed(2)
    moving = torch.rand(2, 3, 4, 5, 6, generator=gen, dtype=F64)
    w = warp_image(moving, _constant_field((4, 5, 6), (0.0, 0.0, 1.0), batch=2))
    assert w.shape == moving.shape
    _close(w[..., :-1], moving[..., 1:])
    w = warp_image(moving, _constant_field((4, 5, 6), (1.0, 0.0, 0.0), batch=2))
    _close(w[:, :, :-1], moving[:, :, 1:])


@pytest.mark.parametrize("shape,shift", [((9, 11), (0.3, -1.7)), ((7, 8, 9), (1.25, -0.6, 2.4))])
def test_fractional_shift_on_linear_ramp_is_exact_in_interior(shape, shift):
    coeffs = (1.5, -2.0, 0.75)[: len(shape)]
    moving = _ramp(shape, coeffs, offset=3.0)
    w = warp_image(moving, _constant_field(shape, shift))
    expected = _ramp(shape, coeffs, offset=3.0 + sum(c * s for c, s in zip(coeffs, shift)))
    # interior: x + shift stays inside the image on every axis
    sl = tuple(slice(max(0, -int(s // 1)), n - max(0, int(-(-s // 1)))) for n, s in zip(shape, shift))
    inner = (slice(None), slice(None)) + sl
    assert torch.allclose(w[inner], expected[inner], atol=1e-12, rtol=0)
    assert w[inner].numel() > 0


def test_moving_on_a_different_grid_and_broadcast_batch():
    ramp = _ramp((10, 12), (2.0, 1.0))
    u = torch.zeros(3, 2, 4, 5, dtype=F64)  # a 4 x 5 fixed grid reading a 10 x 12 moving image
    u[:, 0] = 3.0
    w = warp_image(ramp, u)  # moving batch 1 broadcast to 3
    assert w.shape == (3, 1, 4, 5)
    _close(w, (_ramp((4, 5), (2.0, 1.0)) + 6.0).expand(3, -1, -1, -1))


# ---------------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------------
def test_nearest_label_warp_preserves_values_and_dtype():
    gen = torch.Generator().manual_seed(3)
    values = torch.tensor([0, 3, 7, 12])
    labels = values[torch.randint(0, 4, (2, 1, 9, 10, 11), generator=gen)]
    u = _smooth_field((9, 10, 11), 2.5, seed=4, batch=2)
    w = warp_labels(labels, u)
    assert w.dtype == labels.dtype and w.shape == labels.shape
    assert set(torch.unique(w).tolist()) <= {0, 3, 7, 12}
    # an integer shift copies the labels exactly
    w = warp_labels(labels, _constant_field((9, 10, 11), (0.0, -1.0, 2.0), batch=2))
    assert torch.equal(w[:, :, :, 1:, :-2], labels[:, :, :, :-1, 2:])


def test_nearest_label_warp_rounds_to_the_closest_voxel():
    labels = torch.arange(6).view(1, 1, 6, 1).expand(1, 1, 6, 3).contiguous()
    w = warp_labels(labels, _constant_field((6, 3), (0.4, 0.0)))
    assert torch.equal(w, labels)
    w = warp_labels(labels, _constant_field((6, 3), (0.6, 0.0)))
    assert torch.equal(w[0, 0, :-1, 0], torch.arange(1, 6))


def test_one_hot_and_linear_onehot_warp_sums_to_one():
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (2, 1, 12, 13), generator=gen)
    oh = one_hot(labels)
    assert oh.shape == (2, 4, 12, 13)
    assert torch.equal(oh.argmax(1, keepdim=True), labels)
    assert one_hot(labels, num_classes=6).shape[1] == 6
    w = warp_onehot(oh.to(F64), _smooth_field((12, 13), 3.0, seed=6, batch=2))
    assert torch.allclose(w.sum(1), torch.ones(2, 12, 13, dtype=F64), atol=1e-12, rtol=0)
    assert (w >= -1e-12).all() and (w <= 1 + 1e-12).all()


# ---------------------------------------------------------------------------------------------------
# keypoints
# ---------------------------------------------------------------------------------------------------
def _smooth_image(shape: tuple[int, ...]) -> torch.Tensor:
    x = identity_grid(shape, dtype=F64)
    return torch.sin(0.3 * x[:, :1]) * torch.cos(0.2 * x[:, -1:]) + 0.05 * x[:, 1:2]


@pytest.mark.parametrize("shape", [(20, 22), (12, 13, 14)])
def test_keypoints_agree_with_image_warp(shape):
    moving = _smooth_image(shape)
    u = _smooth_field(shape, 1.5, seed=7)
    warped = warp_image(moving, u)
    gen = torch.Generator().manual_seed(8)
    lo = torch.full((len(shape),), 2.0, dtype=F64)
    hi = torch.tensor(shape, dtype=F64) - 3.0
    # integer keypoints: warped[p] = moving(p + u(p)) exactly
    pts = (lo + torch.rand(1, 15, len(shape), generator=gen, dtype=F64) * (hi - lo)).round()
    mapped = warp_keypoints(pts, u)
    idx = tuple(pts[0, :, i].long() for i in range(len(shape)))
    from_image = warped[(0, 0) + idx]
    from_points = _sample_points(moving, mapped)
    assert torch.allclose(from_image, from_points, atol=1e-12, rtol=0)
    # non-integer keypoints on a smooth image and field: agreement up to interpolation error
    pts = lo + torch.rand(1, 15, len(shape), generator=gen, dtype=F64) * (hi - lo)
    at_fixed = _sample_points(warped, pts)
    diff = at_fixed - _sample_points(moving, warp_keypoints(pts, u))
    assert diff.abs().max().item() < 0.05
    # the check discriminates: ignoring u, or applying it with the wrong sign, is far off
    assert (at_fixed - _sample_points(moving, pts)).abs().max().item() > 0.3
    assert (at_fixed - _sample_points(moving, 2 * pts - warp_keypoints(pts, u))).abs().max().item() > 0.3


def _sample_points(image: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Independent multilinear interpolation of ``image`` ``(1, 1, *S)`` at ``pts`` ``(1, K, n)``."""
    img = image[0, 0]
    n = img.dim()
    out = torch.zeros(pts.shape[1], dtype=F64)
    for k in range(pts.shape[1]):
        p = pts[0, k]
        base = p.floor().long()
        frac = p - base
        for corner in range(2**n):
            bits = [(corner >> a) & 1 for a in range(n)]
            weight = torch.ones((), dtype=F64)
            idx = []
            for a in range(n):
                weight = weight * (frac[a] if bits[a] else 1 - frac[a])
                idx.append(int(min(max(base[a].item() + bits[a], 0), img.shape[a] - 1)))
            out[k] += weight * img[tuple(idx)]
    return out


def test_keypoints_affine_field_exact_and_nan_rows():
    shape = (10, 11, 12)
    a = torch.tensor([[0.1, 0.0, -0.05], [0.02, 0.1, 0.0], [0.0, -0.03, 0.2]], dtype=F64)
    t = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    x = identity_grid(shape, dtype=F64)
    u = torch.einsum("ij,bj...->bi...", a, x) + t.view(1, 3, 1, 1, 1)
    pts = torch.tensor([[[2.3, 4.6, 7.1], [float("nan")] * 3, [8.9, 0.0, 11.0], [1.0, float("nan"), 2.0]]],
                       dtype=F64)
    out = warp_keypoints(pts, u)
    assert out.shape == pts.shape
    valid = [0, 2]
    expected = pts[0, valid] + pts[0, valid] @ a.T + t
    assert torch.allclose(out[0, valid], expected, atol=1e-12, rtol=0)
    assert torch.isnan(out[0, [1, 3]]).all()


# ---------------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------------
def test_compose_matches_sequential_warps():
    shape = (9, 10, 11)
    ramp = _ramp(shape, (1.0, -2.0, 0.5))
    u1 = _constant_field(shape, (0.5, 1.0, -1.5))
    x = identity_grid(shape, dtype=F64)
    u2 = 0.05 * x.flip(1) - 0.2  # affine, |u2| <= 0.3
    c = compose(u1, u2)
    # x + u1 + u2(x + u1) for affine u2 and constant u1
    expected = u1 + 0.05 * (x + u1).flip(1) - 0.2
    # interior: x + u1, its interpolation nodes and their images under u2 all stay inside the image
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(3, -2))
    assert torch.allclose(c[inner], expected[inner], atol=1e-12, rtol=0)
    both = warp_image(warp_image(ramp, u2), u1)
    assert torch.allclose(warp_image(ramp, c)[inner], both[inner], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error():
    moving = torch.zeros(2, 1, 6, 7)
    u = torch.zeros(2, 2, 6, 7)
    with pytest.raises(ValueError):
        warp_image(moving, torch.zeros(2, 3, 6, 7))  # 3 channels for a 2D field
    with pytest.raises(ValueError):
        warp_image(moving, torch.zeros(2, 2, 6, 7, dtype=torch.int64))  # integer field
    with pytest.raises(ValueError):
        warp_image(torch.zeros(2, 1, 6, 7, 8), u)  # 3D image, 2D field
    with pytest.raises(ValueError):
        warp_image(torch.zeros(3, 1, 6, 7), u)  # batch mismatch
    with pytest.raises(ValueError):
        warp_image(torch.zeros(2, 1, 6, 7, device="meta"), u)  # device mismatch
    with pytest.raises(ValueError):
        warp_labels(torch.zeros(2, 1, 6, 7, dtype=torch.int64), torch.zeros(2, 1, 6, 7))
    with pytest.raises(ValueError):
        one_hot(torch.zeros(2, 2, 6, 7, dtype=torch.int64))
    with pytest.raises(ValueError):
        warp_keypoints(torch.zeros(2, 4, 3), u)  # 3D points, 2D field
    with pytest.raises(ValueError):
        warp_keypoints(torch.zeros(3, 4, 2), u)  # batch mismatch
    with pytest.raises(ValueError):
        warp_keypoints(torch.zeros(2, 4, 2, device="meta"), u)  # device mismatch


def test_integrate_velocity_checks_steps_and_integrates_a_rotation_field():
    """Scaling and squaring: a constant velocity gives the translation; a small linear velocity ``v = A x``
    gives ``(expm(A) − I) x`` (closed form) up to the interpolation of the squarings; bad ``steps`` fail."""
    from layers.warp import integrate_velocity

    v = torch.full((1, 2, 16, 16), 0.7, dtype=torch.float64)
    torch.testing.assert_close(integrate_velocity(v, 5), v)
    a = torch.tensor([[0.0, -0.05], [0.05, 0.0]], dtype=torch.float64)
    y, x = torch.meshgrid(torch.arange(32.0, dtype=torch.float64) - 15.5,
                          torch.arange(32.0, dtype=torch.float64) - 15.5, indexing="ij")
    pos = torch.stack([y, x])  # (2, H, W), about the centre
    vel = torch.einsum("ij,jhw->ihw", a, pos)[None]
    expected = torch.einsum("ij,jhw->ihw", torch.linalg.matrix_exp(a) - torch.eye(2, dtype=torch.float64), pos)
    got = integrate_velocity(vel, 7)[0]
    inner = (slice(None), slice(4, -4), slice(4, -4))  # away from the border padding
    torch.testing.assert_close(got[inner], expected[inner], rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="steps"):
        integrate_velocity(v, -1)

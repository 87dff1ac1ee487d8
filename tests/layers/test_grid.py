"""Grid conventions (layers/grid.py): normalised coordinates, sampling, coarse grids, field resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from layers.grid import (
    check_field,
    coarse_shape,
    grid_sample,
    identity_grid,
    pool_to_grid,
    resize_field,
    sample,
    slab_count,
    spatial_dims,
    to_normalised,
    upsample_field,
)

F64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-12) -> None:
    assert_close(actual, expected, atol=atol, rtol=0)


def test_identity_grid_values():
    g = identity_grid((3, 4), dtype=F64)
    assert g.shape == (1, 2, 3, 4)
    assert g[0, 0, 2, 1].item() == 2.0 and g[0, 1, 2, 1].item() == 1.0


def test_to_normalised_hand_values_and_axis_order():
    shape = (5, 9)
    coords = torch.tensor([[0.0, 0.0], [4.0, 8.0], [2.0, 0.0], [1.0, 6.0]], dtype=F64)
    # align_corners=True: index 0 -> -1, S-1 -> +1; output is (x, y) = (last axis, first axis)
    expected = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 0.0], [0.5, -0.5]], dtype=F64)
    _close(to_normalised(coords, shape), expected)
    # an axis of size 1 maps to 0
    flat = to_normalised(torch.tensor([[0.0, 3.0]], dtype=F64), (1, 7))
    _close(flat, torch.tensor([[0.0, 0.0]], dtype=F64))


@pytest.mark.parametrize("shape", [(6, 9), (4, 5, 7)])
def test_sampling_the_identity_grid_returns_it(shape):
    grid = identity_grid(shape, dtype=F64)
    _close(sample(grid, grid), grid)
    _close(sample(grid, grid, mode="nearest"), grid)


@pytest.mark.parametrize("shape", [(6, 9), (4, 5, 7)])
def test_sample_points_match_dense_and_linear_values(shape):
    gen = torch.Generator().manual_seed(0)
    n = len(shape)
    image = torch.rand(2, 3, *shape, generator=gen, dtype=F64)
    pts = torch.stack([torch.randint(0, s, (2, 10), generator=gen) for s in shape], -1).to(F64)  # (B, K, n)
    out = sample(image, pts)
    assert out.shape == (2, 3, 10)
    for b in range(2):
        for k in range(10):
            idx = tuple(int(v) for v in pts[b, k])
            _close(out[b, :, k], image[(b, slice(None)) + idx])
    # a linear image is reproduced exactly at non-integer points inside
    coeffs = torch.arange(1, n + 1, dtype=F64)
    lin = (identity_grid(shape, dtype=F64) * coeffs.view(1, n, *([1] * n))).sum(1, keepdim=True)
    p = torch.rand(1, 7, n, generator=gen, dtype=F64) * (torch.tensor(shape, dtype=F64) - 1)
    _close(sample(lin, p)[0, 0], p[0] @ coeffs)


def test_sample_border_padding_and_bad_coords():
    image = torch.arange(4, dtype=F64).view(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    pts = torch.tensor([[[-3.0, 0.0], [5.0, 1.0]]], dtype=F64)
    _close(sample(image, pts)[0, 0], torch.tensor([0.0, 3.0], dtype=F64))
    with pytest.raises(ValueError):
        sample(image, torch.zeros(1, 3, 2, 2, dtype=F64))


def test_spatial_dims_and_check_field():
    assert spatial_dims(torch.zeros(1, 1, 4, 4)) == 2
    assert check_field(torch.zeros(1, 3, 2, 2, 2)) == 3
    with pytest.raises(ValueError):
        spatial_dims(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError):
        check_field(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError):
        check_field(torch.zeros(1, 2, 4, 4, dtype=torch.int64))


def test_coarse_shape():
    assert coarse_shape((5, 7), 2) == (3, 4)
    assert coarse_shape((8, 8, 9), 4) == (2, 2, 3)
    assert coarse_shape((5, 7), 1) == (5, 7)
    with pytest.raises(ValueError):
        coarse_shape((5, 7), 0)


@pytest.mark.parametrize("shape,stride", [((5, 7), 2), ((7, 6, 9), 4), ((6, 9), 3)])
def test_pool_to_grid_non_multiple_shape(shape, stride):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, *shape, generator=gen, dtype=F64)
    out = pool_to_grid(x, stride)
    grid = coarse_shape(shape, stride)
    assert out.shape == (2, 3, *grid)
    # reference: numpy edge-padding to a multiple of the stride, then block means
    arr = x.numpy()
    pad = [(0, 0), (0, 0)] + [(0, (-s) % stride) for s in shape]
    arr = np.pad(arr, pad, mode="edge")
    blocks = arr.reshape(2, 3, *[v for g in grid for v in (g, stride)])
    ref = blocks.mean(axis=tuple(3 + 2 * i for i in range(len(shape))))
    _close(out, torch.from_numpy(ref))
    assert pool_to_grid(x, 1) is x


@pytest.mark.parametrize("shape,stride", [((13, 10), 4), ((9, 8, 11), 3)])
def test_upsample_field_constant_and_linear(shape, stride):
    n = len(shape)
    grid = coarse_shape(shape, stride)
    const = torch.tensor([1.5, -2.0, 0.25][:n], dtype=F64).view(1, n, *([1] * n))
    _close(upsample_field(const.expand(1, n, *grid).clone(), shape, stride), const.expand(1, n, *shape))
    # a coarse field that is linear in the node centres s*g + (s-1)/2 upsamples to the same linear function
    a = torch.tensor([[0.3, -0.2, 0.1], [0.05, 0.4, -0.15], [0.2, 0.0, 0.25]][:n], dtype=F64)[:, :n]
    centres = identity_grid(grid, dtype=F64) * stride + (stride - 1) / 2
    coarse = torch.einsum("ij,bj...->bi...", a, centres) + 1.0
    up = upsample_field(coarse, shape, stride)
    assert up.shape == (1, n, *shape)
    x = identity_grid(shape, dtype=F64)
    # exact linear function between the first and last node centre on every axis; beyond them the
    # field is held constant, i.e. it is the linear function of the coordinates clamped to the centres
    first = (stride - 1) / 2
    last = torch.tensor([stride * (g - 1) + first for g in grid], dtype=F64).view(1, n, *([1] * n))
    clamped = torch.minimum(x.clamp_min(first), last)
    _close(up, torch.einsum("ij,bj...->bi...", a, clamped) + 1.0)
    inside = ((x >= first) & (x <= last)).all(1, keepdim=True).expand_as(up)
    assert inside.any()
    _close(up[inside], (torch.einsum("ij,bj...->bi...", a, x) + 1.0)[inside])


def test_upsample_field_stride_one_and_shape_errors():
    u = torch.zeros(1, 2, 4, 5)
    assert upsample_field(u, (4, 5), 1) is u
    with pytest.raises(ValueError):
        upsample_field(torch.zeros(1, 2, 3, 3), (13, 10), 4)  # needs a (4, 3) grid
    with pytest.raises(ValueError):
        upsample_field(u, (4, 5, 6), 2)


def test_resize_field_rescales_voxel_units():
    shape = (5, 9)
    u = torch.tensor([1.0, -2.0], dtype=F64).view(1, 2, 1, 1).expand(1, 2, *shape).clone()
    out = resize_field(u, (9, 5))
    assert out.shape == (1, 2, 9, 5)
    # axis 0: (9 - 1) / (5 - 1) = 2; axis 1: (5 - 1) / (9 - 1) = 0.5
    _close(out[:, 0], torch.full((1, 9, 5), 2.0, dtype=F64))
    _close(out[:, 1], torch.full((1, 9, 5), -1.0, dtype=F64))
    assert resize_field(u, shape) is u
    # a map expressed in voxels of the old grid is the same map on the new grid: new index x sits at old
    # index y = x / r (r = (t - 1) / (s - 1) per axis) and old voxels are r new voxels, so
    # u_old(y) = (0.1 y_0, 0)  ->  u_new(x) = (r_0 * 0.1 * x_0 / r_0, 0) = (0.1 x_0, 0)
    x = identity_grid(shape, dtype=F64)
    u = torch.cat([0.1 * x[:, :1], torch.zeros_like(x[:, :1])], 1)
    out = resize_field(u, (9, 17))
    _close(out[:, :1], 0.1 * identity_grid((9, 17), dtype=F64)[:, :1])
    _close(out[:, 1:], torch.zeros(1, 1, 9, 17, dtype=F64))


def test_channels_last_warps_the_same():
    from layers.grid import channels_last, sample_displaced

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 5, 9, 10, 11, generator=g, dtype=torch.float64)
    cl = channels_last(image, min_voxels=0)
    assert cl.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(cl, image)
    u = (3 * torch.randn(2, 3, 9, 10, 11, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.randn(2, 5, 9, 10, 11, generator=g, dtype=torch.float64)
    a = sample_displaced(image, u)
    ga, = torch.autograd.grad((a * w).sum(), u)
    b = sample_displaced(cl, u)
    gb, = torch.autograd.grad((b * w).sum(), u)
    assert_close(b, a, rtol=0, atol=1e-14)
    assert_close(gb, ga, rtol=0, atol=1e-12)
    # unchanged where the layout would not help: 2D, one channel
    two_d = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    assert channels_last(two_d) is two_d
    one = torch.rand(1, 1, 4, 4, 4, dtype=torch.float64)
    assert channels_last(one, min_voxels=0) is one
    assert channels_last(image) is image  # below the default size threshold


@pytest.mark.parametrize("mode,padding", [("linear", "border"), ("linear", "zeros"), ("nearest", "border")])
def test_grid_sample_slabs_equal_the_plain_call(mode, padding):
    # one 3D volume split into 4 slabs along the grid's first axis: same values and (linear) gradients with
    # respect to the image and the grid, in float64, as one grid_sample call
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 9, 10, 11, generator=g, dtype=torch.float64).requires_grad_()
    grid = (2.4 * torch.rand(1, 8, 7, 6, 3, generator=g, dtype=torch.float64) - 1.2).requires_grad_()
    weights = torch.randn(1, 3, 8, 7, 6, generator=g, dtype=torch.float64)
    outs = []
    for slabs in (1, 4):
        out = grid_sample(image, grid, mode=mode, padding_mode=padding, slabs=slabs)
        if mode == "linear":
            outs.append((out, *torch.autograd.grad((out * weights).sum(), (image, grid))))
        else:
            outs.append((out,))
    assert outs[0][0].shape == (1, 3, 8, 7, 6)
    for a, b in zip(*outs):
        assert_close(a, b, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="slabs=3"):
        grid_sample(image, grid, slabs=3)


def test_slab_count_rule():
    big = torch.zeros(1, 40, 32, 32, 3)
    assert slab_count(big, threads=1) == 1
    assert slab_count(big, threads=2) == 2
    assert slab_count(big, threads=4) == 4
    assert slab_count(torch.zeros(1, 42, 32, 32, 3), threads=4) == 3  # the largest k <= threads dividing 42
    assert slab_count(torch.zeros(1, 41, 32, 32, 3), threads=2) == 1  # prime depth: one call
    assert slab_count(torch.zeros(1, 64, 32, 32, 3), threads=64) == 8  # at most SLAB_MAX slabs
    assert slab_count(torch.zeros(2, 40, 32, 32, 3), threads=2) == 1  # a batch is already parallel
    assert slab_count(torch.zeros(1, 8, 8, 8, 3), threads=2) == 1  # too small to be worth it
    assert slab_count(torch.zeros(1, 64, 64, 2), threads=2) == 1  # 2D


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_automatic_slabs_with_threads_equal_one_call(two_threads):
    # the cases the warps of the project hit with 2 threads: a field warped by itself (scaling and squaring:
    # gradients for the expanded image and the grid), channels-last features, a non-contiguous grid, nearest
    # labels, point sets; compared with slabs=1 in float64
    from layers.warp import compose

    g = torch.Generator().manual_seed(6)
    shape = (32, 32, 34)
    assert slab_count(torch.zeros(1, *shape, 3, dtype=F64)) == 2
    u = (2 * torch.randn(1, 3, *shape, generator=g, dtype=F64)).requires_grad_()
    weights = torch.randn(1, 3, *shape, generator=g, dtype=F64)
    auto = compose(u, u)
    grad_auto, = torch.autograd.grad((auto * weights).sum(), u)
    plain = u + grid_sample(u, to_normalised(torch.movedim(identity_grid(shape, dtype=F64) + u, 1, -1), shape),
                            slabs=1)
    grad_plain, = torch.autograd.grad((plain * weights).sum(), u)
    _close(auto, plain)
    # per-slab accumulation of the image gradient sums the same float64 terms (about 8² per voxel) in another
    # order: ~1e-14 of the largest gradient (measured 9e-15); 1e-12 of it leaves a wide margin
    _close(grad_auto, grad_plain, atol=1e-12 * float(grad_plain.abs().max()))
    feats = torch.rand(1, 4, *shape, generator=g, dtype=F64).contiguous(memory_format=torch.channels_last_3d)
    coords = torch.movedim(identity_grid(shape, dtype=F64) + u.detach(), 1, -1)  # non-contiguous after movedim
    grid = to_normalised(coords, shape)
    for mode in ("linear", "nearest"):
        _close(grid_sample(feats, grid, mode=mode), grid_sample(feats, grid, mode=mode, slabs=1))
    points = 31 * torch.rand(1, 40000, 3, generator=g, dtype=F64)
    _close(sample(feats, points),
           grid_sample(feats, to_normalised(points, shape).reshape(1, 40000, 1, 1, 3), slabs=1).reshape(1, 4, -1))


def test_slabs_never_mix_the_volumes_of_an_image_batch(two_threads):
    # an image batch with a one-volume grid is not slabbed (each slab would read another volume): it fails as
    # grid_sample itself does, and an explicit slab count is refused
    images = torch.rand(4, 1, 32, 32, 32)
    grid = torch.zeros(1, 32, 32, 32, 3)
    with pytest.raises(RuntimeError, match="batch"):
        grid_sample(images, grid)
    with pytest.raises(ValueError, match="slabs=2"):
        grid_sample(images, grid, slabs=2)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
def test_gather_grid_sample_equals_grid_sample_with_its_derivatives(n, padding_mode):
    """The gather formulation (used for second-order warps where PyTorch's grid_sample has no second
    derivative) gives grid_sample's values and first derivatives (float64), coordinates outside the image
    included, and consistent second derivatives (gradgradcheck)."""
    from layers.grid import gather_grid_sample

    g = torch.Generator().manual_seed(n)
    size = (5, 6, 4)[:n]
    image = torch.randn(2, 3, *size, dtype=torch.float64, generator=g).requires_grad_()
    grid = (torch.rand(2, 4, 3, *([2] * (n - 2)), n, dtype=torch.float64, generator=g) * 2.6 - 1.3)
    # and the voxel centres themselves (integer coordinates, the image border included: an unmoved warp)
    centres = to_normalised(identity_grid(size, dtype=torch.float64).movedim(1, -1), size).expand(2, *size, n)
    grid = torch.cat([grid.flatten(1, -2), centres.flatten(1, -2)], 1).unsqueeze(-2)
    if n == 3:
        grid = grid.unsqueeze(-2)
    grid = grid.requires_grad_()
    ref = F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    got = gather_grid_sample(image, grid, padding_mode=padding_mode)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (image, grid)),
                    torch.autograd.grad((ref * w).sum(), (image, grid))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    small = (image[:1, :1].detach().requires_grad_(), grid[:1, :2].detach().requires_grad_())
    assert torch.autograd.gradgradcheck(lambda i, c: gather_grid_sample(i, c, padding_mode=padding_mode), small)


def test_second_order_warps_make_a_meta_gradient_possible_without_native_support(monkeypatch):
    """Inside second_order_warps, grid_sample switches to the gather formulation when PyTorch lacks the second
    derivative (simulated here): a gradient of a gradient through a warp then exists, and where this PyTorch
    has its own it agrees with it (float64)."""
    import layers.grid as grid_module

    g = torch.Generator().manual_seed(9)
    image = torch.randn(1, 2, 6, 5, dtype=torch.float64, generator=g)
    coords = (torch.rand(1, 6, 5, 2, dtype=torch.float64, generator=g) * 1.8 - 0.9)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def meta_gradient():
        c = coords.clone().requires_grad_()
        loss = grid_module.grid_sample(image, c).square().sum()
        (step,) = torch.autograd.grad(loss, c, create_graph=True)
        after = grid_module.grid_sample(image, c - lr * step).square().sum()
        return torch.autograd.grad(after, lr)[0]

    native = grid_module.native_second_order()
    monkeypatch.setattr(grid_module, "native_second_order", lambda: False)
    with grid_module.second_order_warps():
        simulated = meta_gradient()
    assert grid_module._SECOND_ORDER.depth == 0
    if native:
        monkeypatch.undo()
        torch.testing.assert_close(simulated, meta_gradient(), rtol=1e-10, atol=0)


def test_the_second_order_probe_is_invisible_to_an_enclosing_checkpoint():
    """The probe runs once per process, often inside the first checkpointed segment of a meta-gradient; the
    segment's recomputation (probe cached) must save the same tensors as its forward did, or the backward raises
    torch.utils.checkpoint.CheckpointError (the failure of a fresh process before the probe was isolated)."""
    from torch.utils.checkpoint import checkpoint

    import layers.grid as grid_module

    def segment(x: torch.Tensor) -> torch.Tensor:
        grid_module.native_second_order()
        return (x * x.sin()).sum()

    x = torch.linspace(-1.0, 1.0, 7, dtype=torch.float64, requires_grad=True)
    grid_module.native_second_order.cache_clear()  # as in a fresh process: the probe runs inside the segment
    y = checkpoint(segment, x, use_reentrant=False, preserve_rng_state=False)
    (g,) = torch.autograd.grad(y, x)
    torch.testing.assert_close(g, x.sin() + x * x.cos(), rtol=1e-12, atol=0)

"""Handcrafted Gauss-Newton registration recovers known smooth displacements (2D and 3D)."""

import math

import pytest
import torch
import torch.nn.functional as F

from layers import warp_image
from layers.gn import GNRegistration, assemble_normal_equations, geometric_schedule, gn_step
from layers.grid import identity_grid


def _smooth_image(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    pool = F.avg_pool2d if len(shape) == 2 else F.avg_pool3d
    for _ in range(3):
        x = pool(x, 5, 1, 2, count_include_pad=False)
    return (x - x.mean()) / x.std()


def _smooth_field(shape, amplitude):
    grid = identity_grid(shape, dtype=torch.float64)[0]
    comps = []
    for i in range(len(shape)):
        other = grid[(i + 1) % len(shape)] / shape[(i + 1) % len(shape)]
        comps.append(amplitude * torch.sin(math.pi * other + i))
    return torch.stack(comps)[None]


def _epe(u, v, crop):
    sl = (0,) + tuple(slice(crop, -crop) for _ in range(u.dim() - 2))
    return (u - v).norm(dim=1)[sl].mean().item()


@pytest.mark.parametrize("coupling", ["full", "diagonal"])
def test_gn_2d_halves_the_endpoint_error(coupling):
    shape = (96, 96)
    moving = _smooth_image(shape, 0)
    truth = _smooth_field(shape, 5.0)  # up to 5 voxels
    fixed = warp_image(moving, truth)
    out = GNRegistration(iterations=10, stride=4, lam=(0.05, 0.01), coupling=coupling)(fixed, moving)
    before, after = _epe(torch.zeros_like(truth), truth, 8), _epe(out.disp, truth, 8)
    assert before > 3.0
    assert after < 0.5 * before, (before, after)


def test_gn_3d_halves_the_endpoint_error():
    shape = (40, 40, 40)
    moving = _smooth_image(shape, 1)
    truth = _smooth_field(shape, 4.0)
    fixed = warp_image(moving, truth)
    out = GNRegistration(iterations=8, stride=4, lam=(0.05, 0.01))(fixed, moving)
    before, after = _epe(torch.zeros_like(truth), truth, 6), _epe(out.disp, truth, 6)
    assert before > 2.0
    assert after < 0.5 * before, (before, after)


def test_output_shape_for_non_multiple_sizes():
    fixed = _smooth_image((30, 27), 2)
    out = GNRegistration(iterations=2, stride=4)(fixed, fixed)
    assert out.disp.shape == (1, 2, 30, 27)
    assert out.coarse.shape == (1, 2, 8, 7)
    assert out.disp.abs().max() < 1e-6  # identical images: no motion


def test_normal_equations_match_explicit_sums():
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(2, 4, 3, 2, 3, 2, generator=g, dtype=torch.float64)
    res = torch.randn(2, 4, 2, 3, 2, generator=g, dtype=torch.float64)
    hess, grad = assemble_normal_equations(jac, res)
    j = jac[1, :, :, 1, 2, 0]
    torch.testing.assert_close(hess[1, :, :, 1, 2, 0], j.T @ j)
    torch.testing.assert_close(grad[1, :, 1, 2, 0], j.T @ res[1, :, 1, 2, 0])


def test_one_step_decreases_the_linearised_energy():
    shape = (32, 32)
    moving = _smooth_image(shape, 3)
    fixed = warp_image(moving, _smooth_field(shape, 2.0))
    u0 = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    u1 = gn_step(fixed, moving, u0, 0.1, stride=4, rtol=1e-10)
    from layers.grid import upsample_field
    def energy(u):
        w = warp_image(moving, upsample_field(u, shape, 4))
        return (w - fixed).pow(2).mean()
    assert energy(u1) < energy(u0)


def test_geometric_schedule_and_bad_arguments():
    assert geometric_schedule(150, 70, 10)[0] == 150
    assert math.isclose(geometric_schedule(150, 70, 10)[-1], 70)
    with pytest.raises(ValueError, match="iterations"):
        GNRegistration(iterations=0)
    with pytest.raises(ValueError, match="lam"):
        GNRegistration(iterations=3, lam=(1.0, 2.0, -1.0))
    gn = GNRegistration(iterations=1)
    with pytest.raises(ValueError, match="share"):
        gn(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 12))


def test_gn_channels_last_path_is_exact(monkeypatch):
    # 32³ with 3 channels goes through channels_last: field and gradients (w.r.t. both feature maps) must equal
    # the channels-first computation
    import layers.gn as gn_module
    from layers.gn import GNRegistration

    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 3, 32, 32, 32, generator=g, dtype=torch.float64)
    moving = torch.rand(1, 3, 32, 32, 32, generator=g, dtype=torch.float64)
    w = torch.randn(1, 3, 32, 32, 32, generator=g, dtype=torch.float64)

    def run():
        f, m = fixed.clone().requires_grad_(), moving.clone().requires_grad_()
        out = GNRegistration(iterations=2, stride=4, lam=(1.0, 0.5), solver={"rtol": 1e-10})(f, m).disp
        return (out,) + torch.autograd.grad((out * w).sum(), (f, m))

    fast = run()
    monkeypatch.setattr(gn_module, "channels_last", lambda x: x)
    plain = run()
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_compositive_gn_halves_the_endpoint_error():
    shape = (96, 96)
    moving = _smooth_image(shape, 0)
    truth = _smooth_field(shape, 5.0)
    fixed = warp_image(moving, truth)
    out = GNRegistration(iterations=10, stride=4, lam=(0.05, 0.01), update="compose")(fixed, moving)
    before, after = _epe(torch.zeros_like(truth), truth, 8), _epe(out.disp, truth, 8)
    assert after < 0.5 * before, (before, after)


def test_compositive_step_from_zero_equals_the_additive_one_and_composes_after():
    # from u = 0 both rules solve (H + λL) δ = −g and return α δ; from u ≠ 0 the compositive rule solves the
    # system without the λ L u term and returns α δ(x) + u(x + α δ(x) / s) (fields in full-resolution voxels
    # on the coarse grid of spacing s)
    from layers import gn_solve
    from layers.grid import upsample_field
    from layers.heads import handcrafted_jf

    shape = (32, 32)
    moving = _smooth_image(shape, 2)
    fixed = warp_image(moving, _smooth_field(shape, 2.0))
    zero = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    kw = {"stride": 4, "step": 0.7, "rtol": 1e-12, "maxiter": 2000}
    a = gn_step(fixed, moving, zero, 0.05, update="add", **kw)
    c = gn_step(fixed, moving, zero, 0.05, update="compose", **kw)
    torch.testing.assert_close(c, a, rtol=0, atol=1e-10)

    u = 0.5 * torch.randn(1, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = gn_step(fixed, moving, u, 0.05, update="compose", **kw)
    jac, res = handcrafted_jf(fixed, warp_image(moving, upsample_field(u, shape, 4)), 4)
    hess, grad = assemble_normal_equations(jac, res)
    step = 0.7 * gn_solve(hess, -grad, 0.05, rtol=1e-12, maxiter=2000)
    expected = step + warp_image(u, step / 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="update must be one of"):
        gn_step(fixed, moving, zero, 0.05, update="fluid")
    with pytest.raises(ValueError, match="update must be one of"):
        GNRegistration(update="fluid")


def test_channel_weights_equal_features_scaled_by_their_square_root():
    """H and g with data-term weights w_c equal those of features scaled by sqrt(w_c) (handcrafted J and f are
    linear in the features); the whole GN registration agrees too (float64)."""
    from layers.heads import handcrafted_jf

    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(2, 3, 16, 16, 16, generator=g, dtype=torch.float64)
    moving = torch.rand(2, 3, 16, 16, 16, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 2.5], dtype=torch.float64)
    scale = w.sqrt().view(1, -1, 1, 1, 1)
    jac, res = handcrafted_jf(fixed, moving, 4)
    hw, gw = assemble_normal_equations(jac, res, w)
    hs, gs = assemble_normal_equations(*handcrafted_jf(fixed * scale, moving * scale, 4))
    torch.testing.assert_close(hw, hs)
    torch.testing.assert_close(gw, gs)
    reg = GNRegistration(iterations=3, stride=4, lam=(0.3, 0.1), solver={"rtol": 1e-10})
    torch.testing.assert_close(reg(fixed, moving, channel_weights=w).disp, reg(fixed * scale, moving * scale).disp)


def test_a_channel_weight_at_zero_still_gets_a_gradient():
    g = torch.Generator().manual_seed(1)
    jac = torch.randn(1, 2, 2, 4, 4, generator=g, dtype=torch.float64)
    res = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda w: assemble_normal_equations(jac, res, w), (w,))
    hess, grad = assemble_normal_equations(jac, res, w)
    (hess.sum() + grad.sum()).backward()
    assert w.grad[1].abs() > 0


def test_channel_weights_of_the_wrong_shape_are_refused():
    jac, res = torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="channel weights"):
        assemble_normal_equations(jac, res, torch.ones(2))

import pytest
import torch

from layers.diff import spatial_gradient
from layers.grid import pool_to_grid
from layers.heads import CompactHeads, handcrafted_jf, linear_extrapolation_pad


@pytest.mark.parametrize("n,shape,stride", [(2, (16, 24), 2), (2, (16, 24), 4), (2, (16, 32), 8),
                                            (3, (8, 12, 16), 2), (3, (8, 12, 16), 4)])
@pytest.mark.parametrize("hidden", [0, 3])
def test_untrained_heads_equal_handcrafted(n, shape, stride, hidden):
    g = torch.Generator().manual_seed(0)
    fixed = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64)
    warped = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64)
    heads = CompactHeads(n, 3, stride, hidden=hidden).double()
    jac, res = heads(fixed, warped)
    jac_ref, res_ref = handcrafted_jf(fixed, warped, stride)
    assert jac.shape == (2, 3, n, *[s // stride for s in shape])
    torch.testing.assert_close(jac, jac_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(res, res_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,stride", [((12, 20), 4), ((8, 12, 16), 4), ((6, 4, 8), 2), ((16, 8), 8)])
def test_handcrafted_jacobian_is_the_pooled_central_difference(shape, stride):
    # the reference definition: central differences (one-sided at the borders), then block averages
    g = torch.Generator().manual_seed(1)
    warped = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64)
    jac, _ = handcrafted_jf(warped, warped, stride)
    grad = spatial_gradient(warped)
    ref = pool_to_grid(grad.flatten(1, 2), stride).reshape(jac.shape)
    torch.testing.assert_close(jac, ref, rtol=0, atol=1e-12)


def test_handcrafted_jacobian_of_a_ramp_is_its_slope():
    # a linear ramp along axis 1 with slope 0.5: J = (0, 0.5) everywhere, borders included
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 1, 16).expand(1, 1, 8, 16) * 0.5
    jac, res = handcrafted_jf(x, x, 4)
    torch.testing.assert_close(jac[:, 0, 0], torch.zeros(1, 2, 4, dtype=torch.float64))
    torch.testing.assert_close(jac[:, 0, 1], torch.full((1, 2, 4), 0.5, dtype=torch.float64))
    assert res.abs().max() == 0


def test_linear_extrapolation_pad():
    x = torch.tensor([[[1.0, 3.0, 4.0]]]).view(1, 1, 1, 3).expand(1, 1, 2, 3)
    p = linear_extrapolation_pad(x)
    assert p.shape == (1, 1, 4, 5)
    torch.testing.assert_close(p[0, 0, 1], torch.tensor([-1.0, 1.0, 3.0, 4.0, 5.0]))


def test_bad_stride_and_shapes():
    with pytest.raises(ValueError, match="stride"):
        CompactHeads(2, 1, stride=3)
    heads = CompactHeads(2, 2, stride=4)
    with pytest.raises(ValueError, match="channels"):
        heads(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 5)])
def test_linear_extrapolation_pad_equals_the_axis_by_axis_definition(shape):
    """Values and gradients equal padding one axis after the other by concatenation (corners included)."""

    def reference(x):
        for a in range(2, x.dim()):
            first = 2 * x.narrow(a, 0, 1) - x.narrow(a, 1, 1)
            last = 2 * x.narrow(a, x.shape[a] - 1, 1) - x.narrow(a, x.shape[a] - 2, 1)
            x = torch.cat([first, x, last], dim=a)
        return x

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    out, ref = linear_extrapolation_pad(x), reference(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((out * w).sum(), x)
    (gr,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(gx, gr, rtol=0, atol=1e-12)

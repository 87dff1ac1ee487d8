import pytest
import torch
import torch.nn.functional as F

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
    with pytest.raises(ValueError, match="two voxels"):
        linear_extrapolation_pad(torch.zeros(1, 1, 1, 4))


def test_bad_stride_and_shapes():
    with pytest.raises(ValueError, match="stride"):
        CompactHeads(2, 1, stride=3)
    heads = CompactHeads(2, 2, stride=4)
    with pytest.raises(ValueError, match="channels"):
        heads(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 5), (2, 3, 8)])
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


def _reference_heads(heads, fixed, warped):
    """The heads by their definition (docs/design.md §4): the stride-2 chain ``first``, ``rest`` of each head on
    the padded input, the ``f`` head on ``concat(fixed, warped)``, plus the branches."""
    pf, pw = linear_extrapolation_pad(fixed), linear_extrapolation_pad(warped)
    out = []
    for head, x in ((heads.j_head, pw), (heads.f_head, torch.cat([pf, pw], dim=1))):
        y = head.first(x)
        for c in head.rest:
            y = c(y)
        out.append(y if head.branch is None else y + head.branch(x))
    jac, res = out
    return jac.reshape(jac.shape[0], heads.channels, heads.n, *jac.shape[2:]), res


def _perturbed_heads(n, channels, stride, hidden, seed=1):
    torch.manual_seed(seed)
    heads = CompactHeads(n, channels, stride, hidden=hidden).double()
    with torch.no_grad():  # away from the handcrafted initialisation, so that every weight matters
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return heads


@pytest.mark.parametrize("n,shape,stride", [(2, (16, 24), 2), (2, (32, 48), 8), (3, (8, 12, 16), 4),
                                            (3, (16, 8, 16), 8)])
@pytest.mark.parametrize("hidden", [0, 3])
def test_heads_equal_their_definition_in_values_and_gradients(n, shape, stride, hidden):
    """The composed kernels, the f head split into its fixed and warped shares and the merged convolution give
    the stride-2 chain of the definition, values and gradients (features and weights), to float64 rounding: a
    few hundred products of O(1) terms per output, so errors ~1e-14; the tolerance is 1e-12 of the largest
    magnitude."""
    heads = _perturbed_heads(n, 2, stride, hidden)
    fixed = torch.randn(2, 2, *shape, dtype=torch.float64, requires_grad=True)
    warped = torch.randn(2, 2, *shape, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for fn in (heads, lambda f, w: _reference_heads(heads, f, w)):
        jac, res = fn(fixed, warped)
        weight = torch.cos(torch.arange(jac.numel(), dtype=torch.float64).view_as(jac))
        loss = (jac * weight).sum() + res.pow(2).sum()
        outs.append((jac, res))
        grads.append(torch.autograd.grad(loss, [fixed, warped, *heads.parameters()]))
    assert heads.j_head.linear_kernel().shape[2:] == (stride + 2,) * n
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * float(b.detach().abs().max()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * max(1.0, float(b.abs().max())))


def test_prepared_heads_are_reused_only_for_their_own_fixed_features():
    heads = _perturbed_heads(3, 2, 4, 0)
    fixed, warped = torch.randn(2, 1, 2, 8, 8, 12, dtype=torch.float64).unbind(0)
    prepared = heads.prepare(fixed)
    assert prepared.fixed_share.shape == (1, 2, 2, 2, 3) and prepared.kernel.shape == (2 * 3 + 2, 2, 6, 6, 6)
    for a, b in zip(heads(fixed, warped, prepared=prepared), heads(fixed, warped)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="other fixed features"):
        heads(fixed.clone(), warped, prepared=prepared)
    changed = fixed.clone()
    again = heads.prepare(changed)
    changed.mul_(2.0)  # the same tensor, changed in place after prepare: refused, not silently stale
    with pytest.raises(ValueError, match="changed in place"):
        heads(changed, warped, prepared=again)
    with pytest.raises(ValueError, match="must match"):
        heads(fixed, F.pad(warped, (0, 4)))


def test_learned_gn_runs_under_inference_mode():
    """Lightning's predict and test loops run under torch.inference_mode, whose tensors have no version counter:
    the prepared heads work there and give the no_grad result."""
    from layers.gn import GNRegistration

    heads = _perturbed_heads(3, 2, 4, 0)
    gn = GNRegistration(iterations=2, stride=4, lam=(0.5, 0.2), jf=heads, solver={"rtol": 1e-10}).double()
    fixed, moving = torch.rand(2, 1, 2, 8, 8, 12, dtype=torch.float64).unbind(0)
    with torch.no_grad():
        expected = gn(fixed, moving).disp
    with torch.inference_mode():
        got = gn(fixed.clone(), moving.clone()).disp
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

"""The training-memory and speed options of the GN layer: GNRegistration(recompute=True) gives the same values
and gradients as storing everything and saves fewer bytes for backward (docs/design.md §3); the heads prepared once
per registration give the same field and gradients as the heads' definition called every iteration (docs/design.md
§4); linear_extrapolation_pad's hand-written backward equals autograd's through its face writes."""

import pytest
import torch
import torch.nn.functional as F

from layers.gn import GNRegistration
from layers.heads import CompactHeads, linear_extrapolation_pad
from tests.layers.test_heads import _reference_heads

SHAPE = (20, 24, 28)  # padded to 20×24×28 at stride 4 (no padding), grid 5×6×7
CHANNELS = 3


def _smooth(shape, channels, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, channels, *shape, generator=g, dtype=torch.float64)
    for _ in range(2):
        x = F.avg_pool3d(x, 5, 1, 2, count_include_pad=False)
    return (x - x.mean()) / x.std()


class _DefinitionHeads(torch.nn.Module):
    """The heads by their definition (``tests/layers/test_heads.py``), with no ``prepare``: what the GN loop
    computed before the heads were prepared once per registration."""

    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    def forward(self, fixed, warped):
        return _reference_heads(self.heads, fixed, warped)


def _model(recompute, hidden=4, definition=False):
    torch.manual_seed(0)
    heads = CompactHeads(3, CHANNELS, stride=4, hidden=hidden).double()
    with torch.no_grad():  # away from the handcrafted initialisation, so every weight matters
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return GNRegistration(iterations=3, stride=4, lam=(0.5, 0.2), jf=_DefinitionHeads(heads) if definition else heads,
                          solver={"rtol": 1e-10}, recompute=recompute).double()


def _inputs():
    fixed = _smooth(SHAPE, CHANNELS, 1).requires_grad_()
    moving = _smooth(SHAPE, CHANNELS, 2).requires_grad_()
    lam = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64, requires_grad=True)
    mask = (_smooth(SHAPE, 1, 3) > -1.0).double()
    return fixed, moving, lam, mask


def _run(recompute, detach_warp, definition=False):
    """The field ``(1, 3, *SHAPE)`` and the gradients of a loss w.r.t. the features, λ and the heads' weights."""
    model = _model(recompute, definition=definition)
    model.detach_warp = detach_warp
    fixed, moving, lam, mask = _inputs()
    out = model(fixed, moving, lam=lam, mask=mask, moving_mask=mask)
    w = torch.linspace(-1, 1, out.disp.numel(), dtype=torch.float64).view_as(out.disp)
    loss = (w * out.disp).sum() + out.disp.pow(2).mean()
    grads = torch.autograd.grad(loss, [fixed, moving, lam, *model.parameters()])
    return out.disp.detach(), grads


@pytest.mark.parametrize("detach_warp", [False, True])
def test_recompute_gives_the_same_values_and_gradients(detach_warp):
    disp_ref, grads_ref = _run(False, detach_warp)
    disp, grads = _run(True, detach_warp)
    assert disp_ref.abs().max() > 0.1  # it moved
    torch.testing.assert_close(disp, disp_ref, rtol=0, atol=1e-10)
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert g_ref.abs().max() > 0  # every input and head weight gets a gradient
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10 * max(1.0, float(g_ref.abs().max())))


def _saved_bytes(recompute):
    """Bytes of the distinct storages saved for backward during one forward (saved-tensor hooks)."""
    model = _model(recompute)
    fixed, moving, lam, _ = _inputs()
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(fixed, moving, lam=lam)
    out.disp.sum().backward()  # the graph is usable
    return sum(storages.values())


def test_recompute_stores_less_for_backward():
    base, rec = _saved_bytes(False), _saved_bytes(True)
    # without recomputation each iteration stores full-resolution tensors (sampling grid, padded warped features,
    # the f head's input); with it, the stride-4 systems (1/64 of the voxels) and the solves' tensors remain
    assert rec < 0.25 * base, (rec, base)


def test_recompute_has_no_effect_without_gradients():
    fixed, moving, _, _ = _inputs()
    with torch.no_grad():
        a = _model(False)(fixed, moving).disp
        b = _model(True)(fixed, moving).disp
    assert torch.equal(a, b)


def test_the_composed_kernel_of_the_initial_heads_is_the_handcrafted_one():
    # at initialisation the J head's composed kernel of channel 0, axis 0, is the central difference along
    # axis 0 spread over 4 voxels by the boxes, on the padded grid: taps 0..5 = (-1, -1, 0, 0, 1, 1) / 8 along
    # the axis, (0, 1, 1, 1, 1, 0) / 4 along the others
    heads = CompactHeads(2, 1, 4).double()
    kernel = heads.j_head.linear_kernel()[0, 0]
    along = torch.tensor([-1, -1, 0, 0, 1, 1], dtype=torch.float64) / 8
    across = torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.float64) / 4
    torch.testing.assert_close(kernel, along[:, None] * across[None, :], rtol=0, atol=1e-15)
    x = torch.arange(64.0, dtype=torch.float64).view(1, 1, 8, 8)
    assert torch.allclose(heads(x, x)[0][0, 0, 0], torch.full((2, 2), 8.0, dtype=torch.float64))  # slope 8 along 0


@pytest.mark.parametrize("recompute", [False, True])
def test_prepared_heads_in_gn_give_the_definitions_field_and_gradients(recompute):
    """GN with the heads prepared once per registration against the heads' definition called every iteration:
    the same field and gradients (features, λ, weights) to float64 rounding (CG at rtol 1e-10)."""
    disp_ref, grads_ref = _run(False, False, definition=True)
    disp, grads = _run(recompute, False)
    torch.testing.assert_close(disp, disp_ref, rtol=0, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10 * max(1.0, float(g_ref.abs().max())))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 4, 5, 6), (1, 1, 2, 3, 2), (1, 2, 2, 4), (1, 1, 6, 3, 9)])
def test_the_padding_backward_is_the_adjoint_of_its_writes(shape):
    # linear_extrapolation_pad's hand-written backward against autograd through the same in-place face writes
    from layers.heads import _face_writes

    def by_autograd(x):
        out = F.pad(x, (1, 1) * (x.dim() - 2))
        for target, a, b in _face_writes(out):
            target.copy_(2 * a - b)
        return out

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    padded = linear_extrapolation_pad(x)
    w = torch.randn_like(padded)
    assert torch.equal(padded, by_autograd(x))
    (grad,) = torch.autograd.grad((w * padded).sum(), x)
    (ref,) = torch.autograd.grad((w * by_autograd(x)).sum(), x)
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(linear_extrapolation_pad, (x,))

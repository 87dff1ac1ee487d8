"""Masks in the GN data term (layers/masks.py, layers/gn.py): all-ones masks give the unmasked result; a node
outside the fixed mask makes the field independent of the fixed image there; bad masks fail early, named."""

import math

import pytest
import torch
import torch.nn.functional as F

from layers import warp_image
from layers.gn import GNRegistration, gn_step
from layers.grid import identity_grid
from layers.heads import CompactHeads
from layers.masks import check_mask, masked_mean, similarity_weight


def _smooth(shape, seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, *shape, generator=g, dtype=torch.float64)
    pool = F.avg_pool2d if len(shape) == 2 else F.avg_pool3d
    for _ in range(3):
        x = pool(x, 5, 1, 2, count_include_pad=False)
    return (x - x.mean()) / x.std()


def _pair(shape=(32, 32), seed=0, batch=1):
    moving = _smooth(shape, seed, batch)
    grid = identity_grid(shape, dtype=torch.float64)[0]
    truth = torch.stack([3.0 * torch.sin(math.pi * grid[(i + 1) % len(shape)] / shape[0] + i)
                         for i in range(len(shape))])[None].expand(batch, -1, *shape)
    return warp_image(moving, truth), moving


def _heads(n, channels=1, seed=0):
    torch.manual_seed(seed)
    heads = CompactHeads(n, channels, 4, hidden=3).double()
    with torch.no_grad():  # leave the handcrafted initialisation: the nonlinear branch takes part
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return heads


@pytest.mark.parametrize("shape,update,learned", [((28, 30), "add", False), ((28, 30), "compose", True),
                                                  ((12, 14, 16), "add", True)])
def test_all_ones_masks_give_the_unmasked_field(shape, update, learned):
    fixed, moving = _pair(shape, batch=2)
    gn = GNRegistration(iterations=3, stride=4, lam=(0.3, 0.1), update=update, solver={"rtol": 1e-10},
                        jf=_heads(len(shape)) if learned else None).double()
    ones = torch.ones(2, 1, *shape, dtype=torch.float64)
    plain = gn(fixed, moving).disp
    assert plain.abs().max() > 0.3
    torch.testing.assert_close(gn(fixed, moving, mask=ones).disp, plain, rtol=0, atol=0)  # exactly
    torch.testing.assert_close(gn(fixed, moving, mask=ones[:1], moving_mask=ones).disp, plain, rtol=0, atol=1e-12)


def test_excluded_region_of_the_fixed_image_does_not_matter():
    """Nodes 4..7 along the first axis (voxels 16..31) are outside the fixed mask: a change of the fixed image
    in voxels 22..31 (inside the learned heads' receptive field of those nodes only: node g sees voxels
    4g - 1 .. 4g + 4 and, through the nonlinear branch's last 3-node convolution, its neighbours') leaves the
    field and the gradient of the heads unchanged; without the mask both change."""
    shape = (32, 32)
    fixed, moving = _pair(shape)
    other = fixed.clone()
    other[..., 22:, :] += 0.7 * _smooth(shape, 5)[..., 22:, :]
    mask = torch.ones(1, 1, *shape, dtype=torch.float64)
    mask[..., 16:, :] = 0.0

    def run(image, with_mask):
        gn = GNRegistration(iterations=3, stride=4, lam=(0.3, 0.1), jf=_heads(2), solver={"rtol": 1e-10}).double()
        disp = gn(image, moving, mask=mask if with_mask else None).disp
        disp.pow(2).sum().backward()
        return disp.detach(), torch.cat([p.grad.flatten() for p in gn.jf.parameters()])

    (u1, g1), (u2, g2) = run(fixed, True), run(other, True)
    torch.testing.assert_close(u1, u2, rtol=0, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10)
    (v1, h1), (v2, h2) = run(fixed, False), run(other, False)
    assert (v1 - v2).abs().max() > 1e-3 and (h1 - h2).abs().max() > 1e-3
    assert (u1 - v1).abs().max() > 1e-3  # the mask changed the field


def test_an_empty_moving_mask_leaves_no_data_term():
    fixed, moving = _pair((24, 24))
    u = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    zeros = torch.zeros(1, 1, 24, 24, dtype=torch.float64)
    assert gn_step(fixed, moving, u, 0.3, moving_mask=zeros).abs().max() == 0
    assert gn_step(fixed, moving, u, 0.3).abs().max() > 0.1


def test_bad_masks_fail_early_with_their_name():
    fixed, moving = _pair((16, 16), batch=2)
    gn = GNRegistration(iterations=1, stride=4).double()
    with pytest.raises(ValueError, match="mask must be"):
        gn(fixed, moving, mask=torch.ones(2, 1, 16, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="moving_mask must be"):
        gn(fixed, moving, moving_mask=torch.ones(3, 1, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask must be"):
        gn(fixed, moving, mask=torch.ones(2, 2, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        gn(fixed, moving, mask=torch.full((2, 1, 16, 16), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="moving_mask values"):
        gn(fixed, moving, moving_mask=torch.full((1, 1, 16, 16), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="mask must be"):
        gn_step(fixed, moving, torch.zeros(2, 2, 4, 4, dtype=torch.float64), 0.3, mask=torch.ones(2, 1, 8, 8))


def test_masked_mean_and_similarity_weight():
    x = torch.arange(8.0, dtype=torch.float64).view(1, 2, 2, 2)
    assert masked_mean(x) == x.mean()
    torch.testing.assert_close(masked_mean(x, torch.ones(1, 1, 2, 2, dtype=torch.float64)), x.mean())
    w = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    assert masked_mean(x, w) == (0.0 + 4.0) / 2
    assert masked_mean(x, torch.zeros_like(w)) == 0
    m = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    m[..., 2:] = 1.0
    shift = torch.zeros(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        shift[:, 1] = 1.0  # x + u looks one column to the right
    weight = similarity_weight(None, m, shift)
    assert not weight.requires_grad
    assert weight[0, 0, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert similarity_weight(None, None, shift) is None
    assert similarity_weight(m, None) is m
    assert check_mask(m.bool(), x.new_zeros(1, 2, 4, 4), "m").dtype == torch.float64

"""Semantic feature network: shapes, targets and loss, bad input."""

import pytest
import torch

from layers.features import signed_distance_maps
from layers.semantic import SemanticNet, semantic_loss, semantic_targets


@pytest.mark.parametrize("n,shape", [(2, (32, 48)), (3, (16, 32, 16))])
def test_semantic_net_maps_an_image_to_one_channel_per_label(n, shape):
    net = SemanticNet(n, 3)
    out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, 3, *shape)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_semantic_net_is_small():
    assert sum(p.numel() for p in SemanticNet(3, 2).parameters()) < 400_000


def test_semantic_net_refuses_bad_input():
    net = SemanticNet(3, 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.zeros(1, 1, 16, 16, 20))
    with pytest.raises(ValueError, match="single-channel"):
        net(torch.zeros(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="3D"):
        net(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="labels"):
        SemanticNet(3, 0)
    with pytest.raises(ValueError, match="six"):
        SemanticNet(3, 2, features=(8, 16))


def test_targets_are_the_unit_scale_signed_distance_maps():
    lab = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    lab[0, 0, 4:9, 5:12] = 1
    lab[0, 0, 10:14, 2:6] = 2
    t = semantic_targets(lab, [1, 2], (1.0, 2.0))
    torch.testing.assert_close(t, signed_distance_maps(lab, [1, 2], (1.0, 2.0), 1.0))
    assert (t[0, 0][lab[0, 0] == 1] < 0).all() and (t[0, 0][lab[0, 0] != 1] > 0).all()


def test_semantic_loss_is_the_mean_squared_error():
    a, b = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8, dtype=torch.float64)
    assert float(semantic_loss(a, a)) == 0.0
    torch.testing.assert_close(semantic_loss(a, b), ((a - b) ** 2).mean())
    with pytest.raises(ValueError, match="differ"):
        semantic_loss(a, b[:, :1])

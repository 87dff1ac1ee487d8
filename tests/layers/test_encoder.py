"""The residual feature encoder: zero at initialisation, trainable, shape checks."""

import pytest
import torch

from layers.encoder import FeatureEncoder


@pytest.mark.parametrize("n,shape", [(2, (12, 10)), (3, (6, 8, 7))])
def test_untrained_encoder_returns_the_base_features(n, shape):
    g = torch.Generator().manual_seed(0)
    enc = FeatureEncoder(n, 1, 4, hidden=5, depth=3).double()
    image = torch.rand(2, 1, *shape, generator=g, dtype=torch.float64)
    base = torch.rand(2, 4, *shape, generator=g, dtype=torch.float64)
    out = enc(image, base)
    assert torch.equal(out, base)
    # ... yet the last layer receives a gradient, so training can move it
    out.pow(2).sum().backward()
    assert enc.net[-1].weight.grad.abs().sum() > 0


def test_encoder_is_per_sample():
    # instance normalisation: a pair's features do not depend on the other pairs of the batch
    g = torch.Generator().manual_seed(1)
    enc = FeatureEncoder(2, 1, 2, hidden=4, depth=2).double()
    torch.nn.init.normal_(enc.net[-1].weight, generator=g)
    image = torch.rand(3, 1, 16, 16, generator=g, dtype=torch.float64)
    base = torch.rand(3, 2, 16, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(enc(image, base)[1:2], enc(image[1:2], base[1:2]))


def test_encoder_bad_input():
    enc = FeatureEncoder(2, 1, 4, hidden=4)
    with pytest.raises(ValueError, match="4 channels"):
        enc(torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="share B and S"):
        enc(torch.zeros(1, 1, 8, 8), torch.zeros(1, 4, 8, 9))
    with pytest.raises(ValueError, match="hidden and depth"):
        FeatureEncoder(2, 1, 4, hidden=0)

"""LNCC (layers/similarity.py) against a direct windowed computation, gradients, bounds and errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from layers.similarity import LNCC, lncc


def _direct_lncc(fixed: torch.Tensor, moving: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Loop over voxels: replicate-pad, take the (2r+1)^n window, squared correlation coefficient."""
    n = fixed.dim() - 2
    fp = F.pad(fixed, [radius] * (2 * n), mode="replicate")
    mp = F.pad(moving, [radius] * (2 * n), mode="replicate")
    out = torch.empty_like(fixed)
    k = 2 * radius + 1
    for b, c in itertools.product(range(fixed.shape[0]), range(fixed.shape[1])):
        for x in itertools.product(*[range(s) for s in fixed.shape[2:]]):
            win = tuple(slice(i, i + k) for i in x)
            f, m = fp[(b, c) + win].flatten(), mp[(b, c) + win].flatten()
            fc, mc = f - f.mean(), m - m.mean()
            cov, vf, vm = (fc * mc).mean(), (fc * fc).mean(), (mc * mc).mean()
            out[(b, c) + x] = cov * cov / (vf * vm + eps)
    return out


@pytest.mark.parametrize("shape,radius", [((2, 1, 7, 6), 1), ((1, 2, 7, 6), 2), ((1, 1, 5, 4, 6), 1)])
def test_lncc_matches_direct_windows(shape, radius):
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(shape, generator=g, dtype=torch.float64)
    moving = 0.5 * fixed + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    assert_close(lncc(fixed, moving, radius, eps=1e-4), _direct_lncc(fixed, moving, radius, 1e-4),
                 rtol=1e-9, atol=1e-12)


def test_lncc_gradcheck_and_bounds():
    g = torch.Generator().manual_seed(1)
    fixed = torch.rand(1, 1, 5, 6, 4, generator=g, dtype=torch.float64)
    moving = torch.rand(1, 1, 5, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: lncc(fixed, m, 1, 1e-3), (moving,))
    cc = lncc(fixed, moving.detach(), 1)
    assert (cc >= 0).all() and (cc < 1).all()
    # an affine intensity change of a textured image correlates perfectly (up to eps)
    same = lncc(fixed, 3.0 * fixed - 0.2, 1, eps=1e-12)
    assert_close(same, torch.ones_like(same), rtol=0, atol=1e-6)


def test_lncc_precomputed_fixed_broadcasts():
    g = torch.Generator().manual_seed(2)
    fixed = torch.rand(1, 1, 8, 8, generator=g)
    moving = torch.rand(3, 1, 8, 8, generator=g)
    out = LNCC(fixed, radius=2)(moving)
    assert out.shape == (3, 1, 8, 8)
    assert_close(out[1:2], lncc(fixed, moving[1:2], 2))


def test_lncc_errors():
    x = torch.rand(1, 1, 6, 6)
    with pytest.raises(ValueError, match="radius"):
        lncc(x, x, 0)
    with pytest.raises(ValueError, match="eps"):
        lncc(x, x, 1, eps=0.0)
    with pytest.raises(ValueError, match="floating-point"):
        lncc(x, (x > 0.5).long(), 1)
    with pytest.raises(ValueError, match="does not match"):
        lncc(x, torch.rand(1, 1, 6, 5), 1)
    with pytest.raises(ValueError, match="shape"):
        lncc(torch.rand(6, 6), torch.rand(6, 6), 1)

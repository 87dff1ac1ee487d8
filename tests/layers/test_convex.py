"""Tests of the discrete stage of ConvexAdam (:mod:`layers.convex`): the chunked SSD cost volume equals the
unchunked one, a known node shift is found, inverse consistency keeps exact inverses."""

from __future__ import annotations

import pytest
import torch

from layers.convex import coupled_convex, displacement_shifts, inverse_consistency, ssd_cost_volume


def test_cost_volume_chunks_and_argmin(monkeypatch):
    g = torch.Generator().manual_seed(1)
    fixed, moving = torch.rand(1, 4, 7, 8, 9, generator=g), torch.rand(1, 4, 7, 8, 9, generator=g)
    full = ssd_cost_volume(fixed, moving, 2)
    import layers.convex as convex

    monkeypatch.setattr(convex, "_CHUNK_ELEMENTS", 100)
    chunked = ssd_cost_volume(fixed, moving, 2)
    assert full.shape == (1, 125, 7, 8, 9)
    torch.testing.assert_close(full, chunked)
    # a shift of the moving features by one node along axis 1 is found exactly where defined
    shifted = torch.roll(fixed, shifts=-1, dims=3)
    u = coupled_convex(ssd_cost_volume(fixed, shifted, 2), 2, thetas=())
    assert displacement_shifts(2, 3).shape == (125, 3)
    assert float(u[0, 1, 2:-2, 2:-3, 2:-2].mean()) == pytest.approx(-1.0, abs=0.05)


def test_inverse_consistency_keeps_exact_inverses():
    u = torch.full((1, 3, 6, 6, 6), 0.5)
    u1, u2 = inverse_consistency(u, -u, 15)
    torch.testing.assert_close(u1, u)
    torch.testing.assert_close(u2, -u)

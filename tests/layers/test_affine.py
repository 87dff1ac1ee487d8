"""Affine pre-alignment (layers/affine.py, lightning_modules/prealign.py): closed forms and recovery of a known
affine map on a synthetic pair."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from data.synthetic import SyntheticPairs
from layers.affine import affine_displacement, affine_register, centroid, compose_affine
from layers.warp import compose, warp_image, warp_labels
from lightning_modules.baselines import make_baseline
from lightning_modules.prealign import AffinePrealigned

PAD = 6  # the phantoms fill their image: a margin keeps them inside the moving image's view after the affine map
SHAPE = (32 + 2 * PAD,) * 3


def known_affine() -> tuple[torch.Tensor, torch.Tensor]:
    a = math.radians(20)
    rot = torch.tensor([[1.0, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]]) * 1.06
    return rot[None], torch.tensor([[4.0, -5.0, 3.0]])


def affine_pair(deform: bool = False) -> dict:
    """A synthetic fixed image (padded) and a moving image with ``fixed(x) = moving(T(x + v(x)))``, T the known affine
    map (v the generator's deformation when ``deform``)."""
    s = SyntheticPairs(1, seed=1, shape=(32, 32, 32), ndim=3, num_keypoints=4)[0]
    s = {k: F.pad(s[k], (PAD,) * 6) for k in ("fixed", "moving", "fixed_label", "moving_label", "true_disp")}
    fixed, lab = s["fixed"][None], s["fixed_label"][None]
    m, t = known_affine()
    m_inv = torch.linalg.inv(m)
    u_inv = affine_displacement(m_inv, -(m_inv[0] @ t[0])[None], SHAPE)
    src, src_lab = (s["moving"][None], s["moving_label"][None]) if deform else (fixed, lab)
    true = affine_displacement(m, t, SHAPE)
    if deform:
        true = compose_affine(s["true_disp"][None], m, t)
    return {"fixed": fixed, "moving": warp_image(src, u_inv), "fixed_label": lab,
            "moving_label": warp_labels(src_lab, u_inv), "true": true, "spacing": torch.ones(1, 3),
            "moving_spacing": torch.ones(1, 3)}


def test_affine_closed_forms():
    eye, zero = torch.eye(3)[None], torch.zeros(1, 3)
    assert affine_displacement(eye, zero, (4, 5, 6)).abs().max() == 0
    shift = affine_displacement(eye, torch.tensor([[1.0, -2.0, 0.5]]), (4, 5, 6))
    assert torch.equal(shift[0, :, 1, 2, 3], torch.tensor([1.0, -2.0, 0.5]))
    m, t = known_affine()
    v = 0.5 * torch.randn(1, 3, *SHAPE)
    # composing in closed form = the project's compose of the two fields, away from the border
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    torch.testing.assert_close(compose_affine(v, m, t)[inner], compose(v, affine_displacement(m, t, SHAPE))[inner],
                               atol=1e-4, rtol=1e-4)
    img = torch.zeros(1, 1, 8, 8, 8)
    img[0, 0, 2, 3, 4] = 1.0
    assert torch.equal(centroid(img)[0], torch.tensor([2.0, 3.0, 4.0]))


def test_affine_register_recovers_a_known_map():
    pair = affine_pair()
    m, t = affine_register(pair["fixed"], pair["moving"])
    u = affine_displacement(m, t, SHAPE)
    body = pair["fixed_label"][:, 0] > 0
    err = (u - pair["true"]).norm(dim=1)[body]
    assert pair["true"].norm(dim=1)[body].mean() > 3.0
    assert err.mean() < 0.5


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    ks = [k for k in a.unique().tolist() if k > 0]
    return sum(float(2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum())) for k in ks) / len(ks)


def test_prealignment_before_a_deformable_method():
    pair = affine_pair(deform=True)
    gn = make_baseline("gn")
    plain = gn.register(pair)
    wrapped = AffinePrealigned(gn)
    u = wrapped.register(pair)
    before = _dice(pair["fixed_label"], pair["moving_label"])
    without = _dice(pair["fixed_label"], warp_labels(pair["moving_label"], plain))
    with_affine = _dice(pair["fixed_label"], warp_labels(pair["moving_label"], u))
    assert with_affine > without + 0.1 and with_affine > 0.8 > before
    assert wrapped.method_name == "affine+" + gn.method_name

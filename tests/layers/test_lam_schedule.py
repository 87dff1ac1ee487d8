"""The one home of λ (docs/design.md §5): every kind of :class:`layers.lam_schedule.LambdaSchedule` gives positive
``(K,)`` values equal to its defining formula, ``set_lambda`` rescales keeping the shape, the conditioning input
replaces the scale, and :class:`layers.gn.GNRegistration` reads λ from it."""

from __future__ import annotations

import math

import pytest
import torch

from layers.gn import GNRegistration
from layers.lam_schedule import LambdaSchedule, geometric_schedule, schedule_ratio

KINDS = ("fixed", "per_iteration", "scalar", "fourier", "conditioned")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_starts_at_the_reference_and_rescales_keeping_the_shape(kind):
    ref = torch.tensor(geometric_schedule(0.3, 0.03, 5))
    sched = LambdaSchedule((0.3, 0.03), 5, kind=kind)
    values = sched.values()
    assert values.shape == (5,) and (values > 0).all()
    torch.testing.assert_close(values, ref, rtol=1e-6, atol=0)
    assert sched.first() == pytest.approx(0.3, rel=1e-6)
    sched.set_lambda(0.06)
    assert sched.first() == pytest.approx(0.06, rel=1e-6)
    torch.testing.assert_close(schedule_ratio(sched.values().detach()), schedule_ratio(ref), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="finite positive"):
        sched.set_lambda(-1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_log_lam_input_replaces_the_scale_and_is_differentiable(kind):
    sched = LambdaSchedule((0.3, 0.03), 4, kind=kind, lam_init=0.2)
    x = torch.tensor(math.log(0.05), requires_grad=True)
    lam = sched.values(x)
    torch.testing.assert_close(lam.detach(), 0.05 * sched.shape())
    (g,) = torch.autograd.grad(lam.sum(), x)
    torch.testing.assert_close(g, lam.detach().sum())
    batch = sched.values(torch.log(torch.tensor([0.01, 0.1])))
    assert batch.shape == (4, 2)
    torch.testing.assert_close(batch[:, 1] / batch[:, 0], torch.full((4,), 10.0))


def test_learned_kinds_have_parameters_and_gradients():
    for kind, count in (("fixed", 0), ("conditioned", 0), ("scalar", 1), ("per_iteration", 1), ("fourier", 6)):
        sched = LambdaSchedule((0.3, 0.03), 4, kind=kind)
        params = list(sched.parameters())
        assert len(params) == count, kind
        if params:
            sched.values().sum().backward()
            assert all(p.grad is not None for p in params), kind
    per = LambdaSchedule((0.3, 0.03), 4, kind="per_iteration")
    per.clamp_(math.log(0.1), math.log(0.2))
    values = per.values().detach()
    assert float(values.max()) <= 0.2 + 1e-6 and float(values.min()) >= 0.1 - 1e-6
    with pytest.raises(ValueError, match="lam kind"):
        LambdaSchedule((0.3, 0.03), 4, kind="cubic")
    with pytest.raises(ValueError, match="positive values"):
        LambdaSchedule((0.3, 0.03, -1.0), 3)


def test_conditioned_schedule_warns_outside_its_range(caplog):
    sched = LambdaSchedule((0.3, 0.03), 4, kind="conditioned", lam_init=0.1, log_range=(math.log(0.01), 0.0))
    sched.set_lambda(0.5)
    assert not caplog.records
    sched.set_lambda(5.0)
    assert "outside the trained range" in caplog.text
    assert sched.first() == pytest.approx(5.0, rel=1e-6)


def test_gn_registration_reads_lambda_from_its_schedule():
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 32, 32, generator=g, dtype=torch.float64)
    moving = torch.roll(fixed, 1, dims=2)
    sched = LambdaSchedule((0.5, 0.1), 3, kind="per_iteration")
    gn = GNRegistration(iterations=3, stride=4, lam=sched, solver={"rtol": 1e-10}).double()
    assert gn.lam is sched
    u = gn(fixed, moving).disp
    torch.testing.assert_close(u, gn(fixed, moving, lam=sched.values().detach()).disp, rtol=0, atol=0)
    u.pow(2).sum().backward()
    assert sched.log_lam.grad is not None and sched.log_lam.grad.abs().sum() > 0
    torch.testing.assert_close(GNRegistration(iterations=3, lam=(0.5, 0.1)).lam.values(),
                               torch.tensor(geometric_schedule(0.5, 0.1, 3)))
    with pytest.raises(ValueError, match="iterations"):
        GNRegistration(iterations=4, lam=sched)

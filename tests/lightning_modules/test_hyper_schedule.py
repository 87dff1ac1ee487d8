"""Learned learning-rate schedules for AdamIO: exact baseline at initialisation, a differentiable
Adam identical to the baseline loop, correct meta-gradients (with checkpointing), persistence, and a short
meta-training that lowers the registration error."""

from __future__ import annotations

import math

import pytest
import torch

from data.collate import collate_pairs
from data.synthetic import SyntheticPairs
from layers.features import mind_ssc
from layers.grid import pool_to_grid, upsample_field
from layers.losses import keypoint_loss
from layers.optim import (
    FourierSchedule,
    PiecewiseLR,
    ValuesLR,
    adam_optimise,
    baseline_values,
    differentiable_adam,
    schedule_values,
)
from lightning_modules.baselines import AdamIO
from lightning_modules.hyper.schedule import ScheduleMetaLearner, adam_settings, load_schedule, save_schedule

pytestmark = pytest.mark.filterwarnings("ignore")


def _make_pairs(dtype: torch.dtype = torch.float32) -> dict:
    ds = SyntheticPairs(2, seed=3, shape=(32, 32), num_keypoints=32)
    batch = collate_pairs([ds[0], ds[1]])
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


# Function-scoped on purpose: every test gets its own batch (nothing a test does to it can reach another test,
# whatever the order or the worker), made under the test's own thread setting.
@pytest.fixture
def pairs():
    return _make_pairs()


@pytest.fixture
def pairs64():
    """The same pairs in float64, for the tests that compare two code paths or follow a chaotic unrolled
    optimisation: Adam divides by ``sqrt(v)``, so float32 rounding in near-zero gradients becomes steps of the
    full learning rate, and results would depend on the platform's rounding (vector width, library version)."""
    return _make_pairs(torch.float64)


def _coarse(batch, dtype=torch.float32):
    f = pool_to_grid(mind_ssc(batch["fixed"].to(dtype)), 2)
    m = pool_to_grid(mind_ssc(batch["moving"].to(dtype)), 2)
    return f, m


@pytest.mark.parametrize("baseline", ["piecewise", "constant", 0.3, [2.0, 1.0, 0.5]])
def test_untrained_schedule_is_the_baseline_exactly(baseline):
    steps = 270 if baseline == "piecewise" else 40
    base = baseline_values(baseline, steps)
    net = FourierSchedule(base)
    assert torch.equal(net.values(), base)
    assert torch.equal(net.log_delta(), torch.zeros(steps, dtype=torch.float64))
    if baseline == "piecewise":
        assert torch.equal(net.values(), schedule_values(PiecewiseLR(), 270))
    module = ScheduleMetaLearner(steps=steps, baseline=baseline)
    assert module.as_schedule().values == tuple(float(v) for v in base)


def test_differentiable_adam_equals_the_baseline_loop(pairs):
    """Same objective and update as torch.optim.Adam in adam_optimise (float64, a varying schedule)."""
    f, m = _coarse(pairs, torch.float64)
    lrs = torch.linspace(1.0, 0.2, 25, dtype=torch.float64)
    for unit in (1.0, 1.0 / 15.0):
        ref = adam_optimise(f, m, 2, iterations=25, schedule=ValuesLR(tuple(lrs.tolist())), step_unit=unit)
        for ck in (0, 7):
            out = differentiable_adam(
                f, m, 2, lrs.clone().requires_grad_(True), checkpoint_every=ck, step_unit=unit
            )
            torch.testing.assert_close(out.detach(), ref, rtol=1e-9, atol=1e-9)


def test_meta_gradient_matches_finite_differences_with_checkpointing(pairs64):
    f, m = _coarse(pairs64, torch.float64)
    b = pairs64
    steps = 8

    def error(log_lrs: torch.Tensor, ck: int) -> torch.Tensor:
        coarse = differentiable_adam(f, m, 2, log_lrs.exp(), checkpoint_every=ck)
        u = upsample_field(coarse, (32, 32), 2)
        return keypoint_loss(u, b["fixed_keypoints"], b["moving_keypoints"])

    log_lrs = torch.full((steps,), -0.7, dtype=torch.float64, requires_grad=True)
    (g_plain,) = torch.autograd.grad(error(log_lrs, 0), log_lrs)
    (g_ckpt,) = torch.autograd.grad(error(log_lrs, 3), log_lrs)
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-10, atol=1e-12)
    for i in (0, steps // 2, steps - 1):
        h = 1e-6
        plus, minus = log_lrs.detach().clone(), log_lrs.detach().clone()
        plus[i] += h
        minus[i] -= h
        fd = (float(error(plus, 0)) - float(error(minus, 0))) / (2 * h)
        assert abs(float(g_plain[i]) - fd) <= 1e-4 * abs(fd) + 1e-9, (i, float(g_plain[i]), fd)


def test_checkpointed_unroll_does_not_depend_on_the_cuda_state(pairs64, monkeypatch):
    """The checkpointed Adam segments draw no random numbers and stash no RNG state, so the meta-gradient does
    not depend on the CUDA state of the process. On a machine with CUDA, ``checkpoint`` takes CUDA as the device
    type even for CPU tensors and, when it preserves RNG states, saves and restores the CUDA generators if CUDA
    is initialised and raises if CUDA becomes initialised inside a segment ("device state was initialized in
    the forward pass of a Checkpoint"): the three tests that backpropagate through these segments were those
    that failed on a GPU machine. Simulated here on any machine; the result must not change at all."""
    from layers.optim.objective import InstanceObjective

    f, m = _coarse(pairs64, torch.float64)
    lrs = torch.full((6,), 0.5, dtype=torch.float64, requires_grad=True)

    def meta_gradient() -> torch.Tensor:
        out = differentiable_adam(f, m, 2, lrs, checkpoint_every=3)
        return torch.autograd.grad(out.square().sum(), lrs)[0]

    ref = meta_gradient()
    # what checkpoint sees on a CUDA machine: CUDA is its device type for segments of CPU tensors
    monkeypatch.setattr(torch.utils.checkpoint.DefaultDeviceType, "_default_device_type", "cuda")
    real = InstanceObjective.__call__

    def initialising(*args, **kwargs):
        monkeypatch.setattr(torch.cuda, "_initialized", True)
        return real(*args, **kwargs)

    monkeypatch.setattr(InstanceObjective, "__call__", initialising)
    torch.testing.assert_close(meta_gradient(), ref, rtol=0, atol=0)


def test_saved_schedule_drives_adamio(tmp_path, pairs):
    module = ScheduleMetaLearner(steps=12, baseline=0.5)  # piecewise preset: learning rates in 1/15 voxel
    with torch.no_grad():
        module.schedule.mlp[-1].bias.fill_(0.3)  # some non-baseline schedule
    path = save_schedule(module, tmp_path / "sched.pt")
    sched = load_schedule(path)
    assert isinstance(sched, ValuesLR) and len(sched.values) == 12
    torch.testing.assert_close(
        torch.tensor(sched.values, dtype=torch.float64), module.schedule_values().detach(), rtol=1e-12, atol=0
    )
    settings = adam_settings(path)
    assert settings["iterations"] == 12 and settings["step_unit"] == pytest.approx(1 / 15)
    assert settings["schedule"].values == sched.values
    torch.testing.assert_close(AdamIO(**settings).register(pairs), module.register(pairs))
    # the piecewise preset reads the values in the same unit, so eval.py's AdamIO(schedule=...) agrees too
    torch.testing.assert_close(AdamIO(schedule=sched, iterations=12).register(pairs), module.register(pairs))
    # a Lightning checkpoint of the meta-learner is accepted too
    ckpt = tmp_path / "meta.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    assert load_schedule(ckpt).values == sched.values
    assert adam_settings(ckpt)["step_unit"] == pytest.approx(1 / 15)
    with pytest.raises(FileNotFoundError):
        load_schedule(tmp_path / "missing.pt")


def test_meta_training_lowers_the_error(pairs64):
    """A few meta-steps from a too-small constant learning rate lower the final keypoint error (float64: the
    unrolled Adam and the meta-optimiser follow the same path on every platform)."""
    pairs = pairs64
    torch.manual_seed(0)
    module = ScheduleMetaLearner(
        preset="constant", steps=20, baseline=0.05, checkpoint_every=5, lr=0.05, w_path=0.2
    ).double()
    opt = module.configure_optimizers()
    before = float(module.error(pairs, module.register(pairs)))
    for _ in range(6):
        loss = module.error(pairs, module.unrolled(pairs))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = float(module.error(pairs, module.register(pairs)))
    assert after < before - 0.01, (before, after)
    assert float(module.schedule_values().mean()) > 0.05  # it learned to take larger steps


def test_training_step_is_the_meta_loss(pairs64):
    """The training loss is the final error plus ``w_path`` × the mean error at the segment ends, computed
    independently from the unrolled path; its gradient reaches the schedule network."""
    pairs = pairs64
    torch.manual_seed(0)
    module = ScheduleMetaLearner(preset="constant", steps=6, baseline=0.3, checkpoint_every=3, w_path=0.2).double()
    module.log = lambda *a, **k: None  # no trainer attached
    loss = module.training_step(pairs, 0)
    u, path = module.unrolled(pairs, return_path=True)
    ref = module.error(pairs, u) + 0.2 * torch.stack([module.error(pairs, p) for p in path]).mean()
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(float(ref), rel=1e-12, abs=0)
    loss.backward()
    assert float(module.schedule.mlp[-1].bias.grad.abs()) > 0


def test_frozen_steps_keep_the_baseline(tmp_path):
    """``frozen_steps``: the first values stay at the baseline whatever the weights; the rest move; the
    setting survives saving."""
    base = baseline_values("piecewise", 10)
    net = FourierSchedule(base, n_freq=2, frozen_steps=2, max_log_delta=1.0)
    with torch.no_grad():
        net.mlp[-1].bias.fill_(0.5)
    values = net.values()
    assert torch.equal(values[:2], base[:2])
    assert torch.allclose(values[2:], base[2:] * math.exp(math.tanh(0.5)), rtol=1e-12)
    path = save_schedule(net, tmp_path / "frozen.pt", step_unit=1 / 15)
    assert load_schedule(path).values == tuple(float(v) for v in values)
    assert torch.load(path, weights_only=False)["config"]["frozen_steps"] == 2
    with pytest.raises(ValueError, match="frozen_steps"):
        FourierSchedule(base, frozen_steps=10)


def test_piecewise_baseline_is_compressed_to_the_horizon():
    """``baseline="piecewise"`` at T ≠ 270: the published shape scaled to T steps (hold 70/270 of the steps at
    15, cosine, linear to 0.5 at T); at T = 270 the published schedule itself."""
    assert PiecewiseLR.compressed(270) == PiecewiseLR()
    values = baseline_values("piecewise", 20)
    assert torch.equal(values, schedule_values(PiecewiseLR(hold=5, period=14, cut=13, total=20), 20))
    assert torch.equal(values[:6], torch.full((6,), 15.0, dtype=torch.float64))
    assert float(values[-1]) == pytest.approx(0.5 + (float(values[13]) - 0.5) / 7, rel=1e-12)  # linear to 0.5 at T
    assert bool((values[6:].diff() < 0).all())
    with pytest.raises(ValueError, match="steps"):
        PiecewiseLR.compressed(0)


def test_meta_learner_refuses_the_old_lam_key():
    with pytest.raises(ValueError, match="'lam' was renamed 'diffusion_weight'"):
        ScheduleMetaLearner(steps=4, lam=1.0)
    assert ScheduleMetaLearner(steps=4, diffusion_weight=0.5).hparams.diffusion_weight == 0.5

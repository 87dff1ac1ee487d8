"""Bilevel λ for LearnGN (docs/design.md §5): parameters and splits, checkpointing, the CLI config, and the direction
of the effects on tiny synthetic 2D problems (λ grows with image noise; without a guard λ falls; with it the
folding fraction stays below its threshold). The full-size numbers are in benchmarks/results/hyper.md."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader

from data.collate import collate_pairs
from data.datamodule import RegistrationDataModule
from data.synthetic import SyntheticPairs
from layers.metrics import jacobian_stats
from lightning_modules.hyper import BilevelLearnGN, apply_lambda, current_lambda
from lightning_modules.learngn import LearnGN

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[2]
GN = {
    "features": "intensity",
    "iterations": 4,
    "stride": 4,
    "lam_start": 0.003,
    "lam_end": 0.0015,
    "label_loss": "mse",
    "lr": 0.003,
}


def _batch(noise: float, n: int = 4, stream: int = 3, size: int = 64) -> dict:
    ds = SyntheticPairs(n, seed=0, shape=(size, size), noise=noise, stream=stream)
    return collate_pairs([ds[i] for i in range(n)])


def _trainer(epochs: int, **kw) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kw,
    )


def _tune_lambda(hyper_batch: dict, steps: int, **kw) -> tuple[BilevelLearnGN, list[float]]:
    """λ only (handcrafted heads), ``steps`` hyper updates on one fixed hyper batch."""
    seed_everything(0)
    model = BilevelLearnGN(train_network=False, hyper_lr=0.25, **{**GN, **kw})
    model.hyper_source = [hyper_batch]
    lams: list[float] = []
    trainer = _trainer(1)
    orig = model.hyper_step

    def traced():
        out = orig()
        lams.append(float(model.lam_values()[0]))
        return out

    model.hyper_step = traced
    clock = DataLoader(
        [{"fixed": hyper_batch["fixed"][:1]}] * steps, batch_size=None
    )  # λ-only: unused batches
    trainer.fit(model, train_dataloaders=clock)
    return model, lams


def _double(batch):
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}


def test_untrained_bilevel_equals_learngn():
    batch = _double(_batch(0.05, n=2, size=32))
    for mode in ("scalar", "per_iteration", "fourier"):
        model = BilevelLearnGN(lam_mode=mode, **GN)
        ref = LearnGN(**GN)
        torch.testing.assert_close(model.lam_values(), ref.gn.lam.values().detach(), rtol=1e-6, atol=0)
        # same λ values, float64 fields: equal to rounding (the float32 λ schedules agree to 1e-6 relative)
        lam = ref.gn.lam.values().detach().double()
        torch.testing.assert_close(model.double().run(batch, lam=model.lam_values().double()).disp,
                                   ref.double().run(batch, lam=lam).disp, rtol=0, atol=1e-6)
    model = BilevelLearnGN(lam_init=0.01, **GN)
    assert current_lambda(model) == pytest.approx(0.01, rel=1e-6)
    apply_lambda(model, 0.02)
    assert current_lambda(model) == pytest.approx(0.02, rel=1e-6)
    ratio = model.lam_values() / model.lam_values()[0]
    torch.testing.assert_close(ratio, LearnGN(**GN).gn.lam.values().detach() / GN["lam_start"], rtol=1e-5, atol=0)


def test_splits_optimisers_and_checkpoint(tmp_path):
    """λ changes only in hyper steps (hyper split), the heads only in inner steps (train split); log λ and the
    step counter are in the checkpoint, and fine-tuning from a plain LearnGN checkpoint works."""
    seed_everything(0)
    dm = RegistrationDataModule(
        source="synthetic2d",
        synthetic_shape=[32, 32],
        num_train=2,
        num_hyper=2,
        num_val=1,
        num_test=1,
        batch_size=2,
    )
    model = BilevelLearnGN(hyper_warmup=1, hyper_every=2, hyper_lr=0.1, **{**GN, "iterations": 2})
    heads0 = [p.detach().clone() for p in model.network_parameters()]
    lam0 = model.gn.lam.log_lam.detach().clone()
    calls = {"hyper": 0}
    orig = model.next_hyper_batch

    def counted():
        calls["hyper"] += 1
        return orig()

    model.next_hyper_batch = counted
    trainer = _trainer(5)  # one train batch per epoch: 5 inner steps
    trainer.fit(model, datamodule=dm)
    assert int(model.inner_steps) == 5
    assert calls["hyper"] == 2  # 1 warm-up step, then every 2nd: after inner steps 3 and 5
    assert not torch.equal(model.gn.lam.log_lam.detach(), lam0)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(heads0, model.network_parameters()))
    ckpt = tmp_path / "bilevel.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert "gn.lam.log_lam" in state["state_dict"] and int(state["state_dict"]["inner_steps"]) == 5
    assert len(state["optimizer_states"]) == 2
    loaded = BilevelLearnGN.load_from_checkpoint(ckpt, map_location="cpu")
    torch.testing.assert_close(loaded.gn.lam.log_lam, model.gn.lam.log_lam)
    # λ only (no network training): the heads stay, λ moves
    frozen = BilevelLearnGN(train_network=False, **{**GN, "iterations": 2})
    heads1 = [p.detach().clone() for p in frozen.network_parameters()]
    _trainer(2).fit(frozen, datamodule=dm)
    assert all(torch.equal(a, b.detach()) for a, b in zip(heads1, frozen.network_parameters()))
    # fine-tuning from a plain LearnGN checkpoint: weights copied, λ at lam_init
    plain = LearnGN(**{**GN, "iterations": 2})
    with torch.no_grad():
        plain.heads.f_head.first.weight.mul_(1.5)
    ckpt2 = tmp_path / "plain.ckpt"
    torch.save({"state_dict": plain.state_dict(), "model_class": "lightning_modules.learngn.LearnGN"}, ckpt2)
    ft = BilevelLearnGN(init_from=str(ckpt2), lam_init=0.005, **{**GN, "iterations": 2})
    torch.testing.assert_close(ft.heads.f_head.first.weight, plain.heads.f_head.first.weight)
    assert current_lambda(ft) == pytest.approx(0.005, rel=1e-6)


def test_missing_hyper_split_is_a_clear_error():
    dm = RegistrationDataModule(
        source="synthetic2d", synthetic_shape=[32, 32], num_train=2, num_val=1, num_test=1, batch_size=2
    )
    model = BilevelLearnGN(**{**GN, "iterations": 2})
    with pytest.raises(RuntimeError, match="hyper"):
        _trainer(1).fit(model, datamodule=dm)


def test_learned_lambda_increases_with_noise():
    """Handcrafted heads, λ learned on 4 held-out pairs per noise level: monotone in the noise."""
    lams = []
    for noise in (0.02, 0.15, 0.4):
        model, trace = _tune_lambda(_batch(noise), steps=12)
        lams.append(trace[-1])
    assert lams[0] < lams[1] < lams[2], lams
    assert lams[2] > 3 * lams[0], lams


def test_without_guard_lambda_falls_and_the_guard_prevents_folding():
    batch = _batch(0.15)
    start = 0.02
    _, no_guard = _tune_lambda(batch, steps=10, lam_init=start, outer_guard="none")
    guarded, with_guard = _tune_lambda(batch, steps=10, lam_init=start, outer_guard="diffusion", w_guard=1.0)
    assert no_guard[-1] < 0.5 * start, no_guard  # a Dice-only outer loss pulls λ down
    assert with_guard[-1] > no_guard[-1], (with_guard, no_guard)
    folding = float(jacobian_stats(guarded.register(batch), batch["fixed_mask"])["folding"].mean())
    assert folding < guarded.hparams.folding_threshold, folding


def test_config_parses_and_runs_one_step(tmp_path):
    import train

    cfg = ROOT / "configs" / "bilevel_lambda_2d.yaml"
    args = [
        "fit",
        "-c",
        str(cfg),
        "--trainer.fast_dev_run",
        "true",
        "--trainer.logger",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--checkpoint.dirpath",
        str(tmp_path / "ckpt"),
        "--data.synthetic_shape",
        "[32, 32]",
        "--data.num_train",
        "2",
        "--data.num_hyper",
        "2",
        "--data.num_val",
        "1",
        "--data.num_test",
        "1",
        "--model.init_args.iterations",
        "2",
    ]
    cli = train.main(args)
    assert isinstance(cli.model, BilevelLearnGN)
    assert math.isfinite(float(cli.model.lam_values()[0]))


@pytest.mark.parametrize("name", ["bilevel_lambda_3d", "hyper_lambda_2d", "learned_schedule_2d"])
def test_configs_parse(name, tmp_path):
    import train

    cli = train.main(
        [
            "-c",
            str(ROOT / "configs" / f"{name}.yaml"),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--checkpoint.dirpath",
            str(tmp_path),
        ],
        run=False,
    )
    assert type(cli.model).__module__.startswith("lightning_modules.hyper")


def test_negative_jacobian_penalty():
    from layers.losses import negative_jacobian_penalty, regularity_guard

    u = torch.zeros(1, 2, 16, 16, requires_grad=True)
    assert float(negative_jacobian_penalty(u)) == 0.0
    fold = torch.zeros(1, 2, 16, 16)
    fold[0, 0] = -1.5 * torch.arange(16.0).view(16, 1)  # d u_0 / d x_0 = -1.5: det J = -0.5 everywhere
    fold.requires_grad_(True)
    pen = negative_jacobian_penalty(fold)
    assert float(pen) == pytest.approx(0.5, rel=1e-5)
    (g,) = torch.autograd.grad(pen, fold)
    assert g.abs().sum() > 0
    assert float(regularity_guard(fold, "negjac", margin=0.1)) == pytest.approx(0.6, rel=1e-5)
    with pytest.raises(ValueError):
        regularity_guard(fold, "bogus")


def test_sdlogj_excess_is_the_hinge_of_the_metric():
    """The ``sdlogj`` guard against an independent float64 reference: u_0 = c(x_1)·x_0 has det J = 1 + c(x_1)
    exactly, so SDlogJ is the population std of log(1 + c) over the interior columns (2-voxel crop)."""
    import numpy as np

    from layers.losses import regularity_guard, sdlogj_excess

    c = torch.linspace(-0.3, 0.4, 16, dtype=torch.float64) ** 3 + 0.05 * torch.sin(torch.arange(16.0).double())
    u = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    u[0, 0] = c.view(1, 16) * torch.arange(16.0, dtype=torch.float64).view(16, 1)
    sd = float(np.std(np.log1p(c.numpy()[2:14])))
    assert sd > 0.02
    u.requires_grad_(True)
    for bound in (0.0, 0.5 * sd):
        pen = sdlogj_excess(u, bound)
        assert float(pen) == pytest.approx(sd - bound, rel=1e-10)
        (g,) = torch.autograd.grad(pen, u)
        assert g.abs().sum() > 0
    over = sdlogj_excess(u, 2 * sd)
    assert float(over) == 0.0
    assert float(regularity_guard(u, "sdlogj", margin=0.5 * sd)) == pytest.approx(0.5 * sd, rel=1e-10)
    # zero spread (a translation): zero, finite gradient (the std's square root at 0)
    shift = torch.full((1, 2, 16, 16), 0.3, dtype=torch.float64, requires_grad=True)
    (g0,) = torch.autograd.grad(sdlogj_excess(shift, 0.2) + sdlogj_excess(shift, 0.0), shift)
    assert torch.isfinite(g0).all() and float(g0.abs().max()) == 0.0
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    mask[..., :, 2:8] = 1  # the metric's region: columns 2..7 only
    ref = float(np.std(np.log1p(c.numpy()[2:8])))
    assert float(sdlogj_excess(u, 0.0, mask)) == pytest.approx(ref, rel=1e-10)


def test_fourier_lambda_and_step_schedules_are_learned_on_the_hyper_split():
    """GN λ_t and α_t schedules (Fourier networks of the iteration index): the baseline when untrained,
    updated by the hyper step only."""
    batch = _batch(0.15, n=2, size=32)
    model = BilevelLearnGN(lam_mode="fourier", learn_step=True, train_network=False, hyper_lr=0.05, **GN)
    ref = LearnGN(**GN)
    assert torch.equal(model.step_values(), ref.gn.step_schedule)
    b64 = _double(batch)  # the same λ and α schedules, float64 fields: equal up to the float32 schedules' rounding
    u = model.double().run(b64, lam=model.lam_values().double(), step=model.step_values().double()).disp
    torch.testing.assert_close(u, ref.double().run(b64).disp, rtol=0, atol=1e-6)
    model.float()
    lam0, step0 = model.lam_values().detach().clone(), model.step_values().detach().clone()
    _tune = DataLoader([{"fixed": batch["fixed"][:1]}] * 2, batch_size=None)
    model.hyper_source = [batch]
    _trainer(1).fit(model, train_dataloaders=_tune)
    assert not torch.equal(model.lam_values().detach(), lam0)
    assert not torch.equal(model.step_values().detach(), step0)
    assert len(model.hyper_parameters()) == len(list(model.gn.lam.net.parameters())) + len(
        list(model.step_net.parameters())
    )

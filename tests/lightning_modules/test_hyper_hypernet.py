"""The λ-conditioned hypernetwork (docs/design.md §5): identity conditioning at initialisation, λ sampling,
smoothness along a λ sweep, Dice close to models trained at a fixed λ (tiny budgets: the direction only; full
numbers in benchmarks/results/hyper.md), test-time λ selection and ``resolve_lambda``."""

from __future__ import annotations

import math

import lightning
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader

from data.collate import collate_pairs
from data.evaluation.metrics import pair_metrics
from data.synthetic import SyntheticPairs
from layers.conditioning import FiLMHeads, LambdaFiLM
from layers.heads import CompactHeads
from layers.losses import regularity_loss
from lightning_modules.hyper import HyperLearnGN, apply_lambda, current_lambda, resolve_lambda, select_lambda
from lightning_modules.learngn import LearnGN

pytestmark = pytest.mark.filterwarnings("ignore")

GN = {
    "features": "intensity",
    "iterations": 4,
    "stride": 4,
    "lam_start": 0.003,
    "lam_end": 0.0015,
    "label_loss": "mse",
    "lr": 0.003,
}
RANGE = {"lam_min": 3e-4, "lam_max": 3e-2}


@pytest.fixture(scope="module")
def data():
    def make(stream: int, n: int) -> list[dict]:
        ds = SyntheticPairs(n, seed=0, shape=(64, 64), noise=0.1, stream=stream)
        return [ds[i] for i in range(n)]

    return {"train": make(0, 8), "val": make(1, 4), "test": make(2, 4)}


def _fit(model, samples: list[dict], epochs: int) -> None:
    seed_everything(0)
    loader = DataLoader(samples, batch_size=4, shuffle=False, collate_fn=collate_pairs)
    Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    ).fit(model, loader)


def test_film_is_the_identity_at_initialisation():
    film = LambdaFiLM([6, 3], (math.log(1e-3), math.log(1.0)))
    for scale, shift in film(torch.tensor([-9.0, 0.0, 2.0])):
        assert torch.equal(scale, torch.ones_like(scale)) and torch.equal(shift, torch.zeros_like(shift))
    heads = CompactHeads(2, 3, 4)
    cond = FiLMHeads(heads, (math.log(1e-3), 0.0))
    f, w = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="condition"):
        cond(f, w)
    with cond.condition(torch.tensor(-3.0)):
        jac, res = cond(f, w)
    ref_j, ref_f = heads(f, w)
    assert torch.equal(jac, ref_j) and torch.equal(res, ref_f)



def test_film_heads_pass_the_heads_preparation_on():
    """FiLM acts on the heads' outputs: with the heads' prepare() (what GNRegistration calls once per
    registration) the modulated J and f are those computed without it (float64)."""
    heads = CompactHeads(2, 3, 4).double()
    cond = FiLMHeads(heads, (math.log(1e-3), 0.0)).double()
    with torch.no_grad():
        cond.film.mlp[-1].bias.uniform_(-0.5, 0.5)  # a non-identity modulation
    f, w = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with cond.condition(torch.tensor(-3.0, dtype=torch.float64)):
        plain = cond(f, w)
        prepared = cond(f, w, prepared=cond.prepare(f))
    assert not torch.allclose(plain[1], heads(f, w)[1])
    for a, b in zip(prepared, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _float64(batch: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def test_untrained_hypernet_equals_learngn_at_every_lambda(data):
    """At initialisation the λ-conditioned model is LearnGN at every λ, in two parts (float64):

    * its λ schedule ``exp(log λ)·r_t`` equals LearnGN's geometric schedule ``lam → lam/2`` up to float32
      rounding (``run`` takes ``log λ`` as a float32 tensor and exponentiates it in float32; both schedules'
      buffers are float32): ``|log λ|·2⁻²⁴`` from ``log λ``, one float32 ulp (2·2⁻²⁴) from ``exp``, 2⁻²⁴ from
      each schedule buffer, so ``(|log λ| + 4)·2⁻²⁴`` relative;
    * given the same λ values, the FiLM-conditioned heads (scale 1, shift 0) give LearnGN's field: two float64
      computations of the same numbers (they differ by rounding at most: ~1e-15 voxels; 1e-9 leaves a wide
      margin).

    Comparing the fields of the two λ schedules directly mixes in the float32 λ difference, which the GN solves
    amplify most at small λ (7e-6 voxels in float64 and 1.8e-4 in float32 at λ = 3e-4, where the earlier
    float32 version of this test failed on some machines)."""
    batch = _float64(collate_pairs(data["test"][:2]))
    model = HyperLearnGN(**RANGE, **GN).double()
    seen = {}
    model.gn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(lam=kwargs["lam"] if "lam" in kwargs else args[3]), with_kwargs=True)
    for lam in (3e-4, 3e-3, 3e-2):
        ref = LearnGN(**{**GN, "lam_start": lam, "lam_end": lam / 2}).double()
        model.run(batch, log_lam=math.log(lam))
        torch.testing.assert_close(seen["lam"], ref.gn.lam.values().detach(), rtol=(abs(math.log(lam)) + 4) * 2**-24,
                                   atol=0)
        u = model.run(batch, lam=ref.gn.lam.values().detach(), log_lam=math.log(lam)).disp
        assert u.dtype == torch.float64
        torch.testing.assert_close(u, ref.register(batch), rtol=0, atol=1e-9)
    # one λ per batch item equals the items run separately (float64: the same numbers up to rounding)
    lams = torch.tensor([1e-3, 1e-2], dtype=torch.float64)
    u = model.run(batch, log_lam=lams.log()).disp
    for i in range(2):
        one = {k: (v[i : i + 1] if torch.is_tensor(v) else v[i : i + 1]) for k, v in batch.items()}
        torch.testing.assert_close(u[i : i + 1], model.run(one, log_lam=lams[i].log()).disp, rtol=0, atol=1e-9)


def test_lambda_draws_cover_the_range_and_its_ends():
    torch.manual_seed(0)
    model = HyperLearnGN(p_end=0.2, **RANGE, **GN)
    lo, hi = model.gn.lam.log_range
    draws = torch.stack([model.sample_log_lam() for _ in range(2000)])
    assert float(draws.min()) >= lo - 1e-6 and float(draws.max()) <= hi + 1e-6
    at_ends = ((draws - lo).abs() < 1e-6) | ((draws - hi).abs() < 1e-6)
    assert 0.15 < float(at_ends.float().mean()) < 0.25
    inner = draws[~at_ends]
    assert abs(float(inner.mean()) - 0.5 * (lo + hi)) < 0.2  # log-uniform in between


def test_smoothness_increases_along_lambda_and_dice_matches_fixed_lambda_models(data):
    """After a short training: diffusion of u decreases monotonically along a λ sweep, and at three λ values
    the amortised model's Dice is within 0.02 of LearnGN models trained at that λ (tiny budget)."""
    w_reg = 0.1
    hyper = HyperLearnGN(w_reg=w_reg, **RANGE, **{**GN, "lr": 1e-3})
    _fit(hyper, data["train"], epochs=2)
    test = collate_pairs(data["test"])
    hyper.eval()
    sweep = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    with torch.no_grad():
        rough = [float(regularity_loss(hyper.run(test, log_lam=math.log(lam)).disp)) for lam in sweep]
    assert all(a > b for a, b in zip(rough, rough[1:])), rough
    for lam in (1e-3, 3e-3, 1e-2):
        fixed = LearnGN(
            **{**GN, "lam_start": lam, "lam_end": lam / 2, "w_reg": w_reg * lam / GN["lam_start"], "lr": 1e-3}
        )
        _fit(fixed, data["train"], epochs=2)
        fixed.eval()
        with torch.no_grad():
            d_hyper = float(
                pair_metrics(test, hyper.run(test, log_lam=math.log(lam)).disp, hd95=False)["dice"].mean()
            )
            d_fixed = float(pair_metrics(test, fixed.register(test), hd95=False)["dice"].mean())
        assert abs(d_hyper - d_fixed) < 0.02, (lam, d_hyper, d_fixed)


def test_select_lambda_gradient_descent_agrees_with_the_sweep(data):
    model = HyperLearnGN(**RANGE, **GN)  # untrained: handcrafted GN, λ-scaled
    val = [collate_pairs(data["val"])]
    choice = select_lambda(model, val, steps=15, lr=0.2, sweep_points=9)
    assert choice.source == "gd", choice
    assert RANGE["lam_min"] <= choice.lam_gd <= RANGE["lam_max"]
    assert choice.loss_gd <= choice.loss_sweep * 1.01, choice
    lams = [s[0] for s in choice.sweep]
    assert abs(math.log(choice.lam_gd / choice.lam_sweep)) <= math.log(lams[1] / lams[0]) + 1e-6, choice
    assert choice.trace[-1][1] < choice.trace[0][1]
    assert current_lambda(model) == pytest.approx(math.sqrt(3e-4 * 3e-2), rel=1e-5)  # unchanged by selection


def test_resolve_lambda(data, tmp_path):
    model = HyperLearnGN(**RANGE, **GN)
    assert resolve_lambda(model, "0.01") == pytest.approx(0.01, rel=1e-6)
    assert resolve_lambda(model, 0.002) == pytest.approx(0.002, rel=1e-6)
    assert resolve_lambda(model, None) == pytest.approx(0.002, rel=1e-6)
    for bad in ("abc", -1.0, "0"):
        with pytest.raises(ValueError):
            resolve_lambda(model, bad)
    with pytest.raises(ValueError, match="dataloader"):
        resolve_lambda(model, "auto")
    val = [collate_pairs(data["val"][:2])]
    lam = resolve_lambda(model, "auto", val, steps=4, sweep_points=3)
    assert current_lambda(model) == pytest.approx(lam, rel=1e-6)
    # no descent steps: the sweep's best λ (not the descent's starting point, the middle of the range)
    sweep_only = select_lambda(model, val, steps=0, sweep_points=3)
    assert sweep_only.source == "sweep" and sweep_only.lam == min(sweep_only.sweep, key=lambda t: t[1])[0]
    # the evaluation λ is a buffer: it is in the checkpoint
    ckpt = tmp_path / "hyper.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "model_class": "lightning_modules.hyper.hypernet.HyperLearnGN",
            "pytorch-lightning_version": lightning.__version__,
        },
        ckpt,
    )
    loaded = HyperLearnGN.load_from_checkpoint(ckpt, map_location="cpu")
    assert current_lambda(loaded) == pytest.approx(lam, rel=1e-6)
    # plain LearnGN: resolve_lambda rescales its schedule
    plain = LearnGN(**GN)
    assert resolve_lambda(plain, 0.01) == pytest.approx(0.01, rel=1e-6)
    torch.testing.assert_close(
        plain.gn.lam.values().detach() / plain.gn.lam.values().detach()[0],
        LearnGN(**GN).gn.lam.values().detach() / GN["lam_start"],
    )
    apply_lambda(plain, 0.003)
    assert current_lambda(plain) == pytest.approx(0.003, rel=1e-6)
    # a plain LearnGN checkpoint initialises a HyperLearnGN (its heads copied, FiLM at the identity)
    with torch.no_grad():
        plain.heads.f_head.first.weight.mul_(1.5)
    ckpt2 = tmp_path / "plain.ckpt"
    torch.save({"state_dict": plain.state_dict(), "model_class": "lightning_modules.learngn.LearnGN"}, ckpt2)
    warm = HyperLearnGN(init_from=str(ckpt2), **RANGE, **GN)
    torch.testing.assert_close(warm.heads.f_head.first.weight, plain.heads.f_head.first.weight)
    with pytest.raises(ValueError, match="learn_schedule"):
        HyperLearnGN(learn_schedule=True, **RANGE, **GN)


@pytest.mark.parametrize("variant", ["fixed", "learned", "bilevel", "hyper"])
def test_lam_override_reaches_the_registration_of_every_variant(data, variant):
    """``eval.py --lam`` (resolve_lambda) changes what every LearnGN variant registers with: the field equals a
    run with the rescaled schedule passed explicitly, and differs from the unscaled one."""
    from lightning_modules.hyper import BilevelLearnGN

    if variant == "hyper":
        model = HyperLearnGN(**RANGE, **GN)
    elif variant == "bilevel":
        model = BilevelLearnGN(**GN)
    else:
        model = LearnGN(learn_schedule=variant == "learned", **GN)
    model = model.double()
    batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in collate_pairs(data["val"][:1]).items()}
    with torch.no_grad():
        before = model.register(batch)
        resolve_lambda(model, 4 * current_lambda(model))
        after = model.register(batch)
        if variant != "hyper":
            schedule = LearnGN(**GN).gn.lam.values().detach().double() * 4
            torch.testing.assert_close(model.lam_values().double(), schedule)
            torch.testing.assert_close(after, model.run(batch, lam=schedule).disp)
    assert (after - before).abs().max() > 1e-3


def test_a_semantic_hypernetwork_step_adds_the_semantic_loss():
    """With semantic channels the training step at a drawn λ is the registration terms (diffusion scaled by
    λ / lam_start) plus the U-Net's own loss, as a LearnGN step after its warm-up (one training step for both)."""
    from tests.lightning_modules.test_learngn import _batch3d

    args = dict(spatial_dims=3, features="mind", label_ids=[1, 2], iterations=2, lam_start=0.3, lam_end=0.1,
                rtol=1e-8, semantic=True, semantic_widths=[4, 4, 4, 4, 4, 4], semantic_weight_init=0.5,
                label_loss="dice", lam_min=0.1, lam_max=1.0, w_reg=1.0)
    model = HyperLearnGN(**args).double()
    batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in _batch3d().items()}
    log_lam = torch.tensor(math.log(0.6), dtype=torch.float64)
    model.sample_log_lam = lambda: log_lam
    loss = model.training_step(batch, 0)
    with torch.no_grad():
        terms = model.loss_terms(batch, model.run(batch, log_lam=log_lam).disp)
        terms["reg"] = terms["reg"] * (0.6 / 0.3)
        ref = sum(terms.values()) + model.semantic_term(batch)
    assert float(model.semantic_term(batch)) > 0
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-10, atol=0)
    # during a semantic warm-up the step is the U-Net's loss alone, as for LearnGN
    warm = HyperLearnGN(**{**args, "semantic_warmup": 2}).double()
    warm.sample_log_lam = lambda: log_lam
    torch.testing.assert_close(warm.training_step(batch, 0).detach(), warm.semantic_term(batch).detach(),
                               rtol=1e-12, atol=0)

"""Tests of the evaluation-only baselines (docs/design.md §6): schedules, Dice improvement on synthetic 3D pairs, the
ConvexAdam coarse stage, AdamIO initialisation, fit refusal, 2D support and clear errors on bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from data.evaluation.metrics import pair_metrics
from data.synthetic import SyntheticConfig, generator_for, make_synthetic_pair
from layers.features import box_filter, mind_ssc
from layers.optim import PRESETS, FeatureMSE, ImageLNCC, adam_optimise, apply_increment, schedule_values
from layers.warp import compose, warp_image, warp_labels
from lightning_modules.base import EvaluationOnlyError
from lightning_modules.baselines import (
    BASELINES,
    AdamIO,
    ConvexAdam,
    HandcraftedGN,
    Identity,
    make_baseline,
    make_schedule,
    piecewise_lr,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only add overhead (and contention on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(sample: dict) -> dict:
    return {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in sample.items()}


@pytest.fixture(scope="module")
def pair3d() -> dict:
    """A 48³ synthetic phantom warped by a large smooth field (|u| 7 voxels on average; initial Dice 0.26).

    The phantom (image and labels) of :func:`data.synthetic.make_synthetic_pair` is the moving image; the
    fixed image and labels are it warped with ``u = (5 + 2 sin(ωy), −4 + 2 cos(ωz), 3 sin(ωx))``,
    ``ω = 2π/48``,
    through :mod:`layers.warp`, so ``u`` is the exact answer.
    """
    sample = _batch(make_synthetic_pair(SyntheticConfig(shape=(48, 48, 48), max_displacement=0.05),
                                        generator_for(0)))
    x = torch.stack(torch.meshgrid(*[torch.arange(48.0)] * 3, indexing="ij"))
    w = 2 * math.pi / 48
    u = torch.stack([5 + 2 * torch.sin(w * x[1]), -4 + 2 * torch.cos(w * x[2]), 3 * torch.sin(w * x[0])])
    u = u[None]
    sample["fixed"] = warp_image(sample["moving"], u)
    sample["fixed_label"] = warp_labels(sample["moving_label"], u)
    sample["fixed_mask"] = (sample["fixed_label"] > 0).float()
    sample["true_disp"] = u
    for key in ("fixed_keypoints", "moving_keypoints"):
        sample.pop(key)
    return sample


def _pair2d(shape=(40, 40)) -> dict:
    cfg = SyntheticConfig(shape=shape, max_displacement=0.1, num_keypoints=8)
    return _batch(make_synthetic_pair(cfg, generator_for(5)))


# ------------------------------------------------------------------------------------------ schedules
def test_piecewise_lr_values():
    cut = 0.1 + 14.9 * (1 + math.cos(math.pi * 110 / 200)) / 2  # η(180)
    expected = {
        0: 15.0,
        70: 15.0,
        125: 0.1 + 14.9 * (1 + math.cos(math.pi * 55 / 200)) / 2,
        180: cut,
        225: cut + (0.5 - cut) * 45 / 90,  # linear midpoint
        269: cut + (0.5 - cut) * 89 / 90,
    }
    assert cut == pytest.approx(6.3846, abs=1e-4)  # "≈ 6.4"
    for step, value in expected.items():
        assert piecewise_lr(step) == pytest.approx(value, rel=1e-12), step
    assert piecewise_lr(270) == pytest.approx(0.5)
    assert PRESETS["piecewise"].iterations == 270 and PRESETS["constant"].iterations == 100
    values = schedule_values(PRESETS["piecewise"].schedule, 270)
    assert values.shape == (270,) and float(values[125]) == pytest.approx(expected[125])
    assert schedule_values(PRESETS["constant"].schedule, 100).eq(1.0).all()


def test_schedule_from_config():
    assert make_schedule([3.0, 2.0])(0) == 3.0 and make_schedule([3.0, 2.0])(5) == 2.0
    assert make_schedule(0.5)(17) == 0.5
    assert make_schedule("piecewise")(125) == piecewise_lr(125)
    assert make_schedule(lambda s: 2.0 * s)(3) == 6.0
    model = AdamIO(preset="constant", schedule=[1.0, 0.5], iterations=2)
    assert model.schedule(1) == 0.5 and model.iterations == 2
    assert AdamIO(preset="piecewise", lr=2.0).schedule(0) == 2.0
    with pytest.raises(ValueError, match="known presets: constant, piecewise"):
        make_schedule("cosine")
    with pytest.raises(ValueError, match="finite"):
        make_schedule([1.0, float("nan")])


# ------------------------------------------------------------------------------------------ Dice on 3D pairs
def _recipe(name: str) -> dict:
    """The ``init_args`` of ``configs/baselines/<name>.yaml``."""
    return dict(yaml.safe_load((ROOT / "configs" / "baselines" / f"{name}.yaml").read_text())["init_args"])


FAST = {
    "gn": dict(),
    "adam": dict(preset="constant", iterations=60),
    "adam_piecewise": dict(preset="piecewise"),
    "convexadam": dict(grid_sp=4, iterations=40),
    # the recipes of configs/baselines (intensity LNCC, diffeomorphic Adam stage; the second with the log-Jacobian
    # term), with a convex grid small enough for 48³
    "convexadam_lncc": {**_recipe("convexadam_lncc"), "grid_sp": 4},
    "convexadam_logj": {**_recipe("convexadam_logj"), "grid_sp": 4},
}


@pytest.mark.parametrize("name", list(FAST))
def test_baselines_improve_dice(pair3d, name):
    model = make_baseline(name.split("_")[0], **FAST[name])
    before = pair_metrics(pair3d, torch.zeros(1, 3, 48, 48, 48))
    with torch.no_grad():  # as in the base class's test/predict steps
        u = model.register(pair3d)
    after = pair_metrics(pair3d, u)
    assert u.shape == (1, 3, 48, 48, 48) and torch.isfinite(u).all()
    assert float(before["dice"]) < 0.3
    assert float(after["dice"]) > 0.75, (name, float(after["dice"]))
    assert float(after["folding"]) < 0.001
    body = pair3d["fixed_mask"][:, 0] > 0
    error = (u - pair3d["true_disp"]).norm(dim=1)[body].mean()
    assert error < 2.0, (name, float(error))  # from 7.1 voxels


def test_identity_is_zero(pair3d):
    u = Identity().register(pair3d)
    assert u.shape == (1, 3, 48, 48, 48) and u.abs().max() == 0


# ------------------------------------------------------------------------------------------ ConvexAdam
def test_convex_stage_recovers_large_shift():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 1, 12, 12, 12, generator=g)
    moving = torch.nn.functional.interpolate(base, size=(48, 48, 48), mode="trilinear", align_corners=False)
    shift = torch.tensor([8.0, 0.0, -4.0]).view(1, 3, 1, 1, 1)
    fixed = warp_image(moving, shift.expand(1, 3, 48, 48, 48))
    model = ConvexAdam(grid_sp=4, disp_hw=4, inverse_consistency=True)
    u = model.coarse_field(mind_ssc(fixed), mind_ssc(moving))
    err = (u - shift).norm(dim=1)
    assert u.shape == (1, 3, 48, 48, 48)
    assert float(err.mean()) < 1.0, float(err.mean())  # 8 voxels = 2 nodes: larger than the grid spacing
    assert float(err[:, 8:-8, 8:-8, 8:-8].mean()) < 0.5
    u_noic = ConvexAdam(grid_sp=4, inverse_consistency=False).coarse_field(mind_ssc(fixed), mind_ssc(moving))
    assert float((u_noic - shift).norm(dim=1).mean()) < 1.0  # the same scale without inverse consistency


# ------------------------------------------------------------------------------------------ AdamIO init
def test_adam_starts_exactly_at_init(pair3d):
    const = torch.tensor([2.5, -1.0, 3.0]).view(1, 3, 1, 1, 1).expand(1, 3, 48, 48, 48).contiguous()
    model = AdamIO(preset="constant", iterations=0)
    torch.testing.assert_close(model.register({**pair3d, "init_disp": const}), const, rtol=0, atol=1e-6)
    # an affine field survives the half-resolution round trip exactly away from the outermost voxels
    x = torch.stack(torch.meshgrid(*[torch.arange(48.0)] * 3, indexing="ij"))[None]
    affine = 0.05 * x.flip(1) + 0.02 * x - 1.0
    u = AdamIO(preset="constant", iterations=0, init=lambda batch: affine).register(pair3d)
    torch.testing.assert_close(u[..., 1:-1, 1:-1, 1:-1], affine[..., 1:-1, 1:-1, 1:-1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ LNCC / velocity
def test_image_lncc_matches_warping_the_pooled_image(pair3d):
    from layers.grid import pool_to_grid
    from layers.similarity import lncc

    fixed, moving = pair3d["fixed"].double(), pair3d["moving"].double()
    const = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1, 1)
    # a constant field on the stride-4 grid, LNCC on the stride-2 images: the warp is by const / 2 there
    term = ImageLNCC(fixed, moving, 4, stride=2, radius=2, weight=3.0)
    u = const.expand(1, 3, 12, 12, 12)
    warped = warp_image(pool_to_grid(moving, 2), const.expand(1, 3, 24, 24, 24) / 2)
    expected = 3.0 * (1 - lncc(pool_to_grid(fixed, 2), warped, 2).mean())
    torch.testing.assert_close(term(u), expected)
    with pytest.raises(ValueError, match="multiple of stride"):
        ImageLNCC(fixed, moving, 4, stride=3)


def test_velocity_parametrisation_starts_at_init_and_does_not_fold(pair3d):
    g = torch.Generator().manual_seed(0)
    f, m = torch.rand(1, 2, 12, 12, 12, generator=g), torch.rand(1, 2, 12, 12, 12, generator=g)
    init = torch.tensor([2.0, -1.0, 1.0]).view(1, 3, 1, 1, 1).expand(1, 3, 12, 12, 12).contiguous()
    from layers.optim import make_schedule

    out = adam_optimise(f, m, 4, init=init, iterations=1, schedule=make_schedule(0.0), velocity_steps=5)
    torch.testing.assert_close(out, init, rtol=0, atol=1e-6)  # lr 0: exp(0) = id, composed with init
    with pytest.raises(ValueError, match="velocity_steps"):
        adam_optimise(f, m, 4, iterations=1, schedule=make_schedule(1.0), velocity_steps=-1)
    with torch.no_grad():
        u = ConvexAdam(**{**FAST["convexadam_lncc"], "diffusion_weight": 0.0, "iterations": 20}).register(pair3d)
    assert float(pair_metrics(pair3d, u, hd95=False)["folding"]) == 0.0


def test_velocity_increment_is_applied_before_the_base_field():
    """``apply_increment`` with a velocity: ``v(x) = e(x) + base(x + e(x))``. For an affine base ``A x + b`` this
    is ``base(x) + (I + A) e(x)`` in closed form (the other order, ``base(x) + e(x + base(x))``, differs)."""
    from layers.warp import integrate_velocity

    g = torch.Generator().manual_seed(0)
    shape = (20, 20, 20)
    a = torch.tensor([[0.02, -0.05, 0.0], [0.04, 0.0, 0.03], [0.0, -0.02, 0.01]], dtype=torch.float64)
    pos = torch.stack(torch.meshgrid(*[torch.arange(k, dtype=torch.float64) for k in shape], indexing="ij"))
    base = (torch.einsum("ij,j...->i...", a, pos) + torch.tensor([0.5, -0.3, 0.2]).view(3, 1, 1, 1))[None]
    inc = box_filter(box_filter(torch.randn(1, 3, *shape, generator=g, dtype=torch.float64), 2), 2)
    e = integrate_velocity(inc, 4)
    expected = base + torch.einsum("ij,bj...->bi...", torch.eye(3, dtype=torch.float64) + a, e)
    got = apply_increment(base, inc, 4)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    torch.testing.assert_close(got[inner], expected[inner], rtol=0, atol=1e-10)
    assert float((got - compose(base, e))[inner].abs().max()) > 1e-3  # the other order is distinguishable
    torch.testing.assert_close(apply_increment(base, inc, 0), base + inc)


def test_convexadam_lncc_options_are_checked():
    with pytest.raises(ValueError, match="lncc_stride"):
        ConvexAdam(lncc_weight=1.0, lncc_stride=3, adam_stride=4)
    with pytest.raises(ValueError, match="lncc_weight"):
        ConvexAdam(lncc_weight=-1.0)
    with pytest.raises(ValueError, match="velocity_steps"):
        ConvexAdam(velocity_steps=-2)


def test_log_jacobian_term_enters_the_loss_in_closed_form():
    # lr 0, no similarity, λ 0: the loss of the first step is μ · log(det(I + A))² for an affine initial field
    # u₀ = s·(A g) + t on the stride-s grid (A in coarse voxels per coarse voxel; exact with central differences)
    from layers.optim import make_schedule

    s, mu = 4, 0.7
    a = torch.tensor([[0.1, 0.05, 0.0], [0.0, -0.2, 0.03], [0.02, 0.0, 0.15]], dtype=torch.float64)
    g = torch.stack(torch.meshgrid(*[torch.arange(10, dtype=torch.float64)] * 3, indexing="ij"))
    init = (s * torch.einsum("ij,j...->i...", a, g) + torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1, 1))[None]
    feats = torch.rand(1, 2, 10, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    losses = []
    adam_optimise(feats, feats, s, init=init, iterations=1, schedule=make_schedule(0.0), diffusion_weight=0.0,
                  weight=0.0, logj_weight=mu, velocity_steps=2, callback=lambda step, loss, u: losses.append(loss))
    expected = mu * math.log(float(torch.linalg.det(torch.eye(3, dtype=torch.float64) + a))) ** 2
    assert losses[0] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="logj_weight"):
        adam_optimise(feats, feats, s, iterations=1, schedule=make_schedule(1.0), logj_weight=-1.0)
    for cls in (ConvexAdam, AdamIO):
        with pytest.raises(ValueError, match="logj_weight"):
            cls(logj_weight=-0.1)


@pytest.fixture(scope="module")
def logj_runs(pair3d) -> dict:
    """Metrics of the convexadam_logj recipe (15 iterations) on ``pair3d`` for log-J weights 0, 0.35 and 2."""
    settings = {**FAST["convexadam_logj"], "iterations": 15}
    out = {}
    with torch.no_grad():
        for mu in (0.0, 0.35, 2.0):
            out[mu] = pair_metrics(pair3d, ConvexAdam(**{**settings, "logj_weight": mu}).register(pair3d), hd95=False)
    return out


@pytest.mark.parametrize("mu,ratio", [(0.35, 0.5), (2.0, 0.4)])  # measured: 0.185 and 0.159 vs 0.467
def test_log_jacobian_term_lowers_the_spread_of_log_j(logj_runs, mu, ratio):
    # the same ConvexAdam LNCC recipe with and without the term: a smaller SDlogJ, no folding, still aligned
    without, with_term = logj_runs[0.0], logj_runs[mu]
    assert float(with_term["sdlogj"]) < ratio * float(without["sdlogj"]), (with_term, without)
    assert float(with_term["folding"]) == 0.0 and float(with_term["dice"]) > 0.75
    assert float(logj_runs[2.0]["sdlogj"]) < float(logj_runs[0.35]["sdlogj"])  # more weight, smoother


# ------------------------------------------------------------------------------------------ Lightning
class _Pairs(torch.utils.data.Dataset):
    def __init__(self, sample: dict) -> None:
        self.sample = sample

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict:
        return self.sample


def _loader() -> DataLoader:
    cfg = SyntheticConfig(shape=(32, 32), max_displacement=0.1, num_keypoints=8)
    return DataLoader(_Pairs(make_synthetic_pair(cfg, generator_for(7))), batch_size=1)


def _trainer() -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, max_epochs=1)


@pytest.mark.parametrize("name", list(BASELINES))
def test_fit_raises(name):
    model = make_baseline(name)
    assert model.evaluation_only and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(EvaluationOnlyError):
        _trainer().fit(model, train_dataloaders=_loader())


def test_trainer_test_runs_under_inference_mode():
    model = AdamIO(preset="constant", iterations=10)
    out = _trainer().test(model, dataloaders=_loader())
    assert out and math.isfinite(out[0]["test/dice"])
    records = _trainer().predict(ConvexAdam(grid_sp=2, disp_hw=2, iterations=5), dataloaders=_loader())
    assert records[0][0]["status"] == "ok", records[0][0]["error"]
    # the LNCC / velocity Adam stage builds its similarity outside the optimisation loop
    lncc = ConvexAdam(grid_sp=2, disp_hw=2, iterations=5, weight=0.0, lncc_weight=1.0, lncc_radius=1,
                      adam_stride=2, velocity_steps=3)
    records = _trainer().predict(lncc, dataloaders=_loader())
    assert records[0][0]["status"] == "ok", records[0][0]["error"]


@pytest.mark.parametrize("name,kwargs", [
    ("identity", {}), ("gn", {}), ("gn", {"features": "sdm", "feature_scale": 20.0, "lam": (150.0, 70.0)}),
    ("adam", {"iterations": 20}), ("convexadam", {"grid_sp": 4, "disp_hw": 2, "iterations": 10}),
])
def test_2d_and_batches(name, kwargs):
    batch = _pair2d()
    model = make_baseline(name, **kwargs)
    u = model.register(batch)
    assert u.shape == (1, 2, 40, 40) and torch.isfinite(u).all()
    # a batch of two copies gives the same field twice, close to the single pair's (for Adam, the batch mean
    # of the loss halves the gradients, which Adam's ε sees: see layers/optim/objective.py)
    two = {k: (torch.cat([v, v]) if torch.is_tensor(v) else v * 2) for k, v in batch.items()}
    u2 = model.register(two)
    assert u2.shape == (2, 2, 40, 40)
    torch.testing.assert_close(u2[0], u2[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(u2[:1], u, rtol=0, atol=0.1)


# ------------------------------------------------------------------------------------------ errors
def test_bad_inputs(pair3d):
    with pytest.raises(ValueError, match="known methods: identity, gn, adam, convexadam"):
        make_baseline("demons")
    with pytest.raises(ValueError, match="known presets"):
        AdamIO(preset="fast")
    with pytest.raises(ValueError, match="same shape"):
        AdamIO(iterations=1).register({**pair3d, "moving": pair3d["moving"][..., :40]})
    bad = pair3d["fixed"].clone()
    bad[0, 0, 1, 2, 3] = float("nan")
    for name in BASELINES:
        with pytest.raises(ValueError, match="non-finite"):
            make_baseline(name).register({**pair3d, "fixed": bad})
    with pytest.raises(ValueError, match="larger than the coarse grid"):
        ConvexAdam(grid_sp=6, disp_hw=4).register(pair3d)  # 8 nodes < window of 9
    with pytest.raises(ValueError, match="features must be one of"):
        HandcraftedGN(features="hog")
    with pytest.raises(ValueError, match="init must be"):
        AdamIO(iterations=1).register({**pair3d, "init_disp": torch.zeros(1, 3, 8, 8, 8)})


@pytest.mark.parametrize("threads", [1, 2])
def test_feature_mse_channels_last_path_is_exact(threads, monkeypatch):
    # 32³ with 4 channels is above channels_last's size threshold: the layout used for the warp must not change
    # the value or the gradient (compared with the moving features forced to stay channels-first), with the
    # warp in one piece (1 thread) or split into slabs (2 threads)
    import layers.grid
    import layers.optim.objective as io

    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 4, 32, 32, 32, generator=g, dtype=torch.float64)
    moving = torch.rand(1, 4, 32, 32, 32, generator=g, dtype=torch.float64)
    v = (2 * torch.randn(1, 3, 32, 32, 32, generator=g, dtype=torch.float64)).requires_grad_()
    assert layers.grid.channels_last(moving).is_contiguous(memory_format=torch.channels_last_3d)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert layers.grid.slab_count(v.new_zeros(1, 32, 32, 32, 3)) == (1 if threads == 1 else 2)
        fast = FeatureMSE(fixed, moving)
        value = fast(v)
        grad, = torch.autograd.grad(value, v)
        monkeypatch.setattr(io, "channels_last", lambda x: x)
        plain = FeatureMSE(fixed, moving)
        ref = plain(v)
        ref_grad, = torch.autograd.grad(ref, v)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(value, ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-15)


def test_an_initialiser_replaces_convexadams_convex_stage_and_starts_adamio():
    from data.collate import collate_pairs
    from data.synthetic import SyntheticPairs
    from lightning_modules.base import RegistrationModule
    from lightning_modules.baselines import AdamIO, ConvexAdam

    class Shift(RegistrationModule):
        def register(self, batch):
            u = torch.zeros(batch["fixed"].shape[0], 2, *batch["fixed"].shape[2:])
            u[:, 0] = 1.5
            return u

    ds = SyntheticPairs(1, seed=0, shape=(32, 32), ndim=2)
    batch = collate_pairs([ds[0]])
    for method in (ConvexAdam(iterations=0), AdamIO(iterations=0)):
        method.set_initialiser(Shift())
        torch.testing.assert_close(method.register(batch), Shift().register(batch))
    moved = AdamIO(preset="constant", iterations=3)
    moved.set_initialiser(Shift())
    u = moved.register(batch)
    assert (u - Shift().register(batch)).abs().max() > 0
    with pytest.raises(TypeError, match="RegistrationModule"):
        AdamIO().set_initialiser(lambda b: b)


@pytest.mark.parametrize("cls", [AdamIO, ConvexAdam])
def test_old_lam_key_is_refused_naming_diffusion_weight(cls):
    # the Adam baselines' diffusion weight was called lam (GN's λ, a different quantity, keeps that name)
    with pytest.raises(ValueError, match="'lam' was renamed 'diffusion_weight'"):
        cls(lam=1.0)
    assert cls(diffusion_weight=0.5).diffusion_weight == 0.5
    assert cls(diffusion_weight=0.5).hparams["diffusion_weight"] == 0.5


# ------------------------------------------------------------------------------- semantic refinement
def _blob_pair():
    """A 32³ pair of one labelled box, the moving one shifted by 3 voxels along W, with images that show nothing
    of it (constant: MIND-SSC cannot align them)."""
    lab = torch.zeros(1, 1, 32, 32, 32, dtype=torch.long)
    lab[..., 10:22, 9:21, 8:20] = 1
    image = torch.ones(1, 1, 32, 32, 32, dtype=torch.float64)
    return {"fixed": image, "moving": image.clone(), "fixed_label": lab, "moving_label": torch.roll(lab, 3, dims=-1),
            "label_ids": torch.tensor([[1]])}


class _SemanticStub(torch.nn.Module):
    """An initialiser with semantic maps (the true labels' signed square-root distance maps) and a zero field;
    counts the calls of semantic_maps."""

    def __init__(self):
        super().__init__()
        self.semantic_net, self.calls = torch.nn.Identity(), 0

    def semantic_maps(self, batch):
        from layers.semantic import semantic_targets

        self.calls += 1
        return tuple(semantic_targets(batch[k], [1]).double() for k in ("fixed_label", "moving_label"))

    def register(self, batch):
        return torch.zeros(1, 3, 32, 32, 32, dtype=torch.float64)

    def run(self, batch, maps=None):
        from types import SimpleNamespace

        assert maps is not None
        return SimpleNamespace(disp=self.register(batch))


def test_adamio_semantic_term_aligns_the_initialisers_segmentations():
    """With the soft Dice of the initialiser's segmentations (true-label maps here) the refinement recovers a
    3-voxel shift that the images do not show (MIND alone leaves the field at zero); the maps are computed
    once."""
    from lightning_modules.base import RegistrationModule

    batch = _blob_pair()
    stub = _SemanticStub()
    dice = {}
    for w in (0.0, 4.0):
        method = AdamIO(preset="constant", lr=0.5, iterations=30, semantic_weight=w, weight=1.0).double()
        method.set_initialiser(RegistrationModule())  # a placeholder the check below replaces
        method.initialiser = stub
        stub.calls = 0
        u = method.register(batch)
        assert stub.calls == (1 if w else 0)
        dice[w] = float(pair_metrics(batch, u, hd95=False)["dice"])
    identity = float(pair_metrics(batch, torch.zeros(1, 3, 32, 32, 32), hd95=False)["dice"])
    assert dice[0.0] == identity < 0.8 and dice[4.0] > 0.9, (identity, dice)  # measured 0.75 and 0.93


def test_adamio_semantic_term_needs_an_initialiser_with_semantic_maps():
    from lightning_modules.base import RegistrationModule

    batch = _blob_pair()
    method = AdamIO(preset="constant", iterations=1, semantic_weight=1.0).double()
    with pytest.raises(ValueError, match="semantic maps"):
        method.register(batch)
    method.set_initialiser(RegistrationModule())
    with pytest.raises(ValueError, match="semantic maps"):
        method.register(batch)
    with pytest.raises(ValueError, match="semantic_sharpness"):
        AdamIO(semantic_sharpness=0)


def test_adamio_from_a_semantic_learngn_starts_at_its_field():
    """iterations 0: the LearnGN field computed from the maps AdamIO passes on equals the model's own
    (``register``, used without the semantic term)."""
    from lightning_modules.learngn import LearnGN

    torch.manual_seed(0)
    model = LearnGN(spatial_dims=3, features="mind", label_ids=[1], iterations=2, semantic=True,
                    semantic_widths=[4, 4, 4, 4, 4, 4], semantic_weight_init=0.5).double()
    batch = _blob_pair()
    method, plain = (AdamIO(preset="constant", iterations=0, semantic_weight=w).double() for w in (1.0, 0.0))
    method.set_initialiser(model)
    plain.set_initialiser(model)  # starts from model.register(batch)
    torch.testing.assert_close(method.register(batch), plain.register(batch), rtol=0, atol=1e-12)

"""Masks in every method's similarity terms (``use_masks``, off by default): all-ones masks give the unmasked
result (float64), ``use_masks=False`` ignores the batch's masks, masked terms do not see the fixed image outside
the mask, and a batch mask of the wrong shape fails early with its key."""

from __future__ import annotations

import pytest
import torch

from data.collate import collate_pairs
from data.synthetic import SyntheticPairs
from layers.losses import mind_loss
from layers.optim import FeatureMSE, ImageLNCC
from lightning_modules.baselines import AdamIO, ConvexAdam, HandcraftedGN
from lightning_modules.learngn import LearnGN

SHAPE = (32, 32)


def _batch(masks: str | None = None, n: int = 1) -> dict:
    """A float64 2D synthetic batch without masks (``None``), with all-ones masks (``"ones"``) or with a fixed
    mask excluding the lower half and an all-ones moving mask (``"half"``)."""
    ds = SyntheticPairs(n, seed=4, shape=SHAPE, ndim=2, max_displacement=0.08)
    batch = collate_pairs([ds[i] for i in range(n)])
    batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    batch.pop("fixed_mask", None)
    batch.pop("moving_mask", None)
    if masks is not None:
        ones = torch.ones_like(batch["fixed"])
        batch["moving_mask"] = ones
        batch["fixed_mask"] = ones.clone()
        if masks == "half":
            batch["fixed_mask"][..., SHAPE[0] // 2:, :] = 0.0
    return batch


def _learngn(**kw) -> LearnGN:
    torch.manual_seed(0)
    model = LearnGN(spatial_dims=2, features="mind", iterations=3, lam_start=0.3, lam_end=0.1, hidden=2,
                    rtol=1e-10, w_label=0.0, w_mind=1.0, **kw).double()
    with torch.no_grad():  # away from the handcrafted initialisation
        for p in model.heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


METHODS = {
    "gn": lambda **kw: HandcraftedGN(iterations=3, lam=(0.3, 0.1), solver={"rtol": 1e-10}, **kw),
    "gn_pooled": lambda **kw: HandcraftedGN(iterations=3, lam=(1.0, 0.1), feature_stride=2, solver={"rtol": 1e-10},
                                            **kw),
    "adam": lambda **kw: AdamIO(preset="constant", iterations=15, **kw),
    "convexadam": lambda **kw: ConvexAdam(grid_sp=2, disp_hw=2, iterations=10, lncc_weight=1.0, **kw),
    "learngn": _learngn,
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_all_ones_masks_give_the_unmasked_field(name):
    plain = METHODS[name]().double().register(_batch())
    masked = METHODS[name](use_masks=True).double().register(_batch("ones"))
    assert plain.abs().max() > 0.1
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_masks_are_off_by_default_and_change_the_field_when_on(name):
    plain = METHODS[name]().double().register(_batch())
    assert not METHODS[name]().use_masks
    assert torch.equal(METHODS[name]().double().register(_batch("half")), plain)
    masked = METHODS[name](use_masks=True).double().register(_batch("half"))
    assert (masked - plain).abs().max() > 1e-3


def test_learngn_training_losses_with_all_ones_masks():
    model = _learngn(use_masks=True)
    batch, ones = _batch(), _batch("ones")
    with torch.no_grad():
        u = model.register(batch)
    torch.testing.assert_close(model.loss_terms(ones, u)["mind"], model.loss_terms(batch, u)["mind"], rtol=1e-12,
                               atol=0)
    half = model.loss_terms(_batch("half"), u)["mind"]
    assert abs(float(half) - float(model.loss_terms(batch, u)["mind"])) > 1e-6


def test_learngn_field_ignores_the_fixed_image_outside_the_mask():
    """Intensity features: the fixed mask excludes GN nodes 4..7 of the first axis (voxels 16..31); the fixed image
    changed in voxels 22..31 (seen only by those nodes, docs/design.md §3) gives the same field."""
    torch.manual_seed(1)
    model = LearnGN(spatial_dims=2, features="intensity", iterations=3, lam_start=0.3, lam_end=0.1, hidden=2,
                    rtol=1e-10, use_masks=True).double()
    batch = _batch("half")
    other = dict(batch)
    other["fixed"] = batch["fixed"].clone()
    other["fixed"][..., 22:, :] += torch.rand(1, 1, 10, SHAPE[1], dtype=torch.float64)
    torch.testing.assert_close(model.register(other), model.register(batch), rtol=0, atol=1e-12)
    model.use_masks = False
    assert (model.register(other) - model.register(batch)).abs().max() > 1e-3


def test_masked_similarity_terms_ignore_the_fixed_image_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(2, 1, 3, *SHAPE, generator=g, dtype=torch.float64)
    other = fixed.clone()
    other[..., 20:, :] = torch.rand(1, 3, 12, SHAPE[1], generator=g, dtype=torch.float64)
    mask = torch.ones(1, 1, *SHAPE, dtype=torch.float64)
    mask[..., 16:, :] = 0.0
    v = 0.5 * torch.rand(1, 2, *SHAPE, generator=g, dtype=torch.float64)

    def value_and_grad(term):
        w = v.clone().requires_grad_(True)
        loss = term(w)
        (grad,) = torch.autograd.grad(loss, w)
        return loss.detach(), grad

    for make in (lambda f: FeatureMSE(f, moving, mask, mask),
                 lambda f: ImageLNCC(f[:, :1], moving[:, :1], 1, radius=2, fixed_mask=mask, moving_mask=mask)):
        (a, ga), (b, gb) = value_and_grad(make(fixed)), value_and_grad(make(other))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-14)
    # the MIND loss of a training batch: all-ones masks give the plain mean
    f1, m1 = fixed[:, :1], moving[:, :1]
    ones = torch.ones_like(f1)
    torch.testing.assert_close(mind_loss(v, f1, m1, ones, ones), mind_loss(v, f1, m1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["gn", "adam", "convexadam", "learngn"])
def test_a_batch_mask_of_the_wrong_shape_is_refused_with_its_key(name):
    batch = _batch("ones")
    batch["moving_mask"] = batch["moving_mask"][..., :-2]
    with pytest.raises(ValueError, match="moving_mask must be"):
        METHODS[name](use_masks=True).double().register(batch)

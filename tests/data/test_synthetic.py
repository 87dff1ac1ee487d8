"""The synthetic generator: determinism, the true field as the exact answer, keypoints, magnitude."""

from __future__ import annotations

import pytest
import torch

from data.fields import integrate_velocity, random_displacement
from data.synthetic import SyntheticConfig, SyntheticPairs, generator_for
from layers.diff import jacobian_determinant
from layers.grid import sample
from layers.warp import warp_image, warp_keypoints, warp_labels

SMALL = {2: (48, 40), 3: (24, 26, 28)}


def _dice(a: torch.Tensor, b: torch.Tensor, label: int) -> float:
    x, y = a == label, b == label
    return float(2 * (x & y).sum() / (x.sum() + y.sum()))


def test_default_shapes_and_keys():
    assert SyntheticPairs(ndim=2).config.shape == (128, 128)
    assert SyntheticPairs(ndim=3).config.shape == (64, 64, 64)
    s = SyntheticPairs(1, shape=(32, 32))[0]
    assert s["fixed"].shape == s["moving"].shape == (1, 32, 32) and s["fixed"].dtype == torch.float32
    assert s["fixed_label"].dtype == torch.int64 and s["true_disp"].shape == (2, 32, 32)
    assert s["fixed_keypoints"].shape == s["moving_keypoints"].shape == (64, 2)
    assert s["spacing"].tolist() == [1.0, 1.0] and s["affine"].shape == (4, 4)
    assert s["label_ids"].tolist() == [1, 2, 3, 4, 5, 6]
    assert isinstance(s["fixed_id"], str) and s["fixed_id"] != s["moving_id"]


@pytest.mark.parametrize("ndim", [2, 3])
def test_deterministic_per_seed_and_index(ndim):
    a = SyntheticPairs(3, seed=7, shape=SMALL[ndim])
    b = SyntheticPairs(3, seed=7, shape=SMALL[ndim])
    s2 = b[2]  # access order does not matter
    s0, t0 = a[0], b[0]
    for key, value in s0.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, t0[key]), key
    assert torch.equal(a[2]["true_disp"], s2["true_disp"])
    other_seed = SyntheticPairs(3, seed=8, shape=SMALL[ndim])[0]
    assert not torch.equal(other_seed["fixed"], s0["fixed"])
    assert not torch.equal(other_seed["true_disp"], s0["true_disp"])
    assert not torch.equal(a[1]["moving_label"], s0["moving_label"])
    assert not torch.equal(SyntheticPairs(3, seed=7, shape=SMALL[ndim], stream=1)[0]["fixed"], s0["fixed"])


def test_no_global_rng_used():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    SyntheticPairs(1, shape=(24, 24))[0]
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("ndim", [2, 3])
def test_true_field_maps_moving_labels_onto_fixed(ndim):
    ds = SyntheticPairs(2, seed=1, shape=SMALL[ndim], num_organs=5)
    for i in range(len(ds)):
        s = ds[i]
        warped = warp_labels(s["moving_label"][None], s["true_disp"][None])[0]
        labels = s["label_ids"].tolist()
        assert len(labels) >= 6  # body + 5 organs
        for label in labels:
            assert (s["fixed_label"] == label).any() and (s["moving_label"] == label).any()
            assert _dice(warped, s["fixed_label"], label) >= 0.95
        assert torch.equal(s["fixed_mask"], (s["fixed_label"] > 0).float())


@pytest.mark.parametrize("ndim", [2, 3])
def test_keypoints_correspond_through_the_true_field(ndim):
    s = SyntheticPairs(1, seed=3, shape=SMALL[ndim], noise=0.0)[0]
    u = s["true_disp"][None]
    mapped = warp_keypoints(s["fixed_keypoints"][None], u)[0]
    torch.testing.assert_close(mapped, s["moving_keypoints"], atol=1e-5, rtol=0)
    # intensities agree: fixed(p) == moving(p + u(p)) (noise 0, one modality)
    torch.testing.assert_close(warp_image(s["moving"][None], u), s["fixed"][None], atol=1e-5, rtol=0)
    at_fixed = sample(s["fixed"][None], s["fixed_keypoints"][None])
    at_moving = sample(s["moving"][None], s["moving_keypoints"][None])
    torch.testing.assert_close(at_fixed, at_moving, atol=1e-4, rtol=0)
    # keypoints are distinct voxels inside the fixed body
    kp = s["fixed_keypoints"].long()
    assert len({tuple(p) for p in kp.tolist()}) == kp.shape[0]
    assert bool((s["fixed_label"][0][tuple(kp.T)] > 0).all())


@pytest.mark.parametrize("ndim,fraction", [(2, 0.05), (2, 0.15), (2, 0.25), (3, 0.15)])
def test_displacement_reaches_requested_magnitude_without_folding(ndim, fraction):
    shape = SMALL[ndim]
    s = SyntheticPairs(1, seed=2, shape=shape, max_displacement=fraction)[0]
    u = s["true_disp"][None]
    peak = float(u.pow(2).sum(1).sqrt().max())
    target = fraction * min(shape)
    assert 0.97 * target <= peak <= 1.03 * target
    assert float(jacobian_determinant(u).min()) > 0


def test_random_displacement_is_smooth_and_zero_when_asked():
    g = generator_for(0)
    u = random_displacement((40, 40), g, 6.0)
    assert u.shape == (1, 2, 40, 40)
    assert float(u.diff(dim=2).abs().max()) < 1.5  # smooth: neighbouring voxels move alike
    assert float(random_displacement((16, 16), g, 0.0).abs().max()) == 0
    v = torch.zeros(1, 2, 8, 8)
    v[:, 0] = 1.5
    torch.testing.assert_close(integrate_velocity(v), v)  # a constant velocity is a translation


def test_multimodal_changes_the_moving_intensity_mapping():
    uni = SyntheticPairs(1, seed=4, shape=(48, 48), noise=0.0)[0]
    multi = SyntheticPairs(1, seed=4, shape=(48, 48), noise=0.0, multimodal=True)[0]
    assert torch.equal(uni["true_disp"], multi["true_disp"]) and torch.equal(uni["fixed"], multi["fixed"])
    warped = warp_image(multi["moving"][None], multi["true_disp"][None])[0]
    body = multi["fixed_label"] > 0
    assert float((warped - multi["fixed"])[body].abs().mean()) > 0.1
    assert torch.equal(multi["moving_label"], uni["moving_label"])


def test_spacing_and_noise_options():
    s = SyntheticPairs(1, shape=(24, 24, 24), spacing=(2.0, 1.0, 0.5), noise=0.1)[0]
    assert s["spacing"].tolist() == [2.0, 1.0, 0.5] and s["moving_spacing"].tolist() == [2.0, 1.0, 0.5]
    assert torch.diagonal(s["affine"])[:3].tolist() == [2.0, 1.0, 0.5]
    background = s["fixed"][s["fixed_label"] == 0]
    assert 0.07 < float(background.std()) < 0.13
    with pytest.raises(ValueError):
        SyntheticConfig(shape=(16, 16), spacing=(1.0,))
    with pytest.raises(IndexError):
        SyntheticPairs(2, shape=(16, 16))[2]


def test_cache_returns_the_same_items():
    plain = SyntheticPairs(2, seed=5, shape=(24, 24))
    cached = SyntheticPairs(2, seed=5, shape=(24, 24), cache=True)
    for i in (1, 0, 1):
        a, b = plain[i], cached[i]
        assert a.keys() == b.keys()
        for k, v in a.items():
            if torch.is_tensor(v):
                assert torch.equal(v, b[k]), k
            else:
                assert v == b[k], k
    # a caller that replaces an entry of the returned dict does not change the cache
    item = cached[0]
    item["fixed"] = None
    assert torch.is_tensor(cached[0]["fixed"])

"""Features (layers/features.py): MIND-SSC (docs/design.md §6) and signed square-root distance maps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from layers.features import box_filter, mind_ssc, signed_distance_maps
from layers.grid import identity_grid

F64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-12) -> None:
    assert_close(actual, expected, atol=atol, rtol=0)


def _texture(shape: tuple[int, ...], seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Noise plus a smooth trend: textured everywhere (no flat regions)."""
    gen = torch.Generator().manual_seed(seed)
    x = identity_grid(shape, dtype=F64)
    trend = torch.sin(0.4 * x[:, :1]) + 0.1 * x[:, -1:]
    return trend + torch.rand(batch, 1, *shape, generator=gen, dtype=F64)


def _mind_reference(img: np.ndarray, radius: int = 1, dilation: int = 2, eps: float = 1e-3) -> np.ndarray:
    """Direct numpy transcription of docs/design.md §6 for one image ``(*S)`` -> ``(C, *S)``."""
    n, d = img.ndim, dilation
    faces = []
    for axis in range(n):
        for sign in (-1, 1):
            v = [0] * n
            v[axis] = sign
            faces.append(v)
    pairs = [(a, b) for a, b in itertools.combinations(faces, 2) if np.dot(a, b) == 0]
    padded = np.pad(img, d, mode="edge")

    def at(v):  # I(x + d * v), replicate padding
        return padded[tuple(slice(d + d * o, d + d * o + s) for o, s in zip(v, img.shape))]

    k = 2 * radius + 1
    chans = []
    for a, b in pairs:
        sq = np.pad((at(a) - at(b)) ** 2, radius, mode="edge")
        acc = np.zeros(img.shape)
        for off in itertools.product(range(k), repeat=n):
            acc += sq[tuple(slice(o, o + s) for o, s in zip(off, img.shape))]
        chans.append(acc / k**n)
    ssd = np.stack(chans)
    mind = ssd - ssd.min(0, keepdims=True)
    var = mind.mean(0, keepdims=True)
    g = var.mean()
    var = np.clip(var, g * eps, g / eps)
    var = np.where(var > 0, var, 1.0)
    return np.exp(-mind / var)


# ---------------------------------------------------------------------------------------------------
# box filter and MIND-SSC
# ---------------------------------------------------------------------------------------------------
def test_box_filter_hand_values():
    x = torch.arange(5, dtype=F64).view(1, 1, 5, 1).expand(1, 1, 5, 3).contiguous()
    out = box_filter(x, 1)
    # rows (replicate): [0,0,1] -> 1/3, [0,1,2] -> 1, ..., [3,4,4] -> 11/3
    _close(out[0, 0, :, 1], torch.tensor([1 / 3, 1.0, 2.0, 3.0, 11 / 3], dtype=F64))
    assert box_filter(x, 0) is x


def _box_reference(x, r):
    # the definition, differentiated by autograd: replicate pad, then sums of shifted slices per axis
    n = x.dim() - 2
    k = 2 * r + 1
    x = torch.nn.functional.pad(x, [r] * (2 * n), mode="replicate")
    for a in range(2, 2 + n):
        length = x.shape[a] - 2 * r
        acc = x.narrow(a, 0, length)
        for o in range(1, k):
            acc = acc + x.narrow(a, o, length)
        x = acc
    return x / float(k**n)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 4, 5, 6), (1, 1, 2, 3)])
@pytest.mark.parametrize("radius", [1, 2])
def test_box_filter_backward_is_the_adjoint(shape, radius):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(*shape, generator=g, dtype=F64)
    got, = torch.autograd.grad(box_filter(x, radius), x, w)
    ref, = torch.autograd.grad(_box_reference(x, radius), x, w)
    _close(box_filter(x, radius), _box_reference(x, radius))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(lambda t: box_filter(t, radius), (x,))
    # second order (the learned schedules differentiate through Adam steps, i.e. through this backward)
    assert torch.autograd.gradgradcheck(lambda t: box_filter(t, radius).pow(2), (x,))


@pytest.mark.parametrize("shape,channels", [((12, 13), 4), ((8, 9, 10), 12)])
def test_mind_ssc_channels_range_and_reference(shape, channels):
    img = _texture(shape)
    feat = mind_ssc(img)
    assert feat.shape == (1, channels, *shape)
    assert (feat > 0).all() and (feat <= 1).all()
    # the per-voxel minimum channel is exp(0) = 1
    _close(feat.max(1).values, torch.ones(1, *shape, dtype=F64))
    ref = _mind_reference(img[0, 0].numpy())
    _close(feat[0], torch.from_numpy(ref), atol=1e-10)


def test_mind_ssc_radius_dilation_options_match_reference():
    img = _texture((11, 12), seed=3)
    feat = mind_ssc(img, radius=2, dilation=1)
    _close(feat[0], torch.from_numpy(_mind_reference(img[0, 0].numpy(), radius=2, dilation=1)), atol=1e-10)


def test_mind_ssc_identical_images_and_batch_independence():
    a, b = _texture((10, 11), seed=1), _texture((10, 11), seed=2)
    fa = mind_ssc(a)
    _close(mind_ssc(a.clone()), fa, atol=0)
    batch = mind_ssc(torch.cat([a, b, a]))
    _close(batch[0], fa[0], atol=1e-14)
    _close(batch[2], fa[0], atol=1e-14)
    _close(batch[1], mind_ssc(b)[0], atol=1e-14)
    assert (batch[0] - batch[1]).abs().max() > 0.1


@pytest.mark.parametrize("scale,offset", [(2.5, -7.0), (-0.3, 4.0), (1000.0, 1e3)])
def test_mind_ssc_invariant_to_affine_intensity_change(scale, offset):
    img = _texture((7, 8, 9), seed=4)
    _close(mind_ssc(scale * img + offset), mind_ssc(img), atol=1e-5)


def test_mind_ssc_constant_image_is_finite():
    for shape in ((9, 9), (5, 6, 7)):
        feat = mind_ssc(torch.full((1, 1, *shape), 3.0, dtype=F64))
        assert torch.isfinite(feat).all()
        _close(feat, torch.ones_like(feat))


def test_mind_ssc_multichannel_input_is_averaged():
    img = _texture((9, 10), seed=5)
    two = torch.cat([img - 1.0, img + 1.0], 1)  # channel mean = img
    _close(mind_ssc(two), mind_ssc(img), atol=1e-12)


@pytest.mark.parametrize("shape,shift", [((20, 22), (3, 2)), ((14, 15, 16), (2, -1, 3))])
def test_mind_ssc_translation_equivariant_in_interior(shape, shift):
    n = len(shape)
    big_shape = tuple(s + 2 * abs(t) for s, t in zip(shape, shift))
    big = _texture(big_shape, seed=6)
    crop1 = tuple(slice(abs(t), abs(t) + s) for s, t in zip(shape, shift))
    crop2 = tuple(slice(abs(t) + t, abs(t) + t + s) for s, t in zip(shape, shift))
    img1 = big[(slice(None), slice(None)) + crop1]
    img2 = big[(slice(None), slice(None)) + crop2]  # img2(x) = img1(x + shift)
    f1, f2 = mind_ssc(img1), mind_ssc(img2)
    margin = 2 + 1 + max(abs(t) for t in shift)  # dilation + radius + shift
    inner2 = tuple(slice(margin, s - margin) for s in shape)
    inner1 = tuple(slice(margin + t, s - margin + t) for s, t in zip(shape, shift))
    assert f2[(0, slice(None)) + inner2].numel() > 0 and n == len(inner1)
    _close(f2[(0, slice(None)) + inner2], f1[(0, slice(None)) + inner1], atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# signed distance maps
# ---------------------------------------------------------------------------------------------------
def _brute_signed_sqrt_distance(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """For each voxel: distance (mm) to the nearest voxel of the other class, negative inside, then
    ``sign * sqrt``."""
    pts = np.argwhere(np.ones_like(mask)) * np.asarray(spacing)
    inside = mask.reshape(-1)
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    to_out = np.where(~inside[None, :], d, np.inf).min(1)
    to_in = np.where(inside[None, :], d, np.inf).min(1)
    signed = np.where(inside, -to_out, to_in)
    return (np.sign(signed) * np.sqrt(np.abs(signed))).reshape(mask.shape)


def test_signed_distance_half_plane_hand_values_with_spacing():
    lab = torch.zeros(1, 1, 10, 6, dtype=torch.int64)
    lab[:, :, :5] = 1  # rows 0..4 inside
    out = signed_distance_maps(lab, spacing=(2.0, 0.5))
    assert out.shape == (1, 1, 10, 6) and out.dtype == torch.float32
    rows = np.arange(10)
    # inside row i: nearest outside voxel is row 5 -> (5 - i) * 2 mm; outside: row 4 -> (i - 4) * 2 mm
    d = np.where(rows < 5, -(5 - rows) * 2.0, (rows - 4) * 2.0)
    expected = np.sign(d) * np.sqrt(np.abs(d))
    _close(out[0, 0].double(), torch.from_numpy(expected)[:, None].expand(10, 6), atol=1e-6)
    assert (out[0, 0, :5] < 0).all() and (out[0, 0, 5:] > 0).all()


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.5, 0.7)])
def test_signed_distance_disk_matches_brute_force(spacing):
    x = identity_grid((15, 17), dtype=F64)[0]
    disk = ((x[0] - 7.2) ** 2 + (x[1] - 8.4) ** 2) <= 4.5**2
    lab = (disk.long() * 3)[None, None]
    out = signed_distance_maps(lab, label_ids=[3], spacing=spacing, scale=2.0)
    ref = _brute_signed_sqrt_distance(disk.numpy(), spacing) / 2.0
    _close(out[0, 0].double(), torch.from_numpy(ref), atol=1e-6)
    assert (out[0, 0][disk] < 0).all() and (out[0, 0][~disk] > 0).all()
    if spacing == (1.0, 1.0):
        # hand value: (6, 4) is outside ((6 - 7.2)^2 + (4 - 8.4)^2 = 20.8 > 4.5^2) at sqrt(1 + 16) voxels
        # from (7, 8); every voxel at offset a^2 + b^2 < 17 is inside (e.g. (3, 7): 19.6, (5, 5): 16.4)
        assert out[0, 0, 7, 8].item() == pytest.approx(-np.sqrt(np.sqrt(17.0)) / 2.0, abs=1e-6)


def test_signed_distance_labels_batch_and_absent():
    lab = torch.zeros(2, 1, 8, 9, 10, dtype=torch.int64)
    lab[0, :, 2:5, 2:6, 3:7] = 2
    lab[1, :, 1:4, 1:4, 1:4] = 5
    out = signed_distance_maps(lab)  # default: every non-zero label of the batch, ascending
    assert out.shape == (2, 2, 8, 9, 10)
    assert (out[1, 0] == 0).all() and (out[0, 1] == 0).all()  # label absent from that item -> zeros
    for b, k in ((0, 0), (1, 1)):
        ref = _brute_signed_sqrt_distance(lab[b, 0].numpy() == (2, 5)[k], (1.0, 1.0, 1.0))
        _close(out[b, k].double(), torch.from_numpy(ref), atol=1e-6)
    assert (signed_distance_maps(lab, label_ids=[7]) == 0).all()
    full = torch.ones(1, 1, 4, 4, dtype=torch.int64)
    assert (signed_distance_maps(full, label_ids=[1]) == 0).all()  # no boundary: zeros
    with pytest.raises(ValueError):
        signed_distance_maps(torch.zeros(1, 2, 4, 4, dtype=torch.int64))

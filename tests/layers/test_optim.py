"""The Adam instance-optimisation engine of :mod:`layers.optim` (docs/design.md §5, §6) reproduces, in float64, the
numbers of the two loops it replaced (``lightning_modules/baselines/instance_opt.adam_optimise`` and
``lightning_modules/hyper/schedule.differentiable_adam``), recorded before they were merged: the
``torch.optim.Adam`` stepper in 2D and 3D with every objective option, AdamIO and ConvexAdam end to end (both
stages, LNCC / stationary velocity / log-Jacobian, a given initial field), and the functional Adam's field,
checkpoint-segment path and meta-gradient.

Each case is summarised by three numbers of its field (sum, sum of squares, a cosine-weighted sum); they must
agree with the recorded ones to 1e-12 (relative). The recording was checked bit for bit against the whole
fields of the old code: the stepper, AdamIO and ConvexAdam were identical; the functional Adam differed by at
most 1e-16 relative in the field (its loss now adds the terms in the stepper's order).
"""

from __future__ import annotations

import pytest
import torch

from layers.optim import ImageLNCC, PiecewiseLR, SegmentationDice, ValuesLR, adam_optimise, differentiable_adam
from lightning_modules.baselines import AdamIO, ConvexAdam

REFERENCE = {
    'adam2d_plain': (-30.46692895306577, 237.01099448738, 2.5775325598136822),
    'adam2d_init_unit': (-41.67288968485739, 167.0417845834117, 1.2051848786272856),
    'adam2d_velocity': (-37.917962605604046, 249.45229620230376, 2.6685809516844916),
    'adam2d_logj': (-17.96173868165881, 178.24096535625966, 1.3707396263400462),
    'adam2d_mask': (-22.377806922556314, 240.18472055564436, 2.2966235297724946),
    'adam2d_lncc': (-54.868146834344515, 138.13226692676864, 1.708428144914498),
    'adam2d_noweight': (-97.06946179491187, 118.85837374570876, -0.024308880329926286),
    'adamio2d': (-221.63545820269573, 306.0221898350035, -2.5858844105218495),
    'adamio2d_piecewise': (-92.33247176356606, 253.23070810373414, 2.0849864219027667),
    'convex2d': (-432.39294180065167, 1186.9751158555055, -4.789519681204629),
    'convex2d_lncc_vel_logj': (-363.201612192947, 806.7600888978086, -2.060911995844169),
    'convex2d_init': (-176.62641217036088, 434.179551978004, 1.4519098483451867),
    'diffadam2d_ck0_u': (-74.19387452064161, 688.0801495346818, 2.2206711565950625),
    'diffadam2d_ck0_grad': (5.254293867142415, 4.702126607786652, 2.43319447647972),
    'diffadam2d_ck3_u': (-74.19387452064161, 688.0801495346818, 2.2206711565950625),
    'diffadam2d_ck3_grad': (1277.4376631108871, 318945.6840013431, 807.1947587578167),
    'diffadam2d_ck3_path': (-146.41121392062684, 1129.8030884457999, 1.1791403698645784),
    'adam3d_plain': (-106.57924422893639, 350.7600094891917, 0.8613192715190046),
    'adam3d_init_unit': (-111.53371229502324, 258.5669060942553, 1.3637211119941286),
    'adam3d_velocity': (-10.551103564406187, 319.0100045829056, 2.215627605205814),
    'adam3d_logj': (-102.08734516398994, 339.54102606984634, 0.3592435549753805),
    'adam3d_mask': (-148.67779054127743, 327.57396633385986, 0.9684682576346493),
    'adam3d_lncc': (-65.48981379017683, 237.7876591860192, 1.1558171977132243),
    'adam3d_noweight': (-112.13399013720417, 186.7362718613254, 2.018105434764295),
    'adamio3d': (-14.37032709351195, 469.3079213005435, -2.9835962889824508),
    'adamio3d_piecewise': (264.05742261696923, 140.27083528807162, 0.5425025578913106),
    'convex3d': (164.39754314582484, 758.1894655880404, -1.2481891442657016),
    'convex3d_lncc_vel_logj': (39.529549965472405, 339.5735280353273, -0.9533465592727319),
    'convex3d_init': (99.88625187329922, 618.6730505629974, -1.799539718451772),
    'diffadam3d_ck0_u': (-173.47585818938734, 1021.5219829080642, 3.4238227225010327),
    'diffadam3d_ck0_grad': (6.9752341406474, 39.62518250352007, 0.9163508709947649),
    'diffadam3d_ck3_u': (-173.47585818938734, 1021.5219829080642, 3.4238227225010327),
    'diffadam3d_ck3_grad': (1083.177457900989, 615515.0574300484, 548.9870350377482),
    'diffadam3d_ck3_path': (-334.23867683369014, 1829.3485620041997, 0.5101875589481699),
}

LRS = (0.7, 0.5, 0.9, 0.3, 0.2, 0.4, 0.1)
CASES = {
    (12, 10): (1.3, -0.7),
    (8, 7, 6): (0.9, -0.6, 0.4),
}


def _grid(shape: tuple[int, ...]) -> list[torch.Tensor]:
    return list(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))


def _pair(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth analytic 3-channel features ``(1, 3, *S)``: fixed, and the same shifted by ``CASES[shape]``."""
    ax = _grid(shape)

    def img(shift):
        v = sum(torch.sin(0.45 * (a + s) + 0.3 * i) for i, (a, s) in enumerate(zip(ax, shift)))
        w = sum(torch.cos(0.21 * (a - s) * (i + 1)) for i, (a, s) in enumerate(zip(ax, shift)))
        return torch.stack([v, v * w, torch.tanh(w)])[None]

    return img([0.0] * len(shape)), img(CASES[shape])


def _init(shape: tuple[int, ...]) -> torch.Tensor:
    return 0.3 * torch.stack([torch.sin(0.5 * a) for a in _grid(shape)])[None]


def _summary(t: torch.Tensor) -> tuple[float, float, float]:
    t = t.to(torch.float64).flatten()
    w = torch.cos(0.37 * torch.arange(t.numel(), dtype=torch.float64))
    return float(t.sum()), float(t.pow(2).sum()), float((t * w).sum())


def _check(key: str, t: torch.Tensor) -> None:
    got, ref = _summary(t), REFERENCE[key]
    for g, r in zip(got, ref):
        assert abs(g - r) <= 1e-12 * max(1.0, abs(r), ref[1] ** 0.5), (key, got, ref)


def _name(shape: tuple[int, ...]) -> str:
    return f"{len(shape)}d"


@pytest.mark.parametrize("shape", list(CASES), ids=_name)
def test_adam_stepper_reproduces_the_recorded_fields(shape):
    f, m = _pair(shape)
    fm = (_grid(shape)[0] > 1).to(torch.float64)[None, None]
    init = _init(shape)
    cases = {
        "plain": {},
        "init_unit": {"init": init, "step_unit": 0.5},
        "velocity": {"init": init, "velocity_steps": 3},
        "logj": {"logj_weight": 0.4, "smooth_passes": 1},
        "mask": {"fixed_mask": fm, "moving_mask": fm.flip(-1)},
        "lncc": {"extra": ImageLNCC(f, m, 1, stride=1, radius=1, weight=0.8), "weight": 3.0},
        "noweight": {"extra": ImageLNCC(f, m, 1, stride=1, radius=1), "weight": 0.0, "velocity_steps": 2},
    }
    for name, kw in cases.items():
        u = adam_optimise(f, m, 1, iterations=7, schedule=ValuesLR(LRS), diffusion_weight=0.9, **kw)
        _check(f"adam{_name(shape)}_{name}", u)


@pytest.mark.parametrize("shape", list(CASES), ids=_name)
def test_adamio_and_convexadam_reproduce_the_recorded_fields(shape):
    f, m = _pair(shape)
    batch = {"fixed": f[:, :1], "moving": m[:, :1]}
    n = _name(shape)
    _check(f"adamio{n}", AdamIO(preset="constant", iterations=6, diffusion_weight=1.1).register(batch))
    _check(f"adamio{n}_piecewise", AdamIO(iterations=5, schedule=PiecewiseLR.compressed(5)).register(batch))
    cx = {"grid_sp": 2, "disp_hw": 1, "iterations": 6, "lr": [1.0, 0.5, 0.8], "smooth_passes": 2,
          "diffusion_weight": 0.7}
    _check(f"convex{n}", ConvexAdam(**cx).register(batch))
    _check(f"convex{n}_lncc_vel_logj", ConvexAdam(**cx, lncc_weight=1.0, lncc_radius=1, lncc_stride=1,
                                                   velocity_steps=2, logj_weight=0.3).register(batch))
    _check(f"convex{n}_init", ConvexAdam(**cx).register({**batch, "init_disp": _init(shape)}))


@pytest.mark.parametrize("shape", list(CASES), ids=_name)
@pytest.mark.parametrize("checkpoint_every", [0, 3])
def test_functional_adam_reproduces_the_recorded_meta_gradient(shape, checkpoint_every):
    f, m = _pair(shape)
    init = _init(shape)
    lrs = torch.tensor(LRS, dtype=torch.float64, requires_grad=True)
    wts = torch.cos(torch.arange(init.numel(), dtype=torch.float64)).reshape(init.shape)
    u, path = differentiable_adam(f, m, 2, lrs, init=init, step_unit=0.5, checkpoint_every=checkpoint_every,
                                  return_path=True, diffusion_weight=0.9)
    loss = (u * wts).sum() + sum((p * wts).pow(2).sum() for p in path)
    (grad,) = torch.autograd.grad(loss, lrs)
    key = f"diffadam{_name(shape)}_ck{checkpoint_every}"
    _check(f"{key}_u", u.detach())
    _check(f"{key}_grad", grad)
    if path:
        _check(f"{key}_path", torch.stack([p.detach() for p in path]))


def test_the_two_steppers_agree():
    """Same objective, same update: torch.optim.Adam and the functional Adam give the same field (float64)."""
    f, m = _pair((12, 10))
    kw = {"init": _init((12, 10)), "diffusion_weight": 0.9, "logj_weight": 0.2, "velocity_steps": 2}
    ref = adam_optimise(f, m, 2, iterations=7, schedule=ValuesLR(LRS), **kw)
    out = differentiable_adam(f, m, 2, torch.tensor(LRS, dtype=torch.float64), **kw)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_segmentation_dice_is_the_soft_dice_of_the_pooled_maps_warped_on_their_grid():
    """A constant field on the stride-4 grid, segmentations pooled to stride 2: the moving map is warped by
    const / 2 there; the soft Dice by its definition (explicit sums), in float64; a field that undoes a shift
    scores better than none."""
    from layers.grid import pool_to_grid
    from layers.warp import warp_image

    g = torch.Generator().manual_seed(3)
    fixed = torch.rand(1, 2, 16, 16, 16, generator=g, dtype=torch.float64)
    moving = torch.rand(1, 2, 16, 16, 16, generator=g, dtype=torch.float64)
    term = SegmentationDice(fixed, moving, 4, stride=2, weight=3.0)
    const = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1, 1)
    warped = warp_image(pool_to_grid(moving, 2), const.expand(1, 3, 8, 8, 8) / 2)
    f2 = pool_to_grid(fixed, 2)
    dice = [2 * (f2[0, k] * warped[0, k]).sum() / (f2[0, k].sum() + warped[0, k].sum()) for k in range(2)]
    torch.testing.assert_close(term(const.expand(1, 3, 4, 4, 4)), 3.0 * (1 - torch.stack(dice).mean()))

    blob = torch.zeros(1, 1, 16, 16, 16, dtype=torch.float64)
    blob[..., 4:10, 6:12, 2:8] = 1.0  # whole 2³ blocks: binary after pooling
    shifted = torch.roll(blob, 2, dims=-1)  # moving(x) = fixed(x - 2 along W): u_W = +2 undoes it
    shift = SegmentationDice(blob, shifted, 2, stride=2)
    u = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    undone = u.clone()
    undone[:, 2] = 2.0
    assert float(shift(undone)) < 1e-12 < float(shift(u))
    with pytest.raises(ValueError, match="multiple of stride"):
        SegmentationDice(fixed, moving, 4, stride=3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SegmentationDice(fixed, moving + 1, 4)
    with pytest.raises(ValueError, match="differ"):
        SegmentationDice(fixed, moving[:, :1], 4)

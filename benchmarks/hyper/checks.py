"""The measurements that ``report`` recomputes on every run (docs/design.md §5): the λ-hypergradient against
central differences, the instability cliff of the piecewise schedule, and the final TRE as a function of Adam's
first learning rate."""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.hyper.shared import batches, evaluate_adam, make_data
from layers.optim import PiecewiseLR, ValuesLR, schedule_values


def hypergrad_check() -> dict[str, Any]:
    """Relative error of the λ-hypergradient through K = 4 GN iterations vs central differences (float64)."""
    import torch.nn.functional as F

    from layers.gn import GNRegistration
    from layers.grid import identity_grid
    from layers.warp import warp_image

    g = torch.Generator().manual_seed(0)
    shape = (32, 32)
    moving = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    for _ in range(3):
        moving = F.avg_pool2d(moving, 5, 1, 2, count_include_pad=False)
    moving = (moving - moving.mean()) / moving.std()
    grid = identity_grid(shape, dtype=torch.float64)[0]
    truth = torch.stack([2 * torch.sin(math.pi * grid[1] / 32), 2 * torch.cos(math.pi * grid[0] / 32 + 1)])[
        None
    ]
    fixed = warp_image(moving, truth)
    gn = GNRegistration(4, 4, lam=(0.1, 0.02), solver={"rtol": 1e-12, "maxiter": 5000, "eps": 0.0})
    base = gn.lam.values().detach().double()
    w = torch.randn(1, 2, *shape, generator=g, dtype=torch.float64)

    def outer(log_lam: torch.Tensor) -> torch.Tensor:
        disp = gn(fixed, moving, lam=log_lam.exp()).disp
        return (w * disp).mean() + disp.pow(2).mean()

    log_lam = base.log().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(outer(log_lam), log_lam)
    rows = []
    for i in range(4):
        h = 1e-5
        plus, minus = log_lam.detach().clone(), log_lam.detach().clone()
        plus[i] += h
        minus[i] -= h
        fd = (float(outer(plus)) - float(outer(minus))) / (2 * h)
        rows.append(
            {
                "iteration": i,
                "autograd": float(grad[i]),
                "central_difference": fd,
                "rel_error": abs(float(grad[i]) - fd) / abs(fd),
            }
        )
    return {"rows": rows}


def cliff_check(steps: int = 30) -> list[tuple[float, float]]:
    """Meta-objective (final TRE, mm, 16 training pairs) of the piecewise schedule compressed to ``steps``,
    scaled by ``exp(h)``: the instability cliff next to it."""
    from lightning_modules.hyper.schedule import ScheduleMetaLearner

    dm = make_data(num_train=16, num_val=1, num_test=1)
    train = batches(dm, "train", 16)[0]
    pw = schedule_values(PiecewiseLR.compressed(steps), steps)
    module = ScheduleMetaLearner(preset="piecewise", steps=steps, baseline=[float(v) for v in pw])
    out = []
    with torch.no_grad():
        for h in (-0.3, -0.1, -0.03, 0.0, 0.01, 0.03, 0.1, 0.3):
            module.schedule.mlp[-1].bias.fill_(h)
            out.append((h, float(module.error(train, module.register(train)))))
    return out


def first_step_check(steps: int = 10, pairs: int = 64) -> list[tuple[float, float]]:
    """Final TRE (mm, ``pairs`` training pairs) of the piecewise schedule compressed to ``steps`` with only its
    first learning rate ``η_0`` replaced: Adam's first update is ``η_0 · sign(g)``, and the error is a sharp
    function of ``η_0`` (15 = one coarse voxel)."""
    from layers.optim import PRESETS

    unit = PRESETS["piecewise"].step_unit
    dm = make_data(num_train=pairs, num_val=1, num_test=1)
    train = batches(dm, "train")
    pw = schedule_values(PiecewiseLR.compressed(steps), steps)
    out = []
    for first in (7.5, 10.0, 12.0, 14.0, 15.0, 16.0, 17.0, 20.0):
        values = [first] + [float(v) for v in pw[1:]]
        out.append((first, evaluate_adam(ValuesLR(tuple(values)), steps, train, unit)["tre"]))
    return out

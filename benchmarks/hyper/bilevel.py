"""``bilevel``: bilevel λ for LearnGN (``BilevelLearnGN``, docs/design.md §5) at three noise levels, checked
against a 20-point λ grid, and the runs without / with the regularity guard (σ = 0.15). Writes
``hyper_bilevel.{json,png}``; :func:`fit_bilevel` and :func:`outer_on` serve ``guard`` too."""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch
from lightning.pytorch import seed_everything

from benchmarks.hyper.plots import plot_bilevel
from benchmarks.hyper.shared import INVOCATION, LambdaTrace, batches, make_data, mean_metrics, trainer, write_json
from data.datamodule import RegistrationDataModule
from data.evaluation.metrics import pair_metrics

log = logging.getLogger("benchmarks.hyper")

#: the LearnGN settings of every bilevel run (and, with other λ, of the amortised comparison)
BILEVEL_COMMON = {
    "features": "intensity",
    "iterations": 5,
    "stride": 4,
    "lam_start": 0.003,
    "lam_end": 0.0015,
    "hidden": 0,
    "w_label": 1.0,
    "label_loss": "mse",
    "lr": 3e-3,
}

#: the guard variants: (name, BilevelLearnGN settings) with the regularity guard's weight of ``bilevel``
GUARDS = (
    ("no_guard", {"outer_guard": "none"}),
    ("diffusion", {"outer_guard": "diffusion"}),
    ("negjac", {"outer_guard": "negjac", "w_guard": 10.0, "guard_margin": 0.1}),
)


def bench_bilevel(args: argparse.Namespace) -> dict:
    """Learn λ with learned and handcrafted heads at three noise levels; then the guard runs at σ = 0.15."""
    t0 = time.time()
    noises = [0.02, 0.15, 0.4]
    epochs = args.epochs or (3 if args.quick else 25)
    sizes = bilevel_sizes(args.quick)
    hyper = {
        "lam_mode": "scalar",
        "hyper_lr": args.lr or 0.1,
        "hyper_warmup": 4,
        "hyper_every": 1,
        "outer_guard": "diffusion",
        "w_guard": 1.0,
    }
    grid = [float(v) for v in torch.logspace(-4, -1, 20)]
    out: dict[str, Any] = {
        "noises": noises,
        "epochs": epochs,
        "sizes": sizes,
        "common": BILEVEL_COMMON,
        "hyper": hyper,
        "grid": grid,
        "runs": {},
    }
    for noise in noises:
        dm = make_data(noise, **sizes)
        test = batches(dm, "test")
        run: dict[str, Any] = {}
        for name, extra in (("learned", {}), ("handcrafted", {"train_network": False})):
            model, trace = fit_bilevel(dm, epochs, **hyper, **extra)
            lam = float(model.lam_values()[0])
            at_learned = outer_on(model, test)
            at_grid = [outer_on(model, test, g)["outer"] for g in grid]
            best = min(range(len(grid)), key=lambda i: at_grid[i])
            run[name] = {
                "lam": lam,
                "trace": trace,
                "test": at_learned,
                "grid_outer": at_grid,
                "grid_best_lam": grid[best],
                "grid_best_outer": at_grid[best],
                "gap": at_learned["outer"] / at_grid[best] - 1.0,
            }
            log.info(
                "noise %.2f %s: λ = %.4g, outer %.4f, grid best λ = %.4g (%.4f), gap %.2f %%",
                noise,
                name,
                lam,
                at_learned["outer"],
                grid[best],
                at_grid[best],
                100 * run[name]["gap"],
            )
        out["runs"][str(noise)] = run
    # the guard: start above the Dice optimum, learn λ with and without the regularity guard
    dm = make_data(0.15, **sizes)
    test = batches(dm, "test")
    out["guard"] = {}
    for name, guard in GUARDS:
        model, trace = fit_bilevel(dm, epochs, **{**hyper, **guard, "lam_init": 0.01})
        out["guard"][name] = {
            "lam": float(model.lam_values()[0]),
            "trace": trace,
            "test": outer_on(model, test),
            "settings": guard,
        }
    out["folding_threshold"] = 0.01
    out["seconds"] = time.time() - t0
    out["command"] = f"{INVOCATION} bilevel{' --quick' if args.quick else ''}"
    plot_bilevel(out)
    write_json("bilevel", out)
    return out


def bilevel_sizes(quick: bool) -> dict[str, int]:
    """The split sizes of the bilevel and guard runs (train, hyper, val, test; batch size)."""
    return {
        "num_train": 8 if quick else 16,
        "num_hyper": 4 if quick else 8,
        "num_val": 1,
        "num_test": 8 if quick else 16,
        "batch_size": 4,
    }


def fit_bilevel(dm: RegistrationDataModule, epochs: int, **kw: Any) -> tuple[Any, list[float]]:
    """A ``BilevelLearnGN`` (:data:`BILEVEL_COMMON` updated by ``kw``) fitted for ``epochs``, and its λ trace."""
    from lightning_modules.hyper import BilevelLearnGN

    seed_everything(0)
    model = BilevelLearnGN(**{**BILEVEL_COMMON, **kw})
    trace = LambdaTrace()
    trainer(max_epochs=epochs, callbacks=[trace]).fit(model, datamodule=dm)
    return model, trace.values


def outer_on(model: Any, test: list[dict], lam: float | None = None, w_guard: float = 1.0) -> dict[str, float]:
    """Held-out outer loss (soft-Dice loss + w_guard·diffusion) and metrics of ``model`` at first-iteration
    ``lam`` (None: the model's own λ)."""
    from layers.losses import outer_loss
    from lightning_modules.hyper.lam_selection import run_with_log_lam

    losses, records = [], []
    model.eval()
    with torch.no_grad():
        for b in test:
            if lam is None:
                u = model.register(b)
            else:
                u = run_with_log_lam(model, b, torch.tensor(math.log(lam)))
            terms = outer_loss(b, u, guard="diffusion", w_guard=w_guard)
            losses.append(float(sum(terms.values())) * b["fixed"].shape[0])
            records.append(pair_metrics(b, u, hd95=False))
    out = mean_metrics(records)
    out["outer"] = sum(losses) / sum(b["fixed"].shape[0] for b in test)
    return out

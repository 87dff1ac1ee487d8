"""``amortised``: the λ-conditioned hypernetwork (``HyperLearnGN``, docs/design.md §5): smoothness along a λ
sweep, Dice against LearnGN models trained at fixed λ, and test-time λ selection (gradient descent vs sweep).
Writes ``hyper_amortised.{json,png}``."""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch
from lightning.pytorch import seed_everything

from benchmarks.hyper.bilevel import BILEVEL_COMMON
from benchmarks.hyper.plots import plot_amortised
from benchmarks.hyper.shared import INVOCATION, batches, make_data, mean_metrics, trainer, write_json
from data.evaluation.metrics import pair_metrics

log = logging.getLogger("benchmarks.hyper")

AMORTISED_REF = 0.003  # λ_ref: the reference schedule starts there; w_reg applies at λ_ref


def bench_amortised(args: argparse.Namespace) -> dict:
    """Train one hypernetwork over the λ range and fixed-λ LearnGN models at three λ; compare and select λ."""
    from lightning_modules.hyper import HyperLearnGN, select_lambda
    from lightning_modules.learngn import LearnGN

    t0 = time.time()
    epochs = args.epochs or (2 if args.quick else 30)
    sizes = {
        "num_train": 8 if args.quick else 16,
        "num_val": 4 if args.quick else 8,
        "num_test": 8 if args.quick else 16,
        "batch_size": 4,
    }
    noise, w_reg = 0.1, 0.1
    common = {**BILEVEL_COMMON, "lam_start": AMORTISED_REF, "lam_end": AMORTISED_REF / 2, "lr": 1e-3}
    lam_min, lam_max = 3e-4, 3e-2
    dm = make_data(noise, **sizes)
    test, val = batches(dm, "test"), batches(dm, "val")
    seed_everything(0)
    hyper = HyperLearnGN(
        lam_min=lam_min, lam_max=lam_max, w_reg=w_reg, reg_scaling=True, anneal=True, **common
    )
    trainer(max_epochs=2 * epochs).fit(
        hyper, datamodule=dm
    )  # one model for the whole range: twice the epochs
    sweep = [float(v) for v in torch.logspace(math.log10(lam_min), math.log10(lam_max), 9)]
    along = [smoothness(hyper, test, lam) for lam in sweep]
    compare = {}
    for lam in (1e-3, 3e-3, 1e-2):
        seed_everything(0)
        fixed = LearnGN(
            **{**common, "lam_start": lam, "lam_end": lam / 2, "w_reg": w_reg * lam / AMORTISED_REF}
        )
        trainer(max_epochs=epochs).fit(fixed, datamodule=dm)
        hand = LearnGN(**{**common, "lam_start": lam, "lam_end": lam / 2})
        compare[str(lam)] = {
            "hyper": smoothness(hyper, test, lam),
            "fixed": smoothness(fixed, test, lam),
            "handcrafted": smoothness(hand, test, lam),
        }
        log.info(
            "λ = %.4g: Dice hyper %.4f, fixed %.4f, handcrafted %.4f",
            lam,
            compare[str(lam)]["hyper"]["dice"],
            compare[str(lam)]["fixed"]["dice"],
            compare[str(lam)]["handcrafted"]["dice"],
        )
    selected = {}
    for start in (lam_min, lam_max):  # gradient descent from both ends of the range
        choice = select_lambda(
            hyper, val, steps=30, lr=0.15, sweep_points=9, max_batches=None, lam_init=start
        )
        selected[f"from {start:g}"] = {
            "lam": choice.lam,
            "source": choice.source,
            "lam_gd": choice.lam_gd,
            "loss_gd": choice.loss_gd,
            "lam_sweep": choice.lam_sweep,
            "loss_sweep": choice.loss_sweep,
            "sweep": choice.sweep,
            "trace": choice.trace,
            "test_at_gd": smoothness(hyper, test, choice.lam_gd),
            "test_at_sweep": smoothness(hyper, test, choice.lam_sweep),
        }
    out = {
        "epochs": epochs,
        "hyper_epochs": 2 * epochs,
        "anneal": True,
        "sizes": sizes,
        "noise": noise,
        "w_reg": w_reg,
        "lam_ref": AMORTISED_REF,
        "range": [lam_min, lam_max],
        "common": common,
        "sweep": sweep,
        "along": along,
        "compare": compare,
        "selection": selected,
        "seconds": time.time() - t0,
        "command": f"{INVOCATION} amortised{' --quick' if args.quick else ''}",
    }
    plot_amortised(out)
    write_json("amortised", out)
    return out


def smoothness(model: Any, test: list[dict], lam: float) -> dict[str, float]:
    """Diffusion of the field (voxel², lower = smoother) and the metrics of ``model`` at first-iteration λ."""
    from layers.losses import regularity_loss
    from lightning_modules.hyper.lam_selection import run_with_log_lam

    diffs, records = [], []
    model.eval()
    with torch.no_grad():
        for b in test:
            u = run_with_log_lam(model, b, torch.tensor(math.log(lam)))
            diffs.append(float(regularity_loss(u)))
            records.append(pair_metrics(b, u, hd95=False))
    out = mean_metrics(records)
    out["diffusion"] = sum(diffs) / len(diffs)
    return out

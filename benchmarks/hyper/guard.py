"""``guard``: the regularity-guard runs of ``bilevel`` again at low noise (σ = 0.02), longer, λ started at the
reference 0.003: Dice-only outer loss vs the two guards (docs/design.md §5). Writes ``hyper_guard.json``."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from benchmarks.hyper.bilevel import bilevel_sizes, fit_bilevel, outer_on
from benchmarks.hyper.shared import INVOCATION, batches, make_data, write_json

log = logging.getLogger("benchmarks.hyper")

#: (name, BilevelLearnGN settings): the diffusion guard with its weight spelled out
GUARDS = (
    ("no_guard", {"outer_guard": "none"}),
    ("diffusion", {"outer_guard": "diffusion", "w_guard": 1.0}),
    ("negjac", {"outer_guard": "negjac", "w_guard": 10.0, "guard_margin": 0.1}),
)


def bench_guard(args: argparse.Namespace) -> dict:
    """Low noise (σ = 0.02), λ started at the reference 0.003: Dice-only outer loss vs the two guards."""
    t0 = time.time()
    epochs = args.epochs or (3 if args.quick else 50)
    sizes = bilevel_sizes(args.quick)
    hyper = {"lam_mode": "scalar", "hyper_lr": args.lr or 0.1, "hyper_warmup": 4, "hyper_every": 1}
    dm = make_data(0.02, **sizes)
    test = batches(dm, "test")
    out: dict[str, Any] = {
        "noise": 0.02,
        "epochs": epochs,
        "sizes": sizes,
        "hyper": hyper,
        "runs": {},
        "folding_threshold": 0.01,
    }
    for name, guard in GUARDS:
        model, trace = fit_bilevel(dm, epochs, **{**hyper, **guard})
        out["runs"][name] = {
            "lam": float(model.lam_values()[0]),
            "trace": trace,
            "test": outer_on(model, test),
            "settings": guard,
        }
        log.info(
            "guard %s: λ = %.4g, folding %.4f",
            name,
            out["runs"][name]["lam"],
            out["runs"][name]["test"]["folding"],
        )
    out["seconds"] = time.time() - t0
    out["command"] = f"{INVOCATION} guard{' --quick' if args.quick else ''}"
    write_json("guard", out)
    return out

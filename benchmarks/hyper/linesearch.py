"""``linesearch``: the exact full-batch meta-gradient of the AdamIO schedule at the best training constant and
the training TRE along the descent direction: is the meta-gradient useful, and how far? (docs/design.md §5).
Writes ``hyper_linesearch_T<steps>[_m<magnitude>].json``."""

from __future__ import annotations

import argparse

import torch

from benchmarks.hyper.shared import INVOCATION, batches, best_constant, evaluate_adam, make_data, write_json
from layers.optim import ValuesLR


def bench_linesearch(args: argparse.Namespace) -> dict:
    """:func:`line_search` with the options of the command line, written to its JSON file."""
    out = line_search(args.steps or 10, args.train_pairs or 32, args.magnitude)
    write_json(f"linesearch_T{out['steps']}" + ("" if args.magnitude == 0.15 else f"_m{args.magnitude:g}"), out)
    return out


def line_search(steps: int = 10, pairs: int = 32, magnitude: float = 0.15) -> dict:
    """The exact meta-gradient at the best training constant, and the final TRE on the same training pairs
    along the normalised descent direction ``log η − ε ∇/|∇|`` (through the real AdamIO loop): whether the
    gradient is useful and how far."""
    from layers.optim import PRESETS
    from lightning_modules.hyper.schedule import ScheduleMetaLearner

    unit = PRESETS["piecewise"].step_unit
    dm = make_data(num_train=pairs, num_val=1, num_test=1, magnitude=magnitude)
    train = batches(dm, "train")
    best, _ = best_constant(steps, train, unit)
    base = torch.full((steps,), float(best), dtype=torch.float64)
    module = ScheduleMetaLearner(preset="piecewise", steps=steps, baseline=[float(v) for v in base], outer="tre")
    log_lr = base.log().clone().requires_grad_()
    total = 0.0
    for b in train:
        err = module.error(b, module.unrolled(b, log_lr.exp())) * b["fixed"].shape[0] / pairs
        err.backward()
        total += float(err.detach())
    grad = log_lr.grad.detach().clone()
    direction = -grad / grad.norm()
    along = []
    for eps in (0.0, 0.05, 0.1, 0.2, 0.4):
        values = (base.log() + eps * direction).exp()
        along.append((eps, evaluate_adam(ValuesLR(tuple(float(v) for v in values)), steps, train, unit)["tre"]))
    return {"steps": steps, "pairs": pairs, "constant": best, "meta_loss": total,
            "gradient": [float(v) for v in grad], "along": along,
            "magnitude": magnitude,
            "command": f"{INVOCATION} linesearch --steps {steps}"
            + (f" --magnitude {magnitude}" if magnitude != 0.15 else "")}

"""``schedule``: meta-learn the AdamIO learning-rate schedule (``ScheduleMetaLearner``, docs/design.md §5) and
compare it on held-out pairs with the piecewise schedule and a grid of constant learning rates at the same step
count. Writes ``hyper_schedule_T<steps>[_<tag>].{json,png,pt}``."""

from __future__ import annotations

import argparse
import time

import torch
from lightning.pytorch import seed_everything

from benchmarks.common import RESULTS
from benchmarks.hyper.plots import plot_schedule
from benchmarks.hyper.shared import (
    INVOCATION,
    BestOnValidation,
    LossTrace,
    batches,
    best_constant,
    compare_with_references,
    evaluate_adam,
    make_data,
    trainer,
    write_json,
)
from layers.optim import PiecewiseLR, ValuesLR, schedule_values


def bench_schedule(args: argparse.Namespace) -> dict:
    """Meta-train the schedule network from its baseline, export it, evaluate it against the references."""
    from layers.optim import PRESETS
    from lightning_modules.hyper.schedule import ScheduleMetaLearner, adam_settings, save_schedule

    steps = args.steps or (60 if args.quick else 270)
    unit = PRESETS["piecewise"].step_unit
    seed_everything(0)
    train_pairs = 8 if args.quick else (args.train_pairs or 16)
    dm = make_data(num_train=train_pairs, num_val=args.val_pairs, num_test=8 if args.quick else args.test_pairs,
                   batch_size=args.batch_size, magnitude=args.magnitude)
    test = batches(dm, "test")
    val = batches(dm, "val")
    t0 = time.time()
    piecewise = PiecewiseLR.compressed(steps)
    pw_values = schedule_values(piecewise, steps)
    base_values = pw_values * args.baseline_scale
    train_constant = None
    if (args.baseline_constant or args.baseline_best) and args.baseline_scale != 1.0:
        raise SystemExit("--baseline-constant/--baseline-best and --baseline-scale exclude each other")
    if args.baseline_constant or args.baseline_best:
        # a tuned baseline: the best of the constants on the *training* pairs (the test pairs stay unseen)
        train = batches(dm, "train")
        train_constant, train_constant_tre = best_constant(steps, train, unit)
        base_values = torch.full((steps,), float(train_constant), dtype=torch.float64)
        if args.baseline_best and evaluate_adam(piecewise, steps, train, unit)["tre"] < train_constant_tre:
            base_values, train_constant = pw_values.clone(), None  # the piecewise schedule is better there
    model = ScheduleMetaLearner(
        preset="piecewise",
        steps=steps,
        baseline=[float(v) for v in base_values],
        outer=args.outer,
        w_path=0.2,
        checkpoint_every=max(1, min(15, steps // 3)),
        lr=args.lr or 0.01,
        max_log_delta=args.max_log_delta,
        n_freq=args.n_freq,
        frozen_steps=args.frozen_steps,
    )
    untrained = model.schedule_values().detach().clone()
    epochs = args.epochs or (3 if args.quick else 10)
    curve = LossTrace()
    callbacks = [curve]
    select = BestOnValidation(val, steps, unit) if args.select_on_val else None
    if select is not None:
        callbacks.append(select)
    trainer(max_epochs=epochs, gradient_clip_val=1.0, callbacks=callbacks).fit(model, datamodule=dm)
    name = f"schedule_T{steps}" + (f"_{args.tag}" if args.tag else "")
    path = save_schedule(model, RESULTS / f"hyper_{name}.pt")
    res_base = evaluate_adam(ValuesLR(tuple(float(v) for v in base_values)), steps, test, unit)
    settings = adam_settings(path)  # the exported schedule, as `eval.py --method adam --schedule` reads it
    res_learned = evaluate_adam(settings["schedule"], settings["iterations"], test,
                                settings.get("step_unit", unit), per_pair=True)
    refs = compare_with_references(res_learned, steps, test, unit)
    out = {
        "steps": steps,
        "name": name,
        "epochs": epochs,
        "step_unit": unit,
        "train_pairs": len(dm.datasets["train"]),
        "test_pairs": len(dm.datasets["test"]),
        "baseline": (f"constant {train_constant} (the best constant on the training pairs)"
                     if train_constant is not None else
                     ("piecewise" if steps == 270 else f"piecewise compressed to {steps} steps")
                     + (f" × {args.baseline_scale}" if args.baseline_scale != 1.0 else "")
                     + (" (better than the best constant on the training pairs)" if args.baseline_best else "")),
        "baseline_constant": train_constant,
        "baseline_values": [float(v) for v in base_values],
        "baseline_scale": args.baseline_scale,
        "untrained_equals_baseline": bool(torch.equal(untrained, base_values)),
        "constants": refs["constants"],
        "piecewise": refs["piecewise"],
        "learned": res_learned,
        "baseline_result": res_base,
        "paired": refs["paired"],
        "best_constant_test": refs["best_constant"],
        "learned_values": list(settings["schedule"].values),
        "piecewise_values": pw_values.tolist(),
        "meta_loss": curve.values,
        "n_freq": args.n_freq,
        "frozen_steps": args.frozen_steps,
        "outer": args.outer,
        "batch_size": args.batch_size,
        "selected_on_val": None if select is None else {
            "val_tre_untrained": select.untrained,
            "val_tre_per_epoch": select.history, "best_epoch": select.best[1], "best_val_tre": select.best[0],
            "val_pairs": sum(int(b["fixed"].shape[0]) for b in val),
        },
        "meta_lr": args.lr or 0.01,
        "max_log_delta": args.max_log_delta,
        "seconds": time.time() - t0,
        "command": schedule_command(args, steps),
    }
    plot_schedule(out)
    write_json(name, out)
    return out


def schedule_command(args: argparse.Namespace, steps: int) -> str:
    """The command line of a ``schedule`` run: the options that differ from their defaults."""
    return (
        f"{INVOCATION} schedule --steps {steps}{' --quick' if args.quick else ''}"
        + (f" --epochs {args.epochs}" if args.epochs else "")
        + (f" --lr {args.lr}" if args.lr else "")
        + (f" --max-log-delta {args.max_log_delta}" if args.max_log_delta != 3.0 else "")
        + (f" --baseline-scale {args.baseline_scale}" if args.baseline_scale != 1.0 else "")
        + (f" --train-pairs {args.train_pairs}" if args.train_pairs else "")
        + (f" --val-pairs {args.val_pairs}" if args.val_pairs != 8 else "")
        + (f" --magnitude {args.magnitude}" if args.magnitude != 0.15 else "")
        + (f" --test-pairs {args.test_pairs}" if args.test_pairs != 16 else "")
        + (f" --n-freq {args.n_freq}" if args.n_freq != 4 else "")
        + (f" --outer {args.outer}" if args.outer != "tre" else "")
        + (f" --batch-size {args.batch_size}" if args.batch_size != 4 else "")
        + (f" --frozen-steps {args.frozen_steps}" if args.frozen_steps else "")
        + (" --select-on-val" if args.select_on_val else "")
        + (" --baseline-constant" if args.baseline_constant else "")
        + (" --baseline-best" if args.baseline_best else "")
        + (f" --tag {args.tag}" if args.tag else "")
    )

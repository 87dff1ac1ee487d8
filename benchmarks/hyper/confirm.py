"""``confirm``: the learned schedule of a ``schedule`` run against the references on fresh pairs (data seed 1),
docs/design.md §5. Writes ``hyper_confirm_T<steps>.json``."""

from __future__ import annotations

import argparse
import time

from benchmarks.common import RESULTS
from benchmarks.hyper.shared import (
    INVOCATION,
    batches,
    compare_with_references,
    evaluate_adam,
    make_data,
    write_json,
)


def bench_confirm(args: argparse.Namespace) -> dict:
    """The learned schedule of ``hyper_schedule_T<steps>`` against the piecewise schedule and the 10 constants on
    *fresh* pairs (the test stream of data seed 1), which played no part in choosing the protocol: the schedule
    runs' test pairs (seed 0) were looked at while the recipe was developed, these were not."""
    from lightning_modules.hyper.schedule import adam_settings

    steps = args.steps or 10
    unit = 1.0 / 15.0
    source = RESULTS / f"hyper_schedule_T{steps}.pt"
    if not source.is_file():
        raise SystemExit(f"no learned schedule at {source}: run `schedule --steps {steps}` first")
    pairs = args.test_pairs
    dm = make_data(num_train=1, num_val=1, num_test=pairs, seed=1, magnitude=args.magnitude)
    test = batches(dm, "test")
    t0 = time.time()
    settings = adam_settings(source)
    learned = evaluate_adam(settings["schedule"], steps, test, settings.get("step_unit", unit), per_pair=True)
    out = {
        "steps": steps, "pairs": pairs, "data_seed": 1, "schedule_file": source.name,
        "learned": learned, **compare_with_references(learned, steps, test, unit),
        "seconds": time.time() - t0,
        "command": f"{INVOCATION} confirm --steps {steps} --test-pairs {pairs}",
    }
    write_json(f"confirm_T{steps}", out)
    return out

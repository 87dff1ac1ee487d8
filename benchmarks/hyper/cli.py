"""The command line of :mod:`benchmarks.hyper` (docs/design.md §5): one positional subcommand and the options
of all of them (each subcommand reads the ones it documents)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import shlex
import warnings

import torch

import benchmarks.hyper
from benchmarks.hyper.shared import INVOCATION, OLD_INVOCATION

log = logging.getLogger("benchmarks.hyper")

#: subcommand -> (module of benchmarks.hyper, function)
SUBCOMMANDS = {
    "schedule": ("schedule", "bench_schedule"),
    "bilevel": ("bilevel", "bench_bilevel"),
    "guard": ("guard", "bench_guard"),
    "amortised": ("amortised", "bench_amortised"),
    "linesearch": ("linesearch", "bench_linesearch"),
    "confirm": ("confirm", "bench_confirm"),
    "report": ("report", "report"),
}


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv``, run the subcommand, log its result's scalars."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    module, function = SUBCOMMANDS[args.what]
    fn = getattr(importlib.import_module(f"benchmarks.hyper.{module}"), function)
    result = fn(args)
    log.info(
        "%s done: %s",
        args.what,
        json.dumps({k: v for k, v in result.items() if not isinstance(v, list)})[:2000],
    )


def current_command(recorded: str) -> str:
    """A command recorded in a JSON result as it is typed today: ``python benchmarks/hyper.py ...`` becomes
    ``python -m benchmarks.hyper ...`` when today's parser accepts all of its options; a command with options
    that have since been removed is returned as recorded (it runs from a checkout of its own commit)."""
    if not recorded.startswith(OLD_INVOCATION + " "):
        return recorded
    rest = recorded[len(OLD_INVOCATION) + 1:]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _, unknown = build_parser().parse_known_args(shlex.split(rest))
    except SystemExit:
        return recorded
    return recorded if unknown else f"{INVOCATION} {rest}"


def build_parser() -> argparse.ArgumentParser:
    """The parser: ``what`` (the subcommand) and the options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hyper", description=benchmarks.hyper.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=list(SUBCOMMANDS))
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="schedule: the horizon T (default 270)")
    parser.add_argument(
        "--baseline-scale", type=float, default=1.0, help="schedule: start from the piecewise schedule × this"
    )
    parser.add_argument(
        "--max-log-delta",
        type=float,
        default=3.0,
        help="schedule: bound on |log η − log η_baseline| (trust region)",
    )
    parser.add_argument(
        "--baseline-constant",
        action="store_true",
        help="schedule: start from the best of the constant learning rates on the training pairs",
    )
    parser.add_argument(
        "--baseline-best",
        action="store_true",
        help="schedule: start from the better (on the training pairs) of the best constant and the piecewise",
    )
    parser.add_argument("--magnitude", type=float, default=0.15,
                        help="schedule/linesearch: largest synthetic displacement, fraction of the image size")
    parser.add_argument("--val-pairs", type=int, default=8, help="schedule: validation pairs (selection)")
    parser.add_argument("--test-pairs", type=int, default=16, help="schedule: held-out test pairs")
    parser.add_argument("--train-pairs", type=int, default=None, help="schedule: training pairs (default 16)")
    parser.add_argument("--n-freq", type=int, default=4, help="schedule: Fourier frequencies of the network")
    parser.add_argument("--outer", default="tre", choices=["tre", "epe", "label", "mixed"],
                        help="schedule: meta-objective (held-out comparison is always by TRE)")
    parser.add_argument("--tag", default="", help="schedule: suffix of the result files (a variant run)")
    parser.add_argument("--frozen-steps", type=int, default=0,
                        help="schedule: the first steps keep the baseline learning rate (not learned)")
    parser.add_argument("--batch-size", type=int, default=4, help="schedule: training pairs per meta-step")
    parser.add_argument(
        "--select-on-val",
        action="store_true",
        help="schedule: keep the epoch whose schedule has the lowest TRE on the validation pairs",
    )
    parser.add_argument("--threads", type=int, default=1)
    return parser

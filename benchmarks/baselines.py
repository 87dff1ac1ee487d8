"""Benchmark of the evaluation-only baselines: accuracy, regularity and time per pair.

    python -m benchmarks.baselines                       # BrainPair (both directions) + 3 synthetic 3D pairs
    python -m benchmarks.baselines --threads 2 --synthetic 3 --methods identity gn adam convexadam

Runs identity, handcrafted GN, AdamIO (both presets) and ConvexAdam on

* BrainPair (``../shared/data/BrainPair``, or ``$L2O_SHARED_DATA/BrainPair``): 0001←0002 and 0002←0001,
  Dice over the 30 labels of the dataset JSON, read with :class:`data.learn2reg.Learn2RegDataset`; skipped
  with a message when the folder is absent;
* a few synthetic 3D pairs of :class:`data.synthetic.SyntheticPairs` (the embedded default data).

Every number comes from :func:`data.evaluation.metrics.pair_metrics`. Seconds are wall-clock around
``register`` only (no I/O, no metrics), CPU seconds the process time over the same span (with a busy machine
the CPU time is the steadier measure). The table is written to ``benchmarks/results/baselines.md`` with the
command, the machine, the thread count and the load average.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.common import REPO, RESULTS, as_batch, load_average, machine, now, shared_data_root, write_page
from data.evaluation.metrics import pair_metrics
from data.synthetic import SyntheticPairs
from lightning_modules.baselines import make_baseline

log = logging.getLogger("benchmarks.baselines")


def recipe(name: str) -> dict[str, Any]:
    """The ``init_args`` of ``configs/baselines/<name>.yaml`` (the one place a baseline recipe is written)."""
    return dict(yaml.safe_load((REPO / "configs" / "baselines" / f"{name}.yaml").read_text())["init_args"])


#: (row label, method name, init arguments)
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("identity", "identity", {}),
    ("handcrafted GN (MIND, defaults: full resolution, stride 4, λ 0.3→0.03)", "gn", {}),
    ("handcrafted GN (MIND pooled ×2, stride 4, λ 1→0.1; gn_mind.yaml)", "gn",
     {"feature_stride": 2, "lam": (1.0, 0.1)}),
    ("handcrafted GN, compositive updates (MIND pooled ×2, λ 1→0.3, 25 it; gn_compose.yaml)", "gn",
     {"feature_stride": 2, "lam": (1.0, 0.3), "iterations": 25, "update": "compose"}),
    ("AdamIO piecewise (270 it)", "adam", {"preset": "piecewise"}),
    ("AdamIO constant (100 it)", "adam", {"preset": "constant"}),
    ("ConvexAdam", "convexadam", {}),
    ("ConvexAdam, 40 Adam iterations", "convexadam", {"iterations": 40}),
    ("ConvexAdam, λ 2.5, 60 Adam iterations (smoother)", "convexadam", {"diffusion_weight": 2.5, "iterations": 60}),
    ("ConvexAdam + diffeomorphic LNCC Adam stage (r 3 at ½ res, stride-4 SVF, λ 0.2, 60 it; convexadam_lncc.yaml)",
     "convexadam", recipe("convexadam_lncc")),
    ("ConvexAdam + diffeomorphic LNCC Adam stage with log-Jacobian term (r 5 at ½ res, ½-res SVF, μ 0.35, λ 0.2, "
     "22 it; convexadam_logj.yaml)",
     "convexadam", recipe("convexadam_logj")),
]
COLUMNS = ("dice", "dice30", "hd95", "sdlogj", "sdlogj_l2r", "folding")


def main(argv: list[str] | None = None) -> int:
    """Run the methods on the data sets and write the page."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--synthetic", type=int, default=3, help="number of synthetic 3D pairs (0: none)")
    parser.add_argument("--synthetic-size", type=int, default=64, help="synthetic volume edge (voxels)")
    parser.add_argument("--no-brainpair", action="store_true", help="skip BrainPair")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="subset of row methods by name (identity gn adam convexadam)")
    parser.add_argument("--out", type=Path, default=RESULTS / "baselines.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    load_start, started = load_average(), now()

    datasets: list[tuple[str, list[dict[str, Any]]]] = []
    if not args.no_brainpair:
        brain = brainpair_batches(shared_data_root("BrainPair"))
        if brain:
            datasets.append(("BrainPair (160×192×224, 30 labels, both directions)", brain))
    if args.synthetic > 0:
        datasets.append((f"synthetic 3D ({args.synthetic} pairs, {args.synthetic_size}³, test stream)",
                         synthetic_batches(args.synthetic, args.synthetic_size)))
    methods = [m for m in METHODS if args.methods is None or m[1] in args.methods]

    command = " ".join(sys.argv[1:] if argv is None else argv)
    out: list[str] = [
        "# Baselines benchmark",
        "",
        f"Command: `python -m benchmarks.baselines {command}`",
        "",
        f"Machine: {machine()}; torch {torch.__version__}, `torch.set_num_threads({args.threads})`; "
        f"started {started}, load average at start {load_start} (1 / 5 / 15 min).",
        "",
        "Metrics from `data.evaluation.metrics.pair_metrics` (HD95 in mm with the image spacing; SDlogJ "
        "over the interior; folding = fraction of J ≤ 0). Seconds: wall clock around `register` only; "
        "CPU-s: process time over the same span.",
        "",
    ]
    for title, batches in datasets:
        results = []
        for label, name, kwargs in methods:
            model = make_baseline(name, **kwargs)
            results.append((label, run_method(model, batches)))
        out += [f"## {title}", "", *table(results, per_pair=False), ""]
        if len(batches) > 1 and title.startswith("BrainPair"):
            out += ["Per pair:", "", *table(results, per_pair=True), ""]
    out += [f"Finished {now()}; load average at the end {load_average()}.", ""]
    write_page(args.out, out)
    log.info("wrote %s", args.out)
    return 0


def brainpair_batches(root: Path) -> list[dict[str, Any]]:
    """The two BrainPair directions as batches, or ``[]`` (with a message) when the data is absent."""
    json_path = root / "BrainPair" / "BrainPair_dataset.json"
    if not json_path.exists():
        log.warning("BrainPair not found at %s: skipped (set L2O_SHARED_DATA)", json_path)
        return []
    from data.learn2reg import Learn2RegDataset

    ds = Learn2RegDataset(json_path, "registration_val", require_labels=True)
    return [as_batch(ds[i]) for i in range(len(ds))]


def synthetic_batches(count: int, size: int) -> list[dict[str, Any]]:
    """``count`` synthetic 3D pairs (``size``³, the generator's defaults, test stream)."""
    ds = SyntheticPairs(count, seed=0, shape=(size,) * 3, stream=2)
    return [as_batch(ds[i]) for i in range(len(ds))]


def run_method(model: torch.nn.Module, batches: Iterable[dict[str, Any]]) -> list[dict[str, float]]:
    """Register every batch; one row of metrics, ``seconds`` and ``cpu_seconds`` per pair."""
    rows = []
    for batch in batches:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            u = model.register(batch)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        metrics = pair_metrics(batch, u)
        row = {k: float(v[0]) for k, v in metrics.items()}
        row.update(seconds=seconds, cpu_seconds=cpu_seconds)
        row["pair"] = f"{batch['fixed_id'][0]}<-{batch['moving_id'][0]}"
        log.info("%s %s: %s", type(model).__name__, row["pair"],
                 {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        rows.append(row)
    return rows


def table(results: list[tuple[str, list[dict[str, float]]]], per_pair: bool) -> list[str]:
    """Markdown rows: one per method (means over pairs), or one per method and pair."""
    names = ["method"] + (["pair"] if per_pair else []) + [
        "Dice", "Dice30", "HD95 (mm)", "SDlogJ", "SDlogJ-L2R", "folding (%)", "s / pair", "CPU-s / pair"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for label, rows in results:
        groups = [(r["pair"], [r]) for r in rows] if per_pair else [("", rows)]
        for pair, rs in groups:
            cells = [label] + ([pair] if per_pair else [])
            fold = _mean(rs, "folding")
            cells += [_fmt(_mean(rs, "dice"), ".4f"), _fmt(_mean(rs, "dice30"), ".4f"),
                      _fmt(_mean(rs, "hd95"), ".2f"), _fmt(_mean(rs, "sdlogj"), ".3f"),
                      _fmt(_mean(rs, "sdlogj_l2r"), ".3f"), _fmt(None if fold is None else 100 * fold, ".3f"),
                      _fmt(_mean(rs, "seconds"), ".1f"), _fmt(_mean(rs, "cpu_seconds"), ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or value != value else format(value, spec)


def _mean(rows: list[dict[str, float]], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r and r[key] == r[key]]
    return sum(vals) / len(vals) if vals else None


if __name__ == "__main__":
    raise SystemExit(main())

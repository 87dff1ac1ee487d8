"""Probes of baseline settings (which settings reach Dice 0.72, and at what regularity?).

    python -m benchmarks.baseline_probes [--threads 2]

Each row is ``make_baseline(method, **settings)`` on both BrainPair directions (Dice over the 30 labels of the
dataset JSON; per direction and the mean), with the metrics of :func:`data.evaluation.metrics.pair_metrics`
(means over the two directions) and the wall-clock seconds of ``register``; then variants of the
``convexadam_logj.yaml`` recipe on 3 synthetic 3D pairs (64³, the benchmark's). Results in
``benchmarks/results/baseline_probes.md``. The BrainPair part is skipped with a message when the data is absent
(``../shared/data`` or ``$L2O_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from benchmarks.baselines import brainpair_batches, recipe, run_method, synthetic_batches
from benchmarks.common import RESULTS, load_average, now, shared_data_root, torch_threads, write_page
from lightning_modules.baselines import make_baseline

#: the convexadam_lncc.yaml and convexadam_logj.yaml recipes
LNCC_RECIPE, LOGJ_RECIPE = recipe("convexadam_lncc"), recipe("convexadam_logj")

#: (label, method, settings): less regularisation, finer grids, other MIND settings
PROBES: list[tuple[str, str, dict[str, Any]]] = [
    ("ConvexAdam (defaults)", "convexadam", {}),
    ("ConvexAdam, λ 0.5", "convexadam", {"diffusion_weight": 0.5}),
    ("ConvexAdam, 40 it, MIND dilation 1", "convexadam", {"iterations": 40, "mind_dilation": 1}),
    ("ConvexAdam, 40 it, MIND radius 2", "convexadam", {"iterations": 40, "mind_radius": 2}),
    ("ConvexAdam, 40 it, 2 smoothing passes", "convexadam", {"iterations": 40, "smooth_passes": 2}),
    ("GN, MIND ×2, λ 1→0.03, 15 it", "gn", {"feature_stride": 2, "lam": (1.0, 0.03), "iterations": 15}),
    ("GN, MIND ×2, λ 0.3→0.01, 20 it", "gn", {"feature_stride": 2, "lam": (0.3, 0.01), "iterations": 20}),
    ("GN, MIND ×2, stride 2, λ 1→0.1", "gn", {"feature_stride": 2, "stride": 2, "lam": (1.0, 0.1)}),
    # intensity LNCC (images at ½ resolution) in the Adam stage instead of / besides MIND
    ("ConvexAdam, 40 it, MIND + LNCC r 2", "convexadam", {"iterations": 40, "lncc_weight": 1.0, "lncc_radius": 2}),
    ("ConvexAdam, 40 it, LNCC r 3 only", "convexadam",
     {"iterations": 40, "weight": 0.0, "lncc_weight": 1.0, "lncc_radius": 3}),
    ("ConvexAdam, 40 it, LNCC r 3 only, stride-4 grid, λ 0.5", "convexadam",
     {"iterations": 40, "weight": 0.0, "lncc_weight": 1.0, "lncc_radius": 3, "adam_stride": 4,
      "diffusion_weight": 0.5}),
    ("ConvexAdam, LNCC r 3, stride-4 SVF (5 squarings), λ 0.2, 60 it (convexadam_lncc.yaml)", "convexadam",
     LNCC_RECIPE),
    # a log-Jacobian volume-change term (layers.diff.log_jacobian_energy) instead of more diffusion: the trade-off
    # between Dice and SDlogJ moves; then a finer (stride-2) velocity grid and larger LNCC windows
    ("same, + log-J term μ 0.3, 2 smoothing passes", "convexadam",
     {**LNCC_RECIPE, "logj_weight": 0.3, "smooth_passes": 2}),
    ("ConvexAdam, LNCC r 3, ½-res SVF (2 squarings), μ 0.3, λ 0.2, 2 passes, 22 it", "convexadam",
     {**LOGJ_RECIPE, "lncc_radius": 3, "logj_weight": 0.3}),
    ("same, LNCC r 5", "convexadam", {**LOGJ_RECIPE, "logj_weight": 0.3}),
    ("same, LNCC r 5, μ 0.35 (convexadam_logj.yaml)", "convexadam", LOGJ_RECIPE),
    ("same, LNCC r 5, no log-J term (λ 0.2)", "convexadam", {**LOGJ_RECIPE, "logj_weight": 0.0}),
    ("same, LNCC r 5, no log-J term, λ 1 (smoother by diffusion only)", "convexadam",
     {**LOGJ_RECIPE, "logj_weight": 0.0, "diffusion_weight": 1.0}),
    ("same, LNCC r 5, μ 0.35, 5 squarings", "convexadam", {**LOGJ_RECIPE, "velocity_steps": 5}),
]


#: (label, changes to LOGJ_RECIPE) on the synthetic 3D pairs: which part of the brain recipe fits 64³ phantoms
SYNTHETIC_PROBES: list[tuple[str, dict[str, Any]]] = [
    ("convexadam_logj.yaml", {}),
    ("without the log-J term", {"logj_weight": 0.0}),
    ("LNCC r 3", {"lncc_radius": 3}),
    ("LNCC r 2", {"lncc_radius": 2}),
    ("LNCC r 2, without the log-J term", {"lncc_radius": 2, "logj_weight": 0.0}),
    ("LNCC r 3 at full resolution", {"lncc_radius": 3, "lncc_stride": 1}),
    ("60 iterations", {"iterations": 60}),
    ("MIND instead of LNCC", {"weight": 12.0, "lncc_weight": 0.0}),
]


def main(argv: list[str] | None = None) -> int:
    """Run the probes and write the page."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_probes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "baseline_probes.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    batches = brainpair_batches(shared_data_root("BrainPair"))
    started = now()
    lines = [
        "# Baseline probes",
        "",
        f"Command: `python -m benchmarks.baseline_probes --threads {args.threads}`; {torch_threads(args.threads)}; "
        f"started {started}.",
        "",
    ]
    if batches:
        lines += [
            "## BrainPair, both directions",
            "",
            "Dice per direction and their mean; the other columns are means over the two directions.",
            "",
            "| setting | Dice 0001←0002 | Dice 0002←0001 | Dice | SDlogJ | SDlogJ-L2R | folding (%) | s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, method, settings in PROBES:
            rows = run_method(make_baseline(method, **settings), batches)
            per_direction = " | ".join(format(r["dice"], ".4f") for r in rows)
            lines.append(f"| {label} | {per_direction} | "
                         f"{_mean(rows, 'dice'):.4f} | {_mean(rows, 'sdlogj'):.3f} | {_mean(rows, 'sdlogj_l2r'):.3f} | "
                         f"{100 * _mean(rows, 'folding'):.3f} | {_mean(rows, 'seconds'):.1f} |")
    synthetic = synthetic_batches(3, 64)
    lines += [
        "",
        "## Synthetic 3D (3 pairs, 64³): variants of the convexadam_logj.yaml recipe",
        "",
        "| setting | Dice | TRE (mm) | SDlogJ | folding (%) | s |",
        "|---|---|---|---|---|---|",
    ]
    for label, changes in SYNTHETIC_PROBES:
        rows = run_method(make_baseline("convexadam", **{**LOGJ_RECIPE, **changes}), synthetic)
        lines.append(f"| {label} | {_mean(rows, 'dice'):.4f} | {_mean(rows, 'tre'):.3f} | "
                     f"{_mean(rows, 'sdlogj'):.3f} | "
                     f"{100 * _mean(rows, 'folding'):.3f} | {_mean(rows, 'seconds'):.2f} |")
    lines += ["", f"Load average at the end {load_average()}.", ""]
    write_page(args.out, lines)
    logging.getLogger("benchmarks.baseline_probes").info("wrote %s", args.out)
    return 0


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


if __name__ == "__main__":
    raise SystemExit(main())

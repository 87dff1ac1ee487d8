"""Probes of baseline settings on one BrainPair direction (issue 5: can any setting reach Dice 0.72?).

    python benchmarks/baseline_probes.py [--threads 2]

Each row is ``make_baseline(method, **settings)`` on BrainPair 0001←0002 (Dice over the 30 labels of the
dataset JSON), with the metrics of :func:`lightning_modules.metrics.pair_metrics` and the wall-clock seconds of
``register``; results in ``benchmarks/results/baseline_probes.md``. Skipped with a message when the data is
absent (``../shared/data`` or ``$L2O_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from baselines import brainpair_batches, run_method, shared_data_root  # noqa: E402

from lightning_modules.baselines import make_baseline  # noqa: E402

#: (label, method, settings): less regularisation, finer grids, other MIND settings
PROBES: list[tuple[str, str, dict[str, Any]]] = [
    ("ConvexAdam (defaults)", "convexadam", {}),
    ("ConvexAdam, λ 0.5", "convexadam", {"lam": 0.5}),
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
     {"iterations": 40, "weight": 0.0, "lncc_weight": 1.0, "lncc_radius": 3, "adam_stride": 4, "lam": 0.5}),
    ("ConvexAdam, LNCC r 3, stride-4 SVF (5 squarings), λ 0.2, 60 it (convexadam_lncc.yaml)", "convexadam",
     {"iterations": 60, "weight": 0.0, "lncc_weight": 1.0, "lncc_radius": 3, "adam_stride": 4,
      "velocity_steps": 5, "lam": 0.2}),
    # a log-Jacobian volume-change term (layers.diff.log_jacobian_energy) instead of more diffusion: the trade-off
    # between Dice and SDlogJ moves; then a finer (stride-2) velocity grid and larger LNCC windows
    ("same, + log-J term μ 0.3, 2 smoothing passes", "convexadam",
     {"iterations": 60, "weight": 0.0, "lncc_weight": 1.0, "lncc_radius": 3, "adam_stride": 4,
      "velocity_steps": 5, "lam": 0.2, "logj_weight": 0.3, "smooth_passes": 2}),
    ("ConvexAdam, LNCC r 3, ½-res SVF (2 squarings), μ 0.3, λ 0.2, 2 passes, 22 it", "convexadam",
     {"iterations": 22, "weight": 0.0, "lncc_weight": 1.0, "lncc_radius": 3, "adam_stride": 2,
      "velocity_steps": 2, "lam": 0.2, "logj_weight": 0.3, "smooth_passes": 2}),
    ("same, LNCC r 5", "convexadam",
     {"iterations": 22, "weight": 0.0, "lncc_weight": 1.0, "lncc_radius": 5, "adam_stride": 2,
      "velocity_steps": 2, "lam": 0.2, "logj_weight": 0.3, "smooth_passes": 2}),
    ("same, LNCC r 5, μ 0.35 (convexadam_logj.yaml)", "convexadam",
     {"iterations": 22, "weight": 0.0, "lncc_weight": 1.0, "lncc_radius": 5, "adam_stride": 2,
      "velocity_steps": 2, "lam": 0.2, "logj_weight": 0.35, "smooth_passes": 2}),
    ("same, LNCC r 5, μ 0.35, 5 squarings", "convexadam",
     {"iterations": 22, "weight": 0.0, "lncc_weight": 1.0, "lncc_radius": 5, "adam_stride": 2,
      "velocity_steps": 5, "lam": 0.2, "logj_weight": 0.35, "smooth_passes": 2}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "baseline_probes.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    batches = brainpair_batches(shared_data_root())[:1]
    if not batches:
        return 0
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        "# Baseline probes on BrainPair 0001←0002 (issue 5)",
        "",
        f"Command: `python benchmarks/baseline_probes.py --threads {args.threads}`; torch {torch.__version__}, "
        f"{args.threads} threads; started {started}.",
        "",
        "| setting | Dice | SDlogJ | SDlogJ-L2R | folding (%) | s |",
        "|---|---|---|---|---|---|",
    ]
    for label, method, settings in PROBES:
        row = run_method(make_baseline(method, **settings), batches)[0]
        lines.append(f"| {label} | {row['dice']:.4f} | {row['sdlogj']:.3f} | {row['sdlogj_l2r']:.3f} | "
                     f"{100 * row['folding']:.3f} | {row['seconds']:.1f} |")
    load = os.getloadavg()
    lines += ["", f"Load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    logging.getLogger("benchmarks.baseline_probes").info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

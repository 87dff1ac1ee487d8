"""Per-pair overhead of ``eval.py`` outside the registration (results: benchmarks/results/eval_overhead.md).

    python benchmarks/eval_overhead.py                      # BrainPair val (2 pairs), GN-MIND, 2 threads, 3 runs
    python benchmarks/eval_overhead.py --repeats 5 --threads 16 --accelerator gpu

Runs ``eval.py`` ``repeats`` times as a fresh process each (the real command, imports and all) and reports, per
stage of ``summary.json``'s ``timings`` (seconds per pair: ``load``, ``initial_metrics``, ``register``,
``metrics``, ``write``, ``total``, ``overhead`` = ``total - register``), the median over the runs of the mean
over the pairs. Needs ``../shared/data/BrainPair`` (skips with a message when it is absent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "BrainPair" / "BrainPair_dataset.json"
STAGES = ("load", "initial_metrics", "register", "metrics", "write", "total", "overhead")


def eval_overhead(data: str | Path = DATA, repeats: int = 3, threads: int = 2, accelerator: str = "cpu",
                  method_config: str = "configs/baselines/gn_mind.yaml") -> dict[str, list[float]]:
    """Run ``eval.py --method gn`` on the val split of ``data`` ``repeats`` times; return ``{stage: [seconds
    per pair of each run]}`` for :data:`STAGES` (the ``timings`` of each run's ``summary.json``)."""
    runs: dict[str, list[float]] = {k: [] for k in STAGES}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            out = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "eval.py", "--method", "gn", "--method-config", method_config, "--data",
                   str(data), "--split", "val", "--out", str(out), "--threads", str(threads), "--accelerator",
                   accelerator, "--overwrite"]
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            timings = json.loads((out / "summary.json").read_text())["timings"]
            for k in STAGES:
                runs[k].append(timings[k])
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        sys.stdout.write(f"skipped: {args.data} not found (the BrainPair data is not part of the repository)\n")
        return 0
    runs = eval_overhead(args.data, args.repeats, args.threads, args.accelerator)
    sys.stdout.write(f"| stage | median s/pair ({args.repeats} runs) | runs |\n|---|---|---|\n")
    for k, values in runs.items():
        sys.stdout.write(f"| {k} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

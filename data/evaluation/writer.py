"""Hold-out evaluation outputs (docs/design.md §9): a Lightning prediction writer and the summary files, and
:func:`synchronise`, the CUDA-synchronised time stamp that times every evaluation stage.

Output contract (other tools read it):

* ``<out>/summary.json`` = ``{"method", "n_pairs", "n_failed", "initial": {metric: mean}, "metrics": {metric:
  mean}, "timings": {stage: mean seconds}}`` with metric names :data:`SUMMARY_METRICS` and stage names
  :data:`TIMING_KEYS` plus ``overhead`` (``total - register``); a metric that does not apply is ``null``;
  timings average the registered pairs (``null`` when none);
* ``<out>/pairs.csv``: one row per pair with ``fixed``, ``moving``, ``status``, ``error`` and the metric names
  (after registration; ``initial_<metric>`` columns hold the values before) and ``timings_<stage>`` columns;
* ``<out>/summary.md``: the same as a table;
* ``<out>/disp/disp_<fixed>_<moving>.nii.gz``; ``<out>/figures/*.png``.

Every file is written when complete (:func:`data.io.atomic_write_bytes`: a hidden ``*.tmp`` temporary, then a
rename; the permissions the umask allows). Under DDP each rank writes its pairs' rows to
``<out>/.parts/rank<r>.json``; rank 0 merges them (dropping the duplicates a distributed sampler pads with)
after a barrier.

An output folder that already holds results is refused unless the run may overwrite them, in which case they
are cleared first (:func:`prepare_output`), so no stale displacement file or figure stays beside a new table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..io import atomic_write_bytes, remove_stale_temporaries, write_pair_displacement
from .figures import pair_figure
from .metrics import METRIC_NAMES

log = logging.getLogger(__name__)

__all__ = [
    "RESULT_FILES",
    "SUMMARY_METRICS",
    "TIMING_KEYS",
    "EvaluationWriter",
    "comparison_table",
    "existing_results",
    "prepare_output",
    "summarise",
    "synchronise",
    "write_outputs",
]

SUMMARY_METRICS: tuple[str, ...] = (*METRIC_NAMES, "seconds")

#: the stages timed per pair, in seconds (``timings`` of a record, ``summary.json``, ``timings_<stage>`` in
#: ``pairs.csv``): ``load`` waiting for the data loader (reading, preprocessing, collating, moving to the
#: device; the loader prefetches one batch, so a batch's wait holds the loading of the next one and only the
#: mean is exact per pair), ``initial_metrics`` the metrics of the identity, ``register`` the registration
#: (``seconds``), ``metrics`` the metrics after it, ``write`` copying the field to the host, writing its file
#: and the figure, ``total`` the wall time from the end of the previous batch (for the first, from the start
#: of the prediction loop) to the end of this one's writing; each is divided evenly over the pairs of a
#: batch. ``summary.json`` adds ``overhead`` = the mean of ``total - register``.
TIMING_KEYS: tuple[str, ...] = ("load", "initial_metrics", "register", "metrics", "write", "total")

#: the files of an evaluation directly under ``<out>``
RESULT_FILES: tuple[str, ...] = ("summary.json", "pairs.csv", "summary.md")


def synchronise(device: torch.device | str | None) -> float:
    """Wait for the work queued on ``device`` when it is a CUDA device (nothing otherwise), then return
    ``time.perf_counter()`` in seconds: a time stamp that includes the device's pending work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def existing_results(out: str | Path) -> list[Path]:
    """The results of an earlier evaluation in ``out``: :data:`RESULT_FILES`, ``disp/disp_*.nii.gz``,
    ``figures/*.png`` and ``.parts/`` (other files are not results of this project and are left alone)."""
    out = Path(out)
    found = [out / name for name in RESULT_FILES if (out / name).exists()]
    for sub, pattern in (("disp", "disp_*.nii.gz"), ("figures", "*.png")):
        if (out / sub).is_dir():
            found += sorted(p for p in (out / sub).glob(pattern) if not p.name.endswith(".tmp.png"))
    if (out / ".parts").exists():
        found.append(out / ".parts")
    return found


def prepare_output(out: str | Path, overwrite: bool = False, *, clear: bool = True) -> list[Path]:
    """Make ``out`` ready for a new evaluation and return the results of an earlier one that it held.

    Temporary files an interrupted run left (``.*.tmp``) are removed. If ``out`` holds results
    (:func:`existing_results`) and ``overwrite`` is False, ``FileExistsError`` names them and nothing is
    touched; with ``overwrite`` (and ``clear``) they are deleted, so the new run leaves no stale displacement
    file or figure beside its table. ``clear=False`` only checks.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    old = existing_results(out)
    if old and not overwrite:
        shown = ", ".join(str(p.relative_to(out)) for p in old[:4]) + (f" and {len(old) - 4} more" if len(old) > 4
                                                                       else "")
        raise FileExistsError(
            f"--out {out} already holds evaluation results ({shown}); pass --overwrite to replace them, or "
            "choose another folder"
        )
    if clear:
        remove_stale_temporaries([out, out / "disp", out / "figures", out / ".parts"])
        if (out / "figures").is_dir():  # the figure writer's own temporaries (figures.pair_figure)
            for p in (out / "figures").glob("*.tmp.png"):
                p.unlink(missing_ok=True)
        for p in old:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        if old:
            log.info("removed %d result files of an earlier run from %s", len(old), out)
    return old


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def summarise(method: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``summary.json`` dict of a list of pair records (see ``RegistrationModule.timed_register``)."""
    ok = [r for r in rows if r["status"] == "ok"]
    initial = {k: _mean([r["initial"].get(k, float("nan")) for r in rows]) for k in METRIC_NAMES}
    initial["seconds"] = None
    metrics = {k: _mean([r["metrics"].get(k, float("nan")) for r in ok]) for k in METRIC_NAMES}
    metrics["seconds"] = _mean([r["seconds"] for r in ok])
    timed = [r.get("timings", {}) for r in ok]
    timings = {k: _mean([t.get(k, float("nan")) for t in timed]) for k in TIMING_KEYS}
    timings["overhead"] = _mean([t.get("total", float("nan")) - t.get("register", float("nan")) for t in timed])
    return {"method": method, "n_pairs": len(rows), "n_failed": len(rows) - len(ok),
            "initial": initial, "metrics": metrics, "timings": timings}


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def comparison_table(summaries: Sequence[dict[str, Any]], include_initial: bool = True) -> str:
    """A markdown table of several ``summary.json`` dicts (one row per method, plus the initial values)."""
    head = "| method | pairs | failed | " + " | ".join(SUMMARY_METRICS) + " |"
    sep = "|" + "---|" * (3 + len(SUMMARY_METRICS))
    lines = [head, sep]
    if include_initial and summaries:
        s0 = summaries[0]
        lines.append(f"| initial | {s0['n_pairs']} | – | "
                     + " | ".join(_fmt(s0["initial"].get(k)) for k in SUMMARY_METRICS) + " |")
    for s in summaries:
        lines.append(f"| {s['method']} | {s['n_pairs']} | {s['n_failed']} | "
                     + " | ".join(_fmt(s["metrics"].get(k)) for k in SUMMARY_METRICS) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str | Path, method: str, rows: Sequence[dict[str, Any]], note: str = "") -> dict[str, Any]:
    """Write ``pairs.csv``, ``summary.json`` and ``summary.md`` under ``out``; return the summary."""
    out = Path(out)
    rows = sorted(rows, key=lambda r: (r["fixed"], r["moving"]))
    summary = summarise(method, rows)
    buf = io.StringIO()
    fields = ["fixed", "moving", "status", "error", *SUMMARY_METRICS, *[f"initial_{k}" for k in METRIC_NAMES],
              *[f"timings_{k}" for k in TIMING_KEYS]]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        row = {"fixed": r["fixed"], "moving": r["moving"], "status": r["status"], "error": r["error"],
               "seconds": r["seconds"] if r["status"] == "ok" else ""}
        for k in METRIC_NAMES:
            v = r["metrics"].get(k)
            row[k] = "" if v is None or not math.isfinite(v) else v
            v0 = r["initial"].get(k)
            row[f"initial_{k}"] = "" if v0 is None or not math.isfinite(v0) else v0
        for k in TIMING_KEYS:
            t = r.get("timings", {}).get(k)
            row[f"timings_{k}"] = "" if t is None or not math.isfinite(t) else t
        writer.writerow(row)
    _atomic_write(out / "pairs.csv", buf.getvalue())
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    md = f"# Evaluation of `{method}`\n\n{note}\n" + comparison_table([summary])
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        md += "\nFailed pairs:\n\n" + "".join(f"- {r['fixed']} ← {r['moving']}: {r['error']}\n" for r in failed)
    _atomic_write(out / "summary.md", md)
    return summary


class EvaluationWriter(BasePredictionWriter):
    """Writes displacement files and figures as pairs are predicted, and the summary files at the end.

    Args:
        out: output folder.
        method: method name for the summary.
        n_figures: figures for the first ``n_figures`` pairs (by dataset index).
        half: store displacement files as 16-bit (see :func:`data.io.write_displacement`).
        write_disp: write ``disp/`` files.
    """

    def __init__(self, out: str | Path, method: str, n_figures: int = 3, half: bool = False,
                 write_disp: bool = True, note: str = "") -> None:
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.method = method
        self.n_figures = n_figures
        self.half = half
        self.write_disp = write_disp
        self.note = note
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self._mark = self._batch_start = time.perf_counter()  # end of the previous batch; start of this one

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # before the prediction loop builds the loader, which loads the first batch at once
        self._mark = synchronise(pl_module.device)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start = synchronise(pl_module.device)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        indices = list(batch_indices) if batch_indices is not None else []
        count = max(len(prediction), 1)
        for i, rec in enumerate(prediction):
            start = time.perf_counter()  # the stacked pairs' records come first: record i is batch item i
            disp = rec.pop("disp", None)
            position = rec.pop("position", None)
            if rec["status"] == "ok" and disp is not None:
                try:
                    if self.write_disp:
                        affine = batch["affine"][i] if "affine" in batch else None
                        write_pair_displacement(self.out / "disp", disp, rec["fixed"], rec["moving"], affine,
                                                half=self.half)
                    idx = indices[position] if position is not None and position < len(indices) else None
                    if idx is not None and idx < self.n_figures:
                        pair_figure(
                            batch["fixed"][i].cpu(), batch["moving"][i].cpu(), disp,
                            self.out / "figures" / f"pair_{idx:03d}_{rec['fixed']}_{rec['moving']}.png",
                            batch["fixed_label"][i].cpu() if "fixed_label" in batch else None,
                            batch["moving_label"][i].cpu() if "moving_label" in batch else None,
                            title=f"{self.method}: fixed {rec['fixed']} ← moving {rec['moving']}  "
                                  f"Dice {rec['initial'].get('dice', float('nan')):.3f} → "
                                  f"{rec['metrics'].get('dice', float('nan')):.3f}",
                        )
                except Exception as exc:  # writing outputs of one pair must not stop the run
                    rec["status"], rec["error"] = "failed", f"writing outputs: {type(exc).__name__}: {exc}"
                    log.warning("pair %s/%s: %s", rec["fixed"], rec["moving"], rec["error"])
            timings = rec.setdefault("timings", {})
            timings["write"] = timings.get("write", 0.0) + time.perf_counter() - start
            timings["load"] = (self._batch_start - self._mark) / count
            self.rows.append(rec)
        end = synchronise(pl_module.device)
        for rec in self.rows[len(self.rows) - len(prediction):]:
            rec["timings"]["total"] = (end - self._mark) / count
        self._mark = end

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        rows = self.rows
        if trainer.world_size > 1:
            part = self.out / ".parts" / f"rank{trainer.global_rank}.json"
            _atomic_write(part, json.dumps(rows))
            trainer.strategy.barrier("evaluation-parts")
            if trainer.global_rank != 0:
                return
            merged: dict[tuple[str, str], dict[str, Any]] = {}
            for r in range(trainer.world_size):
                for row in json.loads((self.out / ".parts" / f"rank{r}.json").read_text()):
                    merged.setdefault((row["fixed"], row["moving"]), row)
            rows = list(merged.values())
        self.summary = write_outputs(self.out, self.method, rows, self.note)
        self.rows = []

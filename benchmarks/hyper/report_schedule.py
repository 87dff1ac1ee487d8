"""Section 4 of ``hyper.md``: the learned AdamIO schedules (``schedule``), their confirmation on fresh pairs
(``confirm``), the variant runs, the meta-gradient line searches (``linesearch``) and the instability cliff
(docs/design.md §5). Prose: ``templates/schedule.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, render
from benchmarks.hyper.checks import cliff_check, first_step_check
from benchmarks.hyper.cli import current_command
from benchmarks.hyper.plots import plot_schedule
from benchmarks.hyper.shared import INVOCATION

TEMPLATE = Path(__file__).with_name("templates") / "schedule.md"


def schedule_lines() -> list[str]:
    """The lines of section 4 (empty without ``schedule`` results); redraws the main schedules' figures."""
    mains = sorted((p for p in RESULTS.glob("hyper_schedule_T*.json") if is_main_schedule(p)), key=_steps)
    lines = _block("section") if mains else []
    for path in mains:
        d = json.loads(path.read_text())
        plot_schedule(d)
        lines += run_lines(d)
    confirms = sorted(RESULTS.glob("hyper_confirm_T*.json"), key=_steps)
    if confirms:
        lines += confirm_lines([json.loads(p.read_text()) for p in confirms])
    variants = [p for p in RESULTS.glob("hyper_schedule_T*_*.json") if not is_main_schedule(p)
                and "name" in json.loads(p.read_text())]
    if variants:
        lines += variant_lines([json.loads(p.read_text()) for p in sorted(variants, key=_variant_order)])
    for path in sorted(RESULTS.glob("hyper_linesearch_T*.json")):
        lines += linesearch_lines(json.loads(path.read_text()))
    failed = RESULTS / "hyper_schedule_T30_from_piecewise.json"
    if failed.is_file():
        lines += cliff_lines(json.loads(failed.read_text()), [json.loads(p.read_text()) for p in mains])
    return lines


def is_main_schedule(path: Path) -> bool:
    """``hyper_schedule_T<steps>.json`` (not a variant with a suffix)."""
    return path.stem.split("_T")[-1].isdigit()


def run_lines(d: dict[str, Any]) -> list[str]:
    """One main ``schedule`` run: its setting, the table against the references, the verdict and the figure."""
    best = str(d["best_constant_test"])
    sel = d.get("selected_on_val")
    selection = "" if not sel else _block(
        "selection", val_pairs=sel["val_pairs"], epoch=sel["best_epoch"] + 1,
        untrained=(_block("selection_untrained", tre=f"{sel['val_tre_untrained']:.4f}")[0] + " "
                   if sel.get("val_tre_untrained") is not None else ""),
        first=f"{sel['val_tre_per_epoch'][0]:.4f}", best=f"{sel['best_val_tre']:.4f}")[0]
    outer = (_block("outer_tre") if d.get("outer", "tre") == "tre" else _block("outer_other", outer=d["outer"]))[0]
    lines = _block(
        "run", steps=d["steps"], command=current_command(d["command"]), minutes=f"{d['seconds'] / 60:.1f}",
        baseline=d["baseline"],
        max_log_delta=d["max_log_delta"], untrained_equals_baseline=d["untrained_equals_baseline"],
        frozen=_block("frozen", frozen_steps=d["frozen_steps"])[0] if d.get("frozen_steps") else "",
        epochs=d["epochs"], batches=-(-d["train_pairs"] // d.get("batch_size", 4)),
        batch_size=d.get("batch_size", 4), train_pairs=d["train_pairs"], n_freq=d.get("n_freq", 4),
        meta_lr=d["meta_lr"], outer=outer, selection=selection, test_pairs=d["test_pairs"])
    rows = [("piecewise (published)", d["piecewise"])]
    rows += [(f"constant {k}" + (" (best)" if k == best else ""), v) for k, v in d["constants"].items()]
    if "baseline_result" in d:
        rows += [(f"baseline ({d['baseline']}, = untrained network)", d["baseline_result"])]
    rows += [("learned", d["learned"])]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['tre']:.4f} | {r['dice']:.4f} | {r['sdlogj']:.4f} | "
            f"{100 * r['folding']:.2f} % |"
        )
    beats = d["learned"]["tre"] < min(d["piecewise"]["tre"], d["constants"][best]["tre"])
    start = "" if "baseline_result" not in d else _block(
        "verdict_start", base=f"{d['baseline_result']['tre']:.4f}",
        change=f"{100 * (d['learned']['tre'] / d['baseline_result']['tre'] - 1):+.1f}")[0]
    paired = d.get("paired")
    paired_text = "" if not paired else _block("verdict_paired", items="; ".join(
        _block("verdict_paired_item", name=name.replace("_", " "), mean=f"{v['mean']:+.4f}", se=f"{v['se']:.4f}",
               wins=f"{100 * v['wins']:.0f}")[0] for name, v in paired.items()))[0]
    return lines + _block(
        "verdict", constants=len(d["constants"]), beats="yes" if beats else "no",
        learned=f"{d['learned']['tre']:.4f}", best_tre=f"{d['constants'][best]['tre']:.4f}", best=best,
        piecewise=f"{d['piecewise']['tre']:.3f}", start=start, paired=paired_text, steps=d["steps"],
        name=d.get("name", "schedule_T" + str(d["steps"])))


def confirm_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The ``confirm`` runs: the learned schedules on fresh pairs."""
    lines = _block("confirm", hyper=INVOCATION)
    for d in runs:
        b = str(d["best_constant"])
        pw_, bc = d["paired"]["piecewise"], d["paired"]["best_constant"]
        lines.append(
            f"| {d['steps']} | {d['pairs']} | {d['learned']['tre']:.4f} | {d['piecewise']['tre']:.4f} | "
            f"{d['constants'][b]['tre']:.4f} ({b}) | {pw_['mean']:+.4f} ± {pw_['se']:.4f} "
            f"({100 * pw_['wins']:.0f} %) | {bc['mean']:+.4f} ± {bc['se']:.4f} ({100 * bc['wins']:.0f} %) |"
        )
    return lines + _block("confirm_closing")


def variant_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The tagged ``schedule`` runs, and what became of the removed smoothed meta-objectives."""
    lines = _block("variants")
    for d in runs:
        best = d["constants"][str(d["best_constant_test"])]["tre"]
        pair = d.get("paired", {}).get("piecewise")
        lines.append(
            f"| {d['name']} | `{current_command(d['command'])}` | {d['test_pairs']} | {d['learned']['tre']:.4f} | "
            f"{d['piecewise']['tre']:.4f} | "
            f"{best:.4f} | " + (f"{pair['mean']:+.4f} ± {pair['se']:.4f}" if pair else "–") + " |"
        )
    return lines + _block("variants_removed")


def linesearch_lines(d: dict[str, Any]) -> list[str]:
    """One ``linesearch`` run: the training TRE along the meta-gradient's descent direction, and the verdict."""
    magnitude = "" if d.get("magnitude", 0.15) == 0.15 else _block(
        "linesearch_magnitude", percent=f"{100 * d['magnitude']:.0f}")[0]
    lines = _block("linesearch", steps=d["steps"], magnitude=magnitude, command=current_command(d["command"]),
                   pairs=d["pairs"], constant=d["constant"])
    lines += [f"| {eps:.2f} | {tre:.4f} |" for eps, tre in d["along"]]
    start, best_tre = d["along"][0][1], min(t for _, t in d["along"])
    if best_tre < start:
        return lines + _block("linesearch_downhill", change=f"{100 * (best_tre / start - 1):+.2f}")
    return lines + _block("linesearch_rough")


def cliff_lines(failed: dict[str, Any], mains: list[dict[str, Any]]) -> list[str]:
    """The failed T = 30 run from the piecewise schedule, the recomputed cliff and first-step tables, and the
    learned-to-baseline ratios of the main runs ``mains``."""
    ml = failed["meta_loss"]
    lines = _block("cliff", command=current_command(failed["command"]), max_log_delta=failed["max_log_delta"],
                   first=f"{sum(ml[:8]) / 8:.3f}", last=f"{sum(ml[-8:]) / 8:.3f}",
                   learned=f"{failed['learned']['tre']:.3f}", piecewise=f"{failed['piecewise']['tre']:.3f}")
    lines += [f"| {h:+.2f} | {v:.4f} |" for h, v in cliff_check(30)]
    lines += _block("cliff_first_step")
    lines += [f"| {first:g} | {v:.4f} |" for first, v in first_step_check(10)]
    lines += _block("cliff_ratios")
    for d in mains:
        lr, base, t = d["learned_values"], d["baseline_values"], d["steps"]
        cols = [1, t // 4, t // 2, 3 * t // 4, t - 1]
        lines.append(f"| {t} | {d['baseline'].split(' (')[0]} | "
                     + " | ".join(f"{lr[c] / base[c]:.2f}" for c in cols) + " |")
    return lines + [""]


def _steps(path: Path) -> int:
    return int(path.stem.split("_T")[-1])


def _variant_order(path: Path) -> tuple[int, str]:
    return int(path.stem.split("_T")[-1].split("_")[0]), path.stem


def _block(block: str, /, **values: Any) -> list[str]:
    return render(TEMPLATE, block, **values)

"""``report``: write ``benchmarks/results/hyper.md`` from the JSON results of the other subcommands (and the
checks it recomputes, :mod:`benchmarks.hyper.checks`); docs/design.md §5. The prose is in ``templates/``: this
module fills in the numbers and the tables' rows."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, render
from benchmarks.hyper.checks import hypergrad_check
from benchmarks.hyper.cli import current_command
from benchmarks.hyper.report_schedule import schedule_lines
from benchmarks.hyper.shared import INVOCATION, load_json
from benchmarks.hyper.summary import summary_lines

TEMPLATE = Path(__file__).with_name("templates") / "report.md"

#: the row labels of the guard tables
GUARD_LABELS = {
    "no_guard": "1 − soft Dice only",
    "diffusion": "+ 1.0 · diffusion",
    "negjac": "+ 10 · mean relu(0.1 − det J)",
}


def report(args: argparse.Namespace) -> dict:
    """Write ``hyper.md`` (and redraw the schedule figures); the sections of runs without results are left out."""
    lines = _block("header", hyper=INVOCATION) + summary_lines()
    lines += _block("hypergrad", hyper=INVOCATION)
    for r in hypergrad_check()["rows"]:
        lines.append(
            f"| {r['iteration']} | {r['autograd']:.10g} | {r['central_difference']:.10g} | "
            f"{r['rel_error']:.1e} |"
        )
    lines.append("")
    d = load_json("bilevel")
    if d is not None:
        lines += bilevel_lines(d)
    d = load_json("guard")
    if d is not None:
        lines += guard_lines(d)
    d = load_json("amortised")
    if d is not None:
        lines += amortised_lines(d)
    lines += schedule_lines()
    text = "\n".join(lines)
    (RESULTS / "hyper.md").write_text(text)
    return {"written": str(RESULTS / "hyper.md")}


def bilevel_lines(d: dict[str, Any]) -> list[str]:
    """Section 2: the bilevel λ runs (``hyper_bilevel.json``)."""
    lines = _block("bilevel", command=current_command(d["command"]), minutes=f"{d['seconds'] / 60:.1f}",
                   iterations=d["common"]["iterations"], stride=d["common"]["stride"],
                   lam_start=d["common"]["lam_start"], lam_end=d["common"]["lam_end"], epochs=d["epochs"],
                   hyper_lr=d["hyper"]["hyper_lr"])
    for noise, run in d["runs"].items():
        for name, r in run.items():
            lines.append(
                f"| {noise} | {name} | {r['lam']:.4g} | {r['test']['outer']:.4f} | "
                f"{r['grid_best_outer']:.4f} "
                f"({r['grid_best_lam']:.3g}) | {100 * r['gap']:+.2f} % | {r['test']['dice']:.3f} | "
                f"{100 * r['test']['folding']:.2f} % |"
            )
    lam_l = [run["learned"]["lam"] for run in d["runs"].values()]
    lam_h = [run["handcrafted"]["lam"] for run in d["runs"].values()]
    mono = all(a < b for a, b in zip(lam_l, lam_l[1:])) and all(a < b for a, b in zip(lam_h, lam_h[1:]))
    gaps = [abs(r["gap"]) for run in d["runs"].values() for r in run.values()]
    lines += _block("bilevel_guard", monotone=_yes(mono), lam_learned=", ".join(f"{v:.3g}" for v in lam_l),
                    lam_handcrafted=", ".join(f"{v:.3g}" for v in lam_h), gap=f"{100 * max(gaps):.2f}",
                    epochs=d["epochs"], threshold=f"{100 * d['folding_threshold']:.0f}")
    for name, g_ in d["guard"].items():
        lines.append(
            f"| {GUARD_LABELS.get(name, name)} | {g_['lam']:.4g} | {min(g_['trace']):.4g} | "
            f"{g_['test']['dice']:.3f} | {100 * g_['test']['folding']:.3f} % |"
        )
    if d["guard"]["negjac"]["trace"] == d["guard"]["no_guard"]["trace"]:
        lines += _block("bilevel_coincide")
    return lines + _block("bilevel_figure")


def guard_lines(d: dict[str, Any]) -> list[str]:
    """The low-noise guard runs (``hyper_guard.json``), at the end of section 2."""
    lines = _block("guard", noise=d["noise"], epochs=d["epochs"], command=current_command(d["command"]),
                   minutes=f"{d['seconds'] / 60:.0f}")
    for name, r in d["runs"].items():
        lines.append(
            f"| {GUARD_LABELS.get(name, name)} | {r['lam']:.4g} | {min(r['trace']):.4g} | "
            f"{r['test']['dice']:.3f} "
            f"| {r['test']['sdlogj']:.3f} | {100 * r['test']['folding']:.3f} % |"
        )
    return lines + [""]


def amortised_lines(d: dict[str, Any]) -> list[str]:
    """Section 3: the λ-conditioned hypernetwork (``hyper_amortised.json``)."""
    lines = _block("amortised", command=current_command(d["command"]), minutes=f"{d['seconds'] / 60:.1f}",
                   lam_min=d["range"][0], lam_max=d["range"][1], w_reg=d["w_reg"], lam_ref=d["lam_ref"],
                   noise=d["noise"],
                   hyper_epochs=d.get("hyper_epochs", d["epochs"]), anneal="on" if d.get("anneal") else "off",
                   epochs=d["epochs"])
    for lam, a in zip(d["sweep"], d["along"]):
        lines.append(
            f"| {lam:.3g} | {a['diffusion']:.5f} | {a['sdlogj']:.4f} | {a['dice']:.4f} | "
            f"{100 * a['folding']:.2f} % |"
        )
    diffs = [a["diffusion"] for a in d["along"]]
    lines += _block("amortised_compare", monotone=_yes(all(a > b for a, b in zip(diffs, diffs[1:]))))
    worst = 0.0
    for lam, c in d["compare"].items():
        diff = c["hyper"]["dice"] - c["fixed"]["dice"]
        worst = max(worst, abs(diff))
        lines.append(
            f"| {lam} | {c['hyper']['dice']:.4f} | {c['fixed']['dice']:.4f} | {diff:+.4f} | "
            f"{c['handcrafted']['dice']:.4f} |"
        )
    lines += _block("amortised_selection", worst=f"{worst:.4f}")
    for name, s in d["selection"].items():
        at = s["test_at_gd"] if s["source"] == "gd" else s["test_at_sweep"]
        lines.append(
            f"| {name} | {s['lam_gd']:.4g} ({s['loss_gd']:.4f}) | {s['lam_sweep']:.4g} "
            f"({s['loss_sweep']:.4f}) | {s['source']} | {at['dice']:.4f} |"
        )
    return lines + _block("amortised_figure")


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def _block(block: str, /, **values: Any) -> list[str]:
    return render(TEMPLATE, block, **values)

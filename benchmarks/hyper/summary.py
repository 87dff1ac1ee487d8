"""The summary table at the top of ``hyper.md``: the targets of the learned hyper-parameters
(docs/design.md §5) and whether the JSON results reach them. Row wording: ``templates/summary.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import render
from benchmarks.hyper.shared import load_json

TEMPLATE = Path(__file__).with_name("templates") / "summary.md"


def summary_lines() -> list[str]:
    """The summary section's lines (ending with an empty line)."""
    out = _row("head")
    b = load_json("bilevel")
    if b is not None:
        out += _bilevel_rows(b)
    a = load_json("amortised")
    if a is not None:
        diffs = [x["diffusion"] for x in a["along"]]
        worst = max(abs(c["hyper"]["dice"] - c["fixed"]["dice"]) for c in a["compare"].values())
        out += _row("amortised_smooth", points=len(diffs), first=f"{diffs[0]:.3g}", last=f"{diffs[-1]:.3g}",
                    status=_mark(all(x > y for x, y in zip(diffs, diffs[1:]))))
        out += _row("amortised_dice", worst=f"{worst:.4f}", status=_mark(worst <= 0.02))
    for steps in (10, 20, 30, 270):
        d = load_json(f"schedule_T{steps}")
        if d is not None:
            out += _schedule_rows(steps, d, load_json(f"confirm_T{steps}"))
    return out + [""]


def _bilevel_rows(b: dict[str, Any]) -> list[str]:
    lam = [run["learned"]["lam"] for run in b["runs"].values()]
    gap = max(abs(r["gap"]) for run in b["runs"].values() for r in run.values())
    g = b["guard"]
    fell = g["no_guard"]["lam"] < g["no_guard"]["trace"][0]
    folds = max(r["test"]["folding"] for name, r in g.items() if name != "no_guard")
    return (
        _row("bilevel_monotone", noises=", ".join(b["runs"]), lams=", ".join(f"{v:.3g}" for v in lam),
             status=_mark(all(x < y for x, y in zip(lam, lam[1:]))))
        + _row("bilevel_gap", gap=f"{100 * gap:.2f}", status=_mark(gap < 0.02))
        + _row("guard_falls", start=f"{g['no_guard']['trace'][0]:.3g}", lam=f"{g['no_guard']['lam']:.3g}",
               diffusion=f"{g['diffusion']['lam']:.3g}", status=_mark(fell))
        + _row("guard_folding", threshold=f"{100 * b['folding_threshold']:.0f}", folding=f"{100 * folds:.3f}",
               status=_mark(folds < b["folding_threshold"]))
    )


def _schedule_rows(steps: int, d: dict[str, Any], fresh: dict[str, Any] | None) -> list[str]:
    best = d["constants"][str(d["best_constant_test"])]["tre"]
    out = _row("schedule_exact", steps=steps, equal=d["untrained_equals_baseline"],
               status=_mark(d["untrained_equals_baseline"]))
    ok = d["learned"]["tre"] < min(best, d["piecewise"]["tre"])
    paired = d.get("paired")
    paired_text = "" if not paired else _row(
        "schedule_paired", **_paired_values(paired), pairs=paired["piecewise"]["pairs"])[0]
    out += _row("schedule_beats", steps=steps, learned=f"{d['learned']['tre']:.4f}",
                piecewise=f"{d['piecewise']['tre']:.4f}", best=f"{best:.4f}", paired=paired_text, status=_mark(ok))
    if fresh is not None:
        fb = fresh["constants"][str(fresh["best_constant"])]["tre"]
        fp = fresh["paired"]
        ok = fresh["learned"]["tre"] < min(fb, fresh["piecewise"]["tre"])
        sig = max(v["mean"] + 2 * v["se"] for v in fp.values()) < 0  # both differences below −2 SE
        out += _row("confirm", steps=steps, pairs=fresh["pairs"], learned=f"{fresh['learned']['tre']:.4f}",
                    piecewise=f"{fresh['piecewise']['tre']:.4f}", best=f"{fb:.4f}", **_paired_values(fp),
                    status=_mark(ok),
                    significance=_row("confirm_significance", answer="yes" if sig else "no")[0] if ok else "")
    if "baseline_result" in d:
        base = d["baseline_result"]["tre"]
        out += _row("improves", steps=steps, learned=f"{d['learned']['tre']:.4f}", base=f"{base:.4f}",
                    change=f"{100 * (d['learned']['tre'] / base - 1):+.1f}",
                    answer="yes" if d["learned"]["tre"] < base else "no")
    return out


def _paired_values(paired: dict[str, dict[str, float]]) -> dict[str, str]:
    pw, bc = paired["piecewise"], paired["best_constant"]
    return {"pw": f"{pw['mean']:+.4f}", "pw_se": f"{pw['se']:.4f}", "bc": f"{bc['mean']:+.4f}",
            "bc_se": f"{bc['se']:.4f}"}


def _mark(ok: bool) -> str:
    return _row("reached" if ok else "not_reached")[0]


def _row(block: str, /, **values: Any) -> list[str]:
    return render(TEMPLATE, block, **values)

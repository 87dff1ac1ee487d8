"""The figures of the learned hyper-parameter benchmarks (docs/design.md §5), drawn from their JSON results."""

from __future__ import annotations

from typing import Any

from benchmarks.common import RESULTS, pyplot, save_figure


def plot_schedule(out: dict) -> None:
    """``hyper_<name>.png``: the learned schedule of a ``schedule`` run against its references."""
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    steps = range(out["steps"])
    ax.plot(steps, out["piecewise_values"], label=f"piecewise (TRE {out['piecewise']['tre']:.2f} mm)")
    best = out["best_constant_test"]
    ax.axhline(
        float(best),
        color="grey",
        ls="--",
        label=f"best constant {best} (TRE {out['constants'][str(best)]['tre']:.2f} mm)",
    )
    base = out.get("baseline_values") or [v * out.get("baseline_scale", 1.0) for v in out["piecewise_values"]]
    if base != out["piecewise_values"]:
        ax.plot(
            steps,
            base,
            ":",
            color="C0",
            label=f"baseline = untrained network (TRE {out['baseline_result']['tre']:.2f} mm)",
        )
    ax.plot(steps, out["learned_values"], label=f"learned (TRE {out['learned']['tre']:.2f} mm)")
    _axes(ax, "Adam step t", "learning rate η_t (1/15 voxel)",
          f"AdamIO learning-rate schedules, T = {out['steps']}, synthetic 2D 64×64", yscale="log")
    save_figure(fig, RESULTS / f"hyper_{out['name']}.png", dpi=120)


def plot_bilevel(out: dict) -> None:
    """``hyper_bilevel.png``: λ during training, the held-out λ grid, and the guard runs."""
    fig, axes = pyplot().subplots(1, 3, figsize=(14, 3.8))
    for noise, run in out["runs"].items():
        r = run["learned"]
        (line,) = axes[0].plot(r["trace"], label=f"noise {noise}")
        axes[0].plot(run["handcrafted"]["trace"], ls=":", color=line.get_color())
        axes[1].plot(out["grid"], r["grid_outer"], color=line.get_color(), label=f"noise {noise}")
        axes[1].axvline(r["lam"], color=line.get_color(), ls="--")
    _axes(axes[0], "training step", "λ (first GN iteration)", "bilevel λ (solid: learned heads, dotted: handcrafted)",
          yscale="log")
    _axes(axes[1], "λ", "held-out outer loss", "20-point λ grid (dashed: learned λ)", xscale="log", legend=False)
    for name, g in out["guard"].items():
        axes[2].plot(g["trace"], label=f"{name}: folding {100 * g['test']['folding']:.2f} %")
    _axes(axes[2], "training step", "λ", "outer loss without / with a regularity guard", yscale="log")
    save_figure(fig, RESULTS / "hyper_bilevel.png", dpi=110)


def plot_amortised(out: dict) -> None:
    """``hyper_amortised.png``: smoothness and Dice along λ, and the test-time λ selection."""
    fig, axes = pyplot().subplots(1, 3, figsize=(14, 3.8))
    lams = out["sweep"]
    axes[0].plot(lams, [a["diffusion"] for a in out["along"]], "o-")
    _axes(axes[0], "λ (conditioning and GN weight)", "diffusion of u (voxel²)", "amortised model: smoothness along λ",
          xscale="log", yscale="log", legend=False)
    axes[1].plot(lams, [a["dice"] for a in out["along"]], "o-", label="amortised (one model)")
    fixed = sorted((float(k), v) for k, v in out["compare"].items())
    axes[1].plot(
        [k for k, _ in fixed],
        [v["fixed"]["dice"] for _, v in fixed],
        "s",
        ms=8,
        label="LearnGN trained at that λ",
    )
    axes[1].plot(
        [k for k, _ in fixed], [v["handcrafted"]["dice"] for _, v in fixed], "x", ms=8, label="handcrafted GN"
    )
    _axes(axes[1], "λ", "held-out Dice", None, xscale="log")
    sels = list(out["selection"].items())
    sweep = sels[0][1]["sweep"]
    axes[2].plot([p[0] for p in sweep], [p[1] for p in sweep], "o-", label="sweep (validation)")
    for i, (name, sel) in enumerate(sels):
        trace = sel["trace"]
        axes[2].plot(
            [t[0] for t in trace],
            [t[1] for t in trace],
            ".:",
            color=f"C{i + 1}",
            label=f"gradient descent {name}: λ = {sel['lam_gd']:.3g}",
        )
    _axes(axes[2], "λ", "validation outer loss", "test-time λ selection", xscale="log")
    save_figure(fig, RESULTS / "hyper_amortised.png", dpi=110)


def _axes(ax: Any, xlabel: str, ylabel: str, title: str | None, xscale: str | None = None,
          yscale: str | None = None, legend: bool = True) -> None:
    """Scales, labels, title and (small) legend of one panel."""
    if xscale:
        ax.set_xscale(xscale)
    if yscale:
        ax.set_yscale(yscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)

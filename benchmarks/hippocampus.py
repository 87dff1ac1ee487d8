"""Learned vs handcrafted vs classical registration on real MR: the Hippocampus validation pairs.

    python benchmarks/hippocampus.py --ckpt checkpoints/hippocampus_learngn.ckpt --threads 2

Every row is one ``eval.py`` run (its command is printed in the results page), on the 20 ``registration_val``
pairs of ``../shared/data/Hippocampus`` (40 subjects none of which is in the training split):

1. handcrafted GN: a few settings are scored on 20 *training* pairs (``--split train --data-arg max_pairs=20``,
   subjects disjoint from the val pairs) and the best is the one reported on the val pairs; every choice below
   follows the same rule (:func:`choose`: the best training Dice with SDlogJ ≤ 0.2);
2. identity, compositive GN, AdamIO (piecewise and constant), ConvexAdam (published settings and the project's
   best recipe, ``convexadam_logj.yaml``), LearnGN (the checkpoint, its first-iteration λ chosen on the same
   training pairs), LearnGN followed by Adam refinement (``--init-ckpt``: on MIND-SSC, with ConvexAdam's
   LNCC stage, and with the soft Dice of the model's own segmentations, ``learngn_adam_semantic.yaml``, whose
   weights are chosen on the training pairs too), a second LearnGN checkpoint when ``--fast-ckpt`` is given
   (e.g. fewer GN iterations, ``configs/hippocampus3d_fast.yaml``; its λ chosen the same way), and handcrafted
   GN on the signed distance maps of the *true* labels (an oracle no real method has, the upper reference).

3. learned hyper-parameters (docs/design.md §5), each against its hand-set default, when their files are given:
   ``--bilevel-ckpt`` (a LearnGN whose per-iteration λ was learned on a hyper split of the training subjects,
   ``configs/hippocampus_bilevel.yaml``), ``--hyper-ckpt`` (a λ-conditioned hypernetwork,
   ``configs/hippocampus_hyper.yaml``, at its default λ and with ``--lam auto`` chosen on training pairs) and
   ``--schedule`` (an AdamIO learning-rate schedule meta-trained on training pairs,
   ``configs/hippocampus_schedule.yaml``, against the baseline schedule it started from).

Writes ``benchmarks/results/hippocampus.md`` (and the eval folders under ``--out``). Skips with a message when
the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: handcrafted GN settings scored on training pairs: (label, eval.py arguments)
GN_CANDIDATES: list[tuple[str, list[str]]] = [
    ("MIND, λ 0.3→0.03", ["--method-arg", "lam=[0.3,0.03]"]),
    ("MIND, λ 0.1→0.01", ["--method-arg", "lam=[0.1,0.01]"]),
    ("MIND pooled ×2, λ 1→0.1 (gn_mind.yaml)", ["--method-config", "configs/baselines/gn_mind.yaml"]),
    ("MIND pooled ×2, λ 0.3→0.03", ["--method-config", "configs/baselines/gn_mind.yaml",
                                    "--method-arg", "lam=[0.3,0.03]"]),
]

#: first-iteration λ of the trained LearnGN scored on training pairs (the recipe trains with 0.3; the schedule's
#: shape is kept, ``eval.py --lam``)
LAM_CANDIDATES = (0.3, 0.6, 1.2, 2.4)

#: eval.py arguments that run a LearnGN's semantic U-Net in bfloat16 (layers.semantic.SemanticNet)
BF16 = ["--method-arg", "semantic_precision=bf16"]

#: settings of the refinement of the LearnGN field with the model's own segmentations
#: (``configs/baselines/learngn_adam_semantic.yaml``) scored on training pairs: (label, eval.py arguments)
REFINE_CONFIG = "configs/baselines/learngn_adam_semantic.yaml"
REFINE_CANDIDATES: list[tuple[str, list[str]]] = [
    (f"semantic {w:g}, diffusion {d:g}", ["--method-arg", f"semantic_weight={w:g}", "--method-arg",
                                          f"diffusion_weight={d:g}"])
    for w, d in ((1, 10), (2, 10), (4, 10), (4, 20), (8, 20))]

COLUMNS = ("dice", "dice30", "hd95", "sdlogj", "folding", "seconds")
#: the regularity target of the learned model; handcrafted GN is chosen under the same constraint
SDLOGJ_TARGET = 0.2


def methods(ckpt: str, lam: float) -> list[tuple[str, str, list[str]]]:
    """(key, row label, eval.py arguments) of the compared methods on the val pairs (GN added separately);
    ``lam``: the LearnGN's first-iteration λ chosen on training pairs."""
    try:
        trained = f"{training_lambda(ckpt):g}"
    except (OSError, ValueError, KeyError, TypeError):  # a label only: the row's eval.py run reports the file
        trained = "as saved"
    cfg = "configs/baselines/"
    lam_args = ["--lam", f"{lam:g}"]
    return [
        ("identity", "identity", ["--method", "identity"]),
        ("gn_compose", "handcrafted GN, compositive updates (gn_compose.yaml)",
         ["--method", "gn", "--method-config", cfg + "gn_compose.yaml"]),
        ("adam_piecewise", "AdamIO piecewise (270 it)",
         ["--method", "adam", "--method-config", cfg + "adam_piecewise.yaml"]),
        ("adam_constant", "AdamIO constant (100 it)",
         ["--method", "adam", "--method-config", cfg + "adam_constant.yaml"]),
        ("convexadam", "ConvexAdam (published settings)",
         ["--method", "convexadam", "--method-config", cfg + "convexadam.yaml"]),
        ("convexadam_logj", "ConvexAdam + LNCC/log-J Adam stage (convexadam_logj.yaml)",
         ["--method", "convexadam", "--method-config", cfg + "convexadam_logj.yaml"]),
        ("learngn", f"**LearnGN** (checkpoint, λ {lam:g} chosen on training pairs)",
         ["--method", "learngn", "--ckpt", ckpt, *lam_args]),
        ("learngn_bf16", f"LearnGN (checkpoint, λ {lam:g}; U-Net in bfloat16, `--method-arg "
         "semantic_precision=bf16`)", ["--method", "learngn", "--ckpt", ckpt, *lam_args, *BF16]),
        ("learngn_trained", f"LearnGN at its training λ ({trained}; no selection)",
         ["--method", "learngn", "--ckpt", ckpt]),
        ("learngn_adam", "**LearnGN + Adam refinement** (AdamIO constant, 30 it, from the LearnGN field)",
         ["--method", "adam", "--method-config", cfg + "adam_constant.yaml", "--method-arg", "iterations=30",
          "--init-ckpt", ckpt, *lam_args]),
        ("learngn_convexadam",
         "**LearnGN + the LNCC/log-J Adam stage** of convexadam_logj.yaml (from the LearnGN field)",
         ["--method", "convexadam", "--method-config", cfg + "convexadam_logj.yaml", "--init-ckpt", ckpt,
          *lam_args]),
        ("oracle", "oracle: handcrafted GN on distance maps of the *true* labels (gn_sdm.yaml)",
         ["--method", "gn", "--method-config", cfg + "gn_sdm.yaml"]),
    ]


def lam_candidates(ckpt: str) -> list[tuple[str, list[str]]]:
    """The LearnGN runs of :data:`LAM_CANDIDATES` for a checkpoint: (label, eval.py arguments)."""
    return [(f"{lam:g}", ["--method", "learngn", "--ckpt", ckpt, "--lam", f"{lam:g}"]) for lam in LAM_CANDIDATES]


def checkpoint_iterations(ckpt: str) -> int | str:
    """The number of GN iterations of a LearnGN checkpoint (read without running code), or "?" """
    from data.checkpoint import load_checkpoint  # the installed package (make install)

    try:
        return int(load_checkpoint(REPO / ckpt, what="--fast-ckpt")["hyper_parameters"]["iterations"])
    except (OSError, ValueError, KeyError, TypeError):  # a label only: the row's eval.py run reports the file
        return "?"


def training_lambda(ckpt: str) -> float:
    """The first-iteration λ a LearnGN checkpoint was trained with (its ``lam_start``), read without running code."""
    from data.checkpoint import load_checkpoint  # the installed package (make install)

    return float(load_checkpoint(REPO / ckpt, what="--ckpt")["hyper_parameters"]["lam_start"])


def learned_hyper(a: argparse.Namespace, out: Path) -> list[tuple[str, str, list[str]]]:
    """(key, row label, eval.py arguments) of the learned-hyper-parameter rows and their hand-set defaults, for
    the files given (``--bilevel-ckpt``, ``--hyper-ckpt``, ``--schedule``); the baseline schedule file is
    written under ``out``."""
    rows: list[tuple[str, str, list[str]]] = []
    if a.bilevel_ckpt:
        rows.append(("learngn_bilevel", "LearnGN, λ per GN iteration learned by bilevel optimisation (hyper split of "
                     "the training subjects; Dice + SDlogJ ≤ 0.2 hinge)",
                     ["--method", "learngn", "--ckpt", a.bilevel_ckpt]))
    if a.hyper_ckpt:
        rows.append(("hyper_default", "λ-conditioned hypernetwork at its default λ (0.3, the training λ)",
                     ["--method", "learngn", "--ckpt", a.hyper_ckpt]))
        rows.append(("hyper_auto", "λ-conditioned hypernetwork, `--lam auto` on 8 training pairs (Dice + SDlogJ ≤ "
                     "0.2 hinge)",
                     ["--method", "learngn", "--ckpt", a.hyper_ckpt, "--lam", "auto", "--lam-split", "train",
                      "--lam-guard", "sdlogj", "--lam-guard-margin", f"{SDLOGJ_TARGET:g}", "--lam-guard-weight", "2",
                      "--lam-search", "7", "6", "--data-arg", "batch_size=2"]))  # 4 batches of 2 pairs
    if a.schedule:
        base = baseline_schedule(Path(a.schedule), out / "baseline_schedule.pt")
        adam = ["--method", "adam", "--method-config", "configs/baselines/adam_piecewise.yaml", "--schedule"]
        rows.append(("adam_schedule_base", f"AdamIO, the baseline schedule the learned one started from "
                     f"({base[1]} steps)", [*adam, str(base[0])]))
        rows.append(("adam_schedule_learned", f"AdamIO, learning-rate schedule meta-trained on training pairs "
                     f"({base[1]} steps)", [*adam, a.schedule]))
    return rows


def baseline_schedule(learned: Path, dest: Path) -> tuple[Path, int]:
    """Write the baseline a learned schedule file started from (its ``"baseline"`` values, same step unit) to
    ``dest``; returns ``(dest, T)``."""
    from data.checkpoint import load_checkpoint  # the installed package (make install)
    from lightning_modules.hyper.schedule import save_schedule

    record = load_checkpoint(learned, what="--schedule", expected="a learned schedule (.pt)")
    if not isinstance(record, dict) or "baseline" not in record:
        raise SystemExit(f"error: --schedule {learned} has no baseline values (not a ScheduleMetaLearner export)")
    values = [float(v) for v in record["baseline"]]
    save_schedule(values, dest, step_unit=record.get("step_unit"))
    return dest, len(values)


def shared_data_root() -> Path:
    """``$L2O_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("L2O_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def eval_command(args: list[str], out: Path, data: Path, split: str, threads: int, extra: list[str]) -> list[str]:
    """The ``eval.py`` command line of one evaluation (``sys.executable`` first)."""
    return [sys.executable, "eval.py", *args, "--data", str(data), "--split", split, "--out", str(out),
            "--threads", str(threads), "--figures", "0", *extra]


def shown(cmd: list[str]) -> str:
    """A command line as printed in the results page (``python`` for the interpreter)."""
    return " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])


def run_eval(args: list[str], out: Path, data: Path, split: str, threads: int, extra: list[str]) -> dict:
    """Run one ``eval.py`` evaluation and return its ``summary.json`` (with the command under ``"command"``)."""
    cmd = eval_command(args, out, data, split, threads, extra)
    shown_cmd = shown(cmd)
    print("$", shown_cmd, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if not (out / "summary.json").is_file():
        raise RuntimeError(f"eval.py failed ({proc.returncode}): {shown_cmd}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["command"] = shown_cmd
    return summary


def table(rows: list[tuple[str, str, dict]]) -> list[str]:
    """Markdown table lines of ``(key, label, summary)`` rows over :data:`COLUMNS`."""
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for _, label, summary in rows:
        m = summary["metrics"]
        lines.append(f"| {label} | " + " | ".join(fmt(m.get(c), c) for c in COLUMNS) + " |")
    return lines


def fmt(v: float | None, key: str) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if key == "seconds" else f"{v * 100:.3f}" if key == "folding" else f"{v:.4f}"


def choose(get, prefix: str, candidates: list[tuple[str, list[str]]]) -> tuple[int, list]:
    """Score ``candidates`` ``(label, eval.py arguments)`` on 20 training pairs (``get(key, args, split)`` runs or
    reuses one evaluation, keys ``<prefix><k>``); returns the index of the best training Dice among those that
    meet the regularity target (SDlogJ ≤ :data:`SDLOGJ_TARGET`; the best Dice when none does) and the scored list
    ``[(dice, k, label, summary)]``."""
    scored = []
    for k, (label, args) in enumerate(candidates):
        s = get(f"{prefix}{k}", [*args, "--data-arg", "max_pairs=20"], "train")
        scored.append((s["metrics"]["dice"], k, label, s))
    regular = [c for c in scored if c[3]["metrics"]["sdlogj"] <= SDLOGJ_TARGET]
    return max(regular or scored)[1], scored


def appendix(selections: list[tuple[str, str, int, list]], rows: list) -> list[str]:
    """The page's last sections: each selection ``(title, column, chosen index, scored list of` :func:`choose`)``
    as a table of its candidates on the training pairs (the chosen one marked), and the command of every row."""
    lines = []
    for title, column, chosen, scored in selections:
        lines += ["", f"## {title}", "", f"| {column} | Dice (train pairs) | SDlogJ (train pairs) |", "|---|---|---|"]
        lines += [f"| {label}{' (chosen)' if k == chosen else ''} | {d:.4f} | {s['metrics']['sdlogj']:.3f} |"
                  for d, k, label, s in scored]
    lines += ["", "## Commands", ""]
    lines += [f"- {label}: `{s['command']}`" for _, label, s in rows]
    for title, _, _, scored in selections:
        lines += [f"- {title.split(':')[0]}, {label}: `{s['command']}`" for _, _, label, s in scored]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/hippocampus_learngn.ckpt", help="LearnGN checkpoint")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench_hippocampus", help="folder of the eval.py runs")
    p.add_argument("--reuse", action="store_true", help="reuse the finished evaluations found under --out")
    p.add_argument("--skip", nargs="*", default=[], help="keys of methods to leave out (e.g. learngn rows)")
    p.add_argument("--results", default="benchmarks/results/hippocampus.md")
    p.add_argument("--bilevel-ckpt", help="LearnGN checkpoint with a bilevel-learned λ schedule")
    p.add_argument("--hyper-ckpt", help="λ-conditioned hypernetwork checkpoint (HyperLearnGN)")
    p.add_argument("--schedule", help="learned AdamIO learning-rate schedule (.pt, ScheduleMetaLearner export)")
    p.add_argument("--fast-ckpt", help="a second LearnGN checkpoint (e.g. fewer GN iterations), its λ chosen on "
                                       "training pairs like --ckpt's")
    a = p.parse_args(argv)
    data = shared_data_root() / "Hippocampus" / "Hippocampus_dataset.json"
    if not data.is_file():
        print(f"skipped: {data} not found (set L2O_SHARED_DATA)")
        return 0
    out = (REPO / a.out).resolve()
    help_text = subprocess.run([sys.executable, "eval.py", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    extra = ["--overwrite"] if "--overwrite" in help_text else []
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def get(key: str, args: list[str], split: str) -> dict:
        folder = out / key
        if not a.reuse or not (folder / "summary.json").is_file():
            return run_eval(args, folder, data, split, a.threads, extra)
        summary = json.loads((folder / "summary.json").read_text())
        summary["command"] = shown(eval_command(args, folder, data, split, a.threads, extra)) + " (reused result)"
        return summary

    # 1. handcrafted GN: choose the setting on training pairs (the best training Dice among the settings that
    # meet the regularity target, SDlogJ <= 0.2; also shown: the best training Dice regardless of regularity)
    chosen_gn, scored_gn = choose(get, "select_gn", [(label, ["--method", "gn", *args])
                                                     for label, args in GN_CANDIDATES])
    selections = [("Handcrafted GN: settings scored on 20 training pairs", "setting", chosen_gn, scored_gn)]
    best, loose = scored_gn[chosen_gn], max(scored_gn)
    gn_rows = [("gn", f"handcrafted GN ({best[2]}; the best training Dice with SDlogJ ≤ {SDLOGJ_TARGET})",
                get(f"gn{best[1]}", ["--method", "gn", *GN_CANDIDATES[best[1]][1]], "val"))]
    if loose[1] != best[1]:
        gn_rows.append(("gn_loose", f"handcrafted GN ({loose[2]}; the best training Dice, any regularity)",
                        get(f"gn{loose[1]}", ["--method", "gn", *GN_CANDIDATES[loose[1]][1]], "val")))
    # 2. LearnGN's λ on the same training pairs, under the same regularity target
    lam = LAM_CANDIDATES[0]
    if "learngn" not in a.skip:
        k, scored = choose(get, "select_learngn", lam_candidates(a.ckpt))
        lam = LAM_CANDIDATES[k]
        selections.append(("LearnGN: first-iteration λ scored on the same 20 training pairs", "λ", k, scored))
    # 3. everything else on the val pairs (identity first, then handcrafted GN)
    others = [(key, label, get(key, args, "val")) for key, label, args in methods(a.ckpt, lam)
              if key not in a.skip]
    rows = others[:1] + gn_rows + others[1:]
    # 4. the refinement with the model's segmentations, its setting chosen on the training pairs; a second
    # (faster) checkpoint with its own λ
    if "learngn_adam_semantic" not in a.skip and "learngn" not in a.skip:  # refines the field at the chosen λ
        refine = ["--method", "adam", "--method-config", REFINE_CONFIG, "--init-ckpt", a.ckpt, "--lam", f"{lam:g}"]
        k, scored = choose(get, "select_refine", [(label, [*refine, *args]) for label, args in REFINE_CANDIDATES])
        selections.append((f"LearnGN + refinement with its segmentations: settings scored on the same 20 training "
                           f"pairs (from the LearnGN field at λ {lam:g})", "setting", k, scored))
        rows.append(("learngn_adam_semantic", f"**LearnGN + Adam refinement with the model's segmentations** "
                     f"(20 it, {REFINE_CANDIDATES[k][0]}, chosen on training pairs)",
                     get("learngn_adam_semantic", [*refine, *REFINE_CANDIDATES[k][1]], "val")))
        if a.bilevel_ckpt:  # the same refinement from the field of the bilevel-λ model (its own λ schedule)
            rows.append(("learngn_bilevel_adam_semantic", "LearnGN with bilevel λ + the same refinement",
                         get("learngn_bilevel_adam_semantic", [*refine[:4], "--init-ckpt", a.bilevel_ckpt,
                                                               *REFINE_CANDIDATES[k][1]], "val")))
    if a.fast_ckpt:
        k, scored = choose(get, "select_fast", lam_candidates(a.fast_ckpt))
        selections.append((f"Second checkpoint ({a.fast_ckpt}): first-iteration λ scored on the same 20 training "
                           "pairs", "λ", k, scored))
        fast = ["--method", "learngn", "--ckpt", a.fast_ckpt, "--lam", f"{LAM_CANDIDATES[k]:g}"]
        label = f"{checkpoint_iterations(a.fast_ckpt)} GN iterations** ({a.fast_ckpt}, λ {LAM_CANDIDATES[k]:g} " \
                "chosen on training pairs"
        rows.append(("learngn_fast", f"**LearnGN, {label})", get("learngn_fast", fast, "val")))
        rows.append(("learngn_fast_bf16", f"**LearnGN, {label}; U-Net in bfloat16, `--method-arg "
                     "semantic_precision=bf16`)", get("learngn_fast_bf16", [*fast, *BF16], "val")))
    res = {k: s for k, _, s in rows}
    # 4. learned hyper-parameters against their hand-set defaults (val pairs)
    hyper_rows = [(key, label, get(key, args, "val")) for key, label, args in learned_hyper(a, out)]

    lines = ["# Hippocampus (real MR): learned GN against handcrafted GN and the classical baselines", "",
             f"Command: `python benchmarks/hippocampus.py {shlex.join(sys.argv[1:] if argv is None else argv)}` "
             "(started "
             f"{started}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average at "
             f"the end {os.getloadavg()[0]:.1f}).", "",
             "The 20 `registration_val` pairs of `../shared/data/Hippocampus` (40 subjects, none in the training "
             "split); Dice over the two labels (anterior, posterior), HD95 in mm, folding in %, seconds per pair "
             "around the registration only (LearnGN + Adam includes the LearnGN registration). Every row is one "
             "`eval.py` run; the commands are listed below (with `--reuse`, rows already under `--out` were read "
             "back, not rerun: marked \"reused result\", made by the same command, possibly with another "
             "`--out`, in an earlier run).", "", *table(rows)]
    if {"learngn", "gn", "oracle"} <= res.keys():
        g, lg, o = (res[k]["metrics"]["dice"] for k in ("gn", "learngn", "oracle"))
        lines += ["", f"LearnGN − handcrafted GN: {100 * (lg - g):+.1f} Dice points; it closes "
                      f"{100 * (lg - g) / (o - g):.0f} % of the gap from handcrafted GN on MIND ({g:.4f}) to the "
                      f"oracle ({o:.4f})."]
    if hyper_rows:
        lines += ["", "## Learned hyper-parameters against their hand-set defaults (val pairs)", "",
                  "Each learned setting next to the setting it replaces; every choice was made on training "
                  "subjects only (when each was run relative to the val results above: "
                  "`benchmarks/results/hippocampus_training.md`). The LearnGN rows of the table above are the "
                  "reference of the bilevel and hypernetwork rows (the same network).", "",
                  *table(hyper_rows)]
    lines += appendix(selections, rows + hyper_rows)
    Path(REPO / a.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

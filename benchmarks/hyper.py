"""Benchmarks of the learned hyper-parameters (docs/design.md §5) on synthetic 2D data.

Subcommands (each writes ``benchmarks/results/hyper_<name>.json`` and figures; ``report`` assembles
``benchmarks/results/hyper.md`` from the JSON files):

* ``schedule``  — meta-learn the AdamIO learning-rate schedule (:class:`ScheduleMetaLearner`) and compare it
  on held-out pairs with the piecewise schedule and a grid of constant learning rates at the same step count;
* ``bilevel``   — bilevel λ for LearnGN (:class:`BilevelLearnGN`) at three noise levels, the 20-point λ grid
  check, and the runs without / with the regularity guard (σ = 0.15);
* ``guard``     — the guard runs again at low noise (σ = 0.02), longer;
* ``amortised`` — the λ-conditioned hypernetwork (:class:`HyperLearnGN`): smoothness along a λ sweep, Dice
  against LearnGN models trained at fixed λ, and λ selection (gradient descent vs sweep);
* ``linesearch`` — the exact full-batch meta-gradient of the schedule at the best training constant and the
  training TRE along the descent direction (is the meta-gradient useful, and how far?);
* ``confirm``   — the learned schedule of a ``schedule`` run against the references on fresh pairs (data seed 1);
* ``report``    — write ``hyper.md`` (recomputes the hypergradient check and the schedule cliff table).

The runs behind ``benchmarks/results/hyper.md`` (with ``.venv/bin/python``)::

  python benchmarks/hyper.py bilevel
  python benchmarks/hyper.py guard
  python benchmarks/hyper.py amortised
  # the learned schedules (T = 10, 20, 30, 270): Adam's first step stays at the baseline (--frozen-steps 1)
  for T in 10 20 30; do python benchmarks/hyper.py schedule --steps $T --epochs 40 --lr 0.003 \
      --max-log-delta 1.0 --n-freq 2 --train-pairs 64 --val-pairs 64 --test-pairs 256 --select-on-val \
      --baseline-best --batch-size 64 --frozen-steps 1; done
  python benchmarks/hyper.py schedule --steps 270 --epochs 20 --lr 0.003 --max-log-delta 1.0 --n-freq 2 \
      --train-pairs 64 --val-pairs 64 --test-pairs 256 --select-on-val --baseline-best --batch-size 64 \
      --frozen-steps 1
  for T in 10 20 30 270; do python benchmarks/hyper.py confirm --steps $T --test-pairs 256; done
  # variants in the "other meta-training variants" table: the commands recorded in their JSON files (the
  # smoothed-objective ones, tagged smooth/es/esf, need commit 05772aa, which still has their options)
  python benchmarks/hyper.py linesearch --steps 10
  python benchmarks/hyper.py linesearch --steps 20 --magnitude 0.25
  python benchmarks/hyper.py report

``--quick`` gives tiny smoke budgets. Each run takes minutes to tens of minutes on 2 CPU cores (one torch
thread each by default, ``--threads``): run them in the background with ``nohup``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from data.collate import collate_pairs  # noqa: E402
from data.datamodule import RegistrationDataModule  # noqa: E402
from lightning_modules.baselines import AdamIO  # noqa: E402
from lightning_modules.baselines.schedules import PiecewiseLR, ValuesLR, schedule_values  # noqa: E402
from lightning_modules.metrics import pair_metrics  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("benchmarks.hyper")


# ------------------------------------------------------------------------------------------------ helpers


class _Cached(Dataset):
    """Materialise a (slow, deterministic) synthetic dataset once."""

    def __init__(self, ds: Dataset) -> None:
        self.items = [ds[i] for i in range(len(ds))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class CachedDataModule(RegistrationDataModule):
    """:class:`RegistrationDataModule` whose synthetic splits are generated once and kept in memory."""

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        self.datasets = {k: None if v is None else _Cached(v) for k, v in self.datasets.items()}


def make_data(noise: float = 0.02, shape: int = 64, magnitude: float = 0.15, seed: int = 0,
              **sizes: int) -> CachedDataModule:
    """Synthetic 2D data module (``seed``: 0 for every run but the fresh confirmation pairs), ``shape²`` images,
    displacements up to ``magnitude`` of the size, split sizes from ``sizes`` (num_train, ...)."""
    kw = {
        "num_train": 16,
        "num_val": 8,
        "num_test": 16,
        "num_hyper": 0,
        "batch_size": 4,
        "eval_batch_size": 8,
    }
    kw.update(sizes)
    dm = CachedDataModule(
        source="synthetic2d", synthetic_shape=[shape, shape], synthetic_noise=noise, synthetic_magnitude=magnitude,
        seed=seed, **kw
    )
    dm.setup()
    return dm


def batches(dm: RegistrationDataModule, split: str, size: int = 8) -> list[dict]:
    """All pairs of a split as a list of batches of ``size``."""
    ds = dm.datasets[split]
    return [collate_pairs([ds[j] for j in range(i, min(i + size, len(ds)))]) for i in range(0, len(ds), size)]


def mean_metrics(records: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean over pairs (NaN ignored) of per-batch ``pair_metrics`` dicts."""
    keys = records[0].keys()
    return {k: float(torch.nanmean(torch.cat([r[k].double() for r in records]))) for k in keys}


def trainer(
    max_epochs: int | None = None, max_steps: int = -1, root: Path | None = None, **kw: Any
) -> Trainer:
    """A quiet CPU Trainer (no checkpoints unless ``root``; CSV logs there)."""
    from lightning.pytorch.loggers import CSVLogger

    return Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        logger=CSVLogger(str(root), name="logs") if root else False,
        limit_val_batches=0,
        **kw,
    )


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"hyper_{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


# ------------------------------------------------------------------------------------------- schedule


def evaluate_adam(
    schedule, iterations: int, test: list[dict], step_unit: float = 1.0 / 15.0, per_pair: bool = False
) -> dict[str, Any]:
    """AdamIO (the baseline class, as ``eval.py --method adam``) with ``schedule`` on batches ``test``;
    learning rates in ``step_unit`` voxels (1/15: the piecewise preset's unit). Mean metrics, plus the
    per-pair TRE list ``"tre_pairs"`` with ``per_pair`` (for paired comparisons)."""
    model = AdamIO(schedule=schedule, iterations=iterations, step_unit=step_unit)
    records = [pair_metrics(b, model.register(b), hd95=False) for b in test]
    out: dict[str, Any] = mean_metrics(records)
    if per_pair:
        out["tre_pairs"] = [float(v) for r in records for v in r["tre"]]
    return out


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of the per-pair differences ``a − b``, its standard error, the fractions of pairs where ``a < b``
    (``wins``) and ``a = b`` (``ties``): a paired comparison of two schedules on the same test pairs. Pairs where
    either value is NaN are left out (``pairs`` counts the rest), as :func:`mean_metrics` leaves them out."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    d = d[~torch.isnan(d)]
    return {"mean": float(d.mean()), "se": float(d.std() / math.sqrt(d.numel())),
            "wins": float((d < 0).double().mean()), "ties": float((d == 0).double().mean()),
            "pairs": int(d.numel())}


#: the constant learning rates compared with the learned schedules, in the piecewise preset's unit (1/15 voxel):
#: 0.033 .. 2 voxels per step
CONSTANT_LRS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0)


def best_constant(steps: int, pairs: list[dict], step_unit: float) -> tuple[float, float]:
    """``(lr, tre)``: the constant of :data:`CONSTANT_LRS` with the lowest mean TRE of AdamIO (``steps`` steps) on
    ``pairs``, and that TRE."""
    tre = {lr: evaluate_adam(float(lr), steps, pairs, step_unit)["tre"] for lr in CONSTANT_LRS}
    best = min(tre, key=tre.get)
    return best, tre[best]


def compare_with_references(learned: dict[str, Any], steps: int, test: list[dict], step_unit: float) -> dict:
    """The references on the pairs ``test`` — the piecewise schedule compressed to ``steps`` and every constant of
    :data:`CONSTANT_LRS` (per-pair TREs kept) — the best constant *on these pairs*, and the paired differences of
    ``learned`` (an :func:`evaluate_adam` result with ``per_pair=True`` on the same pairs) to both."""
    pw = evaluate_adam(PiecewiseLR.compressed(steps), steps, test, step_unit, per_pair=True)
    const = {lr: evaluate_adam(float(lr), steps, test, step_unit, per_pair=True) for lr in CONSTANT_LRS}
    best = min(const, key=lambda k: const[k]["tre"])
    return {
        "piecewise": pw,
        "constants": {str(k): v for k, v in const.items()},
        "best_constant": best,
        "paired": {"piecewise": paired_difference(learned["tre_pairs"], pw["tre_pairs"]),
                   "best_constant": paired_difference(learned["tre_pairs"], const[best]["tre_pairs"])},
    }


def bench_schedule(args: argparse.Namespace) -> dict:
    from lightning_modules.baselines.schedules import PRESETS
    from lightning_modules.hyper.schedule import ScheduleMetaLearner, adam_settings, save_schedule

    steps = args.steps or (60 if args.quick else 270)
    unit = PRESETS["piecewise"].step_unit
    seed_everything(0)
    train_pairs = 8 if args.quick else (args.train_pairs or 16)
    dm = make_data(num_train=train_pairs, num_val=args.val_pairs, num_test=8 if args.quick else args.test_pairs,
                   batch_size=args.batch_size, magnitude=args.magnitude)
    test = batches(dm, "test")
    val = batches(dm, "val")
    t0 = time.time()
    piecewise = PiecewiseLR.compressed(steps)
    pw_values = schedule_values(piecewise, steps)
    base_values = pw_values * args.baseline_scale
    train_constant = None
    if (args.baseline_constant or args.baseline_best) and args.baseline_scale != 1.0:
        raise SystemExit("--baseline-constant/--baseline-best and --baseline-scale exclude each other")
    if args.baseline_constant or args.baseline_best:
        # a tuned baseline: the best of the constants on the *training* pairs (the test pairs stay unseen)
        train = batches(dm, "train")
        train_constant, train_constant_tre = best_constant(steps, train, unit)
        base_values = torch.full((steps,), float(train_constant), dtype=torch.float64)
        if args.baseline_best and evaluate_adam(piecewise, steps, train, unit)["tre"] < train_constant_tre:
            base_values, train_constant = pw_values.clone(), None  # the piecewise schedule is better there
    model = ScheduleMetaLearner(
        preset="piecewise",
        steps=steps,
        baseline=[float(v) for v in base_values],
        outer=args.outer,
        w_path=0.2,
        checkpoint_every=max(1, min(15, steps // 3)),
        lr=args.lr or 0.01,
        max_log_delta=args.max_log_delta,
        n_freq=args.n_freq,
        frozen_steps=args.frozen_steps,
    )
    untrained = model.schedule_values().detach().clone()
    epochs = args.epochs or (3 if args.quick else 10)
    curve = LossTrace()
    callbacks = [curve]
    select = BestOnValidation(val, steps, unit) if args.select_on_val else None
    if select is not None:
        callbacks.append(select)
    trainer(max_epochs=epochs, gradient_clip_val=1.0, callbacks=callbacks).fit(model, datamodule=dm)
    name = f"schedule_T{steps}" + (f"_{args.tag}" if args.tag else "")
    path = save_schedule(model, RESULTS / f"hyper_{name}.pt")
    res_base = evaluate_adam(ValuesLR(tuple(float(v) for v in base_values)), steps, test, unit)
    settings = adam_settings(path)  # the exported schedule, as `eval.py --method adam --schedule` reads it
    res_learned = evaluate_adam(settings["schedule"], settings["iterations"], test,
                                settings.get("step_unit", unit), per_pair=True)
    refs = compare_with_references(res_learned, steps, test, unit)
    out = {
        "steps": steps,
        "name": name,
        "epochs": epochs,
        "step_unit": unit,
        "train_pairs": len(dm.datasets["train"]),
        "test_pairs": len(dm.datasets["test"]),
        "baseline": (f"constant {train_constant} (the best constant on the training pairs)"
                     if train_constant is not None else
                     ("piecewise" if steps == 270 else f"piecewise compressed to {steps} steps")
                     + (f" × {args.baseline_scale}" if args.baseline_scale != 1.0 else "")
                     + (" (better than the best constant on the training pairs)" if args.baseline_best else "")),
        "baseline_constant": train_constant,
        "baseline_values": [float(v) for v in base_values],
        "baseline_scale": args.baseline_scale,
        "untrained_equals_baseline": bool(torch.equal(untrained, base_values)),
        "constants": refs["constants"],
        "piecewise": refs["piecewise"],
        "learned": res_learned,
        "baseline_result": res_base,
        "paired": refs["paired"],
        "best_constant_test": refs["best_constant"],
        "learned_values": list(settings["schedule"].values),
        "piecewise_values": pw_values.tolist(),
        "meta_loss": curve.values,
        "n_freq": args.n_freq,
        "frozen_steps": args.frozen_steps,
        "outer": args.outer,
        "batch_size": args.batch_size,
        "selected_on_val": None if select is None else {
            "val_tre_untrained": select.untrained,
            "val_tre_per_epoch": select.history, "best_epoch": select.best[1], "best_val_tre": select.best[0],
            "val_pairs": sum(int(b["fixed"].shape[0]) for b in val),
        },
        "meta_lr": args.lr or 0.01,
        "max_log_delta": args.max_log_delta,
        "seconds": time.time() - t0,
        "command": f"python benchmarks/hyper.py schedule --steps {steps}{' --quick' if args.quick else ''}"
        + (f" --epochs {args.epochs}" if args.epochs else "")
        + (f" --lr {args.lr}" if args.lr else "")
        + (f" --max-log-delta {args.max_log_delta}" if args.max_log_delta != 3.0 else "")
        + (f" --baseline-scale {args.baseline_scale}" if args.baseline_scale != 1.0 else "")
        + (f" --train-pairs {args.train_pairs}" if args.train_pairs else "")
        + (f" --val-pairs {args.val_pairs}" if args.val_pairs != 8 else "")
        + (f" --magnitude {args.magnitude}" if args.magnitude != 0.15 else "")
        + (f" --test-pairs {args.test_pairs}" if args.test_pairs != 16 else "")
        + (f" --n-freq {args.n_freq}" if args.n_freq != 4 else "")
        + (f" --outer {args.outer}" if args.outer != "tre" else "")
        + (f" --batch-size {args.batch_size}" if args.batch_size != 4 else "")
        + (f" --frozen-steps {args.frozen_steps}" if args.frozen_steps else "")
        + (" --select-on-val" if args.select_on_val else "")
        + (" --baseline-constant" if args.baseline_constant else "")
        + (" --baseline-best" if args.baseline_best else "")
        + (f" --tag {args.tag}" if args.tag else ""),
    }
    _plot_schedule(out)
    write_json(name, out)
    return out


def _plot_schedule(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
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
    ax.set_yscale("log")
    ax.set_xlabel("Adam step t")
    ax.set_ylabel("learning rate η_t (1/15 voxel)")
    ax.legend(fontsize=8)
    ax.set_title(f"AdamIO learning-rate schedules, T = {out['steps']}, synthetic 2D 64×64")
    fig.tight_layout()
    fig.savefig(RESULTS / f"hyper_{out['name']}.png", dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- bilevel

BILEVEL_COMMON = {
    "features": "intensity",
    "iterations": 5,
    "stride": 4,
    "lam_start": 0.003,
    "lam_end": 0.0015,
    "hidden": 0,
    "w_label": 1.0,
    "label_loss": "mse",
    "lr": 3e-3,
}


class LambdaTrace(Callback):
    """Records λ (first iteration) after every training batch."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(pl_module.lam_values()[0].detach()))


class BestOnValidation(Callback):
    """Model selection for the schedule meta-learner: after every epoch, the current schedule runs through the
    baseline loop (``AdamIO``, not the differentiable copy) on the validation pairs; the schedule network's
    weights with the lowest mean TRE are kept and restored at the end of the fit (the meta-gradient through
    many Adam steps is noisy, and the last epoch is not necessarily the best)."""

    def __init__(self, val: list[dict], steps: int, step_unit: float) -> None:
        self.val, self.steps, self.step_unit = val, steps, step_unit
        self.history: list[float] = []
        self.untrained: float | None = None
        self.best: tuple[float, int, dict] | None = None

    def _score(self, pl_module, epoch: int) -> float:
        tre = evaluate_adam(pl_module.as_schedule(), self.steps, self.val, self.step_unit)["tre"]
        if self.best is None or tre < self.best[0]:
            state = {k: v.detach().clone() for k, v in pl_module.schedule.state_dict().items()}
            self.best = (tre, epoch, state)
        return tre

    def on_train_start(self, trainer, pl_module) -> None:
        # the untrained network (= the baseline) is a candidate too, as "epoch -1"
        self.untrained = self._score(pl_module, -1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.history.append(self._score(pl_module, trainer.current_epoch))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.best is not None:
            pl_module.schedule.load_state_dict(self.best[2])


class LossTrace(Callback):
    """Records the training loss after every training batch."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.values.append(float(loss))


def outer_on(model, test: list[dict], lam: float | None = None, w_guard: float = 1.0) -> dict[str, float]:
    """Held-out outer loss (soft-Dice loss + w_guard·diffusion) and metrics of ``model`` at first-iteration
    ``lam`` (None: the model's own λ)."""
    from lightning_modules.hyper.hypernet import run_with_log_lam
    from lightning_modules.hyper.objectives import outer_loss

    losses, records = [], []
    model.eval()
    with torch.no_grad():
        for b in test:
            if lam is None:
                u = model.register(b)
            else:
                u = run_with_log_lam(model, b, torch.tensor(math.log(lam)))
            terms = outer_loss(b, u, guard="diffusion", w_guard=w_guard)
            losses.append(float(sum(terms.values())) * b["fixed"].shape[0])
            records.append(pair_metrics(b, u, hd95=False))
    out = mean_metrics(records)
    out["outer"] = sum(losses) / sum(b["fixed"].shape[0] for b in test)
    return out


def fit_bilevel(dm, epochs: int, **kw: Any):
    from lightning_modules.hyper import BilevelLearnGN

    seed_everything(0)
    model = BilevelLearnGN(**{**BILEVEL_COMMON, **kw})
    trace = LambdaTrace()
    trainer(max_epochs=epochs, callbacks=[trace]).fit(model, datamodule=dm)
    return model, trace.values


def bench_bilevel(args: argparse.Namespace) -> dict:
    t0 = time.time()
    noises = [0.02, 0.15, 0.4]
    epochs = args.epochs or (3 if args.quick else 25)
    sizes = {
        "num_train": 8 if args.quick else 16,
        "num_hyper": 4 if args.quick else 8,
        "num_val": 1,
        "num_test": 8 if args.quick else 16,
        "batch_size": 4,
    }
    hyper = {
        "lam_mode": "scalar",
        "hyper_lr": args.lr or 0.1,
        "hyper_warmup": 4,
        "hyper_every": 1,
        "outer_guard": "diffusion",
        "w_guard": 1.0,
    }
    grid = [float(v) for v in torch.logspace(-4, -1, 20)]
    out: dict[str, Any] = {
        "noises": noises,
        "epochs": epochs,
        "sizes": sizes,
        "common": BILEVEL_COMMON,
        "hyper": hyper,
        "grid": grid,
        "runs": {},
    }
    for noise in noises:
        dm = make_data(noise, **sizes)
        test = batches(dm, "test")
        run: dict[str, Any] = {}
        for name, extra in (("learned", {}), ("handcrafted", {"train_network": False})):
            model, trace = fit_bilevel(dm, epochs, **hyper, **extra)
            lam = float(model.lam_values()[0])
            at_learned = outer_on(model, test)
            at_grid = [outer_on(model, test, g)["outer"] for g in grid]
            best = min(range(len(grid)), key=lambda i: at_grid[i])
            run[name] = {
                "lam": lam,
                "trace": trace,
                "test": at_learned,
                "grid_outer": at_grid,
                "grid_best_lam": grid[best],
                "grid_best_outer": at_grid[best],
                "gap": at_learned["outer"] / at_grid[best] - 1.0,
            }
            log.info(
                "noise %.2f %s: λ = %.4g, outer %.4f, grid best λ = %.4g (%.4f), gap %.2f %%",
                noise,
                name,
                lam,
                at_learned["outer"],
                grid[best],
                at_grid[best],
                100 * run[name]["gap"],
            )
        out["runs"][str(noise)] = run
    # the guard: start above the Dice optimum, learn λ with and without the regularity guard
    dm = make_data(0.15, **sizes)
    test = batches(dm, "test")
    out["guard"] = {}
    for name, guard in (
        ("no_guard", {"outer_guard": "none"}),
        ("diffusion", {"outer_guard": "diffusion"}),
        ("negjac", {"outer_guard": "negjac", "w_guard": 10.0, "guard_margin": 0.1}),
    ):
        model, trace = fit_bilevel(dm, epochs, **{**hyper, **guard, "lam_init": 0.01})
        out["guard"][name] = {
            "lam": float(model.lam_values()[0]),
            "trace": trace,
            "test": outer_on(model, test),
            "settings": guard,
        }
    out["folding_threshold"] = 0.01
    out["seconds"] = time.time() - t0
    out["command"] = f"python benchmarks/hyper.py bilevel{' --quick' if args.quick else ''}"
    _plot_bilevel(out)
    write_json("bilevel", out)
    return out


def bench_guard(args: argparse.Namespace) -> dict:
    """Low noise (σ = 0.02), λ started at the reference 0.003: Dice-only outer loss vs the two guards."""
    t0 = time.time()
    epochs = args.epochs or (3 if args.quick else 50)
    sizes = {
        "num_train": 8 if args.quick else 16,
        "num_hyper": 4 if args.quick else 8,
        "num_val": 1,
        "num_test": 8 if args.quick else 16,
        "batch_size": 4,
    }
    hyper = {"lam_mode": "scalar", "hyper_lr": args.lr or 0.1, "hyper_warmup": 4, "hyper_every": 1}
    dm = make_data(0.02, **sizes)
    test = batches(dm, "test")
    out: dict[str, Any] = {
        "noise": 0.02,
        "epochs": epochs,
        "sizes": sizes,
        "hyper": hyper,
        "runs": {},
        "folding_threshold": 0.01,
    }
    for name, guard in (
        ("no_guard", {"outer_guard": "none"}),
        ("diffusion", {"outer_guard": "diffusion", "w_guard": 1.0}),
        ("negjac", {"outer_guard": "negjac", "w_guard": 10.0, "guard_margin": 0.1}),
    ):
        model, trace = fit_bilevel(dm, epochs, **{**hyper, **guard})
        out["runs"][name] = {
            "lam": float(model.lam_values()[0]),
            "trace": trace,
            "test": outer_on(model, test),
            "settings": guard,
        }
        log.info(
            "guard %s: λ = %.4g, folding %.4f",
            name,
            out["runs"][name]["lam"],
            out["runs"][name]["test"]["folding"],
        )
    out["seconds"] = time.time() - t0
    out["command"] = f"python benchmarks/hyper.py guard{' --quick' if args.quick else ''}"
    write_json("guard", out)
    return out


def _plot_bilevel(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for noise, run in out["runs"].items():
        r = run["learned"]
        (line,) = axes[0].plot(r["trace"], label=f"noise {noise}")
        axes[0].plot(run["handcrafted"]["trace"], ls=":", color=line.get_color())
        axes[1].plot(out["grid"], r["grid_outer"], color=line.get_color(), label=f"noise {noise}")
        axes[1].axvline(r["lam"], color=line.get_color(), ls="--")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("λ (first GN iteration)")
    axes[0].set_title("bilevel λ (solid: learned heads, dotted: handcrafted)")
    axes[0].legend(fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("λ")
    axes[1].set_ylabel("held-out outer loss")
    axes[1].set_title("20-point λ grid (dashed: learned λ)")
    for name, g in out["guard"].items():
        axes[2].plot(g["trace"], label=f"{name}: folding {100 * g['test']['folding']:.2f} %")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel("λ")
    axes[2].set_title("outer loss without / with a regularity guard")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "hyper_bilevel.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ amortised

AMORTISED_REF = 0.003  # λ_ref: the reference schedule starts there; w_reg applies at λ_ref


def smoothness(model, test: list[dict], lam: float) -> dict[str, float]:
    """Diffusion of the field (voxel², lower = smoother) and the metrics of ``model`` at first-iteration λ."""
    from lightning_modules.hyper.hypernet import run_with_log_lam
    from lightning_modules.losses import regularity_loss

    diffs, records = [], []
    model.eval()
    with torch.no_grad():
        for b in test:
            u = run_with_log_lam(model, b, torch.tensor(math.log(lam)))
            diffs.append(float(regularity_loss(u)))
            records.append(pair_metrics(b, u, hd95=False))
    out = mean_metrics(records)
    out["diffusion"] = sum(diffs) / len(diffs)
    return out


def bench_amortised(args: argparse.Namespace) -> dict:
    from lightning_modules.hyper import HyperLearnGN, select_lambda
    from lightning_modules.learngn import LearnGN

    t0 = time.time()
    epochs = args.epochs or (2 if args.quick else 30)
    sizes = {
        "num_train": 8 if args.quick else 16,
        "num_val": 4 if args.quick else 8,
        "num_test": 8 if args.quick else 16,
        "batch_size": 4,
    }
    noise, w_reg = 0.1, 0.1
    common = {**BILEVEL_COMMON, "lam_start": AMORTISED_REF, "lam_end": AMORTISED_REF / 2, "lr": 1e-3}
    lam_min, lam_max = 3e-4, 3e-2
    dm = make_data(noise, **sizes)
    test, val = batches(dm, "test"), batches(dm, "val")
    seed_everything(0)
    hyper = HyperLearnGN(
        lam_min=lam_min, lam_max=lam_max, w_reg=w_reg, reg_scaling=True, anneal=True, **common
    )
    trainer(max_epochs=2 * epochs).fit(
        hyper, datamodule=dm
    )  # one model for the whole range: twice the epochs
    sweep = [float(v) for v in torch.logspace(math.log10(lam_min), math.log10(lam_max), 9)]
    along = [smoothness(hyper, test, lam) for lam in sweep]
    compare = {}
    for lam in (1e-3, 3e-3, 1e-2):
        seed_everything(0)
        fixed = LearnGN(
            **{**common, "lam_start": lam, "lam_end": lam / 2, "w_reg": w_reg * lam / AMORTISED_REF}
        )
        trainer(max_epochs=epochs).fit(fixed, datamodule=dm)
        hand = LearnGN(**{**common, "lam_start": lam, "lam_end": lam / 2})
        compare[str(lam)] = {
            "hyper": smoothness(hyper, test, lam),
            "fixed": smoothness(fixed, test, lam),
            "handcrafted": smoothness(hand, test, lam),
        }
        log.info(
            "λ = %.4g: Dice hyper %.4f, fixed %.4f, handcrafted %.4f",
            lam,
            compare[str(lam)]["hyper"]["dice"],
            compare[str(lam)]["fixed"]["dice"],
            compare[str(lam)]["handcrafted"]["dice"],
        )
    selected = {}
    for start in (lam_min, lam_max):  # gradient descent from both ends of the range
        choice = select_lambda(
            hyper, val, steps=30, lr=0.15, sweep_points=9, max_batches=None, lam_init=start
        )
        selected[f"from {start:g}"] = {
            "lam": choice.lam,
            "source": choice.source,
            "lam_gd": choice.lam_gd,
            "loss_gd": choice.loss_gd,
            "lam_sweep": choice.lam_sweep,
            "loss_sweep": choice.loss_sweep,
            "sweep": choice.sweep,
            "trace": choice.trace,
            "test_at_gd": smoothness(hyper, test, choice.lam_gd),
            "test_at_sweep": smoothness(hyper, test, choice.lam_sweep),
        }
    out = {
        "epochs": epochs,
        "hyper_epochs": 2 * epochs,
        "anneal": True,
        "sizes": sizes,
        "noise": noise,
        "w_reg": w_reg,
        "lam_ref": AMORTISED_REF,
        "range": [lam_min, lam_max],
        "common": common,
        "sweep": sweep,
        "along": along,
        "compare": compare,
        "selection": selected,
        "seconds": time.time() - t0,
        "command": f"python benchmarks/hyper.py amortised{' --quick' if args.quick else ''}",
    }
    _plot_amortised(out)
    write_json("amortised", out)
    return out


def _plot_amortised(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    lams = out["sweep"]
    axes[0].plot(lams, [a["diffusion"] for a in out["along"]], "o-")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("λ (conditioning and GN weight)")
    axes[0].set_ylabel("diffusion of u (voxel²)")
    axes[0].set_title("amortised model: smoothness along λ")
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
    axes[1].set_xscale("log")
    axes[1].set_xlabel("λ")
    axes[1].set_ylabel("held-out Dice")
    axes[1].legend(fontsize=8)
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
    axes[2].set_xscale("log")
    axes[2].set_xlabel("λ")
    axes[2].set_ylabel("validation outer loss")
    axes[2].set_title("test-time λ selection")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "hyper_amortised.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- report


def hypergrad_check() -> dict[str, Any]:
    """Relative error of the λ-hypergradient through K = 4 GN iterations vs central differences (float64)."""
    import torch.nn.functional as F

    from layers.gn import GNRegistration
    from layers.grid import identity_grid
    from layers.warp import warp_image

    g = torch.Generator().manual_seed(0)
    shape = (32, 32)
    moving = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    for _ in range(3):
        moving = F.avg_pool2d(moving, 5, 1, 2, count_include_pad=False)
    moving = (moving - moving.mean()) / moving.std()
    grid = identity_grid(shape, dtype=torch.float64)[0]
    truth = torch.stack([2 * torch.sin(math.pi * grid[1] / 32), 2 * torch.cos(math.pi * grid[0] / 32 + 1)])[
        None
    ]
    fixed = warp_image(moving, truth)
    gn = GNRegistration(4, 4, lam=(0.1, 0.02), solver={"rtol": 1e-12, "maxiter": 5000, "eps": 0.0})
    base = gn.lam_schedule.double()
    w = torch.randn(1, 2, *shape, generator=g, dtype=torch.float64)

    def outer(log_lam: torch.Tensor) -> torch.Tensor:
        disp = gn(fixed, moving, lam=log_lam.exp()).disp
        return (w * disp).mean() + disp.pow(2).mean()

    log_lam = base.log().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(outer(log_lam), log_lam)
    rows = []
    for i in range(4):
        h = 1e-5
        plus, minus = log_lam.detach().clone(), log_lam.detach().clone()
        plus[i] += h
        minus[i] -= h
        fd = (float(outer(plus)) - float(outer(minus))) / (2 * h)
        rows.append(
            {
                "iteration": i,
                "autograd": float(grad[i]),
                "central_difference": fd,
                "rel_error": abs(float(grad[i]) - fd) / abs(fd),
            }
        )
    return {"rows": rows}


def summary_lines() -> list[str]:
    """The targets of the learned hyper-parameters and whether the JSON results reach them."""

    def load(name: str) -> dict | None:
        path = RESULTS / f"hyper_{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def mark(ok: bool) -> str:
        return "reached" if ok else "**not reached**"

    out = ["## Summary", "", "| target | result | status |", "|---|---|---|"]
    b = load("bilevel")
    if b is not None:
        lam = [run["learned"]["lam"] for run in b["runs"].values()]
        gap = max(abs(r["gap"]) for run in b["runs"].values() for r in run.values())
        out.append(
            f"| bilevel λ increases with noise (σ {', '.join(b['runs'])}) | λ = "
            f"{', '.join(f'{v:.3g}' for v in lam)} | {mark(all(x < y for x, y in zip(lam, lam[1:])))} |"
        )
        out.append(
            f"| held-out outer loss within 2 % of the best of a 20-point λ grid | worst gap "
            f"{100 * gap:.2f} % | {mark(gap < 0.02)} |"
        )
        g = b["guard"]
        fell = g["no_guard"]["lam"] < g["no_guard"]["trace"][0]
        folds = max(r["test"]["folding"] for name, r in g.items() if name != "no_guard")
        out.append(
            f"| without the guard λ falls (σ 0.15, from {g['no_guard']['trace'][0]:.3g}) | "
            f"{g['no_guard']['lam']:.3g} (with diffusion guard {g['diffusion']['lam']:.3g}) | {mark(fell)} |"
        )
        out.append(
            f"| with the guard folding < {100 * b['folding_threshold']:.0f} % | "
            f"{100 * folds:.3f} % | {mark(folds < b['folding_threshold'])} |"
        )
    a = load("amortised")
    if a is not None:
        diffs = [x["diffusion"] for x in a["along"]]
        worst = max(abs(c["hyper"]["dice"] - c["fixed"]["dice"]) for c in a["compare"].values())
        out.append(
            f"| amortised: smoothness monotone along a {len(diffs)}-point λ sweep | diffusion "
            f"{diffs[0]:.3g} → {diffs[-1]:.3g} | {mark(all(x > y for x, y in zip(diffs, diffs[1:])))} |"
        )
        out.append(
            f"| amortised Dice within 0.02 of fixed-λ models at 3 λ | worst {worst:.4f} | "
            f"{mark(worst <= 0.02)} |"
        )
    for steps in (10, 20, 30, 270):
        d = load(f"schedule_T{steps}")
        if d is None:
            continue
        best = d["constants"][str(d["best_constant_test"])]["tre"]
        out.append(
            f"| T = {steps}: untrained schedule network = baseline exactly | "
            f"{d['untrained_equals_baseline']} | {mark(d['untrained_equals_baseline'])} |"
        )
        ok = d["learned"]["tre"] < min(best, d["piecewise"]["tre"])
        paired = d.get("paired")
        out.append(
            f"| T = {steps}: learned beats piecewise and the best of 10 constants (TRE) | "
            f"{d['learned']['tre']:.4f} vs {d['piecewise']['tre']:.4f} / {best:.4f} mm"
            + (f" (paired: {paired['piecewise']['mean']:+.4f} ± {paired['piecewise']['se']:.4f} / "
               f"{paired['best_constant']['mean']:+.4f} ± {paired['best_constant']['se']:.4f} mm, "
               f"{paired['piecewise']['pairs']} pairs)" if paired else "")
            + f" | {mark(ok)} |"
        )
        fresh = load(f"confirm_T{steps}")
        if fresh is not None:
            fb = fresh["constants"][str(fresh["best_constant"])]["tre"]
            fp = fresh["paired"]
            ok = fresh["learned"]["tre"] < min(fb, fresh["piecewise"]["tre"])
            sig = max(v["mean"] + 2 * v["se"] for v in fp.values()) < 0  # both differences below −2 SE
            out.append(
                f"| T = {steps}: the same on {fresh['pairs']} fresh pairs (data seed 1, not used for any choice) | "
                f"{fresh['learned']['tre']:.4f} vs {fresh['piecewise']['tre']:.4f} / {fb:.4f} mm (paired: "
                f"{fp['piecewise']['mean']:+.4f} ± {fp['piecewise']['se']:.4f} / "
                f"{fp['best_constant']['mean']:+.4f} ± {fp['best_constant']['se']:.4f} mm) | "
                f"{mark(ok)}{'' if not ok else ' (both beyond 2 SE: ' + ('yes' if sig else 'no') + ')'} |"
            )
        if "baseline_result" in d:
            base = d["baseline_result"]["tre"]
            out.append(
                f"| T = {steps}: meta-training improves on its starting point (TRE; context, not a target) | "
                f"{d['learned']['tre']:.4f} vs {base:.4f} mm untrained "
                f"({100 * (d['learned']['tre'] / base - 1):+.1f} %) | "
                f"{'yes' if d['learned']['tre'] < base else 'no'} |"
            )
    return out + [""]


def p_is_main_schedule(path: Path) -> bool:
    """``hyper_schedule_T<steps>.json`` (not a variant with a suffix)."""
    return path.stem.split("_T")[-1].isdigit()


def cliff_check(steps: int = 30) -> list[tuple[float, float]]:
    """Meta-objective (final TRE, mm, 16 training pairs) of the piecewise schedule compressed to ``steps``,
    scaled by ``exp(h)``: the instability cliff next to it."""
    from lightning_modules.hyper.schedule import ScheduleMetaLearner

    dm = make_data(num_train=16, num_val=1, num_test=1)
    train = batches(dm, "train", 16)[0]
    pw = schedule_values(
        PiecewiseLR.compressed(steps),
        steps,
    )
    module = ScheduleMetaLearner(preset="piecewise", steps=steps, baseline=[float(v) for v in pw])
    out = []
    with torch.no_grad():
        for h in (-0.3, -0.1, -0.03, 0.0, 0.01, 0.03, 0.1, 0.3):
            module.schedule.mlp[-1].bias.fill_(h)
            out.append((h, float(module.error(train, module.register(train)))))
    return out


def first_step_check(steps: int = 10, pairs: int = 64) -> list[tuple[float, float]]:
    """Final TRE (mm, ``pairs`` training pairs) of the piecewise schedule compressed to ``steps`` with only its
    first learning rate ``η_0`` replaced: Adam's first update is ``η_0 · sign(g)``, and the error is a sharp
    function of ``η_0`` (15 = one coarse voxel)."""
    from lightning_modules.baselines.schedules import PRESETS

    unit = PRESETS["piecewise"].step_unit
    dm = make_data(num_train=pairs, num_val=1, num_test=1)
    train = batches(dm, "train")
    pw = schedule_values(
        PiecewiseLR.compressed(steps),
        steps,
    )
    out = []
    for first in (7.5, 10.0, 12.0, 14.0, 15.0, 16.0, 17.0, 20.0):
        values = [first] + [float(v) for v in pw[1:]]
        out.append((first, evaluate_adam(ValuesLR(tuple(values)), steps, train, unit)["tre"]))
    return out


def line_search(steps: int = 10, pairs: int = 32, magnitude: float = 0.15) -> dict:
    """The exact meta-gradient at the best training constant, and the final TRE on the same training pairs
    along the normalised descent direction ``log η − ε ∇/|∇|`` (through the real AdamIO loop): whether the
    gradient is useful and how far."""
    from lightning_modules.baselines.schedules import PRESETS
    from lightning_modules.hyper.schedule import ScheduleMetaLearner

    unit = PRESETS["piecewise"].step_unit
    dm = make_data(num_train=pairs, num_val=1, num_test=1, magnitude=magnitude)
    train = batches(dm, "train")
    best, _ = best_constant(steps, train, unit)
    base = torch.full((steps,), float(best), dtype=torch.float64)
    module = ScheduleMetaLearner(preset="piecewise", steps=steps, baseline=[float(v) for v in base], outer="tre")
    log_lr = base.log().clone().requires_grad_()
    total = 0.0
    for b in train:
        err = module.error(b, module.unrolled(b, log_lr.exp())) * b["fixed"].shape[0] / pairs
        err.backward()
        total += float(err.detach())
    grad = log_lr.grad.detach().clone()
    direction = -grad / grad.norm()
    along = []
    for eps in (0.0, 0.05, 0.1, 0.2, 0.4):
        values = (base.log() + eps * direction).exp()
        along.append((eps, evaluate_adam(ValuesLR(tuple(float(v) for v in values)), steps, train, unit)["tre"]))
    return {"steps": steps, "pairs": pairs, "constant": best, "meta_loss": total,
            "gradient": [float(v) for v in grad], "along": along,
            "magnitude": magnitude,
            "command": f"python benchmarks/hyper.py linesearch --steps {steps}"
            + (f" --magnitude {magnitude}" if magnitude != 0.15 else "")}


def bench_confirm(args: argparse.Namespace) -> dict:
    """The learned schedule of ``hyper_schedule_T<steps>`` against the piecewise schedule and the 10 constants on
    *fresh* pairs (the test stream of data seed 1), which played no part in choosing the protocol: the schedule
    runs' test pairs (seed 0) were looked at while the recipe was developed, these were not."""
    from lightning_modules.hyper.schedule import adam_settings

    steps = args.steps or 10
    unit = 1.0 / 15.0
    source = RESULTS / f"hyper_schedule_T{steps}.pt"
    if not source.is_file():
        raise SystemExit(f"no learned schedule at {source}: run `schedule --steps {steps}` first")
    pairs = args.test_pairs
    dm = make_data(num_train=1, num_val=1, num_test=pairs, seed=1, magnitude=args.magnitude)
    test = batches(dm, "test")
    t0 = time.time()
    settings = adam_settings(source)
    learned = evaluate_adam(settings["schedule"], steps, test, settings.get("step_unit", unit), per_pair=True)
    out = {
        "steps": steps, "pairs": pairs, "data_seed": 1, "schedule_file": source.name,
        "learned": learned, **compare_with_references(learned, steps, test, unit),
        "seconds": time.time() - t0,
        "command": f"python benchmarks/hyper.py confirm --steps {steps} --test-pairs {pairs}",
    }
    write_json(f"confirm_T{steps}", out)
    return out


def bench_linesearch(args: argparse.Namespace) -> dict:
    out = line_search(args.steps or 10, args.train_pairs or 32, args.magnitude)
    write_json(f"linesearch_T{out['steps']}" + ("" if args.magnitude == 0.15 else f"_m{args.magnitude:g}"), out)
    return out


def _fmt(v: float, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


# The negative result of the smoothed meta-objectives, whose options left the library (numbers from the
# variants table above it in hyper.md).
REMOVED_VARIANTS = [
    "### Removed from the library: smoothed meta-objectives (perturbations, evolution strategies)",
    "",
    "The runs tagged `smooth`, `es` and `esf` meta-trained the schedule on a Gaussian-smoothed objective "
    "E_ε[L(log η + σε)], meant to step over the instability cliff described below: `smooth` by "
    "backpropagation through 2 antithetic perturbed unrolls per meta-step (σ = 0.2, independent per step), "
    "`es` and `esf` by antithetic evolution strategies (16 forward unrolls per meta-step; σ = 0.2 "
    "independent per step, or σ = 0.3 in the span of the schedule network's Fourier features). None beat "
    "its references: at T = 20, `es` and `smooth` ended at 0.9763 and 0.9832 mm, worse than their own "
    "starting point (constant 7.5, 0.9721 mm) and the piecewise schedule (0.9506 mm); neither `esf` run "
    "ever improved the validation TRE of its starting point, so model selection kept the untrained network "
    "(the piecewise schedule itself: 1.1417 mm at T = 10, 0.9462 mm at T = 20). What worked is the plain "
    "backpropagated meta-gradient with the first step frozen (`fz0.001`: −0.0155 ± 0.0048 mm against "
    "piecewise, and the runs of the sections above). The options behind the three runs "
    "(`ScheduleMetaLearner(perturb=..., perturb_samples=..., perturb_basis=..., meta_gradient=\"es\")`, "
    "about 150 lines and their tests, and the benchmark flags `--perturb`, `--perturb-samples`, "
    "`--perturb-basis`, `--meta-gradient`) were therefore removed; commit "
    "`05772aa741cab0e44405821cabb3c1b55496004c` still has them, and their commands in the table run from a "
    "checkout of it.",
]


def report(args: argparse.Namespace) -> dict:
    lines = [
        "# Learned hyper-parameters",
        "",
        "Synthetic 2D pairs (`data.synthetic`, 64×64, seed 0; train / hyper / val / test are disjoint seed "
        "streams),",
        "CPU only (2 shared cores, `torch.set_num_threads(1)`). Every number below comes from the JSON "
        "files next",
        "to this page, written by `benchmarks/hyper.py`; `python benchmarks/hyper.py report` rewrites this "
        "page.",
        "",
        "## 1. Hypergradient through the GN iterations",
        "",
        "`python benchmarks/hyper.py report` (recomputed here), and `pytest tests/layers/test_hypergrad.py`",
        "(one and K GN iterations vs central differences; closed-form Tikhonov `dx/dλ = −A⁻¹Lx`, dense and "
        "eigen).",
        "Float64, CG rtol 1e-12, one `log λ_t` per iteration, K = 4, 32×32 images, stride 4:",
        "",
        "| iteration t | d loss / d log λ_t (implicit) | central difference | relative error |",
        "|---|---|---|---|",
    ]
    for r in hypergrad_check()["rows"]:
        lines.append(
            f"| {r['iteration']} | {r['autograd']:.10g} | {r['central_difference']:.10g} | "
            f"{r['rel_error']:.1e} |"
        )
    lines.append("")
    path = RESULTS / "hyper_bilevel.json"
    if path.is_file():
        d = json.loads(path.read_text())
        lines += [
            "## 2. Bilevel λ for LearnGN",
            "",
            f"Command: `{d['command']}` ({d['seconds'] / 60:.1f} min). LearnGN on intensity features, "
            f"K = {d['common']['iterations']}, stride {d['common']['stride']}, linear heads, schedule "
            f"{d['common']['lam_start']} → {d['common']['lam_end']} scaled by a learned scalar λ (λ below "
            "is the "
            "first-iteration value). Inner loss: label MSE on `train` (16 pairs); outer loss on `hyper` (8 "
            "pairs): "
            "1 − soft Dice + 1.0 · diffusion(u); "
            f"{d['epochs']} epochs of 4 inner steps, one λ update per step after 4 warm-up steps (Adam, lr "
            f"{d['hyper']['hyper_lr']}). *learned heads*: heads and λ trained together; *handcrafted*: heads "
            "frozen at the handcrafted operators, λ only. Held-out: 16 test pairs; the grid is 20 "
            "log-spaced λ in "
            "[1e-4, 1e-1] with the same (final) heads.",
            "",
            "| noise σ | heads | learned λ | held-out outer loss | best of 20-point grid (λ) | gap | "
            "Dice | folding |",
            "|---|---|---|---|---|---|---|---|",
        ]
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
        lines += [
            "",
            f"λ increases monotonically with the noise: **{'yes' if mono else 'no'}** "
            f"(learned heads {', '.join(f'{v:.3g}' for v in lam_l)}; handcrafted "
            f"{', '.join(f'{v:.3g}' for v in lam_h)}). "
            f"Largest gap to the best grid point: **{100 * max(gaps):.2f} %** (target < 2 %).",
            "",
            f"Regularity guard (noise 0.15, learned heads, λ started at 0.01, {d['epochs']} epochs; "
            "folding threshold "
            f"{100 * d['folding_threshold']:.0f} %):",
            "",
            "| outer loss | final λ | lowest λ on the way | held-out Dice | held-out folding |",
            "|---|---|---|---|---|",
        ]
        names = {
            "no_guard": "1 − soft Dice only",
            "diffusion": "+ 1.0 · diffusion",
            "negjac": "+ 10 · mean relu(0.1 − det J)",
        }
        for name, g_ in d["guard"].items():
            lines.append(
                f"| {names.get(name, name)} | {g_['lam']:.4g} | {min(g_['trace']):.4g} | "
                f"{g_['test']['dice']:.3f} | {100 * g_['test']['folding']:.3f} % |"
            )
        if d["guard"]["negjac"]["trace"] == d["guard"]["no_guard"]["trace"]:
            lines += [
                "",
                "No field folded on the way, so the negative-Jacobian guard stayed at 0 and its run "
                "coincides with the unguarded one.",
            ]
        lines += ["", "![bilevel](hyper_bilevel.png)", ""]
    path = RESULTS / "hyper_guard.json"
    if path.is_file():
        d = json.loads(path.read_text())
        lines += [
            f"Low noise (σ = {d['noise']}), λ started at the reference 0.003, {d['epochs']} epochs "
            f"(command: `{d['command']}`, {d['seconds'] / 60:.0f} min), learned heads:",
            "",
            "| outer loss | final λ | lowest λ on the way | held-out Dice | SDlogJ | held-out folding |",
            "|---|---|---|---|---|---|",
        ]
        names = {
            "no_guard": "1 − soft Dice only",
            "diffusion": "+ 1.0 · diffusion",
            "negjac": "+ 10 · mean relu(0.1 − det J)",
        }
        for name, r in d["runs"].items():
            lines.append(
                f"| {names.get(name, name)} | {r['lam']:.4g} | {min(r['trace']):.4g} | "
                f"{r['test']['dice']:.3f} "
                f"| {r['test']['sdlogj']:.3f} | {100 * r['test']['folding']:.3f} % |"
            )
        lines.append("")
    path = RESULTS / "hyper_amortised.json"
    if path.is_file():
        d = json.loads(path.read_text())
        lines += [
            "## 3. λ-conditioned hypernetwork (amortised λ)",
            "",
            f"Command: `{d['command']}` ({d['seconds'] / 60:.1f} min). `HyperLearnGN` (FiLM per-channel "
            "scale and "
            f"shift of both heads from an MLP of log λ, identity at initialisation), λ ∈ [{d['range'][0]}, "
            f"{d['range'][1]}] log-uniform per batch (20 % at the ends), GN schedule scaled by λ, training "
            "loss "
            f"label MSE + {d['w_reg']} · (λ / {d['lam_ref']}) · diffusion; noise σ = {d['noise']}; "
            f"{d.get('hyper_epochs', d['epochs'])} epochs on 16 pairs with a cosine-annealed learning rate "
            f"({'on' if d.get('anneal') else 'off'}). *Fixed* models: LearnGN trained at that λ with the "
            "same "
            f"loss weights for {d['epochs']} epochs (constant learning rate). Held-out: 16 test pairs.",
            "",
            "| λ | diffusion of u (voxel²) | SDlogJ | Dice | folding |",
            "|---|---|---|---|---|",
        ]
        for lam, a in zip(d["sweep"], d["along"]):
            lines.append(
                f"| {lam:.3g} | {a['diffusion']:.5f} | {a['sdlogj']:.4f} | {a['dice']:.4f} | "
                f"{100 * a['folding']:.2f} % |"
            )
        diffs = [a["diffusion"] for a in d["along"]]
        mono = all(a > b for a, b in zip(diffs, diffs[1:]))
        lines += [
            "",
            f"Smoothness increases monotonically along the sweep: **{'yes' if mono else 'no'}**.",
            "",
            "| λ | Dice amortised | Dice fixed-λ model | difference | Dice handcrafted GN |",
            "|---|---|---|---|---|",
        ]
        worst = 0.0
        for lam, c in d["compare"].items():
            diff = c["hyper"]["dice"] - c["fixed"]["dice"]
            worst = max(worst, abs(diff))
            lines.append(
                f"| {lam} | {c['hyper']['dice']:.4f} | {c['fixed']['dice']:.4f} | {diff:+.4f} | "
                f"{c['handcrafted']['dice']:.4f} |"
            )
        lines += [
            "",
            f"Largest |difference|: **{worst:.4f}** (target ≤ 0.02). Not robust to the budget: a run with the "
            "fixed models' budget (30 epochs, constant learning rate; same code otherwise) missed the target at "
            "λ = 0.001 (Dice 0.8715 vs 0.9037, difference 0.032; 0.0070 and 0.0176 at 0.003 and 0.01).",
            "",
            "Test-time λ selection on the 8 validation pairs (outer loss 1 − soft Dice + diffusion): "
            "gradient "
            "descent on log λ (Adam, 30 steps, lr 0.15) from either end of the range, cross-checked by a "
            "9-point "
            "sweep:",
            "",
            "| start | λ by gradient descent (loss) | best sweep λ (loss) | chosen | test Dice at chosen λ |",
            "|---|---|---|---|---|",
        ]
        for name, s in d["selection"].items():
            at = s["test_at_gd"] if s["source"] == "gd" else s["test_at_sweep"]
            lines.append(
                f"| {name} | {s['lam_gd']:.4g} ({s['loss_gd']:.4f}) | {s['lam_sweep']:.4g} "
                f"({s['loss_sweep']:.4f}) | {s['source']} | {at['dice']:.4f} |"
            )
        lines += ["", "![amortised](hyper_amortised.png)", ""]
    mains = [p for p in RESULTS.glob("hyper_schedule_T*.json") if p_is_main_schedule(p)]
    if mains:
        lines += ["## 4. Learned learning-rate schedule for AdamIO", ""]
    for path in sorted(mains, key=lambda p: int(p.stem.split("_T")[-1])):
        d = json.loads(path.read_text())
        _plot_schedule(d)
        best = str(d["best_constant_test"])
        lines += [
            f"### T = {d['steps']}",
            "",
            f"Command: `{d['command']}` ({d['seconds'] / 60:.1f} min). AdamIO (MIND-SSC, half resolution, "
            "12·MSE + 1.25·diffusion, two 3×3 smoothing passes of the increment), learning rates in the "
            f"piecewise preset's unit of 1/15 voxel, T = {d['steps']} steps for every schedule. Baseline: "
            f"{d['baseline']}. The schedule network (Fourier features of t/T; log η_t = log η_baseline(t) + "
            "MLP, last layer zero-initialised, |MLP| bounded by "
            f"{d['max_log_delta']}) equals the baseline exactly when untrained: "
            f"**{d['untrained_equals_baseline']}**"
            + (f"; the first {d['frozen_steps']} step(s) keep the baseline value (Adam's first update is a "
               "sign step, see the end of this section)" if d.get("frozen_steps") else "")
            + f". Meta-trained {d['epochs']} epochs "
            f"({-(-d['train_pairs'] // d.get('batch_size', 4))} batches of {d.get('batch_size', 4)} of the "
            f"{d['train_pairs']} training pairs each, {d.get('n_freq', 4)} Fourier frequencies, Adam lr "
            f"{d['meta_lr']}, gradient clipping 1) through a differentiable Adam with gradient checkpointing; "
            + ("outer loss = keypoint TRE at the end + 0.2 × TRE at the segment ends along the way. "
               if d.get("outer", "tre") == "tre" else
               f"outer loss = {d['outer']} at the end + 0.2 × the same at the segment ends along the way. ")
            + (f"Model selection: after every epoch the schedule ran through the baseline loop on the "
               f"{d['selected_on_val']['val_pairs']} validation pairs; the epoch with the lowest TRE there is "
               "kept, the untrained network included as epoch 0 (chosen: epoch "
               f"{d['selected_on_val']['best_epoch'] + 1}; validation TRE "
               + (f"{d['selected_on_val']['val_tre_untrained']:.4f} mm untrained, "
                  if d['selected_on_val'].get('val_tre_untrained') is not None else "")
               + f"{d['selected_on_val']['val_tre_per_epoch'][0]:.4f} mm after the first epoch, "
               f"{d['selected_on_val']['best_val_tre']:.4f} mm at the chosen one). " if d.get("selected_on_val")
               else "")
            + f"Evaluated with the baseline class, `AdamIO(**adam_settings(path))`, on {d['test_pairs']} "
            "held-out pairs (data seed 0; the recipe — frozen first step, meta learning rate, trust region — was "
            "settled while looking at results on these pairs, so the fresh-pair confirmation below is the "
            "clean test):",
            "",
            "| schedule | TRE (mm) | Dice | SDlogJ | folding |",
            "|---|---|---|---|---|",
        ]
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
        paired = d.get("paired")
        paired_text = "" if not paired else (
            " Paired over the same test pairs (learned − reference, mean ± standard error, fraction of pairs "
            "where the learned schedule is better): "
            + "; ".join(f"vs {name.replace('_', ' ')} {v['mean']:+.4f} ± {v['se']:.4f} mm ({100 * v['wins']:.0f} %)"
                        for name, v in paired.items()) + ".")
        lines += [
            "",
            f"The learned schedule beats the piecewise schedule and the best of {len(d['constants'])} "
            "constant "
            f"learning rates (the best chosen on the test pairs themselves) on held-out TRE: "
            f"**{'yes' if beats else 'no'}** ({d['learned']['tre']:.4f} mm vs "
            f"{d['constants'][best]['tre']:.4f} mm "
            f"for constant {best} and {d['piecewise']['tre']:.3f} mm for piecewise)."
            + (f" Against its own starting point (the untrained network, {d['baseline_result']['tre']:.4f} mm) "
               f"meta-training changed the held-out TRE by "
               f"{100 * (d['learned']['tre'] / d['baseline_result']['tre'] - 1):+.1f} %."
               if "baseline_result" in d else "") + paired_text,
            "",
            f"![schedule T={d['steps']}](hyper_{d.get('name', 'schedule_T' + str(d['steps']))}.png)",
            "",
        ]
    confirms = sorted(RESULTS.glob("hyper_confirm_T*.json"), key=lambda p: int(p.stem.split("_T")[-1]))
    if confirms:
        lines += [
            "### Confirmation on fresh pairs",
            "",
            "The learned schedules above (the `.pt` files that `schedule` writes next to this page; they are "
            "not kept in git, `schedule` regenerates them) against the piecewise schedule and the 10 constants on "
            "pairs of another data seed (the test stream of seed 1), which played no part in developing the "
            "recipe (`python benchmarks/hyper.py confirm --steps T --test-pairs 256`). TRE in mm; the best "
            "constant is again chosen on these pairs themselves; paired differences are mean ± standard error "
            "(fraction of pairs where the learned schedule is strictly better):",
            "",
            "| T | pairs | learned | piecewise | best constant | learned − piecewise | learned − best constant |",
            "|---|---|---|---|---|---|---|",
        ]
        closing = [
            "",
            "Only T = 20 holds up on these pairs with both differences beyond two standard errors; at T = 10 the "
            "learned schedule is better in the mean but not significantly better than the piecewise one; at "
            "T = 30 it is worse than both references on most pairs although it was better on the seed-0 test "
            "pairs, and at T = 270 all three are equal within noise. Part of the seed-0 gains is therefore "
            "specific to that data draw (the seed-0 train, validation and test streams come from one generator "
            "seed), and the gain that generalises is about 1 % of TRE at T = 20.",
        ]
        for path in confirms:
            d = json.loads(path.read_text())
            b = str(d["best_constant"])
            pw_, bc = d["paired"]["piecewise"], d["paired"]["best_constant"]
            lines.append(
                f"| {d['steps']} | {d['pairs']} | {d['learned']['tre']:.4f} | {d['piecewise']['tre']:.4f} | "
                f"{d['constants'][b]['tre']:.4f} ({b}) | {pw_['mean']:+.4f} ± {pw_['se']:.4f} "
                f"({100 * pw_['wins']:.0f} %) | {bc['mean']:+.4f} ± {bc['se']:.4f} ({100 * bc['wins']:.0f} %) |"
            )
        lines += closing + [""]
    variants = [p for p in RESULTS.glob("hyper_schedule_T*_*.json") if not p_is_main_schedule(p)
                and "name" in json.loads(p.read_text())]
    if variants:
        lines += [
            "### Other meta-training variants (what did and did not work)",
            "",
            "Each row is one `schedule` run with a `--tag` (its JSON, figure and schedule file carry the tag); "
            "the same held-out comparison as above (TRE in mm; the best constant chosen on the test pairs).",
            "",
            "| run | command | test pairs | learned | piecewise | best constant | learned − piecewise (paired) |",
            "|---|---|---|---|---|---|---|",
        ]
        for path in sorted(variants, key=lambda p: (int(p.stem.split("_T")[-1].split("_")[0]), p.stem)):
            d = json.loads(path.read_text())
            best = d["constants"][str(d["best_constant_test"])]["tre"]
            pair = d.get("paired", {}).get("piecewise")
            lines.append(
                f"| {d['name']} | `{d['command']}` | {d['test_pairs']} | {d['learned']['tre']:.4f} | "
                f"{d['piecewise']['tre']:.4f} | "
                f"{best:.4f} | " + (f"{pair['mean']:+.4f} ± {pair['se']:.4f}" if pair else "–") + " |"
            )
        lines += [""] + REMOVED_VARIANTS + [""]
    for path in sorted(RESULTS.glob("hyper_linesearch_T*.json")):
        d = json.loads(path.read_text())
        lines += [
            f"### Is the meta-gradient useful? (T = {d['steps']}"
            + (f", displacements up to {100 * d['magnitude']:.0f} %" if d.get("magnitude", 0.15) != 0.15 else "")
            + ")",
            "",
            f"`{d['command']}`: the exact meta-gradient of the final TRE on {d['pairs']} training pairs (one full "
            f"batch) at the best training constant ({d['constant']}), then the final TRE on the same pairs "
            "through the real AdamIO loop along the normalised descent direction, log η − ε ∇/|∇|:",
            "",
            "| ε | final TRE on the training pairs (mm) |",
            "|---|---|",
        ]
        lines += [f"| {eps:.2f} | {tre:.4f} |" for eps, tre in d["along"]]
        start, best_tre = d["along"][0][1], min(t for _, t in d["along"])
        if best_tre < start:
            verdict = (
                "The gradient points downhill, but only within a small neighbourhood (best point along the line: "
                f"{100 * (best_tre / start - 1):+.2f} % of the training TRE), far less than the pair-to-pair noise "
                "of a 32-pair validation set: with the previous protocol (no frozen first step, trust region "
                "e^±0.2 around the best constant) the gains seen on validation during meta-training were "
                "selection noise and did not carry over to the test pairs."
            )
        else:
            verdict = (
                "Here no step along the descent direction lowers the training TRE (the objective is rough at this "
                "scale of log η), so the exact gradient says nothing about finite steps."
            )
        lines += ["", verdict, ""]
    failed = RESULTS / "hyper_schedule_T30_from_piecewise.json"
    if failed.is_file():
        d = json.loads(failed.read_text())
        ml = d["meta_loss"]
        lines += [
            "### T = 30, starting at the piecewise schedule itself",
            "",
            f"`{d['command']}` (the baseline = the piecewise schedule compressed to 30 steps, trust region "
            f"e^±{d['max_log_delta']}): the meta-loss rose from {sum(ml[:8]) / 8:.3f} (first 8 steps) to "
            f"{sum(ml[-8:]) / 8:.3f} (last 8) and the learned schedule is worse on the test pairs (TRE "
            f"{d['learned']['tre']:.3f} mm vs {d['piecewise']['tre']:.3f} mm for piecewise). The piecewise "
            "schedule sits at an instability cliff of these small images: scaling it by e^h changes the "
            "final training TRE as follows (recomputed by `report`), so the exact gradient at h = 0 is "
            "useless for descent:",
            "",
            "| h | final TRE on the 16 training pairs (mm) |",
            "|---|---|",
        ]
        lines += [f"| {h:+.2f} | {v:.4f} |" for h, v in cliff_check(30)]
        lines += [
            "",
            "Where the cliff comes from: Adam's first update is `η_0 · sign(g)` for every parameter (the "
            "bias-corrected m/√v equals g/|g| at step 1), a displacement of η_0 everywhere, not a gradient step. "
            "With the piecewise preset's unit η_0 = 15 is exactly one coarse voxel, and the final error is a "
            "sharp function of η_0 alone: the piecewise schedule compressed to 10 steps with only η_0 replaced "
            "(64 training pairs, recomputed by `report`):",
            "",
            "| η_0 | final TRE (mm) |",
            "|---|---|",
        ]
        lines += [f"| {first:g} | {v:.4f} |" for first, v in first_step_check(10)]
        lines += [
            "",
            "Below 15 the error rises slowly; just above it, it jumps (a cliff). The optimum sits on the edge, "
            "where the unrolled meta-gradient with respect to η_0 still points towards larger η_0, so a "
            "gradient step on η_0 falls off the cliff. The learned schedules above therefore keep "
            "the first step at the baseline (`frozen_steps = 1`, the baseline being the better of the "
            "piecewise schedule and the best constant on the training pairs) and learn steps 1 .. T − 1 (their "
            "ratios to the baseline in the table below: larger steps after the first one at T = 10, 20 and 30, "
            "within a few per cent of the piecewise schedule at T = 270). Earlier "
            "sessions' runs (no frozen step, trust region e^±0.2 around the best constant or the piecewise "
            "schedule) did not beat the references; the smoothed-objective variants in the table above (Gaussian "
            "perturbations with backpropagated or evolution-strategies gradients) did not either: perturbations "
            "of η_0 fall off the cliff, so the smoothed optimum lies away from it.",
            "",
            "Learned learning rates relative to the baseline, η_learned(t) / η_baseline(t):",
            "",
            "| T | baseline | t = 1 | t = T/4 | t = T/2 | t = 3T/4 | t = T − 1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for path in sorted(mains, key=lambda p: int(p.stem.split("_T")[-1])):
            d = json.loads(path.read_text())
            lr, base, t = d["learned_values"], d["baseline_values"], d["steps"]
            cols = [1, t // 4, t // 2, 3 * t // 4, t - 1]
            lines.append(f"| {t} | {d['baseline'].split(' (')[0]} | "
                         + " | ".join(f"{lr[c] / base[c]:.2f}" for c in cols) + " |")
        lines.append("")
    lines[6:6] = summary_lines()
    text = "\n".join(lines)
    (RESULTS / "hyper.md").write_text(text)
    return {"written": str(RESULTS / "hyper.md")}


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["schedule", "bilevel", "guard", "amortised", "linesearch", "confirm",
                                         "report"])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="schedule: the horizon T (default 270)")
    parser.add_argument(
        "--baseline-scale", type=float, default=1.0, help="schedule: start from the piecewise schedule × this"
    )
    parser.add_argument(
        "--max-log-delta",
        type=float,
        default=3.0,
        help="schedule: bound on |log η − log η_baseline| (trust region)",
    )
    parser.add_argument(
        "--baseline-constant",
        action="store_true",
        help="schedule: start from the best of the constant learning rates on the training pairs",
    )
    parser.add_argument(
        "--baseline-best",
        action="store_true",
        help="schedule: start from the better (on the training pairs) of the best constant and the piecewise",
    )
    parser.add_argument("--magnitude", type=float, default=0.15,
                        help="schedule/linesearch: largest synthetic displacement, fraction of the image size")
    parser.add_argument("--val-pairs", type=int, default=8, help="schedule: validation pairs (selection)")
    parser.add_argument("--test-pairs", type=int, default=16, help="schedule: held-out test pairs")
    parser.add_argument("--train-pairs", type=int, default=None, help="schedule: training pairs (default 16)")
    parser.add_argument("--n-freq", type=int, default=4, help="schedule: Fourier frequencies of the network")
    parser.add_argument("--outer", default="tre", choices=["tre", "epe", "label", "mixed"],
                        help="schedule: meta-objective (held-out comparison is always by TRE)")
    parser.add_argument("--tag", default="", help="schedule: suffix of the result files (a variant run)")
    parser.add_argument("--frozen-steps", type=int, default=0,
                        help="schedule: the first steps keep the baseline learning rate (not learned)")
    parser.add_argument("--batch-size", type=int, default=4, help="schedule: training pairs per meta-step")
    parser.add_argument(
        "--select-on-val",
        action="store_true",
        help="schedule: keep the epoch whose schedule has the lowest TRE on the validation pairs",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    fn = {
        "schedule": bench_schedule,
        "bilevel": bench_bilevel,
        "guard": bench_guard,
        "amortised": bench_amortised,
        "linesearch": bench_linesearch,
        "confirm": bench_confirm,
        "report": report,
    }.get(args.what)
    if fn is None:
        raise SystemExit(f"not implemented yet: {args.what}")
    result = fn(args)
    log.info(
        "%s done: %s",
        args.what,
        json.dumps({k: v for k, v in result.items() if not isinstance(v, list)})[:2000],
    )


if __name__ == "__main__":
    main()

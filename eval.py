"""Hold-out evaluation of a trained model or a baseline (docs/design.md §9).

    python eval.py --method learngn --ckpt runs/x/checkpoints/last.ckpt --split test --out runs/eval/learngn
    python eval.py --method gn --data synthetic2d --split test --out runs/eval/gn
    python eval.py --method convexadam --data ../shared/data/BrainPair/BrainPair_dataset.json --split val \
        --out runs/brain/convexadam
    python eval.py --compare runs/eval/*          # print a comparison table of finished evaluations
    python eval.py --method gn --fixed F.nii.gz --moving M.nii.gz --moving-labels L.nii.gz --out runs/pair
    python eval.py --apply runs/pair/disp.nii.gz --image X.nii.gz --out X_warped.nii.gz [--nearest]

One pair from files (``--fixed``/``--moving``, no dataset JSON): the moving image (and its labels / mask) is
resampled onto the fixed grid from the files' affines (:mod:`data.pair_files`), registered, and ``--out DIR``
receives ``warped.nii.gz`` (the moving image's raw intensities on the fixed grid, with the fixed affine),
``warped_labels.nii.gz`` (with ``--moving-labels``; nearest), ``disp.nii.gz`` (the Learn2Reg convention:
``(*S, n)``, voxel units, fixed grid), ``disp_itk.nii.gz`` (an ITK / ANTs displacement field, :mod:`data.itk`),
``metrics.json`` and ``figure.png``. ``--apply`` warps any other image or label map in the moving image's space
with a saved ``disp.nii.gz`` exactly as the registration warped the moving image. ``--affine`` runs an affine
pre-alignment before any method (both modes) and writes the composed field. ``--deterministic`` makes repeated
runs bit-identical for a ``--seed`` (deterministic algorithms, no cuDNN autotuning).

Writes ``summary.json``, ``pairs.csv``, ``summary.md``, ``disp/`` and ``figures/`` under ``--out`` (refused when
the folder already holds results, unless ``--overwrite``). A pair that fails anywhere (loading, preprocessing,
registration, metrics, writing) is recorded with its error in ``pairs.csv`` and the run goes on. Evaluation
runs through ``Trainer.predict``, so ``--accelerator gpu --devices N --strategy ddp --num-nodes M`` spread the
pairs over several GPUs. Checkpoints and schedules are read without running code from them
(:mod:`data.checkpoint`).

Exit status: 0 every pair registered; 3 some pairs failed; 4 every pair failed (or there were none); 2 the run
was refused before any pair ran (bad option, input, checkpoint or output folder; the message says which).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from layers.enums import Guard

log = logging.getLogger("eval")

METHODS = ("learngn", "gn", "adam", "convexadam", "identity")
#: ``--lam-guard`` choices: the regularity guards of the outer loss
LAM_GUARDS = tuple(g.value for g in Guard)

#: exit status: every pair registered / some pairs failed / every pair failed (or none) / refused before any ran
EXIT_OK, EXIT_SOME_FAILED, EXIT_ALL_FAILED, EXIT_REFUSED = 0, 3, 4, 2


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def _key_values(pairs: list[str] | None, option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise SystemExit(f"error: {option} expects KEY=VALUE; got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, help="registration method")
    p.add_argument("--ckpt", help="checkpoint of a trained model (--method learngn)")
    p.add_argument("--data", help="synthetic2d | synthetic3d | <TASK>_dataset.json (default for learngn: the "
                                  "data module saved in the checkpoint; otherwise synthetic2d)")
    p.add_argument("--split", default="test", choices=("val", "test", "hyper", "train"), help="split to evaluate")
    p.add_argument("--out", help="output folder")
    p.add_argument("--data-arg", action="append", metavar="KEY=VALUE",
                   help="RegistrationDataModule argument (YAML value), e.g. --data-arg slice_mode=true")
    p.add_argument("--method-arg", action="append", metavar="KEY=VALUE",
                   help="method argument (YAML value), e.g. --method-arg preset=constant; for learngn only the "
                        "settings of a loaded model: semantic_precision (float32 | bf16), use_masks")
    p.add_argument("--method-config", help="YAML file of method arguments (init_args of the method; for learngn "
                                           "only semantic_precision and use_masks)")
    p.add_argument("--lam", help="λ for a λ-conditioned model: a value or 'auto' (chosen on --lam-split)")
    p.add_argument("--lam-split", default="val", choices=("val", "train", "hyper"),
                   help="--lam auto: the split λ is chosen on (default val; use train or hyper when val is the "
                        "split you report)")
    p.add_argument("--lam-guard", default="diffusion", choices=LAM_GUARDS,
                   help="--lam auto: the regularity guard of the selection loss (sdlogj with --lam-guard-margin "
                        "0.2: the best Dice with SDlogJ ≤ 0.2)")
    p.add_argument("--lam-guard-margin", type=float, default=0.0,
                   help="--lam auto: the guard's margin (negjac: det J margin; sdlogj: the SDlogJ bound)")
    p.add_argument("--lam-guard-weight", type=float, default=1.0, help="--lam auto: the guard's weight")
    p.add_argument("--lam-search", type=int, nargs=2, default=(9, 20), metavar=("SWEEP", "STEPS"),
                   help="--lam auto: points of the log-spaced λ sweep and Adam steps on log λ (default 9 20)")
    p.add_argument("--init-ckpt", help="LearnGN checkpoint whose field starts the Adam optimisation "
                                       "(--method adam | convexadam: learned GN, then Adam refinement; "
                                       "ConvexAdam then skips its convex stage)")
    p.add_argument("--schedule", help="learned learning-rate schedule checkpoint (--method adam)")
    p.add_argument("--figures", type=int, default=3, help="figures for the first N pairs")
    p.add_argument("--half", action="store_true", help="store displacement files in 16 bit")
    p.add_argument("--no-disp", action="store_true", help="do not write displacement files")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (summary, pairs.csv, disp/, figures/); "
                        "without it such a folder is refused")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="print a table of finished evaluations and exit")
    g = p.add_argument_group("one pair from files (instead of --data; see the module docstring)")
    g.add_argument("--fixed", help="fixed image (.nii / .nii.gz, 2D or 3D)")
    g.add_argument("--moving", help="moving image (any grid: resampled onto the fixed grid from the affines)")
    g.add_argument("--fixed-labels", help="fixed label map (for Dice / HD95 in metrics.json)")
    g.add_argument("--moving-labels", help="moving label map (warped to warped_labels.nii.gz)")
    g.add_argument("--fixed-mask", help="fixed mask (> 0 inside): restricts the similarity terms (the method's "
                   "use_masks, on unless --method-arg use_masks=false) and SDlogJ / folding")
    g.add_argument("--moving-mask", help="moving mask (> 0 inside): restricts the similarity terms (use_masks)")
    g.add_argument("--intensity", choices=("ct", "mr", "none"), default=None,
                   help="intensity normalisation of the two images (default: the checkpoint's data setting for "
                        "learngn when it names one, else none = min-max)")
    g = p.add_argument_group("apply a saved displacement")
    g.add_argument("--apply", metavar="DISP", help="a disp.nii.gz written by this program (Learn2Reg convention)")
    g.add_argument("--image", help="the image or label map to warp (in the moving image's space)")
    g.add_argument("--nearest", action="store_true", help="nearest-neighbour sampling (label maps)")
    p.add_argument("--affine", action="store_true",
                   help="affine pre-alignment (multi-resolution, MIND-SSC) before the method; the written field is "
                        "the composition (lightning_modules.prealign)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms and seeds (--seed): repeated runs give bit-identical outputs")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def load_learngn(ckpt: str, what: str = "--ckpt"):
    """Load a LearnGN-family model from a checkpoint without running code from it, checking its class
    (:func:`data.checkpoint.model_from_checkpoint`; ``FileNotFoundError`` / ``CheckpointError``
    naming the file)."""
    from data.checkpoint import model_from_checkpoint
    from lightning_modules.learngn import LearnGN

    return model_from_checkpoint(ckpt, base=LearnGN, what=what,
                                 expected="a Lightning checkpoint (.ckpt) of a LearnGN model of this project")


def check_lam_options(args: argparse.Namespace) -> None:
    """Refuse ``--lam-*`` selection options that are out of range, or given without ``--lam auto``, before any
    work."""
    defaults = build_parser().parse_args([])
    given = [f"--{k.replace('_', '-')}" for k in ("lam_split", "lam_guard", "lam_guard_margin", "lam_guard_weight",
                                                  "lam_search") if getattr(args, k) != getattr(defaults, k)]
    if not given:
        return
    from lightning_modules.hyper.lam_selection import is_auto

    if not is_auto(args.lam):
        raise SystemExit(f"error: {', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --lam auto only")
    if args.lam_guard_weight < 0:
        raise SystemExit(f"error: --lam-guard-weight must be >= 0; got {args.lam_guard_weight}")
    sweep, steps = args.lam_search
    if sweep < 0 or steps < 0 or sweep + steps == 0:
        raise SystemExit(f"error: --lam-search needs SWEEP, STEPS >= 0, not both 0; got {sweep} {steps}")


def apply_lam(args: argparse.Namespace, model, dm=None) -> str:
    """``--lam``: set the λ of the LearnGN model (``--method learngn``) or of the LearnGN that starts an Adam
    refinement (``--init-ckpt``); ``auto`` chooses it on the ``--lam-split`` pairs of the data module ``dm``
    (set up), with the ``--lam-guard*`` selection loss. Returns a sentence naming the λ used (for the outputs)."""
    target = model if args.method == "learngn" else getattr(model, "initialiser", None)
    if target is None:
        raise SystemExit("error: --lam applies to --method learngn and to the model of --init-ckpt")
    from lightning_modules.hyper.lam_selection import is_auto, resolve_lambda

    if not is_auto(args.lam):
        lam = resolve_lambda(target, args.lam)
        log.info("using λ = %g", lam)
        return f"First-iteration λ {lam:.4g} (`--lam`)."
    if args.lam_split == args.split:
        log.warning("--lam auto chooses λ on the split it evaluates (%s): the result is in-sample", args.split)
    try:
        loader = getattr(dm, f"{args.lam_split}_dataloader")()
    except RuntimeError as exc:  # no such split (hyper without hyper_fraction) or an empty one
        raise SystemExit(f"error: --lam-split {args.lam_split}: {exc}") from None
    sweep, steps = args.lam_search
    lam = resolve_lambda(target, args.lam, loader, guard=args.lam_guard, guard_margin=args.lam_guard_margin,
                         w_guard=args.lam_guard_weight, sweep_points=sweep, steps=steps)
    log.info("using λ = %g (chosen on the %s split)", lam, args.lam_split)
    return f"First-iteration λ {lam:.4g}, chosen by `--lam auto` on the `{args.lam_split}` split."




def read_method_config(path: str) -> dict[str, Any]:
    """The method arguments of a ``--method-config`` YAML file (its ``init_args`` when present); errors name
    the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--method-config file not found: {file}")
    try:
        cfg = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"--method-config {file} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--method-config {file} is not a text file: {exc}") from None
    cfg = {} if cfg is None else cfg
    if isinstance(cfg, dict) and "init_args" in cfg:
        cfg = cfg["init_args"] or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"--method-config {file} must hold a mapping of method arguments; got "
                         f"{type(cfg).__name__}")
    return cfg


def build_method(args: argparse.Namespace, method_args: dict[str, Any]):
    """The LightningModule for ``args.method`` (and the checkpoint dict for learngn)."""
    if args.method == "learngn":
        if not args.ckpt:
            raise SystemExit("error: --method learngn needs --ckpt")
        model, meta = load_learngn(args.ckpt)
        model.configure_inference(**method_args)  # e.g. semantic_precision=bf16; unknown options refused
        return model, meta
    from lightning_modules.baselines import BASELINES, make_baseline

    if args.schedule:
        if args.method != "adam":
            raise SystemExit("error: --schedule applies to --method adam")
        from lightning_modules.hyper.schedule import adam_settings

        method_args.update(adam_settings(args.schedule))
    params = inspect.signature(BASELINES[args.method].__init__).parameters
    unknown = sorted(k for k in method_args if k not in params or k == "self")
    if unknown:
        known = ", ".join(k for k in params if k != "self") or "none"
        raise ValueError(f"--method {args.method} has no option {', '.join(map(repr, unknown))} "
                         f"(--method-arg / --method-config); its options: {known}")
    model = make_baseline(args.method, **method_args)
    if args.init_ckpt:
        if args.method not in ("adam", "convexadam"):
            raise SystemExit("error: --init-ckpt applies to --method adam | convexadam")
        model.set_initialiser(load_learngn(args.init_ckpt, "--init-ckpt")[0])
    model.check_initialiser()  # e.g. AdamIO's semantic_weight needs a semantic LearnGN: refused before any pair
    return model, None


def build_data(args: argparse.Namespace, meta: dict | None, data_args: dict[str, Any]):
    from data.datamodule import RegistrationDataModule

    params: dict[str, Any] = {}
    if args.data is None and meta is not None and meta.get("datamodule_hyper_parameters"):
        params.update({k: v for k, v in meta["datamodule_hyper_parameters"].items() if not k.startswith("_")})
    else:
        params["source"] = args.data or "synthetic2d"
    params.update(data_args)
    if "check_files" not in data_args:  # a missing image fails its own pairs, not the whole run
        params["check_files"] = False
    params["eval_split"] = args.split
    params.setdefault("eval_batch_size", 1)
    return RegistrationDataModule(**params)


def compare(dirs: list[str]) -> str:
    from data.evaluation.writer import comparison_table

    summaries = []
    for d in dirs:
        path = Path(d) / "summary.json"
        if path.is_file():
            summaries.append(json.loads(path.read_text()))
        else:
            log.warning("no summary.json in %s", d)
    return comparison_table(summaries)


def _launch_rank_zero() -> bool:
    """False in the extra processes a distributed launch starts (they must not check or clear ``--out``)."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def exit_status(summary: dict[str, Any] | None) -> int:
    """The exit status of a finished evaluation (see the module docstring)."""
    if summary is None:
        return EXIT_OK
    if summary["n_pairs"] == 0 or summary["n_failed"] >= summary["n_pairs"]:
        return EXIT_ALL_FAILED
    return EXIT_SOME_FAILED if summary["n_failed"] else EXIT_OK


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run an evaluation (or ``--compare``); returns the summary on rank 0, else None. Errors that refuse the
    run before any pair is registered are raised (:func:`cli` turns them into a message and exit status 2)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.compare:
        sys.stdout.write(compare(args.compare))
        return None
    check_lam_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    with deterministic_mode(args.deterministic):
        if args.apply or args.image:
            run_apply(args)
            return None
        if args.fixed or args.moving:
            return run_pair(args)
        return run_dataset(args)


def run_dataset(args: argparse.Namespace) -> dict[str, Any] | None:
    """Evaluate ``--method`` on a split of ``--data`` (the default mode); returns the summary on rank 0."""
    if not args.method or not args.out:
        raise SystemExit("error: --method and --out are required (or --fixed/--moving, --apply, --compare)")
    stray = [f"--{k.replace('_', '-')}" for k in PAIR_ONLY if getattr(args, k)]
    if stray:
        raise SystemExit(f"error: {', '.join(stray)} belong{'s' if len(stray) == 1 else ''} to the one-pair mode "
                         "(--fixed F --moving M)")

    from lightning.pytorch import Trainer, seed_everything

    from data.evaluation.writer import EvaluationWriter, prepare_output
    from data.io import check_unique_disp_names

    out = Path(args.out)
    leader = _launch_rank_zero()
    if leader:  # refuse a folder with results before any work (nothing is touched yet)
        prepare_output(out, args.overwrite, clear=False)
    seed_everything(args.seed, workers=True, verbose=False)
    method_args = {}
    if args.method_config:
        method_args.update(read_method_config(args.method_config))
    method_args.update(_key_values(args.method_arg, "--method-arg"))
    model, meta = build_method(args, method_args)
    dm = build_data(args, meta, _key_values(args.data_arg, "--data-arg"))
    lam_note = ""
    if args.lam is not None:
        dm.setup()
        lam_note = " " + apply_lam(args, model, dm)
    pairs = dm.eval_pairs()
    if pairs is not None:  # before the first pair: no two pairs may write the same displacement file
        check_unique_disp_names(pairs)
    if leader:
        prepare_output(out, args.overwrite)
    model = with_prealignment(model, args.affine)
    writer = EvaluationWriter(out, args.method, n_figures=args.figures, half=args.half,
                              write_disp=not args.no_disp,
                              note=f"Data: `{dm.source}`, split `{args.split}`.{lam_note}\n")
    trainer = Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, num_nodes=args.num_nodes,
        precision=args.precision, logger=False, callbacks=[writer], enable_checkpointing=False,
        enable_model_summary=False, inference_mode=False,
    )
    trainer.predict(model, datamodule=dm, return_predictions=False)
    if trainer.global_rank == 0 and writer.summary is not None:
        s = writer.summary
        sys.stdout.write(
            f"{args.method}: {s['n_pairs']} pairs ({s['n_failed']} failed); results in {out} "
            f"(summary.json, pairs.csv, summary.md, disp/, figures/)\n"
        )
        from data.evaluation.writer import comparison_table

        sys.stdout.write(comparison_table([s]))
        if s["n_failed"]:
            sys.stderr.write(f"warning: {s['n_failed']} of {s['n_pairs']} pairs failed; their errors are in "
                             f"{out / 'pairs.csv'} and {out / 'summary.md'}\n")
        return s
    return None


#: options of the one-pair mode only (argparse destinations)
PAIR_ONLY = ("fixed_labels", "moving_labels", "fixed_mask", "moving_mask", "intensity", "nearest")
#: the files the one-pair mode writes into --out
PAIR_OUTPUTS = ("warped.nii.gz", "warped_labels.nii.gz", "disp.nii.gz", "disp_itk.nii.gz", "metrics.json",
                "figure.png")


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """With ``enabled``: deterministic algorithms (``torch.use_deterministic_algorithms(True, warn_only=True)``),
    no cuDNN autotuning, and the cuBLAS workspace setting CUDA needs for reproducible matrix products; the
    previous settings are restored afterwards. Seeds are set by the caller (``--seed``).

    ``warn_only``: every CPU operation the project uses has a deterministic implementation; on CUDA PyTorch
    flags ``grid_sample``'s backward (its gradient with respect to the *image* is accumulated with atomics; the
    gradient with respect to the sampling grid, which the Adam stages use, is not), so it warns there instead of
    failing the run."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]


def with_prealignment(model, affine: bool):
    """``model`` behind an affine pre-alignment stage when ``affine`` (``--affine``), else ``model``."""
    if not affine:
        return model
    from lightning_modules.prealign import AffinePrealigned

    return AffinePrealigned(model)


def _device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --accelerator {accelerator} but CUDA is not available")
        return torch.device("cuda")
    if accelerator == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator not in ("auto", "cpu"):
        raise SystemExit(f"error: --accelerator {accelerator!r}: the one-pair mode runs on cpu, gpu or auto")
    return torch.device("cpu")


def _checkpoint_intensity(meta: dict | None) -> str:
    """The intensity normalisation a LearnGN checkpoint's data used (``"none"`` when it names none)."""
    from data.intensity import mode_for_modality

    hp = (meta or {}).get("datamodule_hyper_parameters") or {}
    mode = hp.get("intensity", "none")
    if mode in ("ct", "mr", "none"):
        return mode
    source = str(hp.get("source", ""))
    if mode == "auto" and source.endswith(".json"):
        try:  # the modality of the training data, as the data module chose it
            from data.learn2reg_task import Learn2RegTask

            task = Learn2RegTask(source, check_files=False)
            return mode_for_modality(task.modality_name(0))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cannot read the checkpoint's dataset %s (%s)", source, exc)
    log.warning("the checkpoint's data used intensity %r; using min-max (pass --intensity ct|mr|none)", mode)
    return "none"


def _refuse_existing(out: Path, names: Sequence[str], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    old = [name for name in names if (out / name).exists()]
    if old and not overwrite:
        raise FileExistsError(f"--out {out} already holds {', '.join(old)}; pass --overwrite to replace them, or "
                              "choose another folder")


def run_pair(args: argparse.Namespace) -> dict[str, Any]:
    """Register ``--moving`` onto ``--fixed`` and write the one-pair outputs (see the module docstring).

    Returns the ``metrics.json`` dict (``method``, ``fixed``, ``moving``, ``n_pairs`` 1, ``n_failed`` 0 or 1,
    ``status``, ``error``, ``seconds``, ``initial``, ``metrics``, ``timings``: seconds per stage as in
    :data:`data.evaluation.writer.TIMING_KEYS`, ``write`` covering every file but ``metrics.json``);
    bad options or input files raise (status 2)."""
    if not (args.fixed and args.moving):
        raise SystemExit("error: --fixed and --moving go together")
    if not args.method or not args.out:
        raise SystemExit("error: --method and --out are required with --fixed/--moving")
    if args.data:
        raise SystemExit("error: --data and --fixed/--moving exclude each other")
    if args.no_disp:
        raise SystemExit("error: --no-disp does not apply to --fixed/--moving (disp.nii.gz is what --apply reads)")
    from lightning_modules.hyper.lam_selection import is_auto

    if is_auto(args.lam):
        raise SystemExit("error: --lam auto chooses λ on a validation split; give a value with --fixed/--moving")

    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.pytorch import seed_everything

    from data.collate import collate_pairs
    from data.evaluation.figures import pair_figure
    from data.evaluation.writer import synchronise
    from data.io import (
        atomic_write_bytes,
        read_displacement_grid,
        remove_stale_temporaries,
        write_displacement,
        write_nifti,
    )
    from data.itk import write_itk_displacement
    from data.pair_files import load_file_pair, warp_file

    out = Path(args.out)
    _refuse_existing(out, PAIR_OUTPUTS, args.overwrite)
    seed_everything(args.seed, workers=True, verbose=False)
    method_args = read_method_config(args.method_config) if args.method_config else {}
    method_args.update(_key_values(args.method_arg, "--method-arg"))
    model, meta = build_method(args, method_args)
    if (args.fixed_mask or args.moving_mask) and "use_masks" not in method_args and hasattr(model, "use_masks"):
        model.use_masks = True  # mask files restrict the method's similarity terms (docs/design.md §3, §6)
    intensity = args.intensity or _checkpoint_intensity(meta)
    start = time.perf_counter()
    sample = load_file_pair(args.fixed, args.moving, fixed_labels=args.fixed_labels,
                            moving_labels=args.moving_labels, fixed_mask=args.fixed_mask,
                            moving_mask=args.moving_mask, intensity=intensity)
    load = time.perf_counter() - start
    if args.lam is not None:
        apply_lam(args, model)
    model = with_prealignment(model, args.affine)
    device = _device(args.accelerator)
    model = model.to(device).eval()
    begin = synchronise(device)
    batch = move_data_to_device(collate_pairs([sample]), device)
    stamp = synchronise(device)
    load += stamp - begin  # reading, resampling and moving the pair to the device
    record = model.timed_register(batch)[0]
    timings = {"load": load, **record["timings"]}
    result = {"method": args.method, "fixed": str(args.fixed), "moving": str(args.moving), "n_pairs": 1,
              "n_failed": int(record["status"] != "ok"), "status": record["status"], "error": record["error"],
              "seconds": record["seconds"], "initial": record["initial"], "metrics": record["metrics"],
              "timings": timings}
    begin = time.perf_counter()  # timings["write"] already holds copying the field to the host
    if record["status"] == "ok":
        try:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries([out])
            for name in PAIR_OUTPUTS:  # no file of an earlier run may stay beside the new ones
                (out / name).unlink(missing_ok=True)
            affine = sample["affine"].numpy()
            write_displacement(out / "disp.nii.gz", record["disp"], affine, half=args.half)
            u, _ = read_displacement_grid(out / "disp.nii.gz")  # warp with the field as stored: --apply's input
            write_itk_displacement(out / "disp_itk.nii.gz", u, affine)
            write_nifti(out / "warped.nii.gz", warp_file(args.moving, u, affine), affine)
            if args.moving_labels:
                write_nifti(out / "warped_labels.nii.gz", warp_file(args.moving_labels, u, affine, nearest=True),
                            affine)
            if args.figures > 0:
                pair_figure(sample["fixed"], sample["moving"], u, out / "figure.png",
                            fixed_label=sample.get("fixed_label"), moving_label=sample.get("moving_label"),
                            title=f"{args.method}: {Path(args.moving).name} -> {Path(args.fixed).name}")
        except (OSError, ValueError, RuntimeError) as exc:
            result.update(n_failed=1, status="failed", error=f"writing: {type(exc).__name__}: {exc}")
        timings["write"] = timings.get("write", 0.0) + time.perf_counter() - begin
    # the pair's wall time: loading, then everything after the transfer (not building the model in between)
    timings["total"] = load + time.perf_counter() - stamp
    if out.is_dir() or result["status"] == "ok":
        atomic_write_bytes(out / "metrics.json", (json.dumps(result, indent=2) + "\n").encode())
    if result["status"] != "ok":
        sys.stderr.write(f"eval.py: the pair failed: {result['error']}\n")
        return result
    before, after = result["initial"], result["metrics"]
    sys.stdout.write(f"{args.method}: {Path(args.moving).name} -> {Path(args.fixed).name} in "
                     f"{result['seconds']:.2f} s; results in {out} (warped.nii.gz, "
                     f"{'warped_labels.nii.gz, ' if args.moving_labels else ''}disp.nii.gz, disp_itk.nii.gz, "
                     "metrics.json)\n")
    for key in ("dice", "hd95", "sdlogj", "folding"):
        b, a = before.get(key), after.get(key)
        if a is not None and math.isfinite(a):
            sys.stdout.write(f"  {key}: {b:.4f} -> {a:.4f}\n")
    return result


def run_apply(args: argparse.Namespace) -> None:
    """``--apply DISP --image X --out Y [--nearest]``: warp ``X`` with a saved displacement onto its fixed grid."""
    if not (args.apply and args.image and args.out):
        raise SystemExit("error: --apply DISP needs --image X and --out Y")
    extra = [opt for opt, v in (("--method", args.method), ("--fixed", args.fixed), ("--moving", args.moving),
                                ("--data", args.data), ("--ckpt", args.ckpt)) if v]
    if extra:
        raise SystemExit(f"error: --apply takes no {', '.join(extra)}")
    from data.io import read_displacement_grid, write_nifti
    from data.pair_files import warp_file

    out = Path(args.out)
    if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")):
        raise SystemExit(f"error: --out {out} must name a .nii.gz or .nii file with --apply")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    try:
        u, affine = read_displacement_grid(args.apply)
    except ValueError as exc:
        raise ValueError(f"--apply {args.apply}: {exc}") from None
    write_nifti(out, warp_file(args.image, u, affine, nearest=args.nearest), affine)
    sys.stdout.write(f"wrote {out} ({Path(args.image).name} warped with {Path(args.apply).name}, "
                     f"{'nearest' if args.nearest else 'linear'})\n")


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` as a command: the exit status of :func:`exit_status`, or 2 with a one-line message when
    the run is refused (a bad option, input file, checkpoint or output folder; ``-v`` shows the traceback)."""
    verbose = "-v" in (argv if argv is not None else sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        return exit_status(main(argv))
    except SystemExit as exc:  # argparse (status 2) and "error: ..." messages of main
        if isinstance(exc.code, str):
            sys.stderr.write(f"eval.py: {exc.code}\n")
            return EXIT_REFUSED
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        if verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        sys.stderr.write(f"eval.py: error: {type(exc).__name__}: {msg}\n")
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(cli())

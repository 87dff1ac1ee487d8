"""Hold-out evaluation of a trained model or a baseline (DESIGN.md §9).

    python eval.py --method learngn --ckpt runs/x/checkpoints/last.ckpt --split test --out runs/eval/learngn
    python eval.py --method gn --data synthetic2d --split test --out runs/eval/gn
    python eval.py --method convexadam --data ../shared/data/BrainPair/BrainPair_dataset.json --split val \
        --out runs/brain/convexadam
    python eval.py --compare runs/eval/*          # print a comparison table of finished evaluations

Writes ``summary.json``, ``pairs.csv``, ``summary.md``, ``disp/`` and ``figures/`` under ``--out`` (refused when
the folder already holds results, unless ``--overwrite``). A pair that fails anywhere (loading, preprocessing,
registration, metrics, writing) is recorded with its error in ``pairs.csv`` and the run goes on. Evaluation
runs through ``Trainer.predict``, so ``--accelerator gpu --devices N --strategy ddp --num-nodes M`` spread the
pairs over several GPUs. Checkpoints and schedules are read without running code from them
(:mod:`lightning_modules.checkpoint`).

Exit status: 0 every pair registered; 3 some pairs failed; 4 every pair failed (or there were none); 2 the run
was refused before any pair ran (bad option, input, checkpoint or output folder; the message says which).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

log = logging.getLogger("eval")

METHODS = ("learngn", "gn", "adam", "convexadam", "identity")

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
                   help="method argument (YAML value), e.g. --method-arg preset=constant")
    p.add_argument("--method-config", help="YAML file of method arguments (init_args of the method)")
    p.add_argument("--lam", help="λ for a λ-conditioned model: a value or 'auto' (chosen on the val split)")
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
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def load_learngn(ckpt: str, what: str = "--ckpt"):
    """Load a LearnGN-family model from a checkpoint without running code from it, checking its class
    (:func:`lightning_modules.checkpoint.model_from_checkpoint`; ``FileNotFoundError`` / ``CheckpointError``
    naming the file)."""
    from lightning_modules.checkpoint import model_from_checkpoint
    from lightning_modules.learngn import LearnGN

    return model_from_checkpoint(ckpt, base=LearnGN, what=what,
                                 expected="a Lightning checkpoint (.ckpt) of a LearnGN model of this project")


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
        return load_learngn(args.ckpt)
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
    from lightning_modules.evaluation import comparison_table

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
    if not args.method or not args.out:
        raise SystemExit("error: --method and --out are required (or --compare DIR ...)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from lightning.pytorch import Trainer, seed_everything

    from data.io import check_unique_disp_names
    from lightning_modules.evaluation import EvaluationWriter, prepare_output

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
    if args.lam is not None:
        if args.method != "learngn":
            raise SystemExit("error: --lam applies to --method learngn")
        from lightning_modules.hyper.hypernet import resolve_lambda

        dm.setup()
        lam = resolve_lambda(model, args.lam, dm.val_dataloader() if args.lam == "auto" else None)
        log.info("using λ = %g", lam)
    pairs = dm.eval_pairs()
    if pairs is not None:  # before the first pair: no two pairs may write the same displacement file
        check_unique_disp_names(pairs)
    if leader:
        prepare_output(out, args.overwrite)
    writer = EvaluationWriter(out, args.method, n_figures=args.figures, half=args.half,
                              write_disp=not args.no_disp,
                              note=f"Data: `{dm.source}`, split `{args.split}`.\n")
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
        from lightning_modules.evaluation import comparison_table

        sys.stdout.write(comparison_table([s]))
        if s["n_failed"]:
            sys.stderr.write(f"warning: {s['n_failed']} of {s['n_pairs']} pairs failed; their errors are in "
                             f"{out / 'pairs.csv'} and {out / 'summary.md'}\n")
        return s
    return None


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

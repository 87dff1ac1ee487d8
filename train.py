"""Training entry point (LightningCLI): ``python train.py {fit,validate,test} -c configs/<recipe>.yaml``.

* Exact resume: ``python train.py fit -c <cfg> --ckpt_path <run>/checkpoints/last.ckpt``.
* Fine-tuning from a checkpoint's weights with new hyper-parameters:
  ``python train.py fit -c <cfg> --model.init_args.init_from <ckpt> --model.init_args.lr 1e-4``.
* Several GPUs / nodes through Lightning's DDP:
  ``--trainer.accelerator gpu --trainer.strategy ddp --trainer.devices N --trainer.num_nodes M``.
* ``--print_config`` shows every option; unknown keys are refused by LightningCLI.

The model is chosen by ``model.class_path`` (a ``lightning_modules`` registration module, LearnGN by
default); the data by ``data.init_args`` of :class:`data.datamodule.RegistrationDataModule`.

Bad input ends in one message that names it: a config value the project rejects (λ ≤ 0, ``iterations 0``, an
``init_from`` of the wrong class, ...) is reported with the project's own message as the last line (not
jsonargparse's union-type dump), and ``--ckpt_path`` is read first by the project's checkpoint loader
(:mod:`data.checkpoint`: no code runs from the file; a truncated or foreign file is named).
Run as a script, such errors print ``train.py: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from data.checkpoint import CheckpointError, load_checkpoint, require_state_dict, safe_globals
from data.datamodule import RegistrationDataModule
from lightning_modules.base import RegistrationModule

_ROOT = Path(__file__).resolve().parent
_PROJECT_DIRS = tuple(str(_ROOT / d) for d in ("lightning_modules", "layers", "data"))
#: ``ckpt_path`` values Lightning resolves itself (not files)
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")


class BestAndLastCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose ``last.ckpt`` (``save_last``) is the state at the
    end of every epoch, as its name says and as an exact resume (``--ckpt_path .../last.ckpt``) needs.

    Lightning 2.x writes ``last.ckpt`` only when a top-k checkpoint is written in the same step, so with a
    monitored metric it is a copy of the *best* checkpoint whenever the final epochs did not improve it. Here
    ``last.ckpt`` is also written at the end of every epoch otherwise (after validation, or at the end of the
    training epoch when checkpoints are saved there); the monitored ``best-*`` files are Lightning's.
    """

    @property
    def state_key(self) -> str:
        """The key of :class:`ModelCheckpoint` (its state in a checkpoint, so runs saved before this class resume
        with their best-checkpoint bookkeeping)."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def _save_last_now(self, trainer) -> None:
        # skipped as well when a checkpoint (a top-k one, with last.ckpt) was already written at this step
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ConfigError(ValueError):
    """A config value the project rejected; the message is the project's own (with the class it was for)."""


def _raised_in_project(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and last.startswith(_PROJECT_DIRS)


def _rejecting_class(exc: BaseException) -> str | None:
    """The class whose ``__init__`` raised ``exc`` (outermost such frame), for the message."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals \
                and frame.f_code.co_filename.startswith(_PROJECT_DIRS + (str(_ROOT),)):
            return type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return None


def project_error(exc: BaseException) -> BaseException | None:
    """The innermost exception in ``exc``'s chain of causes that this project's code raised, or None."""
    chain, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return next((e for e in reversed(chain) if _raised_in_project(e)), None)


class RegistrationCLI(LightningCLI):
    """LightningCLI with a configurable best/last ModelCheckpoint under ``checkpoint.*``, the project's own
    messages for rejected config values, and a safe, checked ``--ckpt_path``."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as exc:
            root = project_error(exc)
            if root is None or root is exc and isinstance(exc, ConfigError):
                raise
            owner = _rejecting_class(root)
            where = f"{owner}: " if owner else ""
            raise ConfigError(f"{where}{root}") from root

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path here first (to restore its hyper-parameters): the project's loader reads
        # it before, so a crafted file is refused without running code and a truncated one is named
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT and "://" not in str(ckpt_path):
            require_state_dict(load_checkpoint(ckpt_path, what="--ckpt_path"), ckpt_path, what="--ckpt_path")
        with safe_globals():
            super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        with safe_globals():  # what the project's checkpoints hold, for Lightning's own weights-only load
            super()._run_subcommand(subcommand)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/dice",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-{epoch:03d}-{step:05d}",
            "checkpoint.auto_insert_metric_name": False,
        })


def main(args: list[str] | None = None, run: bool = True) -> RegistrationCLI:
    """Run the CLI (``args`` as on the command line; ``run=False`` only builds the objects)."""
    return RegistrationCLI(
        RegistrationModule,
        RegistrationDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "default_root_dir": "runs",
            "logger": [
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "csv"}},
                {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                 "init_args": {"save_dir": "runs", "name": "tb"}},
            ],
        },
        args=args,
        run=run,
    )


def cli(args: list[str] | None = None) -> int:
    """:func:`main` as a command: 0, or 2 with ``train.py: error: <message>`` for a rejected config value or
    checkpoint (the message is the last line)."""
    try:
        main(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:
        sys.stderr.write(f"train.py: error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

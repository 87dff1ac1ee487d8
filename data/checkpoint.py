"""The one checkpoint loader of the project: every file a user hands over as a checkpoint or a learned schedule
(``eval.py --ckpt`` / ``--schedule``, ``init_from``, ``train.py --ckpt_path``, :mod:`lightning_modules.hyper`)
is read here, and reading it never runs code.

* Files are read with ``torch.load(..., weights_only=True)``: tensors, numbers, strings and plain containers,
  plus the few classes this project's own checkpoints hold (:data:`SAFE_GLOBALS`: ``pathlib`` paths, e.g. a
  hyper-parameter given as a path), allowed only for the duration of the load. A pickle that names anything
  else (a crafted file whose ``__reduce__`` would call a function) is refused before any of it is built.
* A recorded model class (``"model_class"``, or LightningCLI's ``hyper_parameters["_class_path"]``) is
  imported only from the project's own packages (:data:`PROJECT_PREFIXES`) and must be a subclass of what the
  caller expects.
* Every failure is a :class:`CheckpointError` (a ``ValueError``) whose message names the file, what went
  wrong and what was expected; a missing file is a ``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import pathlib
import pickle
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "PROJECT_PREFIXES",
    "SAFE_GLOBALS",
    "CheckpointError",
    "checkpoint_class",
    "export_weights",
    "import_project_class",
    "load_checkpoint",
    "load_init_weights",
    "model_from_checkpoint",
    "qualname",
    "rename_legacy_keys",
    "require_state_dict",
    "safe_globals",
]

#: Classes (beyond torch's default weights-only set) that this project's checkpoints may hold.
SAFE_GLOBALS: tuple[type, ...] = (
    pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath,
)

#: Module prefixes a recorded model class may be imported from.
PROJECT_PREFIXES: tuple[str, ...] = ("lightning_modules.",)
#: the base class of the models :func:`main` exports
LEARNGN = "lightning_modules.learngn.LearnGN"

_QUALNAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
CHECKPOINT = "a Lightning checkpoint (.ckpt) saved by this project"


class CheckpointError(ValueError):
    """A file handed over as a checkpoint could not be used; the message names the file and what was expected."""


@contextlib.contextmanager
def safe_globals() -> Iterator[None]:
    """Allow :data:`SAFE_GLOBALS` in weights-only loads inside the block (e.g. around Lightning's own load of
    ``--ckpt_path``); nothing else is added, and nothing stays allowed afterwards."""
    ctx = getattr(torch.serialization, "safe_globals", None)
    if ctx is None:  # torch < 2.5: nothing can be allowed narrowly; the default weights-only set applies
        yield
        return
    with ctx(list(SAFE_GLOBALS)):
        yield


def _refusal_reason(exc: BaseException) -> str:
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", text)
    return found.group(1).strip() if found else text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(
    path: str | Path, *, what: str = "checkpoint", expected: str = CHECKPOINT, map_location: Any = "cpu"
) -> Any:
    """Read ``path`` without running code (``weights_only=True`` with :data:`SAFE_GLOBALS`).

    Args:
        path: the file.
        what: how messages name the file (e.g. ``"--ckpt"``, ``"init_from"``, ``"schedule file"``).
        expected: what the file should be, for messages.
        map_location: as for ``torch.load`` (CPU by default).

    Returns:
        the loaded object (usually a dict).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: the file is truncated, corrupt or not a PyTorch file, or holds objects a weights-only
            load refuses (a pickle that would run code): nothing of it is built.
    """
    path = Path(path)
    if not path.is_file():
        kind = "is a folder, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"{what} {kind}: {path} (expected {expected})")
    try:
        with warnings.catch_warnings(), safe_globals():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{what} {path} was refused: it holds objects other than tensors and plain data "
                f"({_refusal_reason(exc)}), which could run code when loaded, so it is not loaded "
                f"(expected {expected})"
            ) from None
        raise CheckpointError(
            f"{what} {path} is not a readable PyTorch file ({_refusal_reason(exc)}; expected {expected})"
        ) from exc
    except Exception as exc:  # truncated zip archives, text files, empty files, ...
        raise CheckpointError(
            f"{what} {path} cannot be read: it is truncated, corrupt or not a PyTorch file "
            f"({type(exc).__name__}: {exc}; expected {expected})"
        ) from exc


def require_state_dict(
    ckpt: Any, path: str | Path, *, what: str = "checkpoint", expected: str = CHECKPOINT
) -> dict[str, Any]:
    """``ckpt`` as a dict with a ``state_dict`` of tensors, or :class:`CheckpointError` naming the file."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        kind = f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{what} {path} has no 'state_dict' (it holds {kind}; expected {expected})")
    return ckpt


def import_project_class(qualname: str, *, base: type, path: str | Path, what: str = "checkpoint") -> type:
    """The class ``qualname`` (``"package.module.Class"``), imported only from :data:`PROJECT_PREFIXES` and
    checked to be a subclass of ``base``; :class:`CheckpointError` naming the file otherwise."""
    if not isinstance(qualname, str) or not _QUALNAME.match(qualname):
        raise CheckpointError(f"{what} {path} records a malformed model class {qualname!r}")
    if not qualname.startswith(PROJECT_PREFIXES):
        raise CheckpointError(
            f"{what} {path} records the model class {qualname!r}, which is not one of this project's "
            f"(allowed: {', '.join(p + '*' for p in PROJECT_PREFIXES)}); it is not imported"
        )
    module_name, _, cls_name = qualname.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(
            f"{what} {path} records the model class {qualname!r}, but this version of the project has no "
            f"module {module_name!r} ({exc})"
        ) from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise CheckpointError(
            f"{what} {path} records the model class {qualname!r}, but {module_name} has no {cls_name!r} in "
            "this version of the project"
        )
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CheckpointError(f"{what} {path} holds a {qualname}, not a {base.__name__} model")
    return cls


def checkpoint_class(
    ckpt: dict[str, Any], path: str | Path, *, base: type, default: type | None = None, what: str = "checkpoint"
) -> type:
    """The model class a checkpoint records (``model_class``, else ``hyper_parameters["_class_path"]``), via
    :func:`import_project_class`; ``default`` when it records none (:class:`CheckpointError` if None)."""
    qualname = ckpt.get("model_class")
    if qualname is None and isinstance(ckpt.get("hyper_parameters"), dict):
        qualname = ckpt["hyper_parameters"].get("_class_path")
    if qualname is None:
        if default is None:
            raise CheckpointError(
                f"{what} {path} was not saved by a {base.__name__} model of this project (no 'model_class')"
            )
        return default
    return import_project_class(qualname, base=base, path=path, what=what)


#: state-dict keys of the LearnGN family written before λ had one home (docs/design.md §5) -> their keys in
#: the :class:`layers.lam_schedule.LambdaSchedule` at ``gn.lam``: LearnGN's ``learn_schedule`` parameter,
#: BilevelLearnGN's scalar / per-iteration parameter and Fourier network, HyperLearnGN's evaluation λ
LEGACY_LAM_KEYS: dict[str, str] = {
    "log_lam": "gn.lam.log_lam",
    "bilevel_log_lam": "gn.lam.log_lam",
    "log_lam_eval": "gn.lam.log_lam",
    "lam_net.": "gn.lam.net.",
}


def rename_legacy_keys(state_dict: dict[str, Any], prefix: str = "") -> None:
    """Rename, in place, the λ keys of a LearnGN-family ``state_dict`` written before λ had one home
    (:data:`LEGACY_LAM_KEYS`; ``prefix``: the model's prefix in it). Values are kept (same shapes and
    meaning); other keys and current checkpoints are untouched. Called by ``LearnGN._load_from_state_dict``, so
    every load (``eval.py --ckpt``, ``init_from``, Lightning's ``--ckpt_path``) sees the current keys."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in LEGACY_LAM_KEYS.items():
            if rest == old or (old.endswith(".") and rest.startswith(old)):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


def qualname(obj: Any) -> str:
    """``module.QualName`` of a class or of an instance's class (what checkpoints record as ``model_class``)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def load_init_weights(
    module: torch.nn.Module,
    path: str | Path,
    *,
    classes: Sequence[type],
    allowed_missing: Sequence[str] = (),
    allowed_extra: Sequence[str] = (),
    rename: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Load the ``state_dict`` of a Lightning checkpoint into ``module`` (``init_from``: fine-tuning, weights
    only; the file is read by :func:`load_checkpoint`, no code runs from it). Returns the checkpoint dict.

    Args:
        module: the model to fill.
        path: the checkpoint.
        classes: the model classes whose checkpoints are accepted (checked against a recorded ``model_class``).
        allowed_missing: key prefixes of ``module`` that may be absent from the file (they keep their
            initialisation: an added feature encoder, the λ of a bilevel model started from a plain one).
        allowed_extra: key prefixes the file may hold that ``module`` lacks (ignored).
        rename: maps the file's keys to the module's (e.g. into a wrapped head module).

    Raises ``FileNotFoundError`` / :class:`CheckpointError` (naming the file) when it is missing, unreadable,
    refused, of another class, or does not fit ``module``.
    """
    path = Path(path)
    names = [qualname(c) for c in classes]
    expected = "a Lightning checkpoint of " + " or ".join(names)
    ckpt = require_state_dict(load_checkpoint(path, what="init_from", expected=expected), path,
                              what="init_from", expected=expected)
    saved = ckpt.get("model_class")
    if saved is not None and saved not in names:
        raise CheckpointError(f"init_from {path} belongs to {saved}, not {' or '.join(names)}")
    state = ckpt["state_dict"]
    if rename is not None:
        state = {rename(k): v for k, v in state.items()}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"init_from {path} does not match {type(module).__name__}: {exc}") from exc
    fresh = [k for k in missing if k.startswith(tuple(allowed_missing))]
    if fresh:
        log.info("%s has no weights for %s: they keep their initialisation", path, fresh)
    missing = [k for k in missing if not k.startswith(tuple(allowed_missing))]
    unexpected = [k for k in unexpected if not k.startswith(tuple(allowed_extra))]
    if missing or unexpected:
        raise CheckpointError(f"init_from {path} does not match {type(module).__name__}: missing keys {missing}, "
                              f"unexpected keys {unexpected}")
    return ckpt


#: hyper-parameters of retired options that older checkpoints record, dropped when they are loaded: the
#: behaviour they switched on is now the only one (``fused_heads``: composed stride-``s`` head convolutions,
#: :class:`layers.heads.CompactHeads`)
RETIRED_HPARAMS = frozenset({"fused_heads"})


def _init_kwargs(cls: type, hparams: dict[str, Any], path: Path, what: str) -> dict[str, Any]:
    kwargs = {k: v for k, v in hparams.items() if not str(k).startswith("_") and k not in RETIRED_HPARAMS}
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            log.warning("%s %s: hyper-parameters %s are not arguments of %s; ignored", what, path, unknown,
                        cls.__name__)
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return kwargs


#: what a shipped (weights-only) checkpoint keeps of a Lightning checkpoint
EXPORTED_KEYS = ("state_dict", "hyper_parameters", "model_class", "datamodule_hyper_parameters", "epoch",
                 "global_step", "pytorch-lightning_version")


def export_weights(src: str | Path, dst: str | Path, *, base: type) -> Path:
    """Write the weights-only copy of a training checkpoint that a model is shipped as: the keys of
    :data:`EXPORTED_KEYS` (weights, hyper-parameters, class, data settings; no optimiser state, so it is about a
    third of the size and cannot resume training). ``src`` is read safely and checked to rebuild a ``base``
    model before anything is written; ``dst`` is written atomically. Returns ``dst``."""
    from data.io import atomic_write_bytes

    model_from_checkpoint(src, base=base, what="checkpoint to export")
    ckpt = load_checkpoint(src, what="checkpoint to export")
    kept = {k: ckpt[k] for k in EXPORTED_KEYS if k in ckpt}
    buffer = io.BytesIO()
    torch.save(kept, buffer)
    return atomic_write_bytes(dst, buffer.getvalue())


def model_from_checkpoint(
    path: str | Path, *, base: type, default: type | None = None, what: str = "checkpoint",
    expected: str = CHECKPOINT,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model a Lightning checkpoint of this project holds: its recorded class (a subclass of
    ``base``; ``default`` when none is recorded) built from the saved hyper-parameters, with the saved weights
    (strict). Returns ``(model, checkpoint dict)``; the model is in eval mode on the CPU.

    Raises ``FileNotFoundError`` / :class:`CheckpointError` (naming the file) as :func:`load_checkpoint`, and
    :class:`CheckpointError` when the class is not the project's, the hyper-parameters no longer build it, or
    the weights do not fit it.
    """
    path = Path(path)
    ckpt = require_state_dict(load_checkpoint(path, what=what, expected=expected), path, what=what,
                              expected=expected)
    cls = checkpoint_class(ckpt, path, base=base, default=default, what=what)
    hparams = ckpt.get("hyper_parameters") or {}
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{what} {path}: 'hyper_parameters' must be a dict; got {type(hparams).__name__}")
    try:
        model = cls(**_init_kwargs(cls, hparams, path, what))
    except Exception as exc:
        raise CheckpointError(
            f"{what} {path}: its hyper-parameters no longer build a {cls.__name__} ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        model.on_load_checkpoint(ckpt)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except Exception as exc:
        raise CheckpointError(
            f"{what} {path}: its weights do not fit {cls.__name__} ({type(exc).__name__}: {exc})"
        ) from exc
    return model.eval(), ckpt


def main(argv: list[str] | None = None) -> None:
    """``python -m data.checkpoint SRC DST``: export the weights-only copy of a LearnGN-family
    training checkpoint (:func:`export_weights`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m data.checkpoint", description=main.__doc__)
    parser.add_argument("src", help="a training checkpoint (e.g. runs/<recipe>/checkpoints/last.ckpt)")
    parser.add_argument("dst", help="the weights-only file to write")
    args = parser.parse_args(argv)
    # by name, as every class a checkpoint names (data/ does not import lightning_modules/; docs/design.md §1)
    learngn = import_project_class(LEARNGN, base=torch.nn.Module, path=args.src)
    export_weights(args.src, args.dst, base=learngn)


if __name__ == "__main__":
    main()

"""Input checks shared by the evaluation-only baselines (and the learned Adam schedule): the batch pair and renamed
options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ..base import RegistrationModule, check_number, check_numbers

__all__ = ["BaselineModule", "check_number", "check_numbers", "check_pair", "renamed_options"]


class BaselineModule(RegistrationModule):
    """Base of the baselines: evaluation only, no trainable parameters (``fit`` raises
    :class:`~lightning_modules.base.EvaluationOnlyError`, see :class:`~lightning_modules.base.RegistrationModule`).

    A baseline that refines a field (AdamIO, ConvexAdam's Adam stage) starts from :meth:`initial_field`: the
    batch key ``"init_disp"``, else the field of an initialising registration model (:meth:`set_initialiser`,
    e.g. a trained LearnGN: "learned GN, then a few Adam steps"), else ``init_fn(batch)``, else nothing.
    """

    evaluation_only = True
    init_fn: Callable[[dict[str, Any]], torch.Tensor] | None = None

    def set_initialiser(self, model: RegistrationModule | None) -> None:
        """Start every registration from ``model.register(batch)`` (no gradient; the model becomes a submodule,
        so it follows this module's device). None removes it."""
        if model is not None and not isinstance(model, RegistrationModule):
            raise TypeError(f"the initialiser must be a RegistrationModule; got {type(model).__name__}")
        self.initialiser = model

    def check_initialiser(self) -> None:
        """Refuse a setting that needs an initialiser this module does not have (``ValueError``); ``eval.py``
        calls it once, before any pair runs. Nothing to check here; see
        :meth:`lightning_modules.baselines.AdamIO.check_initialiser`."""

    def initial_field(self, batch: dict[str, Any], maps: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> torch.Tensor | None:
        """The initial full-resolution field ``(B, n, *S)`` (voxel units) of a batch, or None (see the class
        docstring); ``maps``: the initialiser's semantic maps of the batch when already computed (a LearnGN's
        ``semantic_maps``), passed on so that it does not compute them again."""
        init = batch.get("init_disp")
        if init is None and getattr(self, "initialiser", None) is not None:
            with torch.no_grad():
                init = self.initialiser.register(batch) if maps is None else self.initialiser.run(batch, maps=maps).disp
        if init is None and self.init_fn is not None:
            init = self.init_fn(batch)
        return init


def check_pair(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and return the ``fixed`` and ``moving`` images of a batch (``data/batch.py``).

    Both must be floating-point ``(B, C, *S)`` tensors with ``S`` 2D or 3D, the same shape and only finite
    values; otherwise ``ValueError`` says what is wrong.
    """
    for key in ("fixed", "moving"):
        if key not in batch:
            raise ValueError(f"the batch has no {key!r} image (keys: {sorted(batch)})")
        if not torch.is_tensor(batch[key]):
            raise ValueError(f"batch[{key!r}] must be a tensor; got {type(batch[key]).__name__}")
    fixed, moving = batch["fixed"], batch["moving"]
    if fixed.dim() not in (4, 5):
        raise ValueError(f"fixed must be (B, C, H, W) or (B, C, D, H, W); got shape {tuple(fixed.shape)}")
    if fixed.shape != moving.shape:
        raise ValueError(
            f"fixed and moving must have the same shape (resample the moving image to the fixed grid first); "
            f"got fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)}"
        )
    for key, x in (("fixed", fixed), ("moving", moving)):
        if not x.is_floating_point():
            raise ValueError(f"{key} must be a floating-point image; got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{key} has non-finite values (NaN or inf)")
    return fixed, moving


def renamed_options(**renames: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate an ``__init__`` so that an option passed under an old name (``old=new`` in ``renames``) raises
    ``ValueError`` naming the new one, instead of a bare ``TypeError``. The signature seen by
    :func:`inspect.signature` (configs, ``eval.py --method-arg``) stays the wrapped one."""

    def decorate(init: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(init)
        def wrapper(self, *args: Any, **kwargs: Any) -> None:
            old = sorted(k for k in kwargs if k in renames)
            if old:
                raise ValueError(f"{type(self).__name__}: option {old[0]!r} was renamed {renames[old[0]]!r}; "
                                 f"pass {renames[old[0]]}=... instead")
            init(self, *args, **kwargs)

        return wrapper

    return decorate

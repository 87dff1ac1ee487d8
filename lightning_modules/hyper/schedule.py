"""Learned learning-rate schedules for Adam instance optimisation (and GN step / λ schedules), docs/design.md §5.

* :class:`FourierSchedule`: a small MLP of Fourier features of the normalised step ``t/T`` giving
  ``log η_t = log η_baseline(t) + MLP(φ(t/T))``. The last MLP layer (weights and bias) starts at zero, so the
  untrained schedule is the baseline **exactly** (``η_t = η_baseline(t) · exp(0)``): the "bias at the
  baseline" of a constant schedule is carried by the fixed offset ``log η_baseline``, which also covers
  non-constant baselines such as the piecewise one.
* :func:`differentiable_adam`: the Adam instance optimisation of
  :func:`lightning_modules.baselines.instance_opt.adam_optimise` written functionally (same objective, same
  update formulas as ``torch.optim.Adam``), differentiable with respect to the per-step learning rates, with
  gradient checkpointing (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant) over segments of steps so
  that memory grows with ``T / checkpoint_every`` instead of ``T``.
* :class:`ScheduleMetaLearner`: a LightningModule that meta-trains a :class:`FourierSchedule` by
  backpropagating a registration error at the end of the ``T`` Adam steps (optionally also along the way,
  against short-horizon bias) on training pairs; it evaluates with the baseline's own loop
  (:func:`~lightning_modules.baselines.instance_opt.refine_field`).
* :func:`save_schedule` / :func:`load_schedule`: the learned schedule as a ``.pt`` file (or straight from the
  Lightning checkpoint) -> a :class:`~lightning_modules.baselines.schedules.ValuesLR` that
  :class:`~lightning_modules.baselines.AdamIO` takes as ``schedule`` (``eval.py --method adam --schedule``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from layers.diff import diffusion
from layers.features import mind_ssc
from layers.grid import pool_to_grid, upsample_field
from lightning_modules.base import RegistrationModule
from lightning_modules.baselines.common import check_pair
from lightning_modules.baselines.instance_opt import FeatureMSE, refine_field, smooth
from lightning_modules.baselines.schedules import (
    PiecewiseLR,
    ValuesLR,
    make_schedule,
    resolve_preset,
    schedule_values,
)
from lightning_modules.checkpoint import CheckpointError, load_checkpoint
from lightning_modules.losses import keypoint_loss, label_loss
from lightning_modules.metrics import batch_label_ids

from .objectives import outer_loss

log = logging.getLogger(__name__)

__all__ = [
    "FourierSchedule",
    "ScheduleMetaLearner",
    "adam_settings",
    "baseline_values",
    "differentiable_adam",
    "load_schedule",
    "save_schedule",
]


def baseline_values(baseline: str | float | Sequence[float], steps: int) -> torch.Tensor:
    """The baseline schedule's values for steps ``0 .. steps − 1``, float64 ``(steps,)``.

    ``baseline``: ``"piecewise"`` (the published schedule compressed to ``steps`` steps,
    :meth:`~lightning_modules.baselines.schedules.PiecewiseLR.compressed`; the published one at 270), another
    preset name of :mod:`lightning_modules.baselines.schedules` (``"constant"``), a number (constant) or per-step
    values (the last is held).
    """
    if baseline == "piecewise":
        values = schedule_values(PiecewiseLR.compressed(steps), steps)
    else:
        values = schedule_values(
            make_schedule(baseline if not isinstance(baseline, list) else tuple(baseline)), steps
        )
    if not torch.all(values > 0):
        raise ValueError("a log-parametrised schedule needs a strictly positive baseline")
    return values


class FourierSchedule(nn.Module):
    """``t ↦ log η_t = log η_baseline(t) + MLP(φ(t/T))`` for ``t = 0 .. T − 1``.

    ``φ(x) = [x, sin(2πkx), cos(2πkx) for k = 1..n_freq]`` (``2·n_freq + 1`` features). The MLP's last layer
    is zero-initialised, so the untrained schedule equals the baseline exactly.

    Args:
        baseline: ``(T,)`` positive baseline values (any unit: a learning rate, a GN step α or λ).
        n_freq: Fourier frequencies.
        hidden: MLP width.
        depth: hidden layers (>= 1).
        max_log_delta: optional bound ``|log η − log η_baseline| <= max_log_delta`` (soft, by ``tanh``); None:
            unbounded.
        frozen_steps: the first ``frozen_steps`` values stay at the baseline (not learned). Adam's first update
            is ``η_0 · sign(g)`` whatever the gradient (bias-corrected ``m/√v = g/|g|``), a displacement of
            ``η_0`` everywhere rather than a gradient step; with the piecewise preset ``η_0 = 15`` is exactly one
            coarse voxel, an optimum of the final error at the edge of a cliff (on the synthetic 2D benchmark
            ``η_0 = 14`` is 0.3 % worse, ``η_0 = 16`` 75 % worse), where the meta-gradient still points towards
            larger ``η_0``. Freezing it lets the later steps be learned.
    """

    def __init__(
        self,
        baseline: Sequence[float] | torch.Tensor,
        n_freq: int = 4,
        hidden: int = 32,
        depth: int = 2,
        max_log_delta: float | None = None,
        frozen_steps: int = 0,
    ) -> None:
        super().__init__()
        base = torch.as_tensor(baseline, dtype=torch.float64).reshape(-1).clone()
        if base.numel() < 1 or not torch.all(base > 0) or not torch.isfinite(base).all():
            raise ValueError("baseline must be a non-empty sequence of finite positive values")
        if n_freq < 0 or hidden < 1 or depth < 1:
            raise ValueError(f"need n_freq >= 0, hidden >= 1, depth >= 1; got {n_freq}, {hidden}, {depth}")
        if not 0 <= int(frozen_steps) < base.numel():
            raise ValueError(f"frozen_steps must be in [0, {base.numel()}); got {frozen_steps}")
        self.n_freq, self.max_log_delta, self.frozen_steps = int(n_freq), max_log_delta, int(frozen_steps)
        self.register_buffer("base", base)
        layers: list[nn.Module] = []
        width = 2 * self.n_freq + 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    @property
    def steps(self) -> int:
        """The horizon ``T``."""
        return int(self.base.numel())

    def features(self) -> torch.Tensor:
        """Fourier features ``(T, 2·n_freq + 1)`` of ``x = t/T``, ``t = 0 .. T − 1`` (float32)."""
        x = torch.arange(self.steps, device=self.base.device, dtype=torch.float32) / self.steps
        feats = [x]
        for k in range(1, self.n_freq + 1):
            feats += [torch.sin(2 * math.pi * k * x), torch.cos(2 * math.pi * k * x)]
        return torch.stack(feats, dim=1)

    def log_delta(self) -> torch.Tensor:
        """``log η_t − log η_baseline(t)`` ``(T,)`` float64 (exactly 0 untrained)."""
        delta = self.mlp(self.features().to(self.mlp[0].weight.dtype))[:, 0].to(torch.float64)
        if self.max_log_delta is not None:
            delta = self.max_log_delta * torch.tanh(delta / self.max_log_delta)
        if self.frozen_steps:
            delta = torch.cat([delta.new_zeros(self.frozen_steps), delta[self.frozen_steps:]])
        return delta

    def log_values(self) -> torch.Tensor:
        """``log η_t`` ``(T,)`` float64."""
        return self.base.log() + self.log_delta()

    def values(self) -> torch.Tensor:
        """``η_t = η_baseline(t) · exp(MLP)`` ``(T,)`` float64, in the baseline's unit (differentiable)."""
        return self.base * self.log_delta().exp()

    def forward(self) -> torch.Tensor:
        return self.values()


# --------------------------------------------------------------------------- differentiable Adam IO


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(x)`` with derivative 0 at ``x = 0`` (Adam's second moment is 0 where all gradients were)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D401
        y = x.sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, grad * 0.5 / y.clamp_min(torch.finfo(y.dtype).tiny), torch.zeros_like(grad))


def _adam_objective(
    delta: torch.Tensor,
    u_coarse: torch.Tensor,
    similarity: FeatureMSE,
    lam: float,
    weight: float,
    smooth_passes: int,
    step_unit: float,
) -> torch.Tensor:
    """The objective of :func:`lightning_modules.baselines.instance_opt.adam_optimise` (same expression)."""
    v = u_coarse + step_unit * smooth(delta, smooth_passes)
    return weight * similarity(v) + lam * diffusion(v)


def _adam_segment(
    t0: int,
    lam: float,
    weight: float,
    smooth_passes: int,
    step_unit: float,
    betas: tuple[float, float],
    eps: float,
    create_graph: bool,
    u_coarse: torch.Tensor,
    similarity: FeatureMSE,
    delta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    lrs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam steps ``t0 .. t0 + len(lrs) − 1`` from state ``(δ, m, v)``; the update of ``torch.optim.Adam``."""
    b1, b2 = betas
    for j in range(lrs.shape[0]):
        step = t0 + j + 1
        if not delta.requires_grad:
            delta = delta.detach().requires_grad_(True)
        loss = _adam_objective(delta, u_coarse, similarity, lam, weight, smooth_passes, step_unit)
        (g,) = torch.autograd.grad(loss, delta, create_graph=create_graph)
        m = torch.lerp(m, g, 1 - b1)
        v = v * b2 + (1 - b2) * g * g
        step_size = lrs[j].to(delta.dtype) / (1 - b1**step)
        denom = _SafeSqrt.apply(v) / math.sqrt(1 - b2**step) + eps
        delta = delta - step_size * (m / denom)
        if not create_graph:
            delta, m, v = delta.detach(), m.detach(), v.detach()
    return delta, m, v


def differentiable_adam(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    stride: int,
    lrs: torch.Tensor,
    *,
    init: torch.Tensor | None = None,
    lam: float = 1.25,
    weight: float = 12.0,
    smooth_passes: int = 2,
    step_unit: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    checkpoint_every: int = 10,
    return_path: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Adam instance optimisation on a coarse grid, differentiable in the learning rates ``lrs``.

    Same parametrisation, objective and update as
    :func:`lightning_modules.baselines.instance_opt.adam_optimise` with ``torch.optim.Adam`` (``β``, ``ε``),
    written with tensors so that autograd reaches ``lrs`` through all ``T`` steps (second-order terms
    included). Segments of ``checkpoint_every`` steps are recomputed in the backward pass.

    Args:
        fixed, moving: coarse features ``(B, C, *G)`` (not differentiated).
        stride: grid stride ``s`` (full-resolution voxels per node).
        lrs: ``(T,)`` learning rates per step (in ``step_unit`` coarse-grid voxels, as in the baseline);
            differentiable.
        init: initial field ``(B, n, *G)`` in full-resolution voxels (zeros when None).
        lam, weight, smooth_passes: the objective ``weight·MSE + λ·diffusion`` and the smoothing of the
            increment, as in the baseline.
        step_unit: coarse-grid voxels per unit of the Adam parameter (the baseline's ``step_unit``).
        betas, eps: Adam's.
        checkpoint_every: steps per checkpointed segment (``<= 0``: no checkpointing).
        return_path: also return the field after every segment but the last.

    Returns:
        the optimised coarse field ``(B, n, *G)`` in full-resolution voxels (and the list of intermediate
        fields with ``return_path``).
    """
    n = fixed.dim() - 2
    shape = (fixed.shape[0], n, *fixed.shape[2:])
    fixed, moving = fixed.detach(), moving.detach()
    s = float(stride)
    u_coarse = (fixed.new_zeros(shape) if init is None else init.detach().to(fixed.dtype)) / s
    steps = int(lrs.shape[0])
    create_graph = lrs.requires_grad and torch.is_grad_enabled()
    seg = steps if checkpoint_every <= 0 else int(checkpoint_every)
    delta = torch.zeros(shape, dtype=fixed.dtype, device=fixed.device, requires_grad=True)
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)
    similarity = FeatureMSE(fixed, moving)
    consts = (lam, weight, smooth_passes, step_unit, betas, eps, create_graph, u_coarse, similarity)
    path = []
    with torch.enable_grad():
        for t0 in range(0, steps, seg):
            chunk = lrs[t0 : t0 + seg]
            if create_graph and checkpoint_every > 0:
                # the segment draws no random numbers: not stashing RNG states keeps the recomputation
                # independent of the process's CUDA state (checkpoint otherwise saves/restores device RNG
                # states when CUDA is initialised and refuses a CUDA initialisation inside the segment)
                delta, m, v = checkpoint(_adam_segment, t0, *consts, delta, m, v, chunk, use_reentrant=False,
                                         preserve_rng_state=False)
            else:
                delta, m, v = _adam_segment(t0, *consts, delta, m, v, chunk)
            if return_path and t0 + seg < steps:
                path.append((u_coarse + step_unit * smooth(delta, smooth_passes)) * s)
        out = (u_coarse + step_unit * smooth(delta, smooth_passes)) * s
    if not create_graph:
        out = out.detach()
    return (out, path) if return_path else out


# ------------------------------------------------------------------------------------ meta-learning


class ScheduleMetaLearner(RegistrationModule):
    """Meta-learns the learning-rate schedule of the Adam instance optimisation (AdamIO, docs/design.md §6).

    Trainable parameters: a :class:`FourierSchedule` of ``steps`` values around ``baseline``. A training step
    runs :func:`differentiable_adam` for ``steps`` steps on the MIND-SSC features of the batch (pooled by
    ``stride``), upsamples the field and backpropagates the registration error to the schedule. Validation
    and test run the baseline's own loop with the current schedule (``refine_field``).

    Args:
        preset: the AdamIO preset whose iteration count and step unit apply (``"piecewise"``: 270 steps,
            learning rates in 1/15 voxel; ``"constant"``: 100 steps, in voxels), so that the learned schedule
            means the same in ``AdamIO(preset=..., schedule=...)``.
        steps: the horizon ``T`` (None: the preset's iterations).
        step_unit: coarse-grid voxels per unit of the Adam parameter (None: the preset's).
        baseline: the schedule the network starts from: ``"piecewise"``, ``"constant"``, a number or values.
        n_freq, hidden, depth, max_log_delta, frozen_steps: :class:`FourierSchedule` options.
        outer: the meta-objective at the end: ``"tre"`` (keypoint distance, mm), ``"label"`` (1 − soft Dice of
            the warped labels), ``"epe"`` (mean end-point error to ``true_disp``, voxels; synthetic data) or
            ``"mixed"`` (tre + label).
        w_path: weight of the same error along the way (mean over the ends of all checkpoint segments but the
            last), against short-horizon bias; 0 disables.
        checkpoint_every: steps per gradient-checkpoint segment.
        lam, stride, smooth_passes, weight, mind_radius, mind_dilation: the AdamIO settings (1.25, 2, 2, 12,
            1, 2).
        lr: Adam learning rate of the schedule network (meta-optimiser). Adam moves every MLP weight by about
            ``lr`` per step, so ``log η_t`` can move by tens of times ``lr``: keep it small, the instance
            optimisation has an instability cliff in η (the meta-gradient is unreliable beyond it).
        export_path: where :meth:`on_fit_end` writes the schedule (:func:`save_schedule`); None: no file.
    """

    method_name = "adam_learned_schedule"

    def __init__(
        self,
        preset: str = "piecewise",
        steps: int | None = None,
        step_unit: float | None = None,
        baseline: str | float | list[float] = "piecewise",
        n_freq: int = 4,
        hidden: int = 32,
        depth: int = 2,
        max_log_delta: float | None = 1.0,
        frozen_steps: int = 0,
        outer: str = "tre",
        w_path: float = 0.0,
        checkpoint_every: int = 10,
        lam: float = 1.25,
        stride: int = 2,
        smooth_passes: int = 2,
        weight: float = 12.0,
        mind_radius: int = 1,
        mind_dilation: int = 2,
        lr: float = 1e-3,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        if outer not in ("tre", "label", "epe", "mixed"):
            raise ValueError(f"unknown outer objective {outer!r}; known: tre, label, epe, mixed")
        chosen = resolve_preset(preset)
        self.steps = int(chosen.iterations if steps is None else steps)
        self.step_unit = float(chosen.step_unit if step_unit is None else step_unit)
        if self.steps < 1 or not self.step_unit > 0:
            raise ValueError(f"need steps >= 1 and step_unit > 0; got {steps}, {step_unit}")
        self.save_hyperparameters()
        self.schedule = FourierSchedule(
            baseline_values(baseline, self.steps), n_freq, hidden, depth, max_log_delta, frozen_steps
        )

    # --- the schedule ------------------------------------------------------------------------------------
    def schedule_values(self) -> torch.Tensor:
        """The current learning rates ``(T,)`` float64 (in ``step_unit`` coarse-grid voxels, as AdamIO's)."""
        return self.schedule.values()

    def as_schedule(self) -> ValuesLR:
        """The current schedule as the baseline's :class:`ValuesLR` (detached)."""
        return ValuesLR(tuple(float(v) for v in self.schedule_values().detach().cpu()))

    # --- registration -------------------------------------------------------------------------------------
    def _coarse_features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        fixed, moving = check_pair(batch)
        with torch.no_grad():
            f = mind_ssc(fixed, hp.mind_radius, hp.mind_dilation)
            m = mind_ssc(moving, hp.mind_radius, hp.mind_dilation)
        return f, m

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """AdamIO with the current schedule (the baseline loop); ``(B, n, *S)`` voxel units."""
        hp = self.hparams
        f, m = self._coarse_features(batch)
        return refine_field(
            f,
            m,
            f.shape[2:],
            hp.stride,
            iterations=self.steps,
            schedule=self.as_schedule(),
            lam=hp.lam,
            weight=hp.weight,
            smooth_passes=hp.smooth_passes,
            step_unit=self.step_unit,
        )

    def unrolled(self, batch: dict[str, Any], lrs: torch.Tensor | None = None, return_path: bool = False):
        """Differentiable AdamIO on a batch with learning rates ``lrs`` ``(T,)`` (default: the schedule).

        Returns the full-resolution field ``(B, n, *S)`` (and the intermediate full-resolution fields with
        ``return_path``).
        """
        hp = self.hparams
        f, m = self._coarse_features(batch)
        shape = tuple(f.shape[2:])
        lrs = self.schedule_values() if lrs is None else lrs
        out = differentiable_adam(
            pool_to_grid(f, hp.stride),
            pool_to_grid(m, hp.stride),
            hp.stride,
            lrs,
            lam=hp.lam,
            weight=hp.weight,
            smooth_passes=hp.smooth_passes,
            step_unit=self.step_unit,
            checkpoint_every=hp.checkpoint_every,
            return_path=return_path,
        )
        if return_path:
            coarse, path = out
            return upsample_field(coarse, shape, hp.stride), [
                upsample_field(p, shape, hp.stride) for p in path
            ]
        return upsample_field(out, shape, hp.stride)

    def error(self, batch: dict[str, Any], u: torch.Tensor) -> torch.Tensor:
        """The meta-objective of a full-resolution field ``u`` ``(B, n, *S)`` (see ``outer``); scalar."""
        kind = self.hparams.outer
        if kind == "epe":
            if batch.get("true_disp") is None:
                raise ValueError("outer='epe' needs true_disp in the batch (synthetic data)")
            return (u - batch["true_disp"].to(u.dtype)).norm(dim=1).mean()
        if kind == "label":
            return outer_loss(batch, u, guard="none")["label"]
        if kind == "mixed":
            ids = batch_label_ids(batch)
            return keypoint_loss(
                u, batch["fixed_keypoints"], batch["moving_keypoints"], batch.get("moving_spacing")
            ) + label_loss(u, batch["moving_label"], batch["fixed_label"], ids, "dice")
        if batch.get("fixed_keypoints") is None:
            raise ValueError("outer='tre' needs keypoints in the batch")
        return keypoint_loss(
            u, batch["fixed_keypoints"], batch["moving_keypoints"], batch.get("moving_spacing")
        )

    # --- training -----------------------------------------------------------------------------------------
    def meta_loss(
        self, batch: dict[str, Any], lrs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, final error)`` of one unroll with learning rates ``lrs`` (default: the schedule): the
        final error plus ``w_path`` × the mean error at the ends of the checkpoint segments."""
        w_path = self.hparams.w_path
        if w_path > 0:
            u, path = self.unrolled(batch, lrs, return_path=True)
            final = self.error(batch, u)
            return final + (w_path * torch.stack([self.error(batch, p) for p in path]).mean()
                            if path else 0.0), final
        final = self.error(batch, self.unrolled(batch, lrs))
        return final, final

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        bsz = batch["fixed"].shape[0]
        values = self.schedule_values()
        loss, final = self.meta_loss(batch, values)
        lrs = values.detach()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bsz)
        self.log("train/error_final", final, on_step=False, on_epoch=True, batch_size=bsz)
        for name, t in (("first", 0), ("mid", lrs.numel() // 2), ("last", lrs.numel() - 1)):
            self.log(f"schedule/lr_{name}", float(lrs[t]), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.schedule.parameters(), lr=self.hparams.lr)

    def on_fit_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            path = save_schedule(self, self.hparams.export_path)
            log.info("learned schedule written to %s", path)


# ------------------------------------------------------------------------------------------ persistence


def save_schedule(
    source: ScheduleMetaLearner | FourierSchedule | Sequence[float],
    path: str | Path,
    *,
    step_unit: float | None = None,
    **meta: Any,
) -> Path:
    """Write a learned schedule to ``path`` (``.pt``).

    The file holds ``{"values": [η_0 .. η_{T−1}], "iterations": T, "step_unit": u, "baseline": [...],
    "log_delta": [...], "state_dict": ..., "config": ..., "meta": {...}}`` (``step_unit`` from a
    :class:`ScheduleMetaLearner`, else the argument, else None = the AdamIO preset's); :func:`load_schedule`
    and :func:`adam_settings` read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"kind": "learned_lr_schedule", "meta": dict(meta), "step_unit": step_unit}
    net = source.schedule if isinstance(source, ScheduleMetaLearner) else source
    if isinstance(net, FourierSchedule):
        with torch.no_grad():
            record["values"] = [float(v) for v in net.values().cpu()]
            record["baseline"] = [float(v) for v in net.base.cpu()]
            record["log_delta"] = [float(v) for v in net.log_delta().cpu()]
        record["state_dict"] = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        record["config"] = {
            "n_freq": net.n_freq,
            "hidden": net.mlp[0].out_features,
            "depth": (len(net.mlp) - 1) // 2,
            "max_log_delta": net.max_log_delta,
            "frozen_steps": net.frozen_steps,
        }
        if isinstance(source, ScheduleMetaLearner):
            record["step_unit"] = source.step_unit
            record["meta"].setdefault("hparams", dict(source.hparams))
    else:
        record["values"] = [float(v) for v in source]
    record["iterations"] = len(record["values"])
    torch.save(record, path)
    return path


def _read_schedule(path: str | Path) -> tuple[list[float], float | None]:
    """``(values, step_unit)`` of a :func:`save_schedule` file or a ScheduleMetaLearner checkpoint, read by
    :func:`lightning_modules.checkpoint.load_checkpoint` (no code runs from the file; errors name it)."""
    path = Path(path)
    expected = "a learned schedule written by save_schedule (.pt) or a ScheduleMetaLearner checkpoint"
    obj = load_checkpoint(path, what="schedule file", expected=expected)
    if isinstance(obj, dict) and "values" in obj:
        try:
            values = [float(v) for v in obj["values"]]
            unit = None if obj.get("step_unit") is None else float(obj["step_unit"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"schedule file {path}: 'values' must be numbers ({exc})") from None
        if not values or not all(math.isfinite(v) and v >= 0 for v in values):
            raise CheckpointError(f"schedule file {path}: 'values' must be finite learning rates >= 0; got {values}")
        return values, unit
    if isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj:
        hp = dict(obj["hyper_parameters"])
        sd = {k[len("schedule.") :]: v for k, v in obj["state_dict"].items() if k.startswith("schedule.")}
        if "base" not in sd:
            raise ValueError(
                f"{path} is a Lightning checkpoint without a learned schedule (no 'schedule.base')"
            )
        try:
            net = FourierSchedule(
                sd["base"],
                hp.get("n_freq", 4),
                hp.get("hidden", 32),
                hp.get("depth", 2),
                hp.get("max_log_delta", 3.0),
                hp.get("frozen_steps", 0),
            )
            net.load_state_dict(sd)
        except Exception as exc:
            raise CheckpointError(
                f"schedule file {path}: its schedule network does not load ({type(exc).__name__}: {exc})"
            ) from exc
        unit = hp.get("step_unit")
        if unit is None:
            unit = resolve_preset(hp.get("preset", "piecewise")).step_unit
        with torch.no_grad():
            return [float(v) for v in net.values()], float(unit)
    raise CheckpointError(f"schedule file {path} is neither a saved schedule nor a ScheduleMetaLearner checkpoint "
                          f"(expected {expected})")


def load_schedule(path: str | Path) -> ValuesLR:
    """Read a learned schedule: a file of :func:`save_schedule` or a Lightning checkpoint of
    :class:`ScheduleMetaLearner`.

    Returns:
        a :class:`~lightning_modules.baselines.schedules.ValuesLR` (callable ``step -> lr``; ``.values`` the
        ``T`` learning rates), accepted by ``AdamIO(schedule=...)``. The values are read in the step unit the
        schedule was learned with: pass :func:`adam_settings` to AdamIO to get the iteration count and the
        unit too.
    """
    return ValuesLR(tuple(_read_schedule(path)[0]))


def adam_settings(path: str | Path) -> dict[str, Any]:
    """``AdamIO`` keyword arguments for a learned schedule: ``{"schedule": ValuesLR, "iterations": T}`` plus
    ``"step_unit"`` when the file records it (else AdamIO's preset unit applies). Usage:
    ``AdamIO(**adam_settings(path))``."""
    values, unit = _read_schedule(path)
    out: dict[str, Any] = {"schedule": ValuesLR(tuple(values)), "iterations": len(values)}
    if unit is not None:
        out["step_unit"] = float(unit)
    return out

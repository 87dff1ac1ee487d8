"""A learned schedule around a baseline: :class:`FourierSchedule` (docs/design.md §5), the trainable part of
meta-learned learning-rate schedules (:class:`lightning_modules.hyper.ScheduleMetaLearner`) and of learned λ /
GN-step schedules (:class:`lightning_modules.hyper.BilevelLearnGN`).

``log η_t = log η_baseline(t) + MLP(φ(t/T))``: the last MLP layer (weights and bias) starts at zero, so the
untrained schedule is the baseline **exactly** (``η_t = η_baseline(t) · exp(0)``): the "bias at the baseline" of
a constant schedule is carried by the fixed offset ``log η_baseline``, which also covers non-constant baselines
such as the piecewise one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FourierSchedule"]


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

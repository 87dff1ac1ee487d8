"""λ-conditioning of the compact CNN heads (docs/design.md §5, HyperMorph-style amortisation).

A small MLP of the normalised ``log λ`` produces per-channel FiLM parameters (a scale ``exp(a)`` and a shift
``β``) for each output group of a module, here the ``J`` head (``C·n`` channels) and the ``f`` head (``C``
channels) of :class:`layers.heads.CompactHeads`:

    J'_{c,i}(p) = exp(a^J_{c,i}(λ)) J_{c,i}(p) + β^J_{c,i}(λ),    f'_c(p) = exp(a^f_c(λ)) f_c(p) + β^f_c(λ).

The last MLP layer is zero-initialised, so an untrained conditioning is exactly the identity (``exp(0) = 1``,
``β = 0``) and a conditioned LearnGN starts as the unconditioned one. The conditioning value is set by a
context manager (:meth:`FiLMHeads.condition`) because the GN loop (:class:`layers.gn.GNRegistration`) calls
its ``jf`` module as ``jf(fixed, warped)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FiLMHeads", "LambdaFiLM"]


class LambdaFiLM(nn.Module):
    """MLP ``log λ -> [(scale, shift) per channel group]``, identity at initialisation.

    Args:
        groups: channel count of each modulated group (e.g. ``[C·n, C]`` for the ``J`` and ``f`` heads).
        log_lam_range: ``(log λ_min, log λ_max)``; the MLP input is ``log λ`` mapped affinely to ``[-1, 1]``
            over this range (values outside extrapolate).
        hidden: MLP width.
        depth: number of hidden layers (>= 1).

    ``forward(log_lam)`` with ``log_lam`` of shape ``()`` or ``(B,)`` (natural log of the dimensionless λ)
    returns one ``(scale, shift)`` pair per group, each ``(B', c)`` with ``B' = 1`` for a scalar input;
    ``scale = exp(a) > 0`` (dimensionless) and ``shift`` in the units of the modulated output.
    """

    def __init__(
        self, groups: Sequence[int], log_lam_range: tuple[float, float], hidden: int = 32, depth: int = 2
    ) -> None:
        super().__init__()
        lo, hi = (float(v) for v in log_lam_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"log_lam_range must be finite with max > min; got {log_lam_range}")
        if depth < 1 or hidden < 1 or not groups or min(groups) < 1:
            raise ValueError(
                f"need depth >= 1, hidden >= 1 and positive groups; got {depth}, {hidden}, {groups}"
            )
        self.groups = [int(g) for g in groups]
        self.register_buffer("log_lam_range", torch.tensor([lo, hi]), persistent=False)
        layers: list[nn.Module] = []
        width = 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, 2 * sum(self.groups))
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def normalise(self, log_lam: torch.Tensor) -> torch.Tensor:
        """``log λ`` -> ``2 (log λ − lo) / (hi − lo) − 1`` (``[-1, 1]`` over the range), same shape."""
        lo, hi = self.log_lam_range[0], self.log_lam_range[1]
        return 2.0 * (log_lam - lo) / (hi - lo) - 1.0

    def forward(self, log_lam: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        z = self.normalise(torch.as_tensor(log_lam).to(self.log_lam_range)).reshape(-1, 1)
        out = self.mlp(z)  # (B', 2 Σ groups)
        params = []
        start = 0
        for g in self.groups:
            a, b = out[:, start : start + g], out[:, start + g : start + 2 * g]
            params.append((a.exp(), b))
            start += 2 * g
        return params


class FiLMHeads(nn.Module):
    """Compact ``(J, f)`` heads modulated per channel by :class:`LambdaFiLM` of the current ``log λ``.

    Args:
        heads: a module ``(fixed, warped) -> (J (B, C, n, *G), f (B, C, *G))`` such as
            :class:`layers.heads.CompactHeads` (needs attributes ``channels`` and ``n``).
        log_lam_range: ``(log λ_min, log λ_max)`` of the conditioning MLP input normalisation.
        hidden, depth: MLP size (see :class:`LambdaFiLM`).

    Use ``with film_heads.condition(log_lam): ...`` around the GN iterations (``log_lam`` ``()`` or ``(B,)``);
    calling the module outside such a block raises ``RuntimeError``.
    """

    def __init__(
        self, heads: nn.Module, log_lam_range: tuple[float, float], hidden: int = 32, depth: int = 2
    ) -> None:
        super().__init__()
        self.heads = heads
        self.channels, self.n = int(heads.channels), int(heads.n)
        self.film = LambdaFiLM([self.channels * self.n, self.channels], log_lam_range, hidden, depth)
        self._log_lam: torch.Tensor | None = None

    @contextlib.contextmanager
    def condition(self, log_lam: torch.Tensor | float) -> Iterator[None]:
        """Condition the heads on ``log λ`` (``()`` or ``(B,)``, differentiable) inside the block."""
        previous = self._log_lam
        self._log_lam = torch.as_tensor(log_lam)
        try:
            yield
        finally:
            self._log_lam = previous

    def prepare(self, fixed: torch.Tensor) -> Any:
        """The wrapped heads' per-registration preparation (``heads.prepare``, e.g.
        :meth:`layers.heads.CompactHeads.prepare`): FiLM acts on the heads' outputs, so what they compute once
        from the fixed features and the weights is unchanged."""
        return self.heads.prepare(fixed)

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, prepared: Any = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``J`` ``(B, C, n, *G)`` and ``f`` ``(B, C, *G)`` of the heads, FiLM-modulated (``prepared``: this
        module's :meth:`prepare` of ``fixed``, passed on to the heads)."""
        if self._log_lam is None:
            raise RuntimeError(
                "FiLMHeads called without a conditioning value: use `with heads.condition(log_lam):`"
            )
        jac, res = self.heads(fixed, warped) if prepared is None else self.heads(fixed, warped, prepared=prepared)
        (sj, bj), (sf, bf) = self.film(self._log_lam.to(jac.device))
        bsz, nd = jac.shape[0], jac.dim() - 3
        if sj.shape[0] not in (1, bsz):
            raise ValueError(f"log λ has {sj.shape[0]} values for a batch of {bsz}")
        view_j = (sj.shape[0], self.channels, self.n) + (1,) * nd
        view_f = (sf.shape[0], self.channels) + (1,) * nd
        jac = jac * sj.to(jac.dtype).view(view_j) + bj.to(jac.dtype).view(view_j)
        res = res * sf.to(res.dtype).view(view_f) + bf.to(res.dtype).view(view_f)
        return jac, res

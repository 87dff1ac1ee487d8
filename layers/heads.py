"""Handcrafted Gauss-Newton operators and the compact CNN heads that learn them (docs/design.md §3-§4).

Both compute, from fixed features ``F`` and warped moving features ``W`` ``(B, C, *Sp)`` with ``Sp`` a
multiple of the stride ``s``:

* ``J`` ``(B, C, n, *G)``: the per-node Jacobian of the residual w.r.t. the displacement (voxel units);
  handcrafted: the central-difference gradient of ``W`` (:func:`layers.diff.spatial_gradient`, one-sided at
  the borders) averaged over ``s^n`` blocks (:func:`layers.grid.pool_to_grid`);
* ``f`` ``(B, C, *G)``: the residual; handcrafted: ``W - F`` averaged over ``s^n`` blocks.

The heads are strided convolutions whose initial weights reproduce these operators exactly: the input is
padded by one voxel of linear extrapolation on each side (so that a central difference at the border equals
the one-sided difference), then a ``4^n`` convolution of stride 2 (central difference ⊗ 2-box for ``J``, a
2-box of ``W - F`` for ``f``) and ``log2(s) - 1`` further ``2^n`` box convolutions of stride 2. With
``hidden > 0`` a nonlinear branch with a zero-initialised last layer is added to each head, so an untrained
model still equals handcrafted GN.

With ``fused=True`` each head's linear part (the ``4^n`` convolution and the box convolutions after it, all
learned) runs as one convolution of stride ``s`` whose ``(s + 2)^n`` kernel is composed from the learned
kernels at every call (:meth:`_Head.linear_kernel`): the same operator and the same gradients up to rounding,
with no stride-2 intermediate and, at ``s = 4``, ``6^n`` multiply-adds per output node instead of ``2^n · 4^n``
(a 2.4× reduction in 3D).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .grid import pool_to_grid, spatial_dims

__all__ = ["CompactHeads", "handcrafted_jf", "linear_extrapolation_pad"]


def handcrafted_jf(fixed: torch.Tensor, warped: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Handcrafted ``J`` ``(B, C, n, *G)`` and ``f`` ``(B, C, *G)`` (see the module docstring).

    ``J[:, :, a]`` equals ``pool_to_grid(spatial_gradient(warped)[:, :, a], stride)`` exactly, computed without
    materialising the full-resolution gradient: the block sum of central differences along axis ``a``
    telescopes to ``(W[s g + s] + W[s g + s - 1] - W[s g] - W[s g - 1]) / 2`` (with one voxel of linear
    extrapolation at the ends, which reproduces the one-sided border differences), so ``warped`` is first
    averaged over the blocks of the other axes and then differenced along ``a`` at stride ``s``.
    """
    n = spatial_dims(warped, "warped")
    if fixed.shape != warped.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and warped {tuple(warped.shape)} differ")
    shape = warped.shape[2:]
    if any(int(v) % stride for v in shape):
        raise ValueError(f"feature shape {tuple(shape)} must be a multiple of the stride {stride}")
    pool = F.avg_pool2d if n == 2 else F.avg_pool3d
    comps = []
    for a in range(n):
        kernel = tuple(1 if b == a else stride for b in range(n))
        q = pool(warped, kernel, kernel) if stride > 1 else warped
        q = _extrapolate_axis(q, 2 + a)  # (B, C, ..., S_a + 2, ...)
        g = shape[a] // stride

        def take(start: int, q=q, a=a, g=g) -> torch.Tensor:
            return q.narrow(2 + a, start, (g - 1) * stride + 1)[
                (slice(None),) * (2 + a) + (slice(None, None, stride),)
            ]

        comps.append((take(stride + 1) + take(stride) - take(1) - take(0)) * (0.5 / stride))
    jac = torch.stack(comps, dim=2)
    res = pool_to_grid(warped - fixed, stride)
    return jac, res


def _extrapolate_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    first = 2 * x.narrow(dim, 0, 1) - x.narrow(dim, 1, 1)
    last = 2 * x.narrow(dim, x.shape[dim] - 1, 1) - x.narrow(dim, x.shape[dim] - 2, 1)
    return torch.cat([first, x, last], dim=dim)


def linear_extrapolation_pad(x: torch.Tensor) -> torch.Tensor:
    """Pad ``(B, C, *S)`` by one voxel on each side of each axis with ``2 x[0] - x[1]`` (and mirrored).

    The axes are extrapolated one after the other (the faces of axis ``a`` span the padding of the axes before
    it), written into one padded tensor instead of concatenating a copy per axis. The backward pass is the
    adjoint of those writes applied to one copy of the incoming gradient (autograd's own backward of the
    in-place face writes would allocate a zero-filled full-size tensor per face read, twelve per call in 3D).
    """
    return _LinearExtrapolationPad.apply(x)


def _face_writes(x: torch.Tensor) -> Iterator[tuple[tuple, tuple, tuple]]:
    """The face writes of :func:`linear_extrapolation_pad` on the padded tensor ``x`` in order, as index
    tuples ``(target, a, b)`` of ``x[target] = 2 x[a] - x[b]``."""
    n = x.dim() - 2
    for a in range(2, 2 + n):
        region = [slice(None)] * 2 + [slice(None) if b < a else slice(1, -1) for b in range(2, 2 + n)]

        def face(i: int, region=region, a=a) -> tuple:
            sel = list(region)
            sel[a] = slice(i, i + 1)
            return tuple(sel)

        last = x.shape[a] - 1
        yield face(0), face(1), face(2)
        yield face(last), face(last - 1), face(last - 2)


class _LinearExtrapolationPad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n = spatial_dims(x)
        out = F.pad(x, (1, 1) * n)
        for target, a, b in _face_writes(out):
            out[target] = 2 * out[a] - out[b]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        for target, a, b in reversed(list(_face_writes(grad))):  # the adjoint of each write, in reverse order
            g = grad[target].clone()
            grad[target] = 0
            grad[a] += 2 * g
            grad[b] -= g
        return grad[(slice(None), slice(None)) + (slice(1, -1),) * (grad.dim() - 2)]


def _check_stride(stride: int) -> int:
    levels = int(round(math.log2(stride))) if stride >= 1 else -1
    if stride < 2 or 2**levels != stride:
        raise ValueError(f"stride must be a power of two >= 2; got {stride}")
    return levels


def _separable(kernels: list[torch.Tensor]) -> torch.Tensor:
    out = kernels[0]
    for k in kernels[1:]:
        out = out[..., None] * k
    return out


class _Head(nn.Module):
    """Strided linear head ``in_ch -> out_ch`` (+ optional zero-initialised nonlinear branch)."""

    def __init__(self, n: int, in_ch: int, out_ch: int, stride: int, hidden: int, fused: bool = False) -> None:
        super().__init__()
        levels = _check_stride(stride)
        self.stride, self.fused = stride, bool(fused)
        conv = nn.Conv2d if n == 2 else nn.Conv3d
        self.first = conv(in_ch, out_ch, 4, stride=2, bias=False)
        self.rest = nn.ModuleList(conv(out_ch, out_ch, 2, stride=2, bias=False) for _ in range(levels - 1))
        self.branch = None
        if hidden > 0:
            act = nn.LeakyReLU(0.1)
            layers: list[nn.Module] = [conv(in_ch, hidden, 4, stride=2), act]
            for _ in range(levels - 1):
                layers += [conv(hidden, hidden, 2, stride=2), act]
            last = conv(hidden, out_ch, 3, padding=1, padding_mode="replicate")
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.branch = nn.Sequential(*layers, last)
        box = _separable([torch.tensor([0.5, 0.5])] * n)
        with torch.no_grad():
            for c in self.rest:
                c.weight.zero_()
                for k in range(out_ch):
                    c.weight[k, k] = box

    def linear_kernel(self) -> torch.Tensor:
        """The linear part as one kernel ``(out_ch, in_ch, *(s + 2,)*n)`` of stride ``s``: composing a kernel
        ``K`` of stride ``t`` with a following ``2^n`` kernel ``W`` of stride 2 gives ``conv_transpose(W, K,
        stride=t)`` of stride ``2t`` (tap ``q`` of ``W`` and tap ``r`` of ``K`` meet at the input offset
        ``t·q + r``)."""
        kernel, step = self.first.weight, 2
        transpose = F.conv_transpose2d if kernel.dim() == 4 else F.conv_transpose3d
        for c in self.rest:
            kernel = transpose(c.weight, kernel, stride=step)
            step *= 2
        return kernel

    def forward(self, x_padded: torch.Tensor) -> torch.Tensor:
        if self.fused:
            conv = F.conv2d if x_padded.dim() == 4 else F.conv3d
            y = conv(x_padded, self.linear_kernel(), stride=self.stride)
        else:
            y = self.first(x_padded)
            for c in self.rest:
                y = c(y)
        if self.branch is not None:
            y = y + self.branch(x_padded)
        return y


class CompactHeads(nn.Module):
    """The learned ``J`` and ``f`` operators of LearnGN, initialised to :func:`handcrafted_jf`.

    Args:
        n: spatial dimensions (2 or 3).
        channels: feature channels ``C``.
        stride: grid stride ``s`` (a power of two >= 2).
        hidden: width of an optional nonlinear branch per head (0: purely linear heads, the reference).
        fused: run each head's linear part as one stride-``s`` convolution with the composed kernel (see the
            module docstring; equal up to rounding, fewer operations and no stride-2 intermediate). The
            parameters and the state dict are the same either way; the attribute may be switched.

    ``forward(fixed, warped)`` with both ``(B, C, *Sp)`` (``Sp`` a multiple of ``s``) returns
    ``J`` ``(B, C, n, *G)`` and ``f`` ``(B, C, *G)``.
    """

    def __init__(self, n: int, channels: int, stride: int = 4, hidden: int = 0, fused: bool = False) -> None:
        super().__init__()
        if n not in (2, 3):
            raise ValueError(f"n must be 2 or 3; got {n}")
        self.n, self.channels, self.stride = n, channels, stride
        self.j_head = _Head(n, channels, channels * n, stride, hidden, fused)
        self.f_head = _Head(n, 2 * channels, channels, stride, hidden, fused)
        self.reset_to_handcrafted()

    @property
    def fused(self) -> bool:
        """Whether the linear parts run as one composed convolution per head (``fused`` of the constructor)."""
        return self.j_head.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.j_head.fused = self.f_head.fused = bool(value)

    @torch.no_grad()
    def reset_to_handcrafted(self) -> None:
        """Set the linear weights to the handcrafted operators (the nonlinear branches are left alone)."""
        n, c = self.n, self.channels
        box = torch.tensor([0.0, 0.5, 0.5, 0.0])
        cd_box = torch.tensor([-0.25, -0.25, 0.25, 0.25])  # central difference ⊗ 2-box
        wj = self.j_head.first.weight
        wj.zero_()
        for ch in range(c):
            for a in range(n):
                wj[ch * n + a, ch] = _separable([cd_box if b == a else box for b in range(n)])
        wf = self.f_head.first.weight
        wf.zero_()
        smooth = _separable([box] * n)
        for ch in range(c):
            wf[ch, ch] = -smooth  # fixed channels come first
            wf[ch, c + ch] = smooth

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if fixed.shape != warped.shape or fixed.shape[1] != self.channels:
            raise ValueError(
                f"fixed {tuple(fixed.shape)} and warped {tuple(warped.shape)} must match with "
                f"{self.channels} channels"
            )
        w = linear_extrapolation_pad(warped)
        jac = self.j_head(w)
        b = jac.shape[0]
        jac = jac.reshape(b, self.channels, self.n, *jac.shape[2:])
        res = self.f_head(torch.cat([linear_extrapolation_pad(fixed), w], dim=1))
        return jac, res

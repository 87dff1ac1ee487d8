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

The heads run in one form (:meth:`CompactHeads.prepare`, :meth:`CompactHeads.forward`): each head's linear
part (the ``4^n`` convolution and the box convolutions after it, all learned) is one convolution of stride ``s``
whose ``(s + 2)^n`` kernel is composed from the learned kernels (:meth:`_Head.linear_kernel`), ``6^n``
multiply-adds per output node at ``s = 4`` instead of ``2^n · 4^n``, with no stride-2 intermediate. The ``f``
head is linear in its input, so its linear part splits into a share of the fixed features, computed once per
registration, and a share of the warped ones, which runs together with the ``J`` head as one convolution of
the padded warped features (``C·n + C`` output channels). The same operator and gradients as the stride-2 chain
of the definition up to rounding (tested against it in float64, ``tests/layers/test_heads.py``); on 14 channels
of 64³ voxels (2 shared CPU cores) the merged convolution took 28-32 ms against 140 ms for the two heads' chains
or their composed kernels run separately (the whole registration: ``benchmarks/results/learngn_profile.md``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .grid import pool_to_grid, spatial_dims

__all__ = ["CompactHeads", "PreparedHeads", "handcrafted_jf", "linear_extrapolation_pad"]


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
    """Pad ``(B, C, *S)`` by one voxel on each side of each axis with ``2 x[0] - x[1]`` (and mirrored); every
    axis needs at least two voxels.

    The axes are extrapolated one after the other (the faces of axis ``a`` span the padding of the axes before
    it), written into one padded tensor instead of concatenating a copy per axis, both faces of an axis by one
    operation on a two-face view (:func:`_face_writes`): on the CPU each operation is a parallel region, whose
    start costs more than a face's arithmetic when the cores are shared. The backward pass is the adjoint of those
    writes applied to one copy of the incoming gradient (autograd's own backward of the in-place face writes
    would allocate a zero-filled full-size tensor per face read).
    """
    return _LinearExtrapolationPad.apply(x)


def _at(x: torch.Tensor, dim: int, index: tuple[int, ...]) -> torch.Tensor:
    """A view of ``x`` at one index, or at two increasing indices, along ``dim``."""
    if len(index) == 1:
        return x.narrow(dim, index[0], 1)
    size, stride = list(x.shape), list(x.stride())
    size[dim], stride[dim] = 2, (index[1] - index[0]) * x.stride(dim)
    return x.as_strided(size, stride, x.storage_offset() + index[0] * x.stride(dim))


def _face_writes(x: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The face writes of :func:`linear_extrapolation_pad` on the padded tensor ``x`` in order, as views
    ``(target, a, b)`` of ``target = 2 a - b``: per axis one write of both faces (``target`` at indices 0 and
    ``S + 1``, ``a`` at 1 and ``S``, ``b`` at 2 and ``S - 1``), or one write per face where ``S < 4`` (the
    views would overlap)."""
    n = x.dim() - 2
    for a in range(2, 2 + n):
        region = x[(slice(None),) * 2 + tuple(slice(None) if b <= a else slice(1, -1) for b in range(2, 2 + n))]
        last = x.shape[a] - 1
        ends = ((0, last), (1, last - 1), (2, last - 2))
        if last - 1 >= 4:
            yield tuple(_at(region, a, e) for e in ends)
        else:
            for side in (0, 1):
                yield tuple(_at(region, a, (e[side],)) for e in ends)


class _LinearExtrapolationPad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n = spatial_dims(x)
        if min(x.shape[2:]) < 2:
            raise ValueError(f"linear extrapolation needs two voxels per axis; got {tuple(x.shape)}")
        out = x.new_empty(*x.shape[:2], *(s + 2 for s in x.shape[2:]))
        out[(slice(None), slice(None)) + (slice(1, -1),) * n] = x
        for target, a, b in _face_writes(out):
            torch.mul(a, 2, out=target)
            target.sub_(b)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # the adjoint of each write, in reverse order; a target is never read by the writes before it, nor by
        # the adjoints after it (nor returned), so it need not be cleared
        grad = grad.clone()
        for target, a, b in reversed(list(_face_writes(grad))):
            a.add_(target, alpha=2)
            b.sub_(target)
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
    """The parameters of one strided head ``in_ch -> out_ch``: the linear stride-2 chain ``first``, ``rest``
    (run composed, :meth:`linear_kernel`) and an optional zero-initialised nonlinear ``branch`` of the padded
    input; :class:`CompactHeads` applies them."""

    def __init__(self, n: int, in_ch: int, out_ch: int, stride: int, hidden: int) -> None:
        super().__init__()
        levels = _check_stride(stride)
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


def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` views the same memory as ``a`` with the same layout (``a`` itself, or a detached alias of
    it such as the input that activation checkpointing recomputes with); ``a`` is held alive, so no other
    tensor can have its address."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() \
        and a.dtype == b.dtype and a.device == b.device


def _version(x: torch.Tensor) -> int:
    """``x._version``, the count of in-place changes, or 0 for an inference tensor (which has none: under
    :func:`torch.inference_mode`, as in Lightning's predict and test loops, it cannot be read)."""
    return 0 if x.is_inference() else x._version


@dataclass(frozen=True)
class PreparedHeads:
    """What :meth:`CompactHeads.prepare` computes once per registration from the fixed features and the
    weights, for every ``forward`` of that registration.

    Attributes:
        fixed: the fixed features ``(B, C, *Sp)`` it was prepared for (``forward`` accepts them or an alias).
        fixed_padded: ``fixed`` after :func:`linear_extrapolation_pad`, ``(B, C, *(Sp + 2))``.
        kernel: ``(C·n + C, C, *(s + 2,)*n)``: the composed kernels of the ``J`` head and of the ``f`` head's
            warped-feature share, stacked along the output channels (one convolution of stride ``s``).
        fixed_share: ``(B, C, *G)``: the ``f`` head's linear part applied to the fixed features (feature units).
    """

    fixed: torch.Tensor
    fixed_padded: torch.Tensor
    kernel: torch.Tensor
    fixed_share: torch.Tensor
    #: ``fixed._version`` at preparation (an in-place change of the features afterwards makes it stale; 0 for an
    #: inference tensor)
    version: int = 0


class CompactHeads(nn.Module):
    """The learned ``J`` and ``f`` operators of LearnGN, initialised to :func:`handcrafted_jf`.

    Args:
        n: spatial dimensions (2 or 3).
        channels: feature channels ``C``.
        stride: grid stride ``s`` (a power of two >= 2).
        hidden: width of an optional nonlinear branch per head (0: purely linear heads, the reference).

    ``forward(fixed, warped, prepared=None)`` with both ``(B, C, *Sp)`` (``Sp`` a multiple of ``s``) returns
    ``J`` ``(B, C, n, *G)`` and ``f`` ``(B, C, *G)``; ``prepared``: :meth:`prepare` of ``fixed`` (the same
    tensor), to be reused over the iterations of one registration (:class:`layers.gn.GNRegistration` does).
    The linear parts run as composed convolutions, the ``f`` head split into its fixed and warped shares (module
    docstring, docs/design.md §4).
    """

    def __init__(self, n: int, channels: int, stride: int = 4, hidden: int = 0) -> None:
        super().__init__()
        if n not in (2, 3):
            raise ValueError(f"n must be 2 or 3; got {n}")
        self.n, self.channels, self.stride = n, channels, stride
        self.j_head = _Head(n, channels, channels * n, stride, hidden)
        self.f_head = _Head(n, 2 * channels, channels, stride, hidden)
        self.reset_to_handcrafted()

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

    def _conv(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return (F.conv2d if self.n == 2 else F.conv3d)(x, kernel, stride=self.stride)

    def prepare(self, fixed: torch.Tensor) -> PreparedHeads:
        """The parts of the heads that depend on the fixed features ``(B, C, *Sp)`` and the weights only
        (:class:`PreparedHeads`), differentiable in both: the composed kernels (:meth:`_Head.linear_kernel`)
        and the ``f`` head's share of the fixed features (its kernel's first ``C`` input channels)."""
        self._check(fixed, "fixed")
        c = self.channels
        kernel_f = self.f_head.linear_kernel()
        kernel = torch.cat([self.j_head.linear_kernel(), kernel_f[:, c:]])
        fixed_padded = linear_extrapolation_pad(fixed)
        share = self._conv(fixed_padded, kernel_f[:, :c])
        return PreparedHeads(fixed, fixed_padded, kernel, share, _version(fixed))

    def _check(self, x: torch.Tensor, name: str) -> None:
        if spatial_dims(x, name) != self.n or x.shape[1] != self.channels:
            raise ValueError(f"{name} must have {self.channels} channels and {self.n} spatial dims, "
                             f"(B, {self.channels}, *Sp); got {tuple(x.shape)}")

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, prepared: PreparedHeads | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if fixed.shape != warped.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and warped {tuple(warped.shape)} must match")
        if prepared is None:
            prepared = self.prepare(fixed)
        elif not _same_data(prepared.fixed, fixed):
            raise ValueError("prepared was made by prepare() for other fixed features than these")
        elif _version(fixed) != prepared.version:
            raise ValueError("the fixed features were changed in place after prepare(): prepare them again")
        self._check(warped, "warped")
        n, c = self.n, self.channels
        w = linear_extrapolation_pad(warped)
        out = self._conv(w, prepared.kernel)  # (B, C·n + C, *G)
        jac, res = out[:, : c * n], out[:, c * n :] + prepared.fixed_share
        if self.j_head.branch is not None:
            jac = jac + self.j_head.branch(w)
        if self.f_head.branch is not None:
            res = res + self.f_head.branch(torch.cat([prepared.fixed_padded, w], dim=1))
        return jac.reshape(jac.shape[0], c, n, *jac.shape[2:]), res

"""Grid conventions of the whole project: voxel coordinates, normalised coordinates, coarse grids.

Conventions (docs/design.md §2):

* images ``(B, C, *S)`` with ``S = (H, W)`` or ``(D, H, W)``; ``n = len(S)``;
* a displacement ``u`` is ``(B, n, *S)`` in **voxel units**, channel ``i`` along array axis ``i``;
* ``u`` lives on the fixed grid and points into the moving image: ``warped(x) = moving(x + u(x))``.

**align_corners.** This module is the only place that converts voxel indices to the normalised
``[-1, 1]`` coordinates of :func:`torch.nn.functional.grid_sample`. It uses ``align_corners=True``:
voxel index ``0`` maps to ``-1`` and index ``S_i - 1`` maps to ``+1`` (voxel centres at the ends), so a
displacement of one voxel is exactly one voxel whatever the image size. Every ``grid_sample`` call in the
project goes through :func:`grid_sample` with that choice.

**Threads.** On the CPU, PyTorch's 3D ``grid_sample`` (forward and backward) parallelises over the batch only,
so a single 3D volume is warped on one core. :func:`grid_sample` therefore cuts the sampling grid of one large
3D volume into slabs along its first axis and samples them as a batch (the image expanded, not copied, in the
forward pass; the gradient of an image that requires one is accumulated per slab and then summed), which
spreads a warp over the threads (1.5-1.9× faster at 2 threads, ``benchmarks/results/warp_layout.md``); the
result is put back together and equals the plain call (value and gradients) to float rounding.

**Coarse grids.** A grid of stride ``s`` has ``G_i = ceil(S_i / s)`` nodes; node ``g`` is the average of
full-resolution voxels ``s*g … s*g + s - 1`` (centre ``s*g + (s - 1) / 2``). Displacements on a coarse grid
are stored in full-resolution voxel units, so :func:`upsample_field` only interpolates (no rescaling).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ALIGN_CORNERS",
    "channels_last",
    "check_field",
    "coarse_shape",
    "gather_grid_sample",
    "grid_sample",
    "identity_grid",
    "pool_to_grid",
    "resize_field",
    "sample",
    "sample_displaced",
    "second_order_warps",
    "spatial_dims",
    "to_normalised",
    "upsample_field",
]

#: The one ``align_corners`` choice for voxel-index <-> normalised-coordinate conversion.
ALIGN_CORNERS = True

_LINEAR = {2: "bilinear", 3: "trilinear"}

#: How many :func:`second_order_warps` contexts are open (per process).
_SECOND_ORDER = type("_Depth", (), {"depth": 0})()


#: Fewest output voxels of a 3D warp that is split into slabs over the CPU threads (:func:`grid_sample`).
SLAB_MIN_VOXELS = 1 << 15

#: Most slabs :func:`grid_sample` uses: the gradient of an image that requires one is accumulated per slab
#: before it is summed, so the backward pass holds up to this many image-sized temporaries.
SLAB_MAX = 8


def slab_count(grid: torch.Tensor, threads: int | None = None) -> int:
    """Number of slabs :func:`grid_sample` cuts a sampling grid ``(B, *T, n)`` into: 1 unless the grid is on the
    CPU, 3D, of one volume (``B = 1``) with at least :data:`SLAB_MIN_VOXELS` voxels, and more than one thread is
    used; then the largest ``k ≤ min(threads, SLAB_MAX)`` that divides ``T[0]`` with at least two rows per slab
    (1 if none). One slab per thread was as fast as two or four per thread at 2 threads
    (``benchmarks/results/warp_layout.md``)."""
    threads = torch.get_num_threads() if threads is None else int(threads)
    if grid.device.type != "cpu" or grid.dim() != 5 or grid.shape[0] != 1 or threads < 2:
        return 1
    if grid.shape[1:-1].numel() < SLAB_MIN_VOXELS:
        return 1
    depth = grid.shape[1]
    return next((k for k in range(min(threads, SLAB_MAX), 1, -1) if depth % k == 0 and depth // k >= 2), 1)


def grid_sample(
    image: torch.Tensor,
    grid: torch.Tensor,
    *,
    mode: str = "linear",
    padding_mode: str = "border",
    slabs: int | None = None,
) -> torch.Tensor:
    """The project's one call of :func:`torch.nn.functional.grid_sample` (``align_corners`` =
    :data:`ALIGN_CORNERS`).

    Args:
        image: ``(B, C, *S)``.
        grid: normalised coordinates ``(B, *T, n)`` (x, y[, z] order, as ``grid_sample`` wants).
        mode: ``"linear"`` (bi/trilinear) or ``"nearest"``.
        padding_mode: ``"border"`` or ``"zeros"``.
        slabs: split a one-volume 3D grid into this many slabs along ``T[0]`` (must divide it; the image must be
            one volume too); None picks :func:`slab_count` (see the module docstring), and 1 for an image batch.

    Returns:
        ``(B, C, *T)``. Inside :func:`second_order_warps` on a PyTorch whose ``grid_sample`` has no second
        derivative, a linear warp is computed by :func:`gather_grid_sample` instead (same values).
    """
    gs_mode = "bilinear" if mode == "linear" else mode
    grid = grid.to(image.dtype)
    if mode == "linear" and _SECOND_ORDER.depth > 0 and not native_second_order():
        return gather_grid_sample(image, grid, padding_mode=padding_mode)
    k = (slab_count(grid) if image.shape[0] == 1 else 1) if slabs is None else int(slabs)
    if k > 1:
        if grid.dim() != 5 or grid.shape[0] != 1 or image.shape[0] != 1 or grid.shape[1] % k:
            raise ValueError(f"slabs={k} needs one 3D image and one 3D grid whose first axis it divides; got image "
                             f"{tuple(image.shape)}, grid {tuple(grid.shape)}")
        depth = grid.shape[1]
        parts = grid.reshape(k, depth // k, *grid.shape[2:])
        img = image.expand(k, *image.shape[1:])
        out = F.grid_sample(img, parts, mode=gs_mode, padding_mode=padding_mode, align_corners=ALIGN_CORNERS)
        return out.transpose(0, 1).reshape(1, image.shape[1], depth, *grid.shape[2:-1])
    return F.grid_sample(image, grid, mode=gs_mode, padding_mode=padding_mode, align_corners=ALIGN_CORNERS)


@contextlib.contextmanager
def second_order_warps(enabled: bool = True) -> Iterator[None]:
    """Within this context, linear warps of :func:`grid_sample` are twice differentiable on every PyTorch.

    Differentiating through a gradient step that contains a warp (the meta-gradient of a learned Adam schedule,
    docs/design.md §5) needs the second derivative of ``grid_sample``; some PyTorch releases (2.11 among them)
    raise "derivative for aten::grid_sampler_2d_backward is not implemented". There, the warps made inside this
    context use :func:`gather_grid_sample`; where PyTorch has the derivative (:func:`native_second_order`),
    nothing changes.
    """
    if not enabled:
        yield
        return
    _SECOND_ORDER.depth += 1
    try:
        yield
    finally:
        _SECOND_ORDER.depth -= 1


@functools.cache
def native_second_order() -> bool:
    """Whether this PyTorch's ``grid_sample`` has a second derivative (probed once on a 2×2 image).

    The probe saves tensors for its own backward under identity saved-tensor hooks, so that an enclosing
    gradient checkpoint does not record them: the probe runs once per process, typically inside the first
    checkpointed segment, and would otherwise be missing from that segment's recomputation (whose saved tensors
    must line up with the forward's).
    """
    image = torch.zeros(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    grid = torch.zeros(1, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        out = F.grid_sample(image, grid, align_corners=ALIGN_CORNERS).sum()
        (g_grid,) = torch.autograd.grad(out, grid, create_graph=True)
        try:
            torch.autograd.grad(g_grid.sum(), image)
        except RuntimeError:
            return False
    return True


def _keep(x: torch.Tensor) -> torch.Tensor:
    """Identity saved-tensor hook (pack and unpack) of :func:`native_second_order`."""
    return x


def gather_grid_sample(image: torch.Tensor, grid: torch.Tensor, *, padding_mode: str = "border") -> torch.Tensor:
    """Linear ``grid_sample`` (``align_corners=True``) from gathers and weights: differentiable to any order.

    Args:
        image: ``(B, C, *S)``, 2D or 3D.
        grid: normalised coordinates ``(B, *T, n)`` (x, y[, z] order), as for :func:`grid_sample`.
        padding_mode: ``"border"`` (coordinates clamped to the image, as ``grid_sample``'s) or ``"zeros"``.

    Returns:
        ``(B, C, *T)``, equal to ``torch.nn.functional.grid_sample(image, grid, mode="bilinear",
        padding_mode=padding_mode, align_corners=True)`` to rounding, with the same first derivatives; the
        ``2ⁿ`` corner values are gathered and weighted by products of the fractional coordinates.
    """
    if padding_mode not in ("border", "zeros"):
        raise ValueError(f"padding_mode must be 'border' or 'zeros'; got {padding_mode!r}")
    n = image.dim() - 2
    bsz, chans, size = image.shape[0], image.shape[1], image.shape[2:]
    out_shape = grid.shape[1:-1]
    coords = grid.reshape(bsz, -1, n).flip(-1)  # (B, M, n), array-axis order
    extent = torch.tensor([float(s - 1) for s in size], dtype=grid.dtype, device=grid.device)
    coords = (coords + 1) * (extent / 2)
    if padding_mode == "border":  # clamped, with derivative 1 strictly inside only (as grid_sample's clipping)
        inside = (coords > 0) & (coords < extent)
        coords = torch.where(inside, coords, torch.minimum(coords.detach().clamp_min(0.0), extent))
    base = coords.detach().floor()
    frac = coords - base
    base = base.long()
    flat = image.reshape(bsz, chans, -1)
    strides = [math.prod(size[i + 1:]) for i in range(n)]
    out = None
    for corner in range(2 ** n):
        index = torch.zeros_like(base[..., 0])
        weight = None
        inside = None
        for axis in range(n):
            bit = (corner >> (n - 1 - axis)) & 1
            pos = base[..., axis] + bit
            w = frac[..., axis] if bit else 1 - frac[..., axis]
            weight = w if weight is None else weight * w
            ok = (pos >= 0) & (pos <= size[axis] - 1)
            inside = ok if inside is None else inside & ok
            index = index + pos.clamp(0, size[axis] - 1) * strides[axis]
        weight = weight * inside.to(weight.dtype)
        values = torch.gather(flat, 2, index.unsqueeze(1).expand(bsz, chans, -1))
        term = values * weight.unsqueeze(1)
        out = term if out is None else out + term
    return out.reshape(bsz, chans, *out_shape)


def spatial_dims(x: torch.Tensor, name: str = "x") -> int:
    """Number of spatial dimensions ``n`` of a ``(B, C, *S)`` tensor (2 or 3), or ``ValueError``."""
    if x.dim() not in (4, 5):
        raise ValueError(f"{name} must have shape (B, C, H, W) or (B, C, D, H, W); got {tuple(x.shape)}")
    return x.dim() - 2


def check_field(u: torch.Tensor, name: str = "u") -> int:
    """Validate a displacement field ``(B, n, *S)`` and return ``n``."""
    n = spatial_dims(u, name)
    if u.shape[1] != n:
        raise ValueError(f"{name} must have n={n} channels for a {n}D field; got shape {tuple(u.shape)}")
    if not u.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got {u.dtype}")
    return n


def identity_grid(shape: Sequence[int], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel-index coordinates of a grid, ``(1, n, *shape)``; channel ``i`` holds the index along axis ``i``."""
    axes = [torch.arange(int(s), device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def to_normalised(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Convert voxel-index coordinates ``(..., n)`` (array order) to grid_sample's ``(..., n)``.

    The output has the last dimension reversed (``x, y[, z]`` = last array axis first), as grid_sample
    expects, and uses ``align_corners=True`` (index 0 -> -1, index ``S_i - 1`` -> +1). An axis of size 1
    maps to 0.
    """
    size = torch.as_tensor([float(s) for s in shape], dtype=coords.dtype, device=coords.device)
    scale = torch.where(size > 1, 2.0 / (size - 1).clamp_min(1.0), torch.zeros_like(size))
    norm = coords * scale - torch.where(size > 1, torch.ones_like(size), torch.zeros_like(size))
    return norm.flip(-1)


def sample(
    image: torch.Tensor,
    coords: torch.Tensor,
    *,
    mode: str = "linear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Sample ``image`` ``(B, C, *S)`` at voxel coordinates.

    Args:
        image: ``(B, C, *S)``.
        coords: voxel-index coordinates in array order, either a dense ``(B, n, *T)`` map (the output is
            ``(B, C, *T)``) or a point set ``(B, K, n)`` (the output is ``(B, C, K)``).
        mode: ``"linear"`` (bi/trilinear) or ``"nearest"``.
        padding_mode: grid_sample padding (``"border"`` repeats the edge, ``"zeros"``).
    """
    n = spatial_dims(image, "image")
    shape = image.shape[2:]
    if coords.dim() == 3 and coords.shape[-1] == n and coords.dim() != n + 2:
        # point set (B, K, n) -> grid (B, K, 1[, 1], n)
        grid = to_normalised(coords, shape).reshape(coords.shape[0], coords.shape[1], *([1] * (n - 1)), n)
        out = grid_sample(image, grid, mode=mode, padding_mode=padding_mode)
        return out.reshape(image.shape[0], image.shape[1], coords.shape[1])
    if coords.dim() != n + 2 or coords.shape[1] != n:
        raise ValueError(f"coords must be (B, {n}, *T) or (B, K, {n}); got {tuple(coords.shape)}")
    grid = to_normalised(torch.movedim(coords, 1, -1), shape)
    return grid_sample(image, grid, mode=mode, padding_mode=padding_mode)


def channels_last(image: torch.Tensor, min_voxels: int = 1 << 15) -> torch.Tensor:
    """``image`` ``(B, C, D, H, W)`` with the channels-last memory layout when it lives on the CPU, has several
    channels and at least ``min_voxels`` voxels per channel (the same tensor values; other inputs are returned
    unchanged).

    PyTorch's CPU ``grid_sample`` reads all channels of a voxel's 8 neighbours; with the channels adjacent in
    memory the warp alone ran 4-23 % faster (forward, and forward + backward with respect to the grid) on
    12-channel features of 80×96×112 and 64³ voxels, and a whole Adam step 0-8 % faster (two runs of
    ``benchmarks/results/warp_layout.md`` at 2 threads, with the warp split over the threads; single runs on this
    shared 2-core machine vary by ±15 %). Tiny volumes are left alone. Convert once, before warping the same image
    many times (the conversion is a copy, differentiable).
    """
    if (image.dim() == 5 and image.device.type == "cpu" and image.shape[1] > 1
            and image.shape[2:].numel() >= min_voxels):
        return image.contiguous(memory_format=torch.channels_last_3d)
    return image


@functools.lru_cache(maxsize=16)
def _normalised_identity(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """grid_sample coordinates of the identity map, ``(1, *shape, n)`` (cached; do not modify)."""
    ident = identity_grid(shape, device=device, dtype=dtype)
    return to_normalised(torch.movedim(ident, 1, -1), shape).contiguous()


def sample_displaced(
    image: torch.Tensor,
    u: torch.Tensor,
    *,
    mode: str = "linear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Sample ``image`` ``(B, C, *S_m)`` at ``x + u(x)`` for every voxel ``x`` of ``u``'s grid -> ``(B, C, *S)``.

    Equivalent to ``sample(image, identity_grid(S) + u)`` but builds grid_sample's coordinates directly
    (a cached normalised identity plus the scaled displacement), which saves several passes over memory.
    ``u`` is ``(B, n, *S)`` in voxels of the image's grid.
    """
    spatial_dims(image, "image")
    shape = tuple(u.shape[2:])
    size = [float(v) for v in image.shape[2:]]
    scale = torch.as_tensor([2.0 / (v - 1) if v > 1 else 0.0 for v in size][::-1], dtype=u.dtype, device=u.device)
    ident = _normalised_identity(shape, u.device, u.dtype)
    if tuple(image.shape[2:]) != shape:
        # identity coordinates must be normalised with the image's size, not the field's
        ident = to_normalised(torch.movedim(identity_grid(shape, device=u.device, dtype=u.dtype), 1, -1),
                              image.shape[2:])
    grid = torch.movedim(u.flip(1), 1, -1) * scale + ident
    return grid_sample(image, grid, mode=mode, padding_mode=padding_mode)


def coarse_shape(shape: Sequence[int], stride: int) -> tuple[int, ...]:
    """Shape ``G`` of the stride-``stride`` grid of a full-resolution shape ``S``: ``ceil(S_i / stride)``."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1; got {stride}")
    return tuple(math.ceil(int(s) / stride) for s in shape)


def pool_to_grid(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Average ``x`` ``(B, C, *S)`` over ``stride^n`` blocks -> ``(B, C, *G)``.

    The input is padded at the far end by replicating its last voxel when ``S`` is not a multiple of the
    stride, so every node averages real values.
    """
    n = spatial_dims(x)
    if stride == 1:
        return x
    pad = []
    for s in reversed(x.shape[2:]):
        pad += [0, (-int(s)) % stride]
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    pool = F.avg_pool2d if n == 2 else F.avg_pool3d
    return pool(x, stride, stride)


def upsample_field(u: torch.Tensor, shape: Sequence[int], stride: int) -> torch.Tensor:
    """Linear interpolation of a coarse field ``(B, C, *G)`` to full resolution ``(B, C, *shape)``.

    Node ``g`` sits at full-resolution position ``stride*g + (stride-1)/2`` (cell-centred), which is
    exactly ``F.interpolate(..., scale_factor=stride, align_corners=False)``; values beyond the outermost
    nodes are held constant. No rescaling: coarse fields are in full-resolution voxel units.
    """
    n = spatial_dims(u, "u")
    shape = tuple(int(s) for s in shape)
    if len(shape) != n:
        raise ValueError(f"shape must have {n} entries; got {shape}")
    if tuple(u.shape[2:]) != coarse_shape(shape, stride):
        raise ValueError(
            f"u has grid {tuple(u.shape[2:])} but shape {shape} at stride {stride} needs "
            f"{coarse_shape(shape, stride)}"
        )
    if stride == 1:
        return u
    up = F.interpolate(u, scale_factor=float(stride), mode=_LINEAR[n], align_corners=False,
                       recompute_scale_factor=False)
    return up[(slice(None), slice(None)) + tuple(slice(0, s) for s in shape)]


def resize_field(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a displacement field ``(B, n, *S)`` to another grid ``shape`` (voxel-centred,
    ``align_corners=True``), rescaling each component so that it stays in the new grid's voxel units."""
    n = check_field(u)
    shape = tuple(int(s) for s in shape)
    if tuple(u.shape[2:]) == shape:
        return u
    out = F.interpolate(u, size=shape, mode=_LINEAR[n], align_corners=True)
    scale = [(t - 1) / max(s - 1, 1) for t, s in zip(shape, u.shape[2:])]
    return out * torch.as_tensor(scale, dtype=u.dtype, device=u.device).view(1, n, *([1] * n))

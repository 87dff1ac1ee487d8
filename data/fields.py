"""Random smooth fields: Gaussian-smoothed noise and large diffeomorphic displacements.

Displacements follow docs/design.md §2: ``u`` ``(1, n, *S)`` in voxel units, channel ``i`` along array axis ``i``.
They are the exponential of a stationary velocity field (Gaussian-smoothed noise on a coarse working grid),
integrated by scaling and squaring with :func:`layers.warp.compose`, then resized to full resolution with
:func:`layers.grid.resize_field`; the velocity is rescaled until the largest displacement norm hits the
requested magnitude. All randomness comes from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from layers.grid import resize_field
from layers.warp import integrate_velocity

__all__ = ["gaussian_smooth", "integrate_velocity", "random_displacement", "smooth_noise"]

_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def gaussian_smooth(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of ``x`` ``(B, C, *S)`` with ``sigma`` in voxels (per axis or one value);
    edges replicate. Returns the same shape."""
    n = x.dim() - 2
    sigmas = [float(sigma)] * n if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    b, c = x.shape[:2]
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        radius = max(1, min(int(math.ceil(3 * s)), x.shape[2 + axis] - 1))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = (k / k.sum()).view(1, 1, *[-1 if a == axis else 1 for a in range(n)])
        pad = [0] * (2 * n)
        pad[2 * (n - 1 - axis)] = pad[2 * (n - 1 - axis) + 1] = radius
        y = F.pad(x.reshape(b * c, 1, *x.shape[2:]), pad, mode="replicate")
        x = conv(y, k).reshape(b, c, *x.shape[2:])
    return x


def smooth_noise(
    shape: Sequence[int],
    generator: torch.Generator,
    channels: int = 1,
    sigma: float = 0.1,
    work_size: int = 32,
) -> torch.Tensor:
    """Smooth random field ``(1, channels, *shape)``, zero mean, scaled so that ``max |value| = 1``
    per channel.

    White noise on a working grid of at most ``work_size`` voxels per axis is Gaussian-smoothed with
    ``sigma`` (a fraction of the image size) and linearly upsampled to ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    n = len(shape)
    work = tuple(max(2, min(s, int(work_size))) for s in shape)
    noise = torch.randn((1, channels, *work), generator=generator)
    noise = gaussian_smooth(noise, [sigma * w for w in work])
    if work != shape:
        noise = F.interpolate(noise, size=shape, mode=_LINEAR[n], align_corners=True)
    noise = noise - noise.mean(dim=tuple(range(2, 2 + n)), keepdim=True)
    peak = noise.abs().amax(dim=tuple(range(2, 2 + n)), keepdim=True).clamp_min(1e-12)
    return noise / peak


def _peak_norm(u: torch.Tensor) -> torch.Tensor:
    """``max_x |u(x)|_2`` of a field ``(B, n, *S)`` (a 0-d tensor)."""
    return u.pow(2).sum(1).max().sqrt()


def random_displacement(
    shape: Sequence[int],
    generator: torch.Generator,
    max_magnitude: float,
    *,
    smoothness: float = 0.12,
    steps: int = 7,
    work_size: int = 32,
    tolerance: float = 0.01,
    max_rounds: int = 6,
) -> torch.Tensor:
    """A smooth random diffeomorphic displacement ``(1, n, *shape)`` with ``max_x |u(x)|_2 ≈ max_magnitude``.

    Args:
        shape: the grid ``S`` (2D or 3D).
        generator: the only source of randomness.
        max_magnitude: the largest displacement norm, in voxels (within ``tolerance``, relative).
        smoothness: Gaussian sigma of the velocity noise, as a fraction of the image size (larger = smoother).
        steps: scaling-and-squaring steps.
        work_size: the velocity is built and integrated on a grid of at most this many voxels per axis, then
            resized (linear) to ``shape``.
        tolerance: relative accuracy of the magnitude calibration.
        max_rounds: calibration rounds (each one integrates the velocity once).
    """
    shape = tuple(int(s) for s in shape)
    n = len(shape)
    work = tuple(max(2, min(s, int(work_size))) for s in shape)
    direction = smooth_noise(work, generator, channels=n, sigma=smoothness, work_size=work_size)
    if max_magnitude <= 0:
        return torch.zeros(1, n, *shape)
    # unit peak norm, in full-resolution voxels; convert to working-grid voxels for the integration
    direction = direction / _peak_norm(direction).clamp_min(1e-12)
    to_work = torch.as_tensor([(w - 1) / max(s - 1, 1) for w, s in zip(work, shape)]).view(1, n, *([1] * n))
    gain = float(max_magnitude)
    u = torch.zeros(1, n, *shape)
    for _ in range(max_rounds):
        u = resize_field(integrate_velocity(direction * gain * to_work, steps), shape)
        peak = float(_peak_norm(u))
        if peak <= 0:
            break
        if abs(peak / max_magnitude - 1.0) <= tolerance:
            break
        gain *= max_magnitude / peak
    return u.contiguous()

"""Warping with a displacement field (docs/design.md §2): ``warped(x) = moving(x + u(x))``.

All functions take ``u`` of shape ``(B, n, *S)`` in voxel units on the fixed grid ``S`` and sample through
:func:`layers.grid.sample_displaced` / :func:`layers.grid.sample`, both through :func:`layers.grid.grid_sample`
(the project's single ``align_corners`` choice). Sampling outside the moving image
repeats its border.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import check_field, sample, sample_displaced

__all__ = ["compose", "integrate_velocity", "one_hot", "warp_image", "warp_keypoints", "warp_labels", "warp_onehot"]


def _check_pair(moving: torch.Tensor, u: torch.Tensor) -> None:
    n = check_field(u)
    if moving.dim() != n + 2:
        raise ValueError(f"moving must be (B, C, *S) with {n} spatial dims; got {tuple(moving.shape)}")
    if moving.shape[0] != u.shape[0] and moving.shape[0] != 1:
        raise ValueError(f"batch sizes differ: moving {moving.shape[0]}, u {u.shape[0]}")
    if moving.device != u.device:
        raise ValueError(f"moving is on {moving.device} but u is on {u.device}")


def warp_image(moving: torch.Tensor, u: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """Warp ``moving`` ``(B, C, *S_m)`` with ``u`` ``(B, n, *S)`` -> ``(B, C, *S)`` (linear by default).

    The moving grid ``S_m`` may differ from the fixed grid ``S``; ``u`` is in voxels of the moving grid.
    """
    _check_pair(moving, u)
    if moving.shape[0] != u.shape[0]:
        moving = moving.expand(u.shape[0], *moving.shape[1:])
    return sample_displaced(moving if moving.is_floating_point() else moving.to(u.dtype), u, mode=mode)


def one_hot(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Integer label map ``(B, 1, *S)`` -> float one-hot ``(B, K, *S)`` (K = max label + 1 by default)."""
    if labels.shape[1] != 1:
        raise ValueError(f"labels must have one channel; got shape {tuple(labels.shape)}")
    lab = labels[:, 0].long()
    k = int(lab.max().item()) + 1 if num_classes is None else int(num_classes)
    return torch.movedim(F.one_hot(lab, k), -1, 1).float()


def warp_labels(labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Warp an integer label map ``(B, 1, *S_m)`` by nearest-neighbour sampling -> ``(B, 1, *S)`` (same dtype)."""
    out = warp_image(labels.to(u.dtype), u, mode="nearest")
    return out.round().to(labels.dtype)


def warp_onehot(onehot: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Warp a one-hot / soft label map ``(B, K, *S_m)`` linearly -> ``(B, K, *S)`` (differentiable in u)."""
    return warp_image(onehot, u, mode="linear")


def warp_keypoints(points: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Map fixed keypoints ``(B, K, n)`` (voxel indices, NaN-padded) to the moving image: ``p + u(p)``.

    ``u`` is sampled linearly at the points; NaN rows stay NaN.
    """
    n = check_field(u)
    if points.dim() != 3 or points.shape[-1] != n:
        raise ValueError(f"points must be (B, K, {n}); got {tuple(points.shape)}")
    if points.shape[0] != u.shape[0]:
        raise ValueError(f"batch sizes differ: points {points.shape[0]}, u {u.shape[0]}")
    if points.device != u.device:
        raise ValueError(f"points are on {points.device} but u is on {u.device}")
    valid = torch.isfinite(points).all(-1, keepdim=True)
    p = torch.where(valid, points, torch.zeros_like(points)).to(u.dtype)
    disp = sample(u, p, mode="linear").transpose(1, 2)  # (B, K, n)
    return torch.where(valid, p + disp, torch.full_like(p, float("nan")))


def compose(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Displacement of the composed map ``x -> x + u1(x) + u2(x + u1(x))`` (``u1`` first, then ``u2``)."""
    return u1 + warp_image(u2, u1)


def integrate_velocity(v: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: ``u = exp(v) - id`` for a stationary velocity ``v`` ``(B, n, *S)`` in voxels.

    ``u_0 = v / 2^steps``, then ``steps`` times ``u <- u ∘ u`` (:func:`compose`). The result is a
    displacement ``(B, n, *S)`` in voxel units whose map ``x + u(x)`` is a diffeomorphism for smooth ``v``.
    """
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0; got {steps}")
    u = v / (2**steps)
    for _ in range(steps):
        u = compose(u, u)
    return u

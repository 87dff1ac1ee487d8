"""Synthetic registration pairs (2D or 3D) with a known diffeomorphic displacement: the embedded default data.

Construction of one pair (all randomness from one ``torch.Generator`` seeded by ``(seed, stream, index)``):

1. a phantom label map (body + overlapping organs, :func:`data.phantom.phantom_labels`) is the **moving**
   anatomy; textured intensities are drawn per label (a second, different mapping for the moving image when
   ``multimodal``);
2. a smooth diffeomorphic displacement ``u`` (:func:`data.fields.random_displacement`) on the fixed grid with
   largest norm ``max_displacement * min(S)`` voxels;
3. ``fixed = warp_image(moving_anatomy, u)`` and ``fixed_label = warp_labels(moving_label, u)`` through
   :mod:`layers.warp`, so ``u`` is the exact answer in the project's convention
   (``warped(x) = moving(x + u(x))``);
4. independent Gaussian noise on both images;
5. keypoints: distinct body voxels of the fixed image and ``moving_keypoints = warp_keypoints(fixed, u)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from layers.warp import warp_image, warp_keypoints, warp_labels

from .fields import random_displacement, smooth_noise
from .phantom import label_intensities, phantom_labels

__all__ = ["SyntheticConfig", "SyntheticPairs", "generator_for", "make_synthetic_pair"]

DEFAULT_SHAPES = {2: (128, 128), 3: (64, 64, 64)}


@dataclass(frozen=True)
class SyntheticConfig:
    """Options of the synthetic generator.

    Attributes:
        shape: the grid ``S`` (2D or 3D); defaults 128x128 and 64^3 are in :data:`DEFAULT_SHAPES`.
        max_displacement: largest displacement norm as a fraction of ``min(S)`` (0.15 = 15 %).
        smoothness: Gaussian sigma of the velocity field as a fraction of the image size.
        noise: standard deviation of the Gaussian noise added to each image (intensities are in ~[0, 1]).
        multimodal: draw a different intensity mapping for the moving image (inverted, jittered per-label
            contrast, inverted texture, gamma).
        num_organs: organs (labels ``2 .. num_organs + 1``; label 1 is the body).
        num_keypoints: keypoints per pair (fewer if the body has fewer voxels).
        spacing: mm per voxel ``(n,)``; ``None`` = 1 mm.
        texture: amplitude of the smooth intensity texture.
    """

    shape: tuple[int, ...] = DEFAULT_SHAPES[2]
    max_displacement: float = 0.15
    smoothness: float = 0.12
    noise: float = 0.02
    multimodal: bool = False
    num_organs: int = 5
    num_keypoints: int = 64
    spacing: tuple[float, ...] | None = None
    texture: float = 0.1

    def __post_init__(self) -> None:
        if len(self.shape) not in (2, 3) or min(self.shape) < 8:
            raise ValueError(f"shape must be 2D or 3D with every size >= 8; got {self.shape}")
        if self.spacing is not None and len(self.spacing) != len(self.shape):
            raise ValueError(f"spacing {self.spacing} must have {len(self.shape)} entries")
        if not 0.0 <= self.max_displacement <= 0.5:
            raise ValueError(
                f"max_displacement is a fraction of the image size in [0, 0.5]; got {self.max_displacement}"
            )
        if self.num_organs < 1 or self.num_keypoints < 0 or self.noise < 0:
            raise ValueError("num_organs must be >= 1, num_keypoints and noise >= 0")


def generator_for(*seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from an integer tuple (e.g. ``(seed, stream, index)``) via numpy's
    ``SeedSequence``: distinct tuples give independent streams."""
    state = np.random.SeedSequence([int(s) for s in seed]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _intensity_maps(num_labels: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label means ``(L,)`` of the first and the second modality (background 0). The second modality
    inverts the contrast of the first and perturbs it per label. Both are always drawn, so the random
    stream (hence the field and the fixed image) does not depend on ``multimodal``."""
    levels = torch.linspace(0.25, 0.95, num_labels - 1)
    fixed_means = torch.cat([torch.zeros(1), levels[torch.randperm(num_labels - 1, generator=g)]])
    jitter = 0.1 * (torch.rand(num_labels - 1, generator=g) - 0.5)
    moving_means = torch.cat([torch.zeros(1), (1.2 - fixed_means[1:] + jitter).clamp(0.1, 1.0)])
    return fixed_means, moving_means


def synthetic_ids(pair_id: str) -> tuple[str, str]:
    """``(fixed_id, moving_id)`` of the synthetic pair ``pair_id``: ``"<pair_id>_fix"``, ``"<pair_id>_mov"``."""
    return f"{pair_id}_fix", f"{pair_id}_mov"


def make_synthetic_pair(config: SyntheticConfig, generator: torch.Generator, pair_id: str = "0000") -> dict:
    """One synthetic pair as a sample dict of :mod:`data.batch` (``n = len(config.shape)``).

    Keys: ``fixed``/``moving`` ``(1, *S)`` float32; ``fixed_label``/``moving_label`` ``(1, *S)`` int64;
    ``fixed_mask``/``moving_mask`` ``(1, *S)`` float32 (body); ``fixed_keypoints``/``moving_keypoints``
    ``(K, n)`` float32 voxel indices with ``moving = fixed + u(fixed)``; ``true_disp`` ``(n, *S)`` float32 in
    voxels (fixed grid, ``warp_labels(moving_label, true_disp) == fixed_label``);
    ``spacing``/``moving_spacing`` ``(n,)`` mm; ``fixed_id`` ``"<pair_id>_fix"``, ``moving_id``
    ``"<pair_id>_mov"``; ``affine`` ``(4, 4)`` ``diag(spacing, 1)``; ``label_ids`` ``(num_organs + 1,)``
    = ``1 .. num_organs + 1``.
    """
    g = generator
    shape = tuple(int(s) for s in config.shape)
    n = len(shape)
    num_labels = config.num_organs + 2
    moving_label = phantom_labels(shape, g, config.num_organs)
    u = random_displacement(shape, g, config.max_displacement * min(shape), smoothness=config.smoothness)
    texture = smooth_noise(shape, g, 1, sigma=0.03, work_size=64)
    fixed_means, moving_means = _intensity_maps(num_labels, g)
    gamma = float(0.6 + 0.8 * torch.rand((), generator=g))
    anatomy = label_intensities(moving_label, fixed_means, texture, config.texture)
    if config.multimodal:
        moving = label_intensities(moving_label, moving_means, -texture, config.texture).clamp_min(0) ** gamma
    else:
        moving = anatomy
    fixed = warp_image(anatomy, u)
    fixed_label = warp_labels(moving_label, u)
    fixed = fixed + config.noise * torch.randn(fixed.shape, generator=g)
    moving = moving + config.noise * torch.randn(moving.shape, generator=g)

    body = torch.nonzero(fixed_label[0, 0] > 0).float()  # (N, n) voxel indices
    k = min(config.num_keypoints, body.shape[0])
    fixed_kp = body[torch.randperm(body.shape[0], generator=g)[:k]]
    moving_kp = warp_keypoints(fixed_kp[None], u)[0]

    spacing = torch.as_tensor(config.spacing or (1.0,) * n, dtype=torch.float32)
    affine = torch.eye(4, dtype=torch.float64)
    affine[range(n), range(n)] = spacing.double()
    return {
        "fixed": fixed[0].float().contiguous(),
        "moving": moving[0].float().contiguous(),
        "fixed_label": fixed_label[0].long(),
        "moving_label": moving_label[0].long(),
        "fixed_mask": (fixed_label[0] > 0).float(),
        "moving_mask": (moving_label[0] > 0).float(),
        "fixed_keypoints": fixed_kp.float(),
        "moving_keypoints": moving_kp.float(),
        "true_disp": u[0].float(),
        "spacing": spacing,
        "moving_spacing": spacing.clone(),
        "fixed_id": synthetic_ids(pair_id)[0],
        "moving_id": synthetic_ids(pair_id)[1],
        "affine": affine,
        "label_ids": torch.arange(1, num_labels, dtype=torch.int64),
    }


class SyntheticPairs(Dataset):
    """A fixed-length dataset of synthetic pairs; item ``i`` depends only on ``(seed, stream, i)``.

    Args:
        length: number of pairs.
        seed: base seed.
        shape: grid ``S``; ``None`` = 128x128 (``ndim=2``) or 64^3 (``ndim=3``).
        ndim: 2 or 3, used when ``shape`` is ``None``.
        max_displacement, smoothness, noise, multimodal, num_organs, num_keypoints, spacing, texture: see
            :class:`SyntheticConfig`.
        stream: an extra seed component that keeps splits disjoint (e.g. 0 train, 1 val, 2 test, 3 hyper).
        cache: keep generated pairs in memory (each worker process keeps its own), so later epochs do not
            generate them again; the items are the same either way.
    """

    def __init__(
        self,
        length: int = 64,
        seed: int = 0,
        *,
        shape: Sequence[int] | None = None,
        ndim: int = 2,
        max_displacement: float = 0.15,
        smoothness: float = 0.12,
        noise: float = 0.02,
        multimodal: bool = False,
        num_organs: int = 5,
        num_keypoints: int = 64,
        spacing: Sequence[float] | None = None,
        texture: float = 0.1,
        stream: int = 0,
        cache: bool = False,
    ) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0; got {length}")
        if shape is None:
            if ndim not in DEFAULT_SHAPES:
                raise ValueError(f"ndim must be 2 or 3; got {ndim}")
            shape = DEFAULT_SHAPES[ndim]
        self.config = SyntheticConfig(
            shape=tuple(int(s) for s in shape),
            max_displacement=float(max_displacement),
            smoothness=float(smoothness),
            noise=float(noise),
            multimodal=bool(multimodal),
            num_organs=int(num_organs),
            num_keypoints=int(num_keypoints),
            spacing=None if spacing is None else tuple(float(s) for s in spacing),
            texture=float(texture),
        )
        self.length = int(length)
        self.seed = int(seed)
        self.stream = int(stream)
        self._cache: dict[int, dict] | None = {} if cache else None

    @property
    def ndim(self) -> int:
        """Spatial dimensions ``n``."""
        return len(self.config.shape)

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"SyntheticPairs(length={self.length}, seed={self.seed}, stream={self.stream}, {self.config})"

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} pairs")
        if self._cache is not None:
            if index not in self._cache:
                self._cache[index] = self._generate(index)
            return dict(self._cache[index])
        return self._generate(index)

    def _pair_id(self, index: int) -> str:
        return f"s{self.stream}_{index:04d}"

    def pair_info(self, index: int) -> tuple[str, str, str]:
        """``(fixed_id, moving_id, source)`` of pair ``index`` without generating it."""
        pid = self._pair_id(index)
        fixed_id, moving_id = synthetic_ids(pid)
        return fixed_id, moving_id, f"synthetic pair {index} (seed {self.seed}, stream {self.stream})"

    def _generate(self, index: int) -> dict:
        g = generator_for(self.seed, self.stream, index)
        return make_synthetic_pair(self.config, g, pair_id=self._pair_id(index))

"""A learned residual feature encoder for LearnGN (an optional extension of the compact heads, docs/design.md §4).

The handcrafted features (MIND-SSC, intensities or distance maps) describe local appearance only; a small
fully convolutional network can learn features whose Gauss-Newton linearisation is more useful for the
training objective (e.g. organ-like maps that make label alignment easier). To keep the project's invariant
that *an untrained model equals handcrafted GN*, the encoder is residual with a zero-initialised last layer:

    features = base + g(concat(image, base))

so ``g == 0`` at initialisation. (Extra zero-initialised channels would not work: GN sees a channel only
through ``JᵀJ`` and ``Jᵀf``, both quadratic in it, so the gradient with respect to an all-zero channel is
exactly zero.)
"""

from __future__ import annotations

import torch
from torch import nn

from .grid import spatial_dims

__all__ = ["FeatureEncoder"]


class FeatureEncoder(nn.Module):
    """Residual feature encoder, shared between the fixed and the moving image (siamese).

    Args:
        n: spatial dimensions (2 or 3).
        image_channels: channels of the image input (1 for the project's grey-value images).
        channels: channels ``C`` of the base features (and of the output).
        hidden: width of the hidden layers.
        depth: number of hidden 3^n convolutions; layer ``k`` is dilated by ``2^k`` (capped at 8), so the
            receptive field grows to ``1 + 2 (2^depth - 1)`` voxels per axis for ``depth <= 4``.

    ``forward(image, base)`` with ``image`` ``(B, image_channels, *S)`` and ``base`` ``(B, C, *S)`` returns
    ``(B, C, *S)`` features, equal to ``base`` while the last layer is zero.
    """

    def __init__(self, n: int, image_channels: int, channels: int, hidden: int = 16, depth: int = 4) -> None:
        super().__init__()
        if n not in (2, 3):
            raise ValueError(f"n must be 2 or 3; got {n}")
        if hidden < 1 or depth < 1:
            raise ValueError(f"hidden and depth must be >= 1; got hidden={hidden}, depth={depth}")
        conv = nn.Conv2d if n == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if n == 2 else nn.InstanceNorm3d
        self.n, self.image_channels, self.channels = n, image_channels, channels
        layers: list[nn.Module] = []
        width = image_channels + channels
        for k in range(depth):
            d = min(2**k, 8)
            layers += [conv(width, hidden, 3, padding=d, dilation=d, padding_mode="replicate"),
                       norm(hidden, affine=True), nn.LeakyReLU(0.1)]
            width = hidden
        last = conv(hidden, channels, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        n = spatial_dims(image, "image")
        if n != self.n or image.shape[1] != self.image_channels or base.shape[1] != self.channels:
            raise ValueError(
                f"encoder expects a {self.n}D image with {self.image_channels} channels and base features with "
                f"{self.channels} channels; got image {tuple(image.shape)}, base {tuple(base.shape)}"
            )
        if image.shape[0] != base.shape[0] or image.shape[2:] != base.shape[2:]:
            raise ValueError(f"image {tuple(image.shape)} and base {tuple(base.shape)} must share B and S")
        return base + self.net(torch.cat([image.to(base.dtype), base], dim=1))

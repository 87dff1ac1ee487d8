"""Semantic features: a small U-Net that predicts signed distance maps of the labels from the image.

Handcrafted GN on the signed distance maps of the *true* labels is an oracle (labels are unknown at test
time) that registers far better than GN on MIND-SSC; as in the LearnGN paper (which uses nnU-Net), a network
trained on the training subjects' labels can predict such maps from the image alone. The network here is
MONAI's :class:`~monai.networks.nets.BasicUNet` regressing, for each label ``k``, the signed square-root
distance map of :func:`layers.features.signed_distance_maps` (``sign(d) sqrt(|d|)``, ``d`` in mm, negative
inside), so its outputs are directly comparable with the oracle features and its sign is a segmentation.

LearnGN uses these maps as extra GN feature channels (``layers.gn``: channel weights in the normal equations,
zero-initialised, so the untrained model is still handcrafted GN on MIND-SSC).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .enums import Precision
from .features import signed_distance_maps
from .grid import spatial_dims
from .losses import soft_dice

__all__ = ["InstanceNorm", "SemanticNet", "instance_norm", "semantic_loss", "semantic_targets", "soft_segmentation"]


class SemanticNet(nn.Module):
    """Image ``(B, 1, *S)`` -> predicted signed square-root distance maps ``(B, L, *S)`` (``sqrt(mm)``).

    Args:
        n: spatial dimensions (2 or 3).
        labels: ``L``, the number of labels whose maps are predicted.
        features: the six widths of :class:`~monai.networks.nets.BasicUNet` (four levels down, the last is the
            output block's width); small by default so that the network trains on a CPU and its checkpoint
            stays small (about 0.3 M parameters).
        precision: ``"float32"`` (the input's dtype) or ``"bf16"``: the network runs under bfloat16 autocast
            (:class:`layers.enums.Precision`; convolutions in bfloat16, the instance norms' statistics in
            float32) and returns maps in the input's dtype; settable afterwards as :attr:`precision`. On a
            CPU with AMX it saves about 0.05 s of a 64³ pair's 0.16 s U-Net time at the same Dice
            (``benchmarks/results/learngn_profile.md``); on a CPU without native bfloat16 it is slower.

    Every axis of ``S`` must be a multiple of 16 (four pooling levels). In 3D the convolution weights are kept
    channels-last (``torch.channels_last_3d``; the values, the state dict and the gradients are unchanged): the
    convolutions then work on channels-last activations, which PyTorch's CPU (oneDNN) convolutions run without
    converting every layer's input and output (0.44 s against 0.52 s for a pair of 64³ images on one shared CPU
    core). Two more changes keep that layout and leave the values as they are (to rounding): the instance norms
    are :class:`InstanceNorm` (PyTorch's copies a channels-last input to channels-first and back), and the
    decoder skips MONAI's padding of an upsampled map to its skip connection's shape (a copy; with every axis a
    multiple of 16 the shapes always match). Together the U-Net on a pair of 64³ images takes 0.73× the time of
    MONAI's own modules on 2 CPU threads (``python -m benchmarks.learngn_profile``, which times both alternately;
    ``benchmarks/results/learngn_profile.md``).
    """

    def __init__(self, n: int, labels: int, features: Sequence[int] = (8, 16, 24, 32, 48, 8),
                 precision: str = "float32") -> None:
        super().__init__()
        self.precision = precision
        from monai.networks.nets import BasicUNet
        from monai.networks.nets.basic_unet import UpCat

        if n not in (2, 3):
            raise ValueError(f"n must be 2 or 3; got {n}")
        if labels < 1:
            raise ValueError(f"labels must be >= 1; got {labels}")
        features = tuple(int(f) for f in features)
        if len(features) != 6 or min(features) < 1:
            raise ValueError(f"features must be six positive widths; got {features}")
        self.n, self.labels = n, int(labels)
        self.net = BasicUNet(spatial_dims=n, in_channels=1, out_channels=self.labels, features=features,
                             act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                             norm=("instance", {"affine": True}))
        for name, module in list(self.net.named_modules()):
            if isinstance(module, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                parent, _, child = name.rpartition(".")
                setattr(self.net.get_submodule(parent), child, InstanceNorm(module))
            elif isinstance(module, UpCat):
                module.is_pad = False
        if n == 3:
            self.net.to(memory_format=torch.channels_last_3d)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        n = spatial_dims(image, "image")
        if n != self.n or image.shape[1] != 1:
            raise ValueError(f"SemanticNet expects a {self.n}D single-channel image; got {tuple(image.shape)}")
        if any(int(s) % 16 for s in image.shape[2:]):
            raise ValueError(f"SemanticNet needs every image axis to be a multiple of 16; got {tuple(image.shape[2:])}")
        if self.precision == Precision.FLOAT32:
            return self.net(image)
        with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16):
            return self.net(image).to(image.dtype)

    @property
    def precision(self) -> Precision:
        """The arithmetic of :meth:`forward` (:class:`layers.enums.Precision`)."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = Precision.lookup(value, "precision")


def semantic_targets(
    labels: torch.Tensor, label_ids: Sequence[int], spacing: Sequence[float] | None = None
) -> torch.Tensor:
    """Training targets of :class:`SemanticNet`: signed square-root distance maps ``(B, L, *S)`` of
    ``labels`` ``(B, 1, *S)`` (:func:`layers.features.signed_distance_maps`, unit scale; no gradient)."""
    return signed_distance_maps(labels, list(label_ids), tuple(spacing) if spacing is not None else None)


def semantic_loss(pred: torch.Tensor, target: torch.Tensor, sharpness: float = 4.0) -> torch.Tensor:
    """Training loss of predicted against target maps ``(B, L, *S)`` (``sqrt(mm)``, negative inside).

    The mean squared error of the maps (keeps them distance-like: smooth, with gradients far from the labels)
    plus ``1 −`` the soft Dice of the regions they enclose, ``sigmoid(−sharpness · map)`` against the target's
    inside, averaged over the labels present in the target (trains the zero level set, i.e. the boundaries,
    which the squared error of a small structure's map learns only slowly).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    target = target.to(pred.dtype)
    mse = (pred - target).pow(2).mean()
    soft, inside = soft_segmentation(pred, sharpness), (target < 0).to(pred.dtype)
    present = inside.flatten(2).sum(2) > 0
    if not present.any():
        return mse
    return mse + (1 - soft_dice(soft, inside)[present]).mean()


def soft_segmentation(maps: torch.Tensor, sharpness: float = 4.0) -> torch.Tensor:
    """Soft segmentations ``sigmoid(−sharpness · maps)`` ``(B, L, *S)`` in ``(0, 1)`` of signed square-root
    distance maps (``sqrt(mm)``, negative inside; :class:`SemanticNet`): 0.5 on the zero level set, 0.88 at
    ``sharpness = 2`` one ``sqrt(mm)`` inside."""
    return torch.sigmoid(-sharpness * maps)


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Affine instance normalisation of ``x`` ``(B, C, *S)``: per item and channel, ``(x − mean) / sqrt(var + eps)
    · weight + bias`` with the mean and the biased variance over ``S`` (:func:`torch.nn.functional.instance_norm`
    without running statistics), ``weight`` and ``bias`` ``(C,)``.

    The statistics are two passes over a ``(B, S, C)`` view (no copy for a channels-last ``x``), and for a
    lower-precision ``x`` (e.g. bfloat16 under autocast) they and the normalisation are computed in float32 and
    only the result rounded to ``x``'s dtype; the result keeps ``x``'s dtype and memory format (PyTorch's instance
    norm copies a channels-last tensor to channels-first and back)."""
    b, c = x.shape[:2]
    v = x.movedim(1, -1).reshape(b, -1, c)
    v = v.to(torch.promote_types(v.dtype, torch.float32))  # bfloat16 / float16 activations: float32 statistics
    mean = v.mean(1, keepdim=True)
    centred = v - mean
    var = (centred * centred).mean(1)
    shape = (b, c) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(var + eps).reshape(shape) * weight.reshape(1, c, *shape[2:])
    shift = bias.reshape(1, c, *shape[2:]) - mean.reshape(shape) * scale
    return torch.addcmul(shift, x, scale).to(x.dtype)  # in the statistics' precision, then x's dtype


class InstanceNorm(nn.Module):
    """:func:`instance_norm` with the parameters of an affine ``nn.InstanceNorm2d`` / ``3d`` without running
    statistics (``weight``, ``bias``: the same names and values, so state dicts are unchanged)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        if not getattr(norm, "affine", False) or getattr(norm, "track_running_stats", False):
            raise ValueError("InstanceNorm replaces an affine instance norm without running statistics")
        self.weight, self.bias, self.eps = norm.weight, norm.bias, float(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps)

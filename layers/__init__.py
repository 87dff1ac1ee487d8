"""Pure-torch building blocks (no Lightning): grids and warps, finite differences, features, the
differentiable Gauss-Newton solve and the GN registration module."""

from .diff import diffusion, jacobian_determinant, log_jacobian_energy, spatial_gradient
from .features import box_filter, mind_ssc, signed_distance_maps
from .gn_solve import gn_solve
from .grid import coarse_shape, identity_grid, pool_to_grid, sample, upsample_field
from .similarity import LNCC, lncc
from .warp import compose, one_hot, warp_image, warp_keypoints, warp_labels, warp_onehot

__all__ = [
    "LNCC",
    "box_filter",
    "coarse_shape",
    "compose",
    "diffusion",
    "gn_solve",
    "identity_grid",
    "jacobian_determinant",
    "log_jacobian_energy",
    "lncc",
    "mind_ssc",
    "one_hot",
    "pool_to_grid",
    "sample",
    "signed_distance_maps",
    "spatial_gradient",
    "upsample_field",
    "warp_image",
    "warp_keypoints",
    "warp_labels",
    "warp_onehot",
]

"""Figures of one registered pair: images with label contours, difference images, deformation grid and
Jacobian determinant map. 3D pairs are shown on one slice (the fixed label's busiest slice along axis 0,
or the middle one)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from layers import jacobian_determinant, warp_image, warp_labels  # noqa: E402

__all__ = ["pair_figure"]


def _slice_index(fixed: torch.Tensor, label: torch.Tensor | None) -> int:
    if label is not None and (label > 0).any():
        counts = (label[0] > 0).flatten(1).sum(1)
        return int(torch.argmax(counts))
    return fixed.shape[1] // 2


def _plane(x: torch.Tensor, idx: int | None) -> np.ndarray:
    """``(C, *S)`` -> the first channel's 2D plane as numpy."""
    x = x[0]
    return (x[idx] if idx is not None else x).detach().float().cpu().numpy()


def pair_figure(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    disp: torch.Tensor,
    path: str | Path,
    fixed_label: torch.Tensor | None = None,
    moving_label: torch.Tensor | None = None,
    title: str = "",
    grid_step: int = 8,
) -> Path:
    """Write a 2×4 panel PNG for one pair and return its path.

    Args:
        fixed, moving: ``(1, *S)`` images; disp: ``(n, *S)`` displacement (voxel units);
        fixed_label, moving_label: optional ``(1, *S)`` integer label maps (contours are drawn).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = disp.shape[0]
    u = disp[None].float()
    warped = warp_image(moving[None].float(), u)[0]
    warped_lab = warp_labels(moving_label[None], u)[0] if moving_label is not None else None
    jac = jacobian_determinant(u)  # (1, *S)
    idx = _slice_index(fixed, fixed_label) if n == 3 else None

    f, m, w = _plane(fixed, idx), _plane(moving, idx), _plane(warped, idx)
    lf = _plane(fixed_label, idx) if fixed_label is not None else None
    lm = _plane(moving_label, idx) if moving_label is not None else None
    lw = _plane(warped_lab, idx) if warped_lab is not None else None
    j = (jac[0, idx] if idx is not None else jac[0]).cpu().numpy()
    # in-plane displacement: the last two array axes
    d = (disp[-2:, idx] if idx is not None else disp[-2:]).float().cpu().numpy()

    vmin, vmax = np.percentile(f, [1, 99])
    fig, axes = plt.subplots(2, 4, figsize=(16, 8))
    for ax, img, lab, name in ((axes[0, 0], f, lf, "fixed"), (axes[0, 1], m, lm, "moving"),
                               (axes[0, 2], w, lw, "warped moving")):
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax)
        if lab is not None and lf is not None:
            levels = np.unique(lf[lf > 0])[:40]
            for k in levels:
                ax.contour(lf == k, levels=[0.5], colors="lime", linewidths=0.6)
                if lab is not lf:
                    ax.contour(lab == k, levels=[0.5], colors="red", linewidths=0.6)
        ax.set_title(name + (" (green: fixed labels, red: this image's)" if lab is not None and lab is not lf else ""),
                     fontsize=8)
    diff_max = float(np.percentile(np.abs(m - f), 99)) or 1.0
    axes[0, 3].imshow(f - w, cmap="seismic", vmin=-diff_max, vmax=diff_max)
    axes[0, 3].set_title("fixed − warped (after)")
    axes[1, 0].imshow(f - m, cmap="seismic", vmin=-diff_max, vmax=diff_max)
    axes[1, 0].set_title("fixed − moving (before)")
    # checkerboard of fixed and warped
    tiles = max(f.shape) // 8 or 1
    yy, xx = np.indices(f.shape)
    board = ((yy // tiles + xx // tiles) % 2).astype(bool)
    axes[1, 1].imshow(np.where(board, f, w), cmap="gray", vmin=vmin, vmax=vmax)
    axes[1, 1].set_title("checkerboard fixed / warped")
    ax = axes[1, 2]
    ax.imshow(f, cmap="gray", vmin=vmin, vmax=vmax, alpha=0.4)
    gy, gx = yy + d[0], xx + d[1]
    for r in range(0, f.shape[0], grid_step):
        ax.plot(gx[r], gy[r], color="tab:blue", linewidth=0.6)
    for c in range(0, f.shape[1], grid_step):
        ax.plot(gx[:, c], gy[:, c], color="tab:blue", linewidth=0.6)
    ax.set_xlim(0, f.shape[1] - 1)
    ax.set_ylim(f.shape[0] - 1, 0)
    ax.set_title("deformation grid (x + u)")
    im = axes[1, 3].imshow(j, cmap="RdBu_r", vmin=0.0, vmax=2.0)
    folds = j <= 0
    if folds.any():
        axes[1, 3].contour(folds, levels=[0.5], colors="k", linewidths=0.8)
    axes[1, 3].set_title(f"det J (min {j.min():.2f}; folds black)")
    fig.colorbar(im, ax=axes[1, 3], fraction=0.046)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title + (f"  [slice {idx} of axis 0]" if idx is not None else ""))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path

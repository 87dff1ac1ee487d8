"""Intensity normalisation of loaded images: CT window, MR percentile scaling, or plain min-max.

All modes map to ``[0, 1]`` (float32). ``"auto"`` picks the mode from a modality string such as the
Learn2Reg JSON's ``modality`` entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["INTENSITY_MODES", "mode_for_modality", "normalise_intensity"]

#: accepted values of the ``intensity`` option
INTENSITY_MODES = ("auto", "ct", "mr", "none")


def mode_for_modality(modality: str | None) -> str:
    """``"ct"`` for CT-like modality names (CT, CBCT, FBCT), ``"mr"`` for MR-like ones (MR, MRI, T1w, T2,
    FLAIR), ``"none"`` (min-max) otherwise."""
    text = (modality or "").upper()
    if "CT" in text:
        return "ct"
    if any(tag in text for tag in ("MR", "T1", "T2", "FLAIR")):
        return "mr"
    return "none"


def _minmax(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalise_intensity(
    image: np.ndarray,
    mode: str = "none",
    *,
    modality: str | None = None,
    ct_window: Sequence[float] = (-1000.0, 1000.0),
    percentiles: Sequence[float] = (0.5, 99.5),
) -> np.ndarray:
    """Normalise an image ``(*S)`` (any numeric dtype, e.g. HU or scanner units) to float32 ``[0, 1]``.

    Args:
        image: the raw intensities.
        mode: ``"ct"``: clip to ``ct_window`` (HU) and scale; ``"mr"``: clip to the ``percentiles`` (in %)
            of the image and scale; ``"none"``: min-max scale; ``"auto"``: :func:`mode_for_modality`.
        modality: the modality name used by ``"auto"``.
        ct_window: ``(low, high)`` in the image's units (HU for CT).
        percentiles: ``(low, high)`` percentiles in ``[0, 100]``.
    Returns:
        float32 array of the same shape in ``[0, 1]`` (all zeros for a constant image).

    Raises:
        ValueError: an unknown mode, or NaN / infinite intensities (refused, not scaled to zeros).
    """
    if mode not in INTENSITY_MODES:
        raise ValueError(f"intensity mode must be one of {INTENSITY_MODES}; got {mode!r}")
    if mode == "auto":
        mode = mode_for_modality(modality)
    x = np.asarray(image, dtype=np.float32)
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:  # one NaN would turn the whole image into zeros (min / max / percentiles are NaN)
        raise ValueError(f"the image holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or Inf) of {x.size}")
    if mode == "ct":
        lo, hi = float(ct_window[0]), float(ct_window[1])
    elif mode == "mr":
        lo, hi = (float(v) for v in np.percentile(x, [float(percentiles[0]), float(percentiles[1])]))
    else:
        lo, hi = float(x.min()), float(x.max())
    return _minmax(x, lo, hi)

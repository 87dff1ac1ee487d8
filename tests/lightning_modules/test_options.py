"""String options of the lightning modules as enums (:class:`layers.enums.StrEnum`): one lookup, one message."""

from __future__ import annotations

import pytest
import torch

from data.features import FEATURE_KINDS, FeatureKind, batch_features
from layers.enums import Guard
from layers.losses import regularity_guard


def test_feature_kinds_are_the_enum_values():
    assert FEATURE_KINDS == ("mind", "sdm", "intensity") and FeatureKind.SDM == "sdm"
    batch = {"fixed": torch.zeros(1, 1, 4, 4), "moving": torch.ones(1, 1, 4, 4)}
    with pytest.raises(ValueError, match=r"^features must be one of \('mind', 'sdm', 'intensity'\); got 'hog'"):
        batch_features(batch, "hog")


def test_guard_lookup():
    u = torch.zeros(1, 2, 4, 4)
    assert float(regularity_guard(u, Guard.NONE)) == 0.0 and float(regularity_guard(u, "diffusion")) == 0.0
    message = r"^guard must be one of \('diffusion', 'negjac', 'sdlogj', 'none'\); got 'l2'"
    with pytest.raises(ValueError, match=message):
        regularity_guard(u, "l2")

"""The features of a batch (:func:`data.features.batch_features`): the kinds are the enum's values, one lookup,
one message."""

from __future__ import annotations

import pytest
import torch

from data.features import FEATURE_KINDS, FeatureKind, batch_features


def test_feature_kinds_are_the_enum_values():
    assert FEATURE_KINDS == ("mind", "sdm", "intensity") and FeatureKind.SDM == "sdm"
    batch = {"fixed": torch.zeros(1, 1, 4, 4), "moving": torch.ones(1, 1, 4, 4)}
    with pytest.raises(ValueError, match=r"^features must be one of \('mind', 'sdm', 'intensity'\); got 'hog'"):
        batch_features(batch, "hog")

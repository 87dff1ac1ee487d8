"""Tests of :mod:`data.evaluation.metrics` (every metric of a batch in one call, and their accumulation) and of
:func:`layers.metrics.labels.batch_label_ids` (docs/design.md §7)."""

from __future__ import annotations

import math

import pytest
import torch

from data.evaluation.metrics import METRIC_NAMES, RegistrationMetrics, pair_metrics
from layers.metrics.labels import batch_label_ids

F64 = torch.float64
NAN = float("nan")


def _box(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...], value: int = 1) -> torch.Tensor:
    lab = torch.zeros((1, 1, *shape), dtype=torch.int64)
    lab[(0, 0) + tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return lab




def _label_batch() -> dict:
    shape = (14, 14)
    fixed = _box(shape, (4, 4), (10, 10))
    return {
        "fixed": torch.zeros(1, 1, *shape),
        "moving": torch.zeros(1, 1, *shape),
        "fixed_label": fixed,
        "moving_label": fixed.clone(),
        "spacing": torch.tensor([[2.0, 0.5]]),
        "moving_spacing": torch.tensor([[2.0, 0.5]]),
    }


def test_pair_metrics_labels_keypoints_and_keys():
    batch = _label_batch()
    batch["fixed_keypoints"] = torch.tensor([[[5.0, 5.0], [NAN, NAN]]])
    batch["moving_keypoints"] = torch.tensor([[[5.0, 8.0], [NAN, NAN]]])
    batch["label_ids"] = torch.tensor([[0, 1]])
    u = torch.zeros(1, 2, 14, 14, dtype=F64)
    u[:, 0] = 2.0  # warped(x) = moving(x + 2 e_0): the square moves up by 2 rows
    out = pair_metrics(batch, u)
    assert set(out) == set(METRIC_NAMES)
    for v in out.values():
        assert v.shape == (1,) and v.dtype == F64
    assert out["dice"].item() == pytest.approx(2 * 24 / 72)  # overlap 4 x 6 of two 6 x 6 squares
    assert out["dice30"].item() == pytest.approx(2 * 24 / 72)
    assert out["hd95"].item() == pytest.approx(2 * 2.0, rel=1e-6)  # k = 2 voxels along axis 0, 2 mm each
    # p + u(p) - q = (5 + 2 - 5, 5 - 8) = (2, -3) voxels -> (4, -1.5) mm
    assert out["tre"].item() == pytest.approx(math.hypot(4.0, 1.5), rel=1e-6)
    assert out["sdlogj"].item() == 0.0 and out["folding"].item() == 0.0
    assert "hd95" not in pair_metrics(batch, u, hd95=False)


def test_pair_metrics_absent_metrics_and_default_labels():
    batch = _label_batch()
    u = torch.zeros(1, 2, 14, 14, dtype=F64)
    only_jac = pair_metrics({"fixed": batch["fixed"], "moving": batch["moving"]}, u)
    assert set(only_jac) == {"sdlogj", "sdlogj_l2r", "folding"}
    out = pair_metrics(batch, u)  # no label_ids: the non-zero labels of the fixed map
    assert set(out) == {"dice", "dice30", "hd95", "sdlogj", "sdlogj_l2r", "folding"}
    assert out["dice"].item() == 1.0 and out["hd95"].item() == 0.0


def test_pair_metrics_per_pair_label_ids():
    b = _label_batch()
    lab = torch.cat([b["fixed_label"], b["fixed_label"] * 2])  # label 1 in pair 0, label 2 in pair 1
    moving = lab.clone()
    moving[1, 0, 4:10, 4:7] = 0  # pair 1: half of label 2 is lost -> Dice 2*18/(36+18) = 2/3
    batch = {"fixed_label": lab, "moving_label": moving, "label_ids": torch.tensor([[1, 3], [2, 3]])}
    out = pair_metrics(batch, torch.zeros(2, 2, 14, 14), hd95=False)
    assert out["dice"].tolist() == pytest.approx([1.0, 2 / 3])


# ---------------------------------------------------------------------------------------------------
# accumulation
# ---------------------------------------------------------------------------------------------------
def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_registration_metrics_accumulate_reset_and_merge():
    m = RegistrationMetrics()
    m.update({"dice": _t(0.5, NAN), "tre": _t(1.0, 3.0)})
    m.update({"dice": _t(0.8), "tre": _t(2.0), "folding": _t(0.1)})
    res = m.compute()
    assert set(res) == set(METRIC_NAMES)
    assert res["dice"].item() == pytest.approx(0.65, abs=1e-15)
    assert res["tre"].item() == pytest.approx(2.0, abs=1e-15)
    assert res["folding"].item() == pytest.approx(0.1, abs=1e-15)
    assert torch.isnan(res["hd95"])  # never updated
    # DDP: the state reduces by summation; merging another process's state gives the pooled mean
    first, other = RegistrationMetrics(), RegistrationMetrics()
    first.update({"dice": _t(0.5, NAN, 0.8)})
    other.update({"dice": _t(0.2, 0.3, 0.4)})
    first.merge_state(other)
    assert first.compute()["dice"].item() == pytest.approx((0.5 + 0.8 + 0.2 + 0.3 + 0.4) / 5, abs=1e-15)
    m.reset()
    m.update({"dice": _t(0.25)})
    res = m.compute()
    assert res["dice"].item() == 0.25
    assert torch.isnan(res["tre"])
    with pytest.raises(ValueError):
        m.update({"not_a_metric": _t(1.0)})


def test_registration_metrics_update_from_batch():
    batch = _label_batch()
    u = torch.zeros(1, 2, 14, 14, dtype=F64)
    u[:, 0] = 2.0
    m = RegistrationMetrics()
    m.update(batch, u)
    m.update(batch, torch.zeros_like(u))
    res = m.compute()
    assert res["dice"].item() == pytest.approx((2 / 3 + 1.0) / 2)
    assert torch.isnan(res["tre"])


def test_batch_label_ids_is_the_one_reading_of_label_ids():
    fixed = torch.tensor([[[[0, 3], [1, 1]]]])
    moving = torch.tensor([[[[2, 0], [1, 0]]]])
    batch = {"fixed_label": fixed, "moving_label": moving}
    assert batch_label_ids(batch) == [1, 3]  # no label_ids: the non-zero labels of the fixed map
    assert batch_label_ids(batch, maps=("fixed_label", "moving_label")) == [1, 2, 3]
    assert batch_label_ids({**batch, "label_ids": [4, 0, 2, 4]}) == [4, 2]  # order kept, 0 and repeats dropped
    rows = torch.tensor([[5, 6, -1], [5, 6, 7]])  # (B, L), padded with -1 by the collate function
    assert batch_label_ids({"label_ids": rows}) == [5, 6]  # the first row, without its padding
    assert batch_label_ids({"label_ids": rows}, per_pair=True) == [[5, 6], [5, 6, 7]]
    assert batch_label_ids({"label_ids": torch.tensor([[5, 6], [5, 6]])}, per_pair=True) == [5, 6]

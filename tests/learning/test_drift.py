"""Drift records: production predictions against labels that arrive later."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.training.drift import (
    DriftRecord,
    format_drift_table,
    measure_drift,
    summarize_drift,
)


def _maps() -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((2, 4, 4), np.uint8)
    label[0, :2, :2] = 1  # 4 voxels of label 1
    pred = label.copy()
    pred[1, :1, :2] = 1  # 2 more voxels: Dice 8/10
    pred[1, 3, 3] = 2  # a label the truth lacks
    return pred, label


def test_measure_drift_per_label() -> None:
    pred, label = _maps()
    r = measure_drift(pred, label, study_key="ST-1", model_name="lesion", model_version="3",
                      recorded_at=5.0)
    assert r.dice == pytest.approx({1: 0.8, 2: 0.0})
    assert r.mean_dice == pytest.approx(0.4)
    assert (r.study_key, r.model_name, r.model_version, r.recorded_at) == ("ST-1", "lesion", "3",
                                                                           5.0)


def test_measure_drift_with_model_labels() -> None:
    pred, label = _maps()
    r = measure_drift(pred, label, study_key="s", model_name="m", model_version="1", labels=[1])
    assert r.dice == pytest.approx({1: 0.8}) and r.mean_dice == pytest.approx(0.8)
    perfect = measure_drift(label, label, study_key="s", model_name="m", model_version="1",
                            labels=[1, 3])
    assert perfect.dice == {1: 1.0, 3: 1.0}  # label 3 absent from both: they agree


def test_measure_drift_both_empty() -> None:
    z = np.zeros((1, 2, 2), np.uint8)
    r = measure_drift(z, z, study_key="s", model_name="m", model_version="1")
    assert r.dice == {} and r.mean_dice == 1.0


def test_measure_drift_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="must be aligned to the same volume"):
        measure_drift(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)), study_key="s",
                      model_name="m", model_version="1")


def _record(version: str, mean: float, t: float | None = None) -> DriftRecord:
    return DriftRecord(f"s-{t}", "lesion", version, {1: mean}, mean, t)


def test_summarize_drift_per_version() -> None:
    records = [_record("1", 0.9, 1.0), _record("1", 0.8, 2.0), _record("2", 0.95, 3.0),
               _record("1", 0.5, 4.0), _record("1", 0.4, 5.0), _record("2", 0.85, 6.0)]
    s1, s2 = summarize_drift(records, k=2)
    assert (s1.model_version, s1.n, s1.last_k) == ("1", 4, 2)
    assert s1.mean_dice == pytest.approx(0.65) and s1.last_k_mean == pytest.approx(0.45)
    assert s1.min_dice == pytest.approx(0.4) and (s1.first_at, s1.last_at) == (1.0, 5.0)
    assert s1.label_means == pytest.approx({1: 0.65})
    assert (s2.model_version, s2.n) == ("2", 2) and s2.last_k_mean == pytest.approx(0.9)


def test_summarize_drift_window_larger_than_records() -> None:
    (s,) = summarize_drift([_record("1", 0.7)], k=10)
    assert s.last_k == 1 and s.last_k_mean == s.mean_dice == pytest.approx(0.7)
    assert s.first_at is None


def test_summarize_drift_invalid_k() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        summarize_drift([], k=0)


def test_format_drift_table() -> None:
    table = format_drift_table(summarize_drift([_record("1", 0.9), _record("1", 0.7)], k=1))
    lines = table.splitlines()
    assert lines[0].split() == ["model", "version", "n", "mean", "Dice", "last-k", "mean", "k",
                                "min"]
    assert lines[1].split() == ["lesion", "1", "2", "0.800", "0.700", "1", "0.700"]

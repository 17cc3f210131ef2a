"""The tracking rule of per-finding results (dicomnode.pipeline.tracking), on its own."""

from __future__ import annotations

from dicomnode.pipeline.tracking import assign_tracking, match_findings


def _f(label: int, xyz, **tracking) -> dict:
    return {"label": label, "label_name": "Lesion" if label == 1 else "Node",
            "centroid_mm": list(xyz), **tracking}


def _uid(label: int, n: int) -> str:
    return f"2.25.{label}{n:03d}"


def test_persisting_findings_keep_identifier_and_uid_new_ones_get_new() -> None:
    previous = assign_tracking([_f(1, (0, 0, 0)), _f(1, (50, 0, 0)), _f(2, (0, 50, 0))], [],
                               earlier_numbers={}, tolerance_mm=10.0, new_uid=_uid)
    assert [p["tracking_id"] for p in previous] == ["Lesion 1", "Lesion 2", "Node 1"]
    # moved a little, reordered, one gone (Lesion 2), one new near nothing
    current = [_f(1, (80, 0, 0)), _f(2, (1, 52, 0)), _f(1, (2, -1, 3))]
    out = assign_tracking(current, previous, earlier_numbers={1: 2, 2: 1}, tolerance_mm=10.0,
                          new_uid=lambda label, n: _uid(label, n) + "9")
    assert [(c["tracking_id"], c["tracking_uid"]) for c in out] == [
        ("Lesion 3", "2.25.10039"),  # new: above every number used, never Lesion 2 again
        ("Node 1", previous[2]["tracking_uid"]),
        ("Lesion 1", previous[0]["tracking_uid"]),
    ]


def test_closest_pairs_first_one_to_one_same_label_within_tolerance() -> None:
    previous = [_f(1, (0, 0, 0), tracking_uid="2.25.1"),
                _f(1, (6, 0, 0), tracking_uid="2.25.2")]
    # current 0 is 4 mm from prev 1 and 5 mm from prev 0; current 1 is 1 mm from prev 1
    current = [_f(1, (4, 3, 0)), _f(1, (7, 0, 0))]
    assert match_findings(previous, current, 10.0) == {1: 1, 0: 0}
    assert match_findings(previous, current, 4.9) == {1: 1}
    assert match_findings(previous, [_f(2, (0, 0, 0))], 10.0) == {}  # another label
    # a previous finding without tracking data (an older result) is never matched
    assert match_findings([_f(1, (0, 0, 0))], [_f(1, (0, 0, 0))], 10.0) == {}

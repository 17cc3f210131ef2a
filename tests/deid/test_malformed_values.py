"""A kept value that breaks its VR's grammar is not kept (issue 16).

A name typed into Patient's Sex, a canary in Slice Thickness or Study Time: the
attribute is kept by the profile because of what its VR promises (a code, a number, a
time), and the value is not that. Such values are emptied (Type 2), replaced by a dummy
(Type 1) or removed (Type 3); an unknown Specific Character Set is removed (the
default repertoire, as pydicom reads it anyway). Conformant values stay byte for byte.
"""

from __future__ import annotations

import warnings

from deidutil import assert_absent, ct, run
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

CANARY = "CANARYq7Zx"


def _raw(ds, tag: int, vr: str, value: str) -> None:  # noqa: ANN001
    t = Tag(tag)
    ds[t] = RawDataElement(t, vr, len(value), value.encode(), 0, False, True)


def test_malformed_kept_values_never_survive():
    ds = ct()
    _raw(ds, 0x00080005, "CS", f"{CANARY}1")  # Specific Character Set
    _raw(ds, 0x00080030, "TM", f"{CANARY}2")  # Study Time (Type 2)
    _raw(ds, 0x00100040, "CS", f"{CANARY}3 x")  # Patient's Sex (Type 2)
    _raw(ds, 0x00180050, "DS", f"{CANARY}4")  # Slice Thickness (Type 2 in CT)
    _raw(ds, 0x00200013, "IS", f"{CANARY}5")  # Instance Number (Type 2 in CT)
    _raw(ds, 0x00181150, "IS", f"{CANARY}6")  # Exposure Time (Type 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the values, on purpose
        result, data = run(ds)
    assert_absent(data, [CANARY, CANARY.upper()])
    out = result.dataset
    assert "SpecificCharacterSet" not in out and "ExposureTime" not in out
    for kw in ("StudyTime", "PatientSex", "SliceThickness", "InstanceNumber"):
        assert out[kw].is_empty, kw


def test_conformant_values_kept_byte_for_byte():
    ds = ct()
    _raw(ds, 0x00180050, "DS", "17.125")
    _raw(ds, 0x00080008, "CS", "DERIVED\\SECONDARY\\MPR ")
    _raw(ds, 0x00200013, "IS", "+4321 ")
    _, data = run(ds)
    for value in (b"17.125", b"DERIVED\\SECONDARY\\MPR ", b"+4321 "):
        assert value in data  # the bytes as received


def test_type_1_code_in_lower_case_kept():
    # Modality (Type 1) in lower case: an equipment value a dummy would break
    ds = ct()
    _raw(ds, 0x00080060, "CS", "ct")
    result, _ = run(ds)
    assert result.dataset.Modality == "ct"

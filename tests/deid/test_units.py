"""Units of the engine: the table compilation, value transformations, descriptors, records."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from deidutil import ct, deidentifier, run
from generate_data import DATA, build_anatomy_words, build_iod_types, dump_iod_types

from dicomnode.dicom.deid import DeidOptions, IdentityRecord, MaskRule, Region
from dicomnode.dicom.deid.descriptors import DescriptorCleaner
from dicomnode.dicom.deid.iod import NOT_IN_IOD, TYPE_1, TYPE_2, UNKNOWN, iod_types_for
from dicomnode.dicom.deid.table import FORCED_REMOVALS, Action, compile_table, load_rows
from dicomnode.dicom.deid.values import age_string, cap_age, shift_da, shift_dt, shift_values


def test_data_files_are_current():
    """The committed derived data equals what generate_data.py makes from highdicom."""
    assert (DATA / "iod_types.json").read_text("utf-8") == dump_iod_types(build_iod_types())
    assert (DATA / "anatomy_words.txt").read_text("utf-8") == build_anatomy_words()


def test_table_is_the_reference_copy():
    from pathlib import Path

    reference = Path("/work/shared/reference/ps3.15-annex-e-table.json")
    if reference.exists():
        assert json.loads(reference.read_text("utf-8")) == load_rows()
    assert len(load_rows()) == 621


def test_table_compiles_every_row_and_options_override():
    basic = compile_table(frozenset())
    assert len(basic.exact) >= 617
    assert basic.exact[0x00080020] == Action.EMPTY  # Study Date: Z
    assert basic.exact[0x00101010] == Action.REMOVE  # Patient's Age: X
    assert basic.exact[0x00081030] == Action.REMOVE  # Study Description: X
    opts = compile_table(
        frozenset(
            {
                "retain_longitudinal_modified_dates",
                "clean_descriptors",
                "retain_patient_characteristics",
            }
        )
    )
    assert opts.exact[0x00080020] == Action.SHIFT
    assert opts.exact[0x00101010] == Action.KEEP
    assert opts.exact[0x00081030] == Action.CLEAN
    # Beam Hold Transition DateTime: K (device identity) vs C (modified dates): C wins
    both = compile_table(
        frozenset({"retain_device_identity", "retain_longitudinal_modified_dates"})
    )
    assert both.exact[0x300C0127] == Action.SHIFT
    for tag in FORCED_REMOVALS:
        assert opts.exact[tag] == Action.REMOVE
    assert compile_table(frozenset(), True).private == Action.CLEAN


def test_timezone_offset_kept_with_modified_dates():
    ds = ct()
    ds.TimezoneOffsetFromUTC = "+0100"
    assert run(ds)[0].dataset.TimezoneOffsetFromUTC == "+0100"
    basic = deidentifier(retain_longitudinal_modified_dates=False)
    assert "TimezoneOffsetFromUTC" not in run(ds, basic)[0].dataset


def test_iod_types():
    ct_types = iod_types_for("1.2.840.10008.5.1.4.1.1.2")
    assert ct_types.type_of(0x00100010, 0) == TYPE_2  # Patient's Name
    assert ct_types.type_of(0x0020000D, 0) == TYPE_1  # Study Instance UID
    assert ct_types.type_of(0x0040A073, 0) == NOT_IN_IOD  # Verifying Observer Sequence
    seg = iod_types_for("1.2.840.10008.5.1.4.1.1.66.4")
    assert seg.type_of(0x00082112, 0x00089124) == TYPE_2  # Source Image Seq in Derivation Image
    assert iod_types_for("1.2.3.4").type_of(0x00100010, 0) == UNKNOWN


@pytest.mark.parametrize(
    ("value", "days", "expected"),
    [
        ("20240229", -365, "20230301"),
        ("20240229", 365, "20250228"),
        ("2024.02.29", -1, "20240228"),
        ("202403", -10, "202403"),
        ("202403", -20, "202402"),
        ("2024", -400, "2023"),
        ("20240101-20240131", -1, "20231231-20240130"),
        ("", -5, ""),
        ("garbage", -5, None),
        ("20241340", -5, None),
    ],
)
def test_shift_da(value: str, days: int, expected: str | None):
    assert shift_da(value, days) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240301101500.123456+0100", "20240229101500.123456+0100"),
        ("2024030110", "2024022910"),
        ("20240301", "20240229"),
        ("2024", "2024"),
        ("20240301-0500", "20240229-0500"),
        ("2024X", None),
    ],
)
def test_shift_dt(value: str, expected: str | None):
    assert shift_dt(value, -1) == expected


def test_shift_values_multi_valued_drops_unparseable():
    assert shift_values("20240301\\20240302", "DA", 1) == "20240302\\20240303"
    assert shift_values("20240301\\junk", "DA", 1) == "20240302"
    assert shift_values("junk", "DA", 1) is None


def test_age():
    birth = dt.date(2000, 5, 20)
    assert age_string(birth, dt.date(2000, 6, 1), 90) == "012D"
    assert age_string(birth, dt.date(2001, 6, 1), 90) == "012M"
    assert age_string(birth, dt.date(2030, 5, 19), 90) == "029Y"
    assert age_string(birth, dt.date(2095, 1, 1), 90) == "090Y"
    assert age_string(birth, dt.date(1999, 1, 1), 90) is None
    assert cap_age("095Y", 90) == "090Y" and cap_age("045Y", 90) == "045Y"
    assert cap_age("095Y", None) == "095Y"


def test_descriptor_cleaning():
    clean = DescriptorCleaner().clean
    assert clean("CT chest - 55F Dr. Smith") == "CT chest"
    assert clean("AX T2 FLAIR 5mm C+") == "AX T2 FLAIR 5mm C+"
    # A bare "1.25" may be a date (January 25); with its unit, or as 0.625, it is not.
    assert clean("Thorax 1.25 B30f MRN 1234567") == "Thorax"
    assert clean("Thorax 1.25 mm 0.625 B30f") == "Thorax 1.25 mm 0.625"
    assert clean("HEAD 2023 Head") == "HEAD Head"
    assert clean("HEAD Smith", frozenset({"HEAD"})) == ""
    assert DescriptorCleaner(["B30F"]).clean("Thorax B30f") == "Thorax B30f"


def test_options_validation():
    with pytest.raises(ValueError, match="exclusive"):
        DeidOptions(retain_longitudinal_full_dates=True)
    with pytest.raises(ValueError, match="keep_text"):
        DeidOptions(keep_text=frozenset({"NotAKeyword"}))
    with pytest.raises(ValueError, match="age_cap_years"):
        DeidOptions(age_cap_years=0)
    with pytest.raises(ValueError, match="Region"):
        Region(row=-1, column=0, rows=1, columns=1)
    with pytest.raises(ValueError, match="MaskRule"):
        MaskRule()
    assert hash(DeidOptions()) == hash(DeidOptions())


def test_full_dates_option_keeps_dates():
    out = run(
        ct(),
        deidentifier(retain_longitudinal_modified_dates=False, retain_longitudinal_full_dates=True),
    )[0]
    assert out.dataset.StudyDate == "20260301"
    assert out.dataset.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert "113106" in out.methods and out.identity.date_shift_days == 0


def test_retain_uids_option_keeps_uids():
    ds = ct()
    out = run(ds, deidentifier(retain_uids=True))[0]
    assert out.dataset.SOPInstanceUID == ds.SOPInstanceUID and out.uid_map == ()


def test_identity_record_json_round_trip():
    record = run(ct())[0].identity
    data = json.loads(json.dumps(record.to_json()))
    assert IdentityRecord.from_json(data) == record
    del data["patient_id"]
    with pytest.raises(ValueError, match="patient_id"):
        IdentityRecord.from_json(data)

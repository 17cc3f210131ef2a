"""Re-identification (deid.md 5.6, checklist 103-110) and the round trip over pydicom's files."""

from __future__ import annotations

import datetime as dt
import json
from io import BytesIO
from pathlib import Path

import pytest
from deidutil import all_test_files, assert_absent, ct, deidentifier, make_seg
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomnode.dicom.deid import (
    MARKER_KEYWORDS,
    DeidentifiedInstance,
    IdentityRecord,
    UIDMapEntry,
    assert_no_pseudonyms,
    encode,
    read,
    reidentify,
)
from dicomnode.errors import DeidentificationError, ReidentificationError


class Vault:
    """What the node's vault gives re-identification: a UID lookup and identity records."""

    def __init__(self) -> None:
        self.uids: dict[str, str] = {}
        self.identity: IdentityRecord | None = None

    def add(self, result: DeidentifiedInstance) -> Dataset:
        # Through JSON, as the vault stores them (encrypted).
        for entry in result.uid_map:
            e = UIDMapEntry.from_json(json.loads(json.dumps(entry.to_json())))
            self.uids[e.pseudonym] = e.original
        self.identity = IdentityRecord.from_json(json.loads(json.dumps(result.identity.to_json())))
        return read(encode(result.dataset))  # the de-identified copy as stored on disk


@pytest.fixture
def deid_study(ct_series: list[Dataset]) -> tuple[list[Dataset], list[Dataset], Vault]:
    """(original CT, de-identified CT as read from its bytes, vault)."""
    vault = Vault()
    engine = deidentifier()
    clean = [vault.add(engine.deidentify(ds)) for ds in ct_series]
    return ct_series, clean, vault


def test_case_103_104_106_108_109_seg_mapped_back(deid_study):
    originals, clean, vault = deid_study
    seg = make_seg(clean)
    own_sop, own_series = str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID)
    assert seg.PatientIdentityRemoved == "YES"  # highdicom copied the markers in

    out = reidentify(seg, vault.uids, vault.identity)
    data = encode(out)
    out = dcmread(BytesIO(data))

    first = originals[0]
    # 103: every reference back to the original instances
    refs = out.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in refs.ReferencedInstanceSequence} == {
        o.SOPInstanceUID for o in originals
    }
    sources = {
        s.ReferencedSOPInstanceUID
        for f in out.PerFrameFunctionalGroupsSequence
        for d in f.DerivationImageSequence
        for s in d.SourceImageSequence
    }
    assert sources == {o.SOPInstanceUID for o in originals}
    # 104
    assert out.FrameOfReferenceUID == first.FrameOfReferenceUID
    # 106: Patient and Study modules
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyDescription",
    ):
        assert out[kw].value == first[kw].value, kw
    # 108: its own UIDs are new, neither pseudonyms nor source UIDs
    assert out.SOPInstanceUID == own_sop and out.SeriesInstanceUID == own_series
    assert own_sop not in vault.uids and own_series not in vault.uids
    assert own_sop not in {o.SOPInstanceUID for o in originals}
    # 109: markers gone, creation dates today (not shifted back into the future)
    for kw in MARKER_KEYWORDS:
        assert kw not in out
    assert out.ContentDate == dt.date.today().strftime("%Y%m%d")
    # and no pseudonym anywhere in the bytes
    assert_absent(data, [vault.identity.patient_pseudonym, *vault.uids])


def test_case_105_sr_image_references_at_any_depth_mapped_back(deid_study):
    originals, clean, vault = deid_study
    sr = _sr_on(clean)
    reidentify(sr, vault.uids, vault.identity)
    image = sr.ContentSequence[0].ContentSequence[0].ContentSequence[0]
    ref = image.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == originals[1].SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == originals[0].StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == originals[0].SeriesInstanceUID
    # 109: a date copied from the sources is un-shifted; one made today is kept
    observed = sr.ContentSequence[0].ContentSequence[0].ObservationDateTime
    assert observed == "20260301101500"
    assert sr.ContentDate == dt.date.today().strftime("%Y%m%d")


def _sr_on(clean: list[Dataset]) -> Dataset:
    """A small SR built on de-identified images: Patient/Study copied, references nested."""
    src = clean[1]
    sr = Dataset()
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    ):
        sr[kw] = src[kw]
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.SOPInstanceUID = "2.25.1234567"
    sr.SeriesInstanceUID = "2.25.7654321"
    sr.Modality = "SR"
    sr.ContentDate = dt.date.today().strftime("%Y%m%d")
    image = Dataset()
    image.ValueType, image.RelationshipType = "IMAGE", "CONTAINS"
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    image.ReferencedSOPSequence = Sequence([ref])
    finding = Dataset()
    finding.ValueType, finding.RelationshipType = "CONTAINER", "CONTAINS"
    finding.ObservationDateTime = src.AcquisitionDate + "101500"
    finding.ContentSequence = Sequence([image])
    root = Dataset()
    root.ValueType = "CONTAINER"
    root.ContentSequence = Sequence([finding])
    sr.ContentSequence = Sequence([root])
    series = Dataset()
    series.SeriesInstanceUID = src.SeriesInstanceUID
    series.ReferencedSOPSequence = Sequence([ref])
    evidence = Dataset()
    evidence.StudyInstanceUID = src.StudyInstanceUID
    evidence.ReferencedSeriesSequence = Sequence([series])
    sr.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    return sr


def test_case_107_leftover_pseudonym_refused(deid_study):
    _originals, clean, vault = deid_study
    seg = make_seg(clean)
    seg.ContentCreatorName = vault.identity.patient_pseudonym  # copied somewhere unexpected
    with pytest.raises(ReidentificationError, match="ContentCreatorName"):
        reidentify(seg, vault.uids, vault.identity)
    seg = make_seg(clean)
    seg.add_new(0x00091010, "UN", f"ref {clean[0].SOPInstanceUID}".encode())  # a private copy
    seg.add_new(0x00090010, "LO", "ACME")
    with pytest.raises(ReidentificationError, match="pseudonym"):
        reidentify(seg, vault.uids, vault.identity)


def test_guard_refuses_markers_and_pseudonymous_uids(deid_study):
    _originals, clean, vault = deid_study
    for kw in MARKER_KEYWORDS:
        ds = Dataset()
        ds[kw] = clean[0][kw]
        with pytest.raises(ReidentificationError, match=kw):
            assert_no_pseudonyms(ds, lambda uid: False)
    ds = Dataset()
    ds.ReferencedSeriesSequence = Sequence([Dataset()])
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = clean[0].SeriesInstanceUID
    with pytest.raises(ReidentificationError, match=r"ReferencedSeriesSequence\[0\]"):
        assert_no_pseudonyms(ds, vault.uids.__contains__)
    stripped = read(encode(clean[0]))
    for kw in MARKER_KEYWORDS:
        delattr(stripped, kw)
    with pytest.raises(ReidentificationError, match="de-identifying equipment"):
        assert_no_pseudonyms(stripped, lambda uid: False)


def test_case_110_missing_vault_row_refused(deid_study):
    _originals, clean, vault = deid_study
    seg = make_seg(clean)
    lost = str(clean[2].SOPInstanceUID)
    lookup = {k: v for k, v in vault.uids.items() if k != lost}
    with pytest.raises(ReidentificationError, match="no vault entry"):
        reidentify(seg, lookup, vault.identity)


def test_reidentify_refuses_another_studys_identity(deid_study, ct_series):
    _originals, clean, vault = deid_study
    other = deidentifier().deidentify(ct(patient_id="SOMEONE-ELSE", seed=9)).identity
    with pytest.raises(ReidentificationError, match="StudyInstanceUID"):
        reidentify(make_seg(clean), vault.uids, other)


def test_reidentify_restores_non_ascii_names():
    ds = ct(patient_name="Gößmann^Jürgen")
    ds.SpecificCharacterSet = "ISO_IR 100"
    vault = Vault()
    clean = vault.add(deidentifier().deidentify(ds))
    assert_absent(encode(clean), ["Gößmann", "Jürgen"])
    seg = make_seg([clean])
    out = dcmread(BytesIO(encode(reidentify(seg, vault.uids, vault.identity))))
    assert str(out.PatientName) == "Gößmann^Jürgen"


# ---------------------------------------------------------------- pydicom's files

_SKIP_COMPARE = {"SOPInstanceUID", "MediaStorageSOPInstanceUID"}


def _uids(ds: Dataset, path: str = "") -> dict[str, str]:
    out = {}
    for elem in ds:
        here = f"{path}{elem.keyword or elem.tag}"
        if elem.VR == "UI" and elem.value:
            out[here] = str(elem.value)
        elif elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                out.update(_uids(item, f"{here}[{i}]."))
    return out


@pytest.mark.filterwarnings(
    # The test files themselves carry values pydicom calls invalid (rtdose's UIDs,
    # badVR's IS); reading them warns, and that is the files' business, not ours.
    "ignore:Invalid value for VR:UserWarning",
    "ignore:The value length:UserWarning",
)
@pytest.mark.parametrize("path", all_test_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_round_trip_pydicom_files(path: Path) -> None:
    """De-identify, store (encode/decode), re-identify, compare with the original.

    For every UI attribute at any depth that the re-identified object still has,
    and for the Patient and General Study modules, the value equals the original.
    Files that are not composite instances must be refused with DeidentificationError.
    """
    raw = path.read_bytes()
    try:
        original = read(raw)
    except DeidentificationError:
        pytest.skip(
            "unreadable or truncated"
        )  # unreadable or truncated on purpose (e.g. *_too_short, rtplan_truncated)
    if not str(original.get("PatientID", "")).strip():
        original.PatientID = "PLANTED-ID"
    try:
        result = deidentifier().deidentify(original)
    except DeidentificationError as exc:
        assert "missing or empty" in str(exc)
        assert not all(
            kw in original
            for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        )
        return
    lookup = {e.pseudonym: e.original for e in result.uid_map}
    stored = read(encode(result.dataset))
    back = reidentify(stored, lookup, result.identity)
    back = dcmread(BytesIO(encode(back)))
    before, after = _uids(original), _uids(back)
    for key, value in after.items():
        if key in before:
            assert value == before[key], key
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "IssuerOfPatientID",
        "StudyDescription",
    ):
        if kw in original:
            assert str(back[kw].value) == str(original[kw].value), kw
    assert back.SOPInstanceUID == original.SOPInstanceUID
    assert back.SeriesInstanceUID == original.SeriesInstanceUID

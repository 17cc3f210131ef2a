"""Determinism and linkage (checklist 63-64, 75, 96-102): same in, same bytes out; one
patient, one pseudonym and one shift; different patients or keys, different pseudonyms."""

from __future__ import annotations

import hashlib
from io import BytesIO

from deidutil import KEY, ct, deidentifier, run
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomnode.dicom.deid import Deidentifier, DeidOptions, PatientNameStyle, deidentify
from dicomnode.dicom.deid.values import parse_da
from dicomnode.dicom.pseudonym import Pseudonymizer


def test_case_75_same_input_identical_bytes():
    a = run(ct())[1]
    b = run(ct())[1]
    assert a == b
    engine = deidentifier()
    assert run(ct(), engine)[1] == run(ct(), engine)[1]


def test_case_99_new_process_same_key_same_bytes():
    # A restart rebuilds the Pseudonymizer from the same secret: nothing depends on
    # process state (the secret file itself is the node's, see test_checklist).
    first = run(ct(), Deidentifier(Pseudonymizer(KEY)))[1]
    second = run(ct(), Deidentifier(Pseudonymizer(bytes(KEY))))[1]
    assert first == second
    assert (
        deidentify(ct(), Pseudonymizer(KEY)).dataset.SOPInstanceUID
        == dcmread(BytesIO(first)).SOPInstanceUID
    )


def test_case_63_96_two_studies_of_one_patient():
    engine_day1, engine_day2 = deidentifier(), deidentifier()  # two runs
    s1 = ct(seed=1, study_date="20240110")
    s2 = ct(seed=2, study_date="20250620")
    r1, r2 = engine_day1.deidentify(s1), engine_day2.deidentify(s2)
    assert r1.dataset.PatientID == r2.dataset.PatientID
    assert r1.dataset.PatientName == r2.dataset.PatientName
    assert r1.identity.date_shift_days == r2.identity.date_shift_days
    assert r1.dataset.StudyInstanceUID != r2.dataset.StudyInstanceUID
    gap_before = parse_da("20250620") - parse_da("20240110")  # type: ignore[operator]
    gap_after = parse_da(r2.dataset.StudyDate) - parse_da(r1.dataset.StudyDate)  # type: ignore[operator]
    assert gap_before == gap_after


def test_case_64_two_patients_different_pseudonyms_and_shifts():
    engine = deidentifier()
    shifts, ids = set(), set()
    for i in range(20):
        r = engine.deidentify(ct(patient_id=f"MRN{i:05d}", seed=i))
        shifts.add(r.identity.date_shift_days)
        ids.add(r.identity.patient_pseudonym)
    assert len(ids) == 20
    assert len(shifts) >= 18  # 3286 possible shifts: a collision or two is allowed


def test_case_97_same_id_two_issuers():
    a, b = ct(), ct()
    a.IssuerOfPatientID = "HOSPITAL-A"
    b.IssuerOfPatientID = "HOSPITAL-B"
    assert run(a)[0].dataset.PatientID != run(b)[0].dataset.PatientID


def test_case_101_another_key_other_pseudonyms():
    one = Deidentifier(Pseudonymizer(KEY)).deidentify(ct())
    other = Deidentifier(Pseudonymizer(b"another-secret-key-0123456789abcdef")).deidentify(ct())
    for kw in (
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
        "AccessionNumber",
        "StudyID",
    ):
        assert one.dataset[kw].value != other.dataset[kw].value, kw


def test_case_102_pseudonyms_not_computable_without_the_key():
    ds = ct()
    out = run(ds)[0].dataset
    pid, uid = str(ds.PatientID), str(ds.SOPInstanceUID)
    unkeyed = set()
    for algo in ("md5", "sha1", "sha256", "sha512"):
        digest = hashlib.new(algo, pid.encode()).digest()
        unkeyed.add(str(int.from_bytes(digest, "big")))
        unkeyed.add(hashlib.new(algo, pid.encode()).hexdigest().upper())
    assert not any(u in str(out.PatientID) or str(out.PatientID)[1:] in u for u in unkeyed)
    assert out.SOPInstanceUID != generate_uid(entropy_srcs=[uid])  # pydicom's unkeyed hash
    assert out.SOPInstanceUID != generate_uid(prefix="2.25.", entropy_srcs=[uid])


def test_patient_name_styles():
    assert str(run(ct())[0].dataset.PatientName).endswith("^")
    engine = Deidentifier(
        Pseudonymizer(KEY), DeidOptions(patient_name_style=PatientNameStyle.ANON_ID)
    )
    out = engine.deidentify(ct()).dataset
    assert str(out.PatientName) == f"ANON^{out.PatientID}"


def test_accession_and_study_id_are_keyed_short_pseudonyms():
    out = run(ct())[0].dataset
    assert len(out.AccessionNumber) == 16 and out.AccessionNumber != "ACC-PH-0001"
    assert len(out.StudyID) == 16 and out.StudyID.isalnum()


def test_case_98_missing_or_empty_patient_id_pseudonymised_per_study():
    """Patient ID is Type 2 (emergency, unidentified patients): the study stands in for
    the patient, never the name (no linking on name)."""
    outs = []
    for value in (None, "", "   "):
        ds = ct()
        if value is None:
            del ds.PatientID
        else:
            ds.PatientID = value
        outs.append(deidentifier().deidentify(ds).dataset)
    pids = {str(o.PatientID) for o in outs}
    assert len(pids) == 1 and pids.pop().strip()
    assert len({str(o.StudyDate) for o in outs}) == 1  # one date shift within the study
    other = ct()
    del other.PatientID
    other.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.98"
    out_other = deidentifier().deidentify(other).dataset
    # same name and birth date, another study: not linked
    assert str(out_other.PatientID) != str(outs[0].PatientID)
    named = ct()
    assert str(deidentifier().deidentify(named).dataset.PatientID) != str(outs[0].PatientID)

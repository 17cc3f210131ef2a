"""De-identification through the running node: nothing identifying outside the vault."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from nodeutil import NodeProcess, storescu, wait_for, write_study
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicomnode.dicom.phantom import make_ct_study

MARKERS = {
    "patient_name": "Phimarkfamily^Phimarkgiven",
    "patient_id": "PHIMARK-ID-7741",
    "accession_number": "PHIMARK-ACC-99",
    "institution_name": "Phimark Memorial Hospital",
    "referring_physician": "Phimarkdoctor^Referring",
    "patient_birth_date": "19570214",
}


def _everything_stored(node: NodeProcess) -> bytes:
    """Every byte the node keeps outside keys/: files, and a dump of the database."""
    blob = bytearray()
    for f in sorted(node.data_dir.rglob("*")):
        if f.is_file() and "keys" not in f.parts and not f.name.startswith("dicomnode.db"):
            blob += f.read_bytes()
    con = sqlite3.connect(node.data_dir / "dicomnode.db")
    try:
        for line in con.iterdump():
            if "INSERT INTO \"vault_" in line:
                continue  # encrypted rows (checked separately below)
            blob += line.encode()
        for (ct,) in con.execute("select ciphertext from vault_uid union all "
                                 "select ciphertext from vault_identity"):
            blob += ct
    finally:
        con.close()
    return bytes(blob)


def _identifiers(files: list[Path]) -> list[bytes]:
    ids = {v.encode() for v in MARKERS.values()}
    ids |= {part.encode() for v in (MARKERS["patient_name"], MARKERS["referring_physician"])
            for part in v.split("^")}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        ids |= {str(ds.StudyInstanceUID).encode(), str(ds.SeriesInstanceUID).encode(),
                str(ds.SOPInstanceUID).encode(), str(ds.FrameOfReferenceUID).encode()}
    return sorted(ids)


def test_study_is_indexed_and_archived_without_identifiers(tmp_path: Path) -> None:
    study = make_ct_study(
        seed=31, n_slices=12, rows=64, columns=64,
        patient_name=MARKERS["patient_name"], patient_id=MARKERS["patient_id"],
        accession_number=MARKERS["accession_number"], institution_name=MARKERS["institution_name"],
        referring_physician=MARKERS["referring_physician"],
        patient_birth_date=MARKERS["patient_birth_date"],
    )
    files = write_study(study, tmp_path / "src")
    with NodeProcess(tmp_path / "node") as node:
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: [s for s in node.studies() if s["hooked_version"] == 1], 60)
        [s] = node.studies()
        assert s["instances"] == 12 and s["patient_key"].startswith("P")
        assert s["patient_key"] != MARKERS["patient_id"]
        assert [f for f in (node.data_dir / "spool").rglob("*") if f.is_file()] == []
        archived = list((node.data_dir / "archive").rglob("*.dcm"))
        assert len(archived) == 12
        stored = _everything_stored(node)
        for marker in _identifiers(files):
            assert marker not in stored, "an identifier is stored outside the vault"
        # the copies are pseudonymous but linkable and still valid CT images
        ds = dcmread(archived[0])
        assert ds.PatientID == s["patient_key"] and ds.PatientIdentityRemoved == "YES"
        assert ds.StudyInstanceUID == s["study_key"] and ds.Modality == "CT"
        assert ds.pixel_array.shape == (64, 64)

        # an authorised operator can see who it is; the read is recorded
        res = node.cli("vault", "show", s["study_key"], "--operator", "alice")
        identity = json.loads(res.stdout)["studies"][s["study_key"]]
        assert identity["patient_id"] == MARKERS["patient_id"]
        assert identity["accession_number"] == MARKERS["accession_number"]
        con = sqlite3.connect(node.data_dir / "dicomnode.db")
        reads = con.execute("select actor, subject from vault_access").fetchall()
        con.close()
        assert reads == [("operator:alice", s["study_key"])]
        log = node.log_text()
    for marker in _identifiers(files):
        assert marker.decode() not in log


def test_two_studies_of_one_patient_link_and_other_patients_do_not(tmp_path: Path) -> None:
    a1 = make_ct_study(seed=1, n_slices=3, rows=32, columns=32, patient_id="PAT-A",
                       study_date="20250101")
    a2 = make_ct_study(seed=2, n_slices=3, rows=32, columns=32, patient_id="PAT-A",
                       study_date="20260505")
    b = make_ct_study(seed=3, n_slices=3, rows=32, columns=32, patient_id="PAT-B",
                      study_date="20250101")
    files = [f for i, st in enumerate((a1, a2, b)) for f in write_study(st, tmp_path / f"s{i}")]
    with NodeProcess(tmp_path / "node") as node:
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: len([s for s in node.studies() if s["hooked_version"] == 1]) == 3, 60)
        keys = {s["study_key"]: s["patient_key"] for s in node.studies()}
        by_uid = {st.study_instance_uid: st for st in (a1, a2, b)}
        archived = {}
        for f in (node.data_dir / "archive").rglob("*.dcm"):
            ds = dcmread(f, stop_before_pixels=True)
            archived.setdefault(ds.StudyInstanceUID, ds)
    assert len(set(keys.values())) == 2
    dates = {k: archived[k].StudyDate for k in keys}
    patients = {k: archived[k].PatientID for k in keys}
    # one patient keeps one pseudonym and one date shift: the interval between studies stays
    same = [k for k in keys if keys[k] == patients[k]]
    assert len(same) == 3
    pa = [k for k in keys if list(keys.values()).count(keys[k]) == 2]
    import datetime as dt
    d = sorted(dt.date.fromisoformat(f"{dates[k][:4]}-{dates[k][4:6]}-{dates[k][6:]}") for k in pa)
    assert (d[1] - d[0]).days == (dt.date(2026, 5, 5) - dt.date(2025, 1, 1)).days
    assert all(dates[k] not in ("20250101", "20260505") for k in keys)
    assert by_uid  # originals are not archived under their own UIDs
    assert not set(by_uid) & set(archived)


def test_risky_object_is_quarantined_not_archived(tmp_path: Path) -> None:
    us = get_testdata_file("US1_UNCR.dcm") or get_testdata_file("SC_rgb.dcm")
    assert us is not None
    ds = dcmread(us)
    if "PatientID" not in ds or not ds.PatientID:
        ds.PatientID = "PAT-US"
    src = tmp_path / "us.dcm"
    ds.save_as(src, enforce_file_format=True)
    with NodeProcess(tmp_path / "node") as node:
        res = storescu(node.port, [src])
        assert res.returncode == 0, res.stderr
        listing = wait_for(lambda: json.loads(node.cli("quarantine", "list", "--json").stdout), 30)
        [item] = listing
        assert item["state"] == "quarantined" and "quarantined:" in item["reason"]
        assert item["path"].startswith("quarantine/")
        assert list((node.data_dir / "archive").rglob("*.dcm")) == []
        assert item["study_key"] in node.cli("quarantine", "list").stdout


def test_offline_deid_command(tmp_path: Path) -> None:
    study = make_ct_study(seed=5, n_slices=4, rows=32, columns=32,
                          patient_id=MARKERS["patient_id"], patient_name=MARKERS["patient_name"])
    files = write_study(study, tmp_path / "src")
    (tmp_path / "src" / "notes.txt").write_text("not DICOM")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    res = subprocess.run([sys.executable, "-m", "dicomnode", "deid", str(tmp_path / "src"),
                          "--out", str(tmp_path / "out"), "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "4 de-identified" in res.stdout and "1 skipped" in res.stdout
    outs = sorted((tmp_path / "out").glob("*.dcm"))
    assert len(outs) == 4
    blob = b"".join(f.read_bytes() for f in outs)
    for marker in _identifiers(files):
        assert marker not in blob
    # same keys as the node: running it again gives the same bytes
    res2 = subprocess.run([sys.executable, "-m", "dicomnode", "deid", str(tmp_path / "src"),
                           "--out", str(tmp_path / "out2"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert res2.returncode == 0
    assert [f.read_bytes() for f in outs] == [
        f.read_bytes() for f in sorted((tmp_path / "out2").glob("*.dcm"))]

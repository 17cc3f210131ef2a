"""Every accepted study ends in a final outcome with a reason, and an operator can retry it.

Through a running node with dcmtk as the modality: a job that keeps failing leaves the
study ``failed`` with the (patient-safe) error instead of "running" forever; ``dicomnode
studies retry`` processes it again once the cause is fixed; malformed values and an
empty Patient ID cost at most their instance; retired storage classes and space-padded
UIDs are stored.
"""

from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import pytest
from nodeutil import NodeProcess, storescu, wait_for, write_study
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicomnode.dicom.phantom import make_ct_study

pytestmark = pytest.mark.slow

FINAL = {"results_sent", "results_held", "not_applicable", "refused", "failed"}
CONFIG: dict[str, Any] = {
    "jobs": {"max_attempts": 2, "retry_base_s": 0.2, "poll_interval_s": 0.1},
    "results": {"destinations": []},
}


def _rows(node: NodeProcess, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _final(node: NodeProcess, timeout: float = 180) -> dict[str, Any]:
    def one() -> tuple[Any, ...] | None:
        rows = _rows(node, "select id, outcome, outcome_reason, run from study")
        return rows[0] if len(rows) == 1 and rows[0][1] in FINAL else None

    sid, outcome, reason, run = wait_for(one, timeout, 0.2)
    return {"id": sid, "outcome": outcome, "reason": reason, "run": run}


def test_dead_job_ends_failed_and_retry_runs_it_again(tmp_path: Path) -> None:
    files = write_study(make_ct_study(n_slices=10, rows=64, columns=64, seed=11), tmp_path / "s")
    with NodeProcess(tmp_path / "node", CONFIG) as node:
        model = node.data_dir / "models" / "demo-lesion" / "1.0.0" / "model.onnx"
        wait_for(model.exists, 30)
        good = model.read_bytes()
        model.write_bytes(good + b"corrupted")  # the package no longer matches its checksum

        res = storescu(node.port, files)
        assert res.returncode == 0, res.stderr
        first = _final(node)
        assert first["outcome"] == "failed"
        assert "infer failed" in first["reason"] and "ModelLoadError" in first["reason"]
        listing = node.cli("studies").stdout
        assert "failed (infer failed" in listing
        as_json = json.loads(node.cli("studies", "--json").stdout)
        assert as_json[0]["outcome"] == "failed"

        model.write_bytes(good)  # the operator fixes the cause...
        res = node.cli("studies", "retry", str(first["id"]))
        assert f"study {first['id']} queued for processing again (run 2)" in res.stdout
        second = _final(node)
        assert (second["outcome"], second["run"]) == ("results_held", 2)
        assert second["reason"] == "no result destination is configured"
        assert len(list((node.data_dir / "results").rglob("*.dcm"))) == 2  # SEG + SR

        again = node.cli("studies", "retry", "4242", check=False)
        assert again.returncode != 0 and "unknown" in again.stderr
    audit = [json.loads(line) for line in
             (node.data_dir / "audit.jsonl").read_text().splitlines()]
    retries = [a for a in audit if a["event"] == "operator_action"
               and a["Detail"].get("action") == "study_retry"]
    assert len(retries) == 1 and retries[0]["Detail"]["previous_outcome"] == "failed"


def test_malformed_value_and_empty_patient_id_cost_only_their_instance(tmp_path: Path) -> None:
    study = make_ct_study(n_slices=12, rows=64, columns=64, seed=12, patient_id="")
    datasets = study.datasets
    # as a scanner wrote it: Number of Frames "1A" (pydicom raises when it reads it)
    datasets[5]._dict[Tag(0x00280008)] = RawDataElement(
        Tag(0x00280008), "IS", 2, b"1A", 0, False, True
    )
    with warnings.catch_warnings():  # pydicom warns while writing the value it dislikes
        warnings.simplefilter("ignore")
        files = write_study(study, tmp_path / "s")
    with NodeProcess(tmp_path / "node", CONFIG) as node:
        res = storescu(node.port, files)
        assert res.returncode == 0, res.stderr
        done = _final(node)
        assert done["outcome"] == "results_held", done
        states = _rows(node, "select state, count(*) from instance group by state")
        assert states == [("deidentified", 12)]
        # De-identification drops a kept value that breaks its VR's grammar (Number of
        # Frames is Type 3 in the CT Image IOD: removed), so the instance is whole again
        # and joins the volume; were it still malformed it would be left out, with a note.
        timings = json.loads(_rows(node, "select timings from inference_result")[0][0])
        archived = [dcmread(p, stop_before_pixels=True)
                    for p in (node.data_dir / "archive").rglob("*.dcm")]
        malformed = [ds for ds in archived if "NumberOfFrames" in ds]
        notes = timings.get("volume_notes", [])
        assert not malformed and not any("left out" in n for n in notes), notes
        # the empty Patient ID became a pseudonym (the same for every instance)
        assert len({str(ds.PatientID) for ds in archived}) == 1
        assert str(archived[0].PatientID).strip()
        assert not [p for p in (node.data_dir / "spool").rglob("*") if p.is_file()]


def test_retired_storage_class_and_space_padded_uid_are_stored(tmp_path: Path) -> None:
    study = make_ct_study(n_slices=2, rows=32, columns=32, seed=13)
    retired = study.datasets[0]
    retired.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
    retired.Modality = "US"
    retired.file_meta.MediaStorageSOPClassUID = retired.SOPClassUID
    padded = study.datasets[1]
    uid = str(padded.SOPInstanceUID)
    value = (uid + " ").encode() if len(uid) % 2 else (uid + "  ").encode()
    padded._dict[Tag(0x00080018)] = RawDataElement(
        Tag(0x00080018), "UI", len(value), value, 0, False, True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = write_study(study, tmp_path / "s")
    with NodeProcess(tmp_path / "node", CONFIG) as node:
        res = storescu(node.port, files, "-R")  # propose exactly the files' SOP classes
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Success" in res.stdout or _rows(node, "select count(*) from instance")[0][0]
        wait_for(lambda: _rows(node, "select count(*) from instance")[0][0] == 2, 30)
        classes = {r[0] for r in _rows(node, "select sop_class_uid from instance")}
        assert "1.2.840.10008.5.1.4.1.1.6" in classes

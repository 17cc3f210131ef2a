"""STOW-RS out: results to Orthanc's DICOMweb plugin, through the same outbox as C-STORE."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from dwpeers import PACS_PASSWORD, PACS_USER, orthanc_client, start_dicomweb_orthanc, write_secret
from nodeutil import NodeProcess, free_port, storescu, wait_for, write_study
from pydicom import dcmread

from dicomnode.dicom.phantom import make_ct_study


def rows(node: NodeProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def dicomweb_node(tmp_path: Path, http_port: int, password: str, **results: Any) -> NodeProcess:
    pw = write_secret(tmp_path / "secrets" / "pacs.password", password)
    return NodeProcess(tmp_path / "node", {
        "peers": {"pacs": {"transport": "dicomweb",
                           "url": f"http://127.0.0.1:{http_port}/dicom-web",
                           "credentials": {"username": PACS_USER, "password_file": str(pw)}}},
        "results": {"destinations": ["pacs"], "retry_base_s": 1.0, "retry_max_s": 2.0,
                    "max_attempts": 20, **results},
    })


def test_seg_and_sr_arrive_on_the_original_study_by_stow_rs(tmp_path: Path) -> None:
    pacs = start_dicomweb_orthanc(tmp_path / "orthanc", users={PACS_USER: PACS_PASSWORD})
    node = dicomweb_node(tmp_path, pacs.http_port, PACS_PASSWORD)
    study = make_ct_study(seed=1511, n_slices=12, patient_id="PAT-WEB-1",
                          patient_name="Webfam^Bo", accession_number="ACC-WEB-1")
    try:
        node.start()
        assert storescu(node.port, write_study(study, tmp_path / "src")).returncode == 0
        wait_for(lambda: rows(node, "select count(*) from outbox where status = 'sent'")[0][0]
                 == 2, 180)
        with orthanc_client(pacs, (PACS_USER, PACS_PASSWORD)) as o:
            [sid] = o.get("/studies").json()
            st = o.get(f"/studies/{sid}").json()
            assert st["MainDicomTags"]["StudyInstanceUID"] == study.study_instance_uid
            assert st["MainDicomTags"]["AccessionNumber"] == "ACC-WEB-1"
            assert st["PatientMainDicomTags"]["PatientID"] == "PAT-WEB-1"
            files = [o.get(f"/instances/{i}/file").content for i in o.get("/instances").json()]
        assert sorted(dcmread(io.BytesIO(f)).Modality for f in files) == ["SEG", "SR"]
        [s] = node.studies()
        for f in files:
            assert s["study_key"].encode() not in f and s["patient_key"].encode() not in f
        assert s["outcome"] == "results_sent"
        audit = (node.data_dir / "audit.jsonl").read_text()
        assert "dicomweb" in audit  # the transport of the result_sent lines
    finally:
        node.stop()
        pacs.stop()


def test_pacs_down_then_up_gets_each_object_once(tmp_path: Path) -> None:
    http_port, dicom_port = free_port(), free_port()
    node = dicomweb_node(tmp_path, http_port, PACS_PASSWORD)
    study = make_ct_study(seed=1512, n_slices=12, patient_id="PAT-WEB-2")
    node.start()
    try:
        assert storescu(node.port, write_study(study, tmp_path / "src")).returncode == 0
        wait_for(lambda: rows(node, "select count(*) from outbox where attempts >= 2")[0][0]
                 == 2, 180)
        assert rows(node, "select count(*) from outbox where status = 'sent'")[0][0] == 0
        pacs = start_dicomweb_orthanc(tmp_path / "orthanc", users={PACS_USER: PACS_PASSWORD},
                                      port=dicom_port, http_port=http_port)
        try:
            wait_for(lambda: rows(node, "select count(*) from outbox where status = 'sent'"
                                  )[0][0] == 2, 60)
            with orthanc_client(pacs, (PACS_USER, PACS_PASSWORD)) as o:
                assert len(o.get("/instances").json()) == 2
                [sid] = o.get("/studies").json()
                assert o.get(f"/studies/{sid}").json()["MainDicomTags"]["StudyInstanceUID"] \
                    == study.study_instance_uid
        finally:
            pacs.stop()
        errors = [e for (e,) in rows(node, "select last_error from outbox")]
        assert errors == [None, None]
    finally:
        node.stop()


@pytest.mark.parametrize("password", ["not-what-orthanc-expects"])
def test_wrong_credentials_dead_letter_at_once_with_the_servers_answer(tmp_path: Path,
                                                                       password: str) -> None:
    pacs = start_dicomweb_orthanc(tmp_path / "orthanc", users={PACS_USER: PACS_PASSWORD})
    node = dicomweb_node(tmp_path, pacs.http_port, password)
    study = make_ct_study(seed=1513, n_slices=12, patient_id="PAT-WEB-3")
    try:
        node.start()
        assert storescu(node.port, write_study(study, tmp_path / "src")).returncode == 0
        wait_for(lambda: rows(node, "select count(*) from outbox where status = 'dead'")[0][0]
                 == 2, 180)
        dead = rows(node, "select attempts, last_error from outbox")
        assert all(a == 1 for a, _ in dead)  # a 4xx is not retried
        assert all("401" in e and "Unauthorized" in e for _, e in dead)
        wait_for(lambda: node.studies()[0]["outcome"] == "failed", 30)
        assert "401" in node.studies()[0]["outcome_reason"]
        with orthanc_client(pacs, (PACS_USER, PACS_PASSWORD)) as o:
            assert o.get("/instances").json() == []
    finally:
        node.stop()
        pacs.stop()

"""Results back to a real PACS (Orthanc): SEG and SR on the original study, durably."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from nodeutil import NodeProcess, free_port, storescu, to_toml, wait_for, write_study
from peers import Receiver, orthanc_get, start_orthanc
from pydicom import dcmread

from dicomnode.dicom.phantom import make_ct_study
from dicomnode.dicom.pseudonym import Pseudonymizer
from dicomnode.dicom.seg import read_seg

DCIODVFY = str(Path(__import__("sys").executable).with_name("dciodvfy"))


def rows(node: NodeProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def orthanc_file(pacs: Receiver, instance_id: str) -> bytes:
    with urllib.request.urlopen(
            f"http://127.0.0.1:{pacs.http_port}/instances/{instance_id}/file", timeout=30) as r:
        return r.read()


def orthanc_instances(pacs: Receiver) -> list[dict]:
    return [orthanc_get(pacs, f"/instances/{i}") for i in orthanc_get(pacs, "/instances")]


@pytest.fixture
def pacs_and_node(tmp_path: Path, request: pytest.FixtureRequest):
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc",
                         modalities={"dicomnode": ["DICOMNODE", "127.0.0.1", node_port]})
    retry = getattr(request, "param", {"retry_base_s": 0.5, "retry_max_s": 2.0,
                                       "max_attempts": 4})
    node = NodeProcess(tmp_path / "node", {
        "scp": {"port": node_port},
        "peers": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port,
                           "allow_store": False}},
        "results": {"destinations": ["pacs"], **retry},
    })
    yield pacs, node
    if node.proc is not None and node.proc.poll() is None:
        node.stop()
    pacs.stop()


def test_seg_and_sr_arrive_on_the_original_study(pacs_and_node, tmp_path: Path) -> None:
    pacs, node = pacs_and_node
    study = make_ct_study(seed=5150, patient_id="PAT-RESULTS-1", patient_name="Resultsfam^Ann",
                          accession_number="ACC-RES-1")
    files = write_study(study, tmp_path / "src")
    node.start()
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: rows(node, "select count(*) from outbox where status = 'sent'")[0][0] == 2,
             120)
    [orthanc_study] = [orthanc_get(pacs, f"/studies/{s}") for s in orthanc_get(pacs, "/studies")]
    assert orthanc_study["MainDicomTags"]["StudyInstanceUID"] == study.study_instance_uid
    assert orthanc_study["MainDicomTags"]["AccessionNumber"] == "ACC-RES-1"
    assert orthanc_study["PatientMainDicomTags"]["PatientID"] == "PAT-RESULTS-1"
    assert orthanc_study["PatientMainDicomTags"]["PatientName"] == "Resultsfam^Ann"
    modalities = sorted(orthanc_get(pacs, f"/series/{s}")["MainDicomTags"]["Modality"]
                        for s in orthanc_study["Series"])
    assert modalities == ["SEG", "SR"]

    p = Pseudonymizer((node.data_dir / "keys" / "node.key").read_bytes().strip())
    [s] = node.studies()
    pseudonyms = {s["study_key"].encode(), s["patient_key"].encode()}
    received = {}
    for inst in orthanc_instances(pacs):
        data = orthanc_file(pacs, inst["ID"])
        for pseudo in pseudonyms:
            assert pseudo not in data, "a pseudonym reached the PACS"
        ds = dcmread(io.BytesIO(data))
        assert "PatientIdentityRemoved" not in ds and ds.PatientID == "PAT-RESULTS-1"
        received[ds.Modality] = (ds, data)
        path = tmp_path / f"{ds.Modality}.dcm"
        path.write_bytes(data)
        out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], f"dciodvfy on {ds.Modality}: {errors}"

    # the SEG on the PACS is the inference mask, on the original source instances
    [(mask_path,)] = rows(node, "select mask_path from inference_result")
    with np.load(io.BytesIO((node.data_dir / mask_path).read_bytes())) as z:
        mask, sop_keys = z["mask"], [str(k) for k in z["sop_keys"]]
    originals = {p.uid(ds.SOPInstanceUID): str(ds.SOPInstanceUID) for ds in study.datasets}
    seg_mask, segments = read_seg(received["SEG"][0], [originals[k] for k in sop_keys])
    assert np.array_equal(seg_mask, mask)
    assert [sg.label for sg in segments] == ["Lesion"]
    sr = received["SR"][0]
    assert sr.ContentSequence  # a TID 1500 report with content
    assert "demo-lesion" in json.dumps(sr.to_json_dict())


@pytest.mark.parametrize("pacs_and_node", [{"retry_base_s": 2.0, "retry_max_s": 4.0,
                                               "max_attempts": 10}], indirect=True)
def test_results_wait_for_a_pacs_that_is_down(pacs_and_node, tmp_path: Path) -> None:
    pacs, node = pacs_and_node
    study = make_ct_study(seed=6150, n_slices=16, patient_id="PAT-RESULTS-3")
    files = write_study(study, tmp_path / "src")
    pacs.stop()  # PACS down while results become due
    node.start()
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: rows(node, "select count(*) from outbox where attempts >= 1")[0][0] == 2, 120)
    assert rows(node, "select count(*) from outbox where status = 'sent'")[0][0] == 0
    node.stop()  # the delivery state survives a restart of the node too
    back = start_orthanc(pacs.workdir, modalities={}, port=pacs.port, http_port=pacs.http_port)
    try:
        node.start()
        wait_for(lambda: rows(node, "select count(*) from outbox where status = 'sent'")[0][0]
                 == 2, 60)
        assert len(orthanc_get(back, "/instances")) == 2
    finally:
        back.stop()


def test_pacs_down_until_dead_letter_then_outbox_retry(pacs_and_node, tmp_path: Path) -> None:
    pacs, node = pacs_and_node
    study = make_ct_study(seed=6160, n_slices=16, patient_id="PAT-RESULTS-2")
    files = write_study(study, tmp_path / "src")
    pacs.stop()  # PACS down while results become due
    node.start()
    assert storescu(node.port, files).returncode == 0
    # max_attempts 4, backoff 0.5 s doubling (cap 2 s): dead within about 4 s
    wait_for(lambda: rows(node, "select count(*) from outbox where status = 'dead'")[0][0] == 2,
             60)
    listing = json.loads(node.cli("outbox", "list", "--status", "dead", "--json").stdout)
    assert len(listing) == 2 and all(i["attempts"] == 4 for i in listing)
    pacs2 = start_orthanc(pacs.workdir, modalities={}, port=pacs.port, http_port=pacs.http_port)
    try:
        for item in listing:
            node.cli("outbox", "retry", str(item["id"]))
        wait_for(lambda: rows(node, "select count(*) from outbox where status = 'sent'")[0][0]
                 == 2, 60)
        assert len(orthanc_get(pacs2, "/instances")) == 2
    finally:
        pacs2.stop()


def test_late_series_supersedes_earlier_results(pacs_and_node, tmp_path: Path) -> None:
    pacs, node = pacs_and_node
    uid = "2.25.987654321987654321"
    first = make_ct_study(seed=71, study_instance_uid=uid, series_number=2, n_slices=16,
                          patient_id="PAT-LATE")
    late = make_ct_study(seed=72, study_instance_uid=uid, series_number=3, n_slices=24,
                         slice_thickness_mm=2.0, patient_id="PAT-LATE")
    node.start()
    assert storescu(node.port, write_study(first, tmp_path / "a")).returncode == 0
    wait_for(lambda: rows(node, "select count(*) from outbox where status = 'sent'")[0][0] == 2,
             120)
    assert storescu(node.port, write_study(late, tmp_path / "b")).returncode == 0
    wait_for(lambda: rows(node, "select count(*) from outbox where status = 'sent'")[0][0] == 4,
             120)
    v2 = rows(node, "select kind, supersedes, sop_instance_uid from outbox "
                    "where study_version = 2 order by kind")
    v1 = dict(rows(node, "select kind, sop_instance_uid from outbox where study_version = 1"))
    assert [(k, sup) for k, sup, _ in v2] == [("SEG", v1["SEG"]), ("SR", v1["SR"])]
    sops = [orthanc_get(pacs, f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
            for i in orthanc_get(pacs, "/instances")]
    assert len(sops) == 4 and len(set(sops)) == 4
    sr2 = dcmread(io.BytesIO(orthanc_file(pacs, next(
        i for i in orthanc_get(pacs, "/instances")
        if orthanc_get(pacs, f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] == v2[1][2]))))
    [pred] = sr2.PredecessorDocumentsSequence
    assert pred.StudyInstanceUID == uid  # the original study, not a pseudonym
    assert pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID \
        == v1["SR"]
    # the rerun re-sends nothing it already delivered
    [s] = node.studies()
    assert s["version"] == 2


@pytest.mark.parametrize("pacs_and_node", [{"retry_base_s": 0.5}], indirect=True)
def test_storage_commitment_confirms_delivered_results(pacs_and_node, tmp_path: Path) -> None:
    pacs, node = pacs_and_node
    # the PACS is asked to commit, and reports back on its own association
    node.config["peers"]["pacs"]["storage_commitment"] = True
    node.config_path.write_text(to_toml(node.config))
    study = make_ct_study(seed=7170, n_slices=12, patient_id="PAT-COMMIT")
    node.start()
    assert storescu(node.port, write_study(study, tmp_path / "src")).returncode == 0
    wait_for(lambda: rows(node, "select count(*) from outbox where status = 'confirmed'")[0][0]
             == 2, 120)
    confirmed = rows(node, "select kind, confirmed_at from outbox where status = 'confirmed'")
    assert sorted(k for k, _ in confirmed) == ["SEG", "SR"]
    assert all(at is not None for _, at in confirmed)
    assert "storage commitment report from ORTHANC: 1 committed" in node.log_text()

"""The worklist notification: HL7 v2.5.1 ORU^R01 over MLLP once a study's results are
delivered, received by an MLLP listener built on hl7apy."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from dwpeers import ack, mllp_listener
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from nodeutil import NodeProcess, storescu, wait_for, write_study
from peers import start_storescp

from dicomnode.dicom.phantom import make_ct_study


def rows(node: NodeProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def study_files(tmp_path: Path, seed: int, patient_id: str) -> tuple[object, list[Path]]:
    study = make_ct_study(seed=seed, n_slices=12, patient_id=patient_id,
                          patient_name="Worklist^Wendy", accession_number=f"ACC-{seed}")
    for ds in study.datasets:  # what a modality copies from its worklist entry
        ds.IssuerOfPatientID = "HOSP-A"
        ds.PlacerOrderNumberImagingServiceRequest = f"PO-{seed}"
        ds.FillerOrderNumberImagingServiceRequest = f"FO-{seed}"
    return study, write_study(study, tmp_path / "src")


def hl7_node(tmp_path: Path, pacs_port: int, ris_port: int, **results: object) -> NodeProcess:
    return NodeProcess(tmp_path / "node", {
        "peers": {
            "pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port},
            "ris": {"transport": "hl7", "host": "127.0.0.1", "port": ris_port,
                    "receiving_application": "RIS", "receiving_facility": "HOSP",
                    "priority_rules": [{"label": "Lesion", "priority": "STAT"}]},
        },
        "results": {"destinations": ["pacs", "ris"], **results},
    })


def test_oru_carries_original_identifiers_findings_and_priority(tmp_path: Path) -> None:
    study, files = study_files(tmp_path, 1521, "PAT-HL7-1")
    pacs = start_storescp(tmp_path / "pacs")
    with mllp_listener() as (ris_port, received):
        node = hl7_node(tmp_path, pacs.port, ris_port).start()
        try:
            assert storescu(node.port, files).returncode == 0
            wait_for(lambda: node.studies()[0]["outcome"] == "results_sent", 180)
            [s] = node.studies()
        finally:
            node.stop()
    pacs.stop()
    assert len(received) == 1
    text = received[0]
    for pseudonym in (s["patient_key"], s["study_key"]):
        assert pseudonym not in text, "a pseudonym reached the RIS"
    msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msg.msh.msh_12.to_er7() == "2.5.1"
    assert msg.msh.msh_5.to_er7() == "RIS" and msg.msh.msh_3.to_er7() == "DICOMNODE"
    result = msg.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == "PAT-HL7-1^^^HOSP-A"
    assert pid.pid_5.to_er7() == "Worklist^Wendy"
    order = result.oru_r01_order_observation
    assert order.orc.orc_2.to_er7() == "PO-1521" and order.orc.orc_3.to_er7() == "FO-1521"
    obr = order.obr
    assert obr.obr_2.to_er7() == "PO-1521" and obr.obr_3.to_er7() == "FO-1521"
    assert obr.obr_18.to_er7() == "ACC-1521"
    assert obr.obr_25.to_er7() == "P"  # preliminary
    assert obr.obr_27.to_er7() == "^^^^^S"
    assert order.oru_r01_timing_qty.tq1.tq1_9.to_er7() == "S^Stat^HL70485"
    obx = [o.obx for o in order.oru_r01_observation]
    assert obx[0].obx_3.to_er7() == "108369006^Lesion^SCT"
    assert obx[0].obx_5.to_er7() == "52101004^Present^SCT"
    assert obx[0].obx_17.to_er7() == "demo-lesion^demo-lesion 1.0.0^L"
    assert {o.obx_6.to_er7() for o in obx[1:]} == {"mm3^cubic millimeter^UCUM",
                                                   "mm^millimeter^UCUM"}
    assert all(float(o.obx_5.to_er7()) > 0 for o in obx[1:])
    assert all(o.obx_11.to_er7() == "P" for o in obx)
    # after the SEG and SR were delivered; the vault read is audited
    [(notified,)] = rows(node, "select sent_at from outbox where kind = 'notification'")
    images = [t for (t,) in rows(node, "select sent_at from outbox where kind != 'notification'")]
    assert len(images) == 2 and notified >= max(images)
    assert "notification sent to ris" in s["outcome_reason"]
    audit = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
    assert any("notification" in json.dumps(a) and "reidentified" in json.dumps(a)
               for a in audit)
    assert "PAT-HL7-1" not in node.log_text() and "Wendy" not in node.log_text()


def test_negative_acknowledgement_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    _, files = study_files(tmp_path, 1522, "PAT-HL7-2")
    pacs = start_storescp(tmp_path / "pacs")
    with mllp_listener(lambda m: ack(m, "AE", "Unknown order")) as (ris_port, received):
        node = hl7_node(tmp_path, pacs.port, ris_port, max_attempts=3, retry_base_s=0.3,
                        retry_max_s=1.0).start()
        try:
            assert storescu(node.port, files).returncode == 0
            wait_for(lambda: node.studies()[0]["outcome"] == "failed", 180)
            [s] = node.studies()
        finally:
            node.stop()
    pacs.stop()
    assert len(received) == 3
    assert len({m.split("\r", 1)[0].split("|")[9] for m in received}) == 1  # same control ID
    [(status, attempts, error)] = rows(
        node, "select status, attempts, last_error from outbox where kind = 'notification'")
    assert (status, attempts) == ("dead", 3)
    assert "answered AE: Unknown order" in error
    assert s["outcome_reason"].startswith("worklist notification to ris failed")
    assert rows(node, "select count(*) from outbox where kind != 'notification' "
                      "and status = 'sent'")[0][0] == 2


def test_negative_study_is_notified_only_where_asked(tmp_path: Path) -> None:
    study = make_ct_study(seed=1523, n_slices=12, n_lesions=0, patient_id="PAT-HL7-3",
                          accession_number="ACC-1523")
    files = write_study(study, tmp_path / "src")
    pacs = start_storescp(tmp_path / "pacs")
    with mllp_listener() as (yes_port, yes), mllp_listener() as (no_port, no):
        node = NodeProcess(tmp_path / "node", {
            "peers": {
                "pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs.port},
                "ris": {"transport": "hl7", "host": "127.0.0.1", "port": yes_port,
                        "notify_negative": True,
                        "priority_rules": [{"label": "Lesion", "priority": "STAT"}]},
                "ris2": {"transport": "hl7", "host": "127.0.0.1", "port": no_port},
            },
            "results": {"destinations": ["pacs", "ris", "ris2"]},
        }).start()
        try:
            assert storescu(node.port, files).returncode == 0
            wait_for(lambda: node.studies()[0]["outcome"] == "results_sent", 180)
        finally:
            node.stop()
    pacs.stop()
    assert no == [] and len(yes) == 1
    order = parse_message(yes[0]).oru_r01_patient_result.oru_r01_order_observation
    [obx] = [o.obx for o in order.oru_r01_observation]
    assert obx.obx_5.to_er7() == "2667000^Absent^SCT"
    assert order.oru_r01_timing_qty.tq1.tq1_9.to_er7() == "R^Routine^HL70485"
    assert order.obr.obr_3.to_er7() == "ACC-1523"  # no Filler Order Number: the accession
    assert rows(node, "select destination from outbox where kind = 'notification'") \
        == [("ris",)]

"""Audit lines (PS3.15 Annex A fields), JSON logs and the metrics the emitting modules count."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opsdata import NodeData
from prometheus_client import REGISTRY

from dicomnode.audit import EVENTS, audit, audit_message
from dicomnode.errors import DatasetError
from dicomnode.scp.handlers import handle_assoc_event, handle_store


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _audit(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "dicomnode.audit"]


def test_audit_message_fields() -> None:
    m = audit_message("result_sent", user="DICOMNODE", ae_title="DICOMNODE", peer_name="pacs",
                      peer_ae="ORTHANC", peer_address="10.0.0.5", study_key="2.25.1",
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", outbox_id=3, kind="SEG")
    assert m["EventID"] == {"csd-code": "110104", "codeSystemName": "DCM",
                            "originalText": "DICOM Instances Transferred"}
    assert m["EventActionCode"] == "C" and m["EventOutcomeIndicator"] == 0
    assert m["EventDateTime"].endswith("Z")
    source, dest = m["ActiveParticipant"]
    assert source["UserID"] == "DICOMNODE" and source["UserIsRequestor"] is True
    assert source["AlternativeUserID"] == "AETITLES=DICOMNODE"
    assert source["RoleIDCode"]["csd-code"] == "110153"
    assert dest["AlternativeUserID"] == "AETITLES=ORTHANC" and dest["UserIsRequestor"] is False
    assert dest["NetworkAccessPointID"] == "10.0.0.5" and dest["NetworkAccessPointTypeCode"] == "2"
    assert dest["RoleIDCode"]["csd-code"] == "110152"
    [obj] = m["ParticipantObjectIdentification"]
    assert obj["ParticipantObjectID"] == "2.25.1"
    assert (obj["ParticipantObjectTypeCode"], obj["ParticipantObjectTypeCodeRole"]) == (2, 3)
    assert obj["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert m["Detail"] == {"outbox_id": 3, "kind": "SEG"}
    assert m["AuditSourceIdentification"]["AuditSourceID"]

    d = audit_message("deidentified", study_key="2.25.1", patient_key="PABC", lifecycle=7)
    study, patient = d["ParticipantObjectIdentification"]
    assert study["ParticipantObjectDataLifeCycle"] == 7
    assert (patient["ParticipantObjectTypeCode"], patient["ParticipantObjectTypeCodeRole"]) == (
        1, 1)
    assert audit_message("model_promoted", model="m", version="2")["EventTypeCode"][0][
        "csd-code"] == "110131"
    assert audit_message("whatever")["EventID"]["csd-code"] == "unknown"
    assert set(EVENTS) >= {"association_accepted", "association_rejected", "deidentified",
                           "vault_read", "reidentified", "result_sent", "model_promoted",
                           "config_loaded"}


def test_audit_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    audit("vault_read", outcome="not a number", subject=object())
    [line] = _audit(caplog)
    assert line["event"] == "vault_read" and line["EventOutcomeIndicator"] == 8


def test_associations_are_counted_and_audited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    before = _value("dicomnode_associations_total", event="rejected")
    for name in ("EVT_ACCEPTED", "EVT_REJECTED"):
        event = SimpleNamespace(
            event=SimpleNamespace(name=name),
            assoc=SimpleNamespace(
                requestor=SimpleNamespace(ae_title="MODALITY1", address="192.0.2.7", port=4000),
                acceptor=SimpleNamespace(ae_title="DICOMNODE")))
        handle_assoc_event(event)  # type: ignore[arg-type]
    assert _value("dicomnode_associations_total", event="rejected") == before + 1
    accepted, rejected = _audit(caplog)
    assert accepted["event"] == "association_accepted" and accepted["EventOutcomeIndicator"] == 0
    assert rejected["event"] == "association_rejected" and rejected["EventOutcomeIndicator"] == 4
    p = rejected["ActiveParticipant"][0]
    assert (p["UserID"], p["NetworkAccessPointID"]) == ("MODALITY1", "192.0.2.7")
    assert rejected["EventID"]["csd-code"] == "110114"
    assert rejected["Detail"]["called_ae"] == "DICOMNODE"


def test_cstore_outcomes_are_counted_by_status() -> None:
    class Refusing:
        def ingest(self, *a: Any, **k: Any) -> None:
            raise DatasetError("SOPInstanceUID missing", status=0xC220)

    class Storing:
        def ingest(self, *a: Any, **k: Any) -> None:
            return None

    event = SimpleNamespace(
        request=SimpleNamespace(AffectedSOPClassUID="1.2", AffectedSOPInstanceUID="1.2.3"),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="")),
        encoded_dataset=lambda include_meta=False: b"",
        context=SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1"))
    rejected = _value("dicomnode_instances_rejected_total", status="0xC220")
    received = _value("dicomnode_instances_received_total")
    assert handle_store(event, Refusing()) == 0xC220  # type: ignore[arg-type]
    assert handle_store(event, Storing()) == 0  # type: ignore[arg-type]
    assert _value("dicomnode_instances_rejected_total", status="0xC220") == rejected + 1
    assert _value("dicomnode_instances_received_total") == received + 1


def test_vault_reads_are_audited_and_counted(node_data: NodeData,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    vault = node_data.node.ctx.vault
    assert vault is not None
    key = node_data.node.index.study(node_data.study_id).study_key  # type: ignore[union-attr]
    before = _value("dicomnode_vault_reads_total", actor="operator")
    with vault.reader("operator:alice", "vault show", key) as r:
        assert r.identity(key) is not None
    assert _value("dicomnode_vault_reads_total", actor="operator") == before + 1
    [line] = [a for a in _audit(caplog) if a["event"] == "vault_read"]
    assert line["ActiveParticipant"][0]["UserID"] == "operator:alice"
    assert line["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == key
    assert line["Detail"] == {"purpose": "vault show", "reads": 1}
    for marker in node_data.markers:
        assert marker not in json.dumps(line)


SCRIPT = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    from dicomnode.logsetup import configure_logging
    from dicomnode.audit import audit
    from dicomnode.errors import StorageError
    configure_logging("INFO", json_logs=True, audit_path=Path(sys.argv[1]))
    configure_logging("INFO", json_logs=True, audit_path=Path(sys.argv[1]))  # idempotent
    log = logging.getLogger("dicomnode.test")
    log.info("study %d complete", 7, extra={"study_key": "2.25.9"})
    try:
        raise ValueError("Phimarkfamily^Phimarkgiven")
    except ValueError:
        log.exception("third-party failure")
    try:
        raise StorageError("disk full under spool/")
    except StorageError:
        log.exception("our failure")
    logging.getLogger("pynetdicom").info("hidden")
    audit("config_loaded", config_digest="abc", source="node.toml")
""")


def test_json_logs_and_audit_file(tmp_path: Path) -> None:
    audit_path = tmp_path / "audit" / "audit.jsonl"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(audit_path)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(ln) for ln in res.stderr.splitlines()]
    assert len(lines) == 3  # one handler despite two calls; pynetdicom's INFO is off
    first, third_party, ours = lines
    assert first["msg"] == "study 7 complete" and first["study_key"] == "2.25.9"
    assert first["level"] == "INFO" and first["logger"] == "dicomnode.test"
    assert first["ts"].endswith("Z")
    assert third_party["exc"]["type"] == "ValueError"
    assert "withheld" in third_party["exc"]["message"] and "in <module>" in \
        third_party["exc"]["stack"]
    assert "Phimark" not in res.stderr
    assert ours["exc"]["message"] == "disk full under spool/"
    assert audit_path.stat().st_mode & 0o777 == 0o600
    [audit_line] = [json.loads(ln) for ln in audit_path.read_text().splitlines()]
    assert audit_line["event"] == "config_loaded" and audit_line["EventID"]["csd-code"] == \
        "110113"
    assert audit_line["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == "abc"


def test_audit_lines_join_the_json_log_without_an_audit_file() -> None:
    script = ("from dicomnode.logsetup import configure_logging\n"
              "from dicomnode.audit import audit\n"
              "configure_logging('INFO', json_logs=True, audit_path=None)\n"
              "audit('model_promoted', model='m', version='2', reason='gate')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    [line] = [json.loads(ln) for ln in res.stderr.splitlines()]
    assert line["logger"] == "dicomnode.audit" and "msg" not in line
    assert line["audit"]["event"] == "model_promoted"
    assert line["audit"]["Detail"] == {"reason": "gate"}

"""Rules of destinations and STOW-RS that need no peer: configuration, the ORU builder's
refusals, the admission gate answered as 503 with Retry-After."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import httpx
import pytest
from dwpeers import write_secret

from dicomnode.api import ApiServer, ApiServices, create_api
from dicomnode.app import create_node
from dicomnode.config import NodeSettings
from dicomnode.dicom.phantom import make_ct_study
from dicomnode.errors import ConfigError
from dicomnode.pipeline.dicomweb import encode_multipart
from dicomnode.pipeline.hl7 import Notification, Observation, build_oru


def settings(**kw: object) -> NodeSettings:
    from dicomnode.config import load_settings

    return load_settings(None, kw)


def test_destination_transports_are_checked_at_load(tmp_path: Path) -> None:
    ok = settings(peers={"ris": {"transport": "hl7", "host": "h", "port": 2575},
                         "web": {"transport": "dicomweb", "url": "https://a.example/dw"},
                         "pacs": {"ae_title": "PACS", "host": "h", "port": 104}},
                  results={"destinations": ["ris", "web", "pacs"]})
    assert ok.peers["ris"].result_kinds == ("notification",)
    assert ok.peers["web"].result_kinds == ("SEG", "SR", "PM", "KEY")  # every image kind
    assert ok.allowed_calling_aes() == ["PACS"]
    bad = [
        ({"p": {"host": "h", "port": 1}}, "ae_title is required"),
        ({"p": {"transport": "dicomweb"}}, "url is needed"),
        ({"p": {"transport": "hl7", "host": "h"}}, "host and port"),
        ({"p": {"transport": "hl7", "host": "h", "port": 1, "kinds": ["SEG"]}},
         "notification"),
        ({"p": {"ae_title": "P", "host": "h", "port": 1, "kinds": ["notification"]}},
         "notifications go to"),
        ({"p": {"transport": "dicomweb", "url": "ftp://x"}}, "http"),
        ({"p": {"transport": "dicomweb", "url": "https://x",
                "credentials": {"token_file": str(tmp_path / "missing")}}}, "no such file"),
        ({"p": {"transport": "dicomweb", "url": "https://x",
                "credentials": {"username": "u"}}}, "password_file"),
    ]
    for peers, message in bad:
        with pytest.raises(ConfigError, match=message):
            settings(peers=peers, results={"destinations": ["p"]})


def _notification(**kw: object) -> Notification:
    base: dict[str, object] = {
        "control_id": "DN1", "sending_application": "DICOMNODE", "sending_facility": None,
        "receiving_application": "RIS", "receiving_facility": None, "patient_id": "ID|1^x",
        "issuer_of_patient_id": None, "patient_name": "Doe^Jane^^Dr",
        "patient_birth_date": None, "patient_sex": "F", "accession_number": "A1",
        "placer_order_number": None, "filler_order_number": None, "priority": "ASAP",
        "observations": (Observation(("1", "Lesion", "SCT"), False, "m", "1"),),
        "observed_at": dt.datetime(2026, 1, 2, 3, 4, 5),
    }
    return Notification(**{**base, **kw})  # type: ignore[arg-type]


def test_oru_escapes_delimiters_and_refuses_what_a_worklist_cannot_match() -> None:
    text = build_oru(_notification())
    pid = next(seg for seg in text.split("\r") if seg.startswith("PID"))
    assert pid.split("|")[3] == "ID\\F\\1\\S\\x"  # HL7 escapes, no field split
    assert pid.split("|")[5] == "Doe^Jane^^^Dr"  # DICOM PN prefix -> XPN prefix
    assert "TQ1|1||||||||A^ASAP^HL70485" in text
    with pytest.raises(ValueError, match="PatientID"):
        build_oru(_notification(patient_id=""))
    with pytest.raises(ValueError, match="order"):
        build_oru(_notification(accession_number=None))
    with pytest.raises(ValueError, match="priority"):
        build_oru(_notification(priority="URGENT"))


def test_stow_rs_answers_503_with_retry_after_while_the_gate_is_closed(tmp_path: Path) -> None:
    pw = write_secret(tmp_path / "p.password", "peer-password-1234")
    s = settings(data_dir=str(tmp_path / "data"), routing={"rules": []},
                 api={"host": "127.0.0.1", "port": 0},
                 peers={"p": {"ae_title": "PEER", "stow_credentials": {
                     "username": "peer", "password_file": str(pw)}}})
    node = create_node(s)
    ds = make_ct_study(seed=1530, n_slices=1, rows=16, columns=16).datasets[0]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body, ct = encode_multipart([buf.getvalue()])
    try:
        for gate, expected in ((lambda: 42.4, 503), (lambda: None, 200)):
            svc = ApiServices.from_context(node.ctx, node.sessions, node.ingestor, gate)
            server = ApiServer(create_api(svc, s.api), "127.0.0.1", 0)
            server.start()
            try:
                r = httpx.post(f"http://127.0.0.1:{server.port}/dicom-web/studies",
                               content=body, headers={"Content-Type": ct},
                               auth=("peer", "peer-password-1234"), timeout=30)
            finally:
                server.stop()
            assert r.status_code == expected
            if expected == 503:
                assert r.headers["retry-after"] == "42"
                assert node.index.stored_paths() == set()
        assert len(node.index.stored_paths()) == 1
    finally:
        node.engine.dispose()
        node.files.close()

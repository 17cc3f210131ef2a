"""TLS associations, and bad peers that must not disturb a concurrent good sender."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from nodeutil import NodeProcess, echoscu, free_port, make_pki, storescu, wait_for
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification


def test_tls_association_with_dcmtk(tmp_path: Path, ct50_files: list[Path]) -> None:
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    config = {"scp": {"tls": {"mode": "separate", "port": tls_port, "cert_file": pki["server_crt"],
                              "key_file": pki["server_key"], "ca_file": pki["ca"]}}}
    with NodeProcess(tmp_path / "node", config) as node:
        tls = ["+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca"])]
        res = storescu(tls_port, ct50_files[:5], *tls)
        assert res.returncode == 0, res.stderr + res.stdout
        assert node.studies()[0]["instances"] == 5
        # a plain client cannot talk to the TLS port
        plain = echoscu(tls_port)
        assert plain.returncode != 0
        # a TLS client without a certificate is refused (client certificates required)
        anon = echoscu(tls_port, "+tla", "+cf", str(pki["ca"]))
        assert anon.returncode != 0
        # the plain port still serves
        assert echoscu(node.port).returncode == 0


def test_tls_only_replaces_plain(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = {"scp": {"tls": {"mode": "only", "cert_file": pki["server_crt"],
                              "key_file": pki["server_key"], "ca_file": pki["ca"]}}}
    with NodeProcess(tmp_path / "node", config) as node:
        assert echoscu(node.port).returncode != 0
        tls = ["+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca"])]
        assert echoscu(node.port, *tls).returncode == 0


def _store_raw_file(port: int, path: Path) -> int | None:
    """C-STORE a file's bytes as they are (pynetdicom's chunked mode does not parse them)."""
    ae = AE(ae_title="BADSCU")
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture
def good_sender(tmp_path: Path, ct50_files: list[Path]):
    """A node plus a well-behaved storescu sending 50 instances while the test misbehaves."""
    node = NodeProcess(tmp_path / "node").start()
    result: dict[str, object] = {}

    def send() -> None:
        time.sleep(0.3)
        result["res"] = storescu(node.port, ct50_files)

    t = threading.Thread(target=send)
    t.start()
    yield node
    t.join(120)
    res = result["res"]
    assert res.returncode == 0, res.stderr  # type: ignore[attr-defined]
    counts = {s["instances"] for s in node.studies()}
    assert 50 in counts, "the good sender's study must be complete in the index"
    assert echoscu(node.port).returncode == 0  # and the node still serves
    node.stop()


def test_truncated_and_unreadable_datasets_get_failure_status(
    good_sender: NodeProcess, tmp_path: Path, ct50_files: list[Path], monkeypatch
) -> None:
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = good_sender
    raw = ct50_files[0].read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) - 1000])
    assert _store_raw_file(node.port, truncated) == 0xC210

    garbage = tmp_path / "garbage.dcm"
    ds = dcmread(ct50_files[1])
    ds.save_as(garbage, enforce_file_format=True)
    body = garbage.read_bytes()
    meta_end = body.index(b"\x08\x00\x05\x00")  # first dataset element (SpecificCharacterSet)
    garbage.write_bytes(body[:meta_end] + bytes(range(256)) * 40)
    assert _store_raw_file(node.port, garbage) == 0xC210

    no_study = tmp_path / "nostudy.dcm"
    ds = dcmread(ct50_files[2])
    del ds.StudyInstanceUID
    ds.save_as(no_study, enforce_file_format=True)
    assert _store_raw_file(node.port, no_study) == 0xC220

    wrong_class = tmp_path / "wrongclass.dcm"
    ds = dcmread(ct50_files[3])
    ds.SOPClassUID = MRImageStorage  # the dataset says MR, the request (file meta) says CT
    ds.save_as(wrong_class, enforce_file_format=False)
    assert dcmread(wrong_class).file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert _store_raw_file(node.port, wrong_class) == 0xA900


def test_garbage_in_p_data_aborts_only_that_association(good_sender: NodeProcess) -> None:
    node = good_sender
    ae = AE(ae_title="BADSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    cx_id = assoc.accepted_contexts[0].context_id
    junk = bytes((i * 37 + 11) % 256 for i in range(300))
    pdv = struct.pack(">IBB", len(junk) + 2, cx_id, 0x03) + junk  # command, last fragment
    pdu = struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv
    assoc.dul.socket.socket.sendall(pdu)
    wait_for(lambda: not assoc.is_established, 30)
    assert assoc.is_aborted or not assoc.is_alive()


def test_http_on_the_dicom_port_is_aborted(good_sender: NodeProcess) -> None:
    node = good_sender
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\n\r\n")
        data = s.recv(10)
    # answered at once with an A-ABORT PDU (type 0x07, PS3.8 9.3.8), never with HTTP;
    # pynetdicom then waits for the peer to close (ARTIM) as the state machine says
    assert data[:1] == b"\x07" and len(data) == 10

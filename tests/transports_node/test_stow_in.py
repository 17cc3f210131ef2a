"""STOW-RS in: Orthanc's DICOMweb client and dicomweb-client push studies to the node.

Each instance must take the same durable path as over C-STORE (indexed, then
de-identified byte for byte as over C-STORE), and a bad body must be answered with
the right status and leave nothing half-written.
"""

from __future__ import annotations

import io
import socket
import sqlite3
from pathlib import Path

import httpx
import pytest
from dwpeers import (
    PEER_PASSWORD,
    PEER_USER,
    orthanc_client,
    start_dicomweb_orthanc,
    stow_node,
    stow_url,
)
from nodeutil import NodeProcess, storescu, wait_for, write_study
from pydicom import dcmread

from dicomnode.dicom.phantom import make_ct_study
from dicomnode.pipeline.dicomweb import encode_multipart

AUTH = (PEER_USER, PEER_PASSWORD)


def rows(node: NodeProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def deidentified(node: NodeProcess) -> dict[str, bytes]:
    """De-identified archive files by their pseudonymous path (less the random suffix that
    makes each write a new file)."""
    return {p.relative_to(node.data_dir).parent.as_posix() + "/" + p.name.split(".")[-3]
            + "." + p.name.split(".")[-4]: p.read_bytes()
            for p in (node.data_dir / "archive").rglob("*.dcm")}


def nothing_half_written(node: NodeProcess) -> None:
    """Every file the node keeps is indexed, and no partial write is left."""
    indexed = {p for (p,) in rows(node, "select path from instance")}
    on_disk = {p.relative_to(node.data_dir).as_posix()
               for sub in ("spool", "archive") for p in (node.data_dir / sub).rglob("*.dcm")}
    assert on_disk == indexed
    tmp = node.data_dir / "tmp"
    leftovers = [p for p in tmp.rglob("*") if p.is_file() and p.stat().st_size > 0] \
        if tmp.is_dir() else []
    assert leftovers == []


def part10(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def post(node: NodeProcess, body: bytes, content_type: str, **kw) -> httpx.Response:
    return httpx.post(f"{stow_url(node)}/studies", content=body, auth=AUTH, timeout=60,
                      headers={"Content-Type": content_type, **kw.pop("headers", {})}, **kw)


def test_orthanc_pushes_a_study_deidentified_exactly_as_over_c_store(tmp_path: Path) -> None:
    study = make_ct_study(seed=1501, n_slices=12, rows=64, columns=64, patient_id="PAT-STOW-1",
                          patient_name="Stowfam^Ann", accession_number="ACC-STOW-1")
    files = write_study(study, tmp_path / "src")
    over_dimse = stow_node(tmp_path / "dimse").start()
    over_stow = stow_node(tmp_path / "stow").start()
    orthanc = start_dicomweb_orthanc(tmp_path / "orthanc", servers={
        "node": {"Url": stow_url(over_stow) + "/", "Username": PEER_USER,
                 "Password": PEER_PASSWORD}})
    try:
        assert storescu(over_dimse.port, files).returncode == 0
        with orthanc_client(orthanc) as o:
            for f in files:
                assert o.post("/instances", content=f.read_bytes()).status_code == 200
            [orthanc_study] = o.get("/studies").json()
            r = o.post("/dicom-web/servers/node/stow", json={"Resources": [orthanc_study]})
            assert r.status_code == 200, r.text
        for node in (over_dimse, over_stow):
            wait_for(lambda n=node: rows(n, "select count(*) from instance "
                                            "where state = 'deidentified'")[0][0] == 12, 60)
        a, b = deidentified(over_dimse), deidentified(over_stow)
        assert len(a) == 12 and a == b  # the same bytes under the same pseudonymous paths
        assert rows(over_stow, "select distinct calling_ae from instance") == [("ORTHANC",)]
        for data in b.values():
            assert b"PAT-STOW-1" not in data and b"Stowfam" not in data
        nothing_half_written(over_stow)
    finally:
        orthanc.stop()
        over_dimse.stop()
        over_stow.stop()


def test_dicomweb_client_stores_and_reads_the_per_instance_answer(tmp_path: Path) -> None:
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_auth
    from requests.auth import HTTPBasicAuth
    from requests.exceptions import HTTPError

    study = make_ct_study(seed=1502, n_slices=6, rows=32, columns=32, patient_id="PAT-STOW-2")
    with stow_node(tmp_path / "node") as node:
        client = DICOMwebClient(stow_url(node),
                                session=create_session_from_auth(HTTPBasicAuth(*AUTH)))
        answer = client.store_instances(list(study.datasets))
        stored = {str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence}
        assert stored == {str(ds.SOPInstanceUID) for ds in study.datasets}
        assert "FailedSOPSequence" not in answer
        assert rows(node, "select count(*) from instance")[0][0] == 6
        # the same instances again: idempotent, still success, nothing new kept
        again = client.store_instances(list(study.datasets))
        assert len(again.ReferencedSOPSequence) == 6
        assert rows(node, "select count(*) from instance")[0][0] == 6
        wrong = DICOMwebClient(stow_url(node), session=create_session_from_auth(
            HTTPBasicAuth(PEER_USER, "not-the-password")))
        with pytest.raises(HTTPError) as err:
            wrong.store_instances(list(study.datasets[:1]))
        assert err.value.response.status_code == 401
        # the XML answer of PS3.19 when the client asks for it
        body, ct = encode_multipart([part10(study.datasets[0])])
        xml = post(node, body, ct, headers={"Accept": "application/dicom+xml"})
        assert xml.status_code == 200 and xml.headers["content-type"] == "application/dicom+xml"
        assert 'keyword="ReferencedSOPSequence"' in xml.text
        wait_for(lambda: rows(node, "select count(*) from instance "
                                    "where state = 'deidentified'")[0][0] == 6, 60)
        nothing_half_written(node)
    assert "PAT-STOW-2" not in node.log_text()


def test_bad_bodies_get_the_right_status_and_leave_nothing_half_written(tmp_path: Path) -> None:
    study = make_ct_study(seed=1503, n_slices=4, rows=32, columns=32, patient_id="PAT-STOW-3")
    good = [part10(ds) for ds in study.datasets]
    with stow_node(tmp_path / "node") as node:
        # not multipart/related of DICOM
        assert post(node, good[0], "application/dicom").status_code == 415
        assert post(node, b"{}", 'multipart/related; type="application/dicom+json"; '
                                 'boundary="b"').status_code == 415
        # malformed multipart: no boundary; no delimiter at all; bad part headers
        assert post(node, good[0], 'multipart/related; type="application/dicom"'
                    ).status_code == 400
        r = post(node, b"garbage " * 100, 'multipart/related; type="application/dicom"; '
                                          'boundary="xyz"')
        assert r.status_code == 400
        r = post(node, b"--xyz\r\nno header line\r\n\r\nDICM\r\n--xyz--\r\n",
                 'multipart/related; type="application/dicom"; boundary="xyz"')
        assert r.status_code == 400
        assert rows(node, "select count(*) from instance")[0][0] == 0
        # a non-DICOM part alone: 409 with its failure reason; beside a good one: 202
        body, ct = encode_multipart([b"\0" * 128 + b"this is not DICOM"])
        r = post(node, body, ct)
        assert r.status_code == 409
        assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC210]
        body, ct = encode_multipart([good[0], b"plain text, not a DICOM file"])
        r = post(node, body, ct)
        assert r.status_code == 202
        answer = r.json()
        assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] \
            == [str(study.datasets[0].SOPInstanceUID)]
        assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC210]
        assert rows(node, "select count(*) from instance")[0][0] == 1
        # a DICOM part cut short inside: the dataset is truncated -> 0xC210, not stored
        body, ct = encode_multipart([good[1][: len(good[1]) // 2]])
        r = post(node, body, ct)
        assert r.status_code == 409
        assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC210]
        # a truncated upload: the body stops inside the third part (no closing delimiter)
        body, ct = encode_multipart(good[1:4])
        cut = body[: body.index(good[3]) + len(good[3]) // 2]
        r = post(node, cut, ct)
        assert r.status_code == 400
        assert len(r.json()["00081199"]["Value"]) == 2  # the two whole parts before it
        assert rows(node, "select count(*) from instance")[0][0] == 3
        # a client that leaves mid-body: the cut part is never stored
        body, ct = encode_multipart([good[3]])
        port = node.config["api"]["port"]
        with socket.create_connection(("127.0.0.1", port)) as s:
            head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\n"
                    f"Content-Length: {len(body)}\r\nAuthorization: "
                    f"Basic {httpx.BasicAuth(*AUTH)._auth_header}\r\n\r\n")
            s.sendall(head.replace("Basic Basic ", "Basic ").encode() + body[: len(body) // 2])
        wait_for(lambda: "client left mid-body" in node.log_text(), 30)
        assert rows(node, "select count(*) from instance")[0][0] == 3
        # credentials: none, wrong; a known peer is still served afterwards
        assert httpx.post(f"{stow_url(node)}/studies", content=body,
                          headers={"Content-Type": ct}).status_code == 401
        assert httpx.post(f"{stow_url(node)}/studies", content=body, auth=(PEER_USER, "x"),
                          headers={"Content-Type": ct}).status_code == 401
        assert post(node, body, ct).status_code == 200
        wait_for(lambda: rows(node, "select count(*) from instance "
                                    "where state = 'deidentified'")[0][0] == 4, 60)
        nothing_half_written(node)
        assert {ds.PatientID for ds in map(dcmread, (node.data_dir / "archive").rglob("*.dcm"))} \
            != {"PAT-STOW-3"}

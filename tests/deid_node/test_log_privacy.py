"""Third-party warnings never carry values into logs (issue 16).

pydicom and pynetdicom warnings quote the offending value ("Invalid value for VR IS:
'...'", "Unknown encoding '...'"). A canary planted in malformed attributes is sent
over C-STORE (dcmtk storescu) and STOW-RS to a running node at DEBUG level, and fed to
the offline ``dicomnode deid``; every log line, audit line and API response is grepped
for it, and so is everything the node stores and the CLI writes (a kept attribute whose
value breaks its VR's grammar is not kept: ``test_malformed_values.py``). The same
malformed attributes must still produce the warnings (their kind
stays), or the test would pass for want of a warning.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
from nodeutil import NodeProcess, free_port, storescu, wait_for
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from dicomnode.dicom.phantom import make_ct_study
from dicomnode.logsetup import scrub_message
from dicomnode.pipeline.dicomweb import encode_multipart

CANARY = "CANARYq7Zx"
TOKEN = "log-privacy-test-token-0123456789"
PEER_USER, PEER_PASSWORD = "stowpeer", "stow-secret-of-the-peer"


def malformed(seed: int) -> Dataset:
    """A CT slice whose attributes carry the canary in values their VR forbids."""
    ds = make_ct_study(seed=seed, n_slices=1, rows=16, columns=16, n_lesions=0,
                       n_vessels=0, patient_id=f"PAT-LOGPRIV-{seed}").datasets[0]
    ds.SOPInstanceUID = generate_uid()

    def raw(tag: int, vr: str, value: str) -> None:
        t = Tag(tag)
        ds[t] = RawDataElement(t, vr, len(value), value.encode(), 0, False, True)

    raw(0x00080005, "CS", f"{CANARY}1")  # Specific Character Set: unknown encoding
    raw(0x00080020, "DA", f"{CANARY}2")  # Study Date
    raw(0x00180050, "DS", f"{CANARY}3")  # Slice Thickness
    raw(0x00200013, "IS", f"{CANARY}4X")  # Instance Number
    raw(0x00081030, "LO", f"{CANARY}5" * 8)  # Study Description, too long for LO
    raw(0x00100010, "PN", f"{CANARY}6^" + "x" * 70)  # Patient's Name, component too long
    return ds


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # pydicom warns here too, on purpose
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _write_secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def test_scrub_keeps_kind_and_keyword_and_drops_values() -> None:
    assert scrub_message(f"Invalid value for VR IS: '{CANARY}'. Please see <url>") == \
        "Invalid value for VR IS: <value>. Please see <url>"
    assert scrub_message(f"Unknown encoding '{CANARY}' - using default encoding instead") == \
        "Unknown encoding <value> - using default encoding instead"
    assert scrub_message("The (0010,0010) 'Patient's Name' value is 'Doe^John'") == \
        "The (0010,0010) [PatientName] 'Patient's Name' value is <value>"
    assert scrub_message(f'Value "{CANARY}" is not valid for elements with a VR of DS') == \
        "Value <value> is not valid for elements with a VR of DS"
    assert scrub_message("Unknown Move Destination: HOSPITALPACS") == \
        "Unknown Move Destination: <value>"
    for value in ("1.2.840.113619.2.55.3.1234", "19570214", "Doe^John", "a@b.org"):
        assert value not in scrub_message(f"bad element {value} seen")
    kept = "The value length (70) exceeds the maximum length of 64 allowed for VR LO."
    assert scrub_message(kept) == kept
    assert scrub_message("Transfer Syntax 'Implicit VR Little Endian' used") == \
        "Transfer Syntax 'Implicit VR Little Endian' used"


def test_canary_over_c_store_and_stow_rs_never_logged(tmp_path: Path) -> None:
    api_port = free_port()
    pw = _write_secret(tmp_path / "secrets" / "peer.password", PEER_PASSWORD)
    node = NodeProcess(tmp_path / "node", {
        "log_level": "DEBUG",
        "api": {"enabled": True, "host": "127.0.0.1", "port": api_port, "token": TOKEN},
        "deid": {"secret": "a-fixed-test-secret-of-at-least-32-chars!"},
        "peers": {"stowpeer": {"ae_title": "STOWPEER", "transport": "dicomweb",
                               "stow_credentials": {"username": PEER_USER,
                                                    "password_file": str(pw)}}},
        "routing": {"rules": []},
    })
    src = tmp_path / "c-store.dcm"
    src.write_bytes(part10(malformed(1601)))
    responses: list[bytes] = []
    with node:
        sent = storescu(node.port, [src])
        assert sent.returncode == 0, sent.stderr
        body, ctype = encode_multipart([part10(malformed(1602))])
        r = httpx.post(f"http://127.0.0.1:{api_port}/dicom-web/studies", content=body,
                       auth=(PEER_USER, PEER_PASSWORD), timeout=60,
                       headers={"Content-Type": ctype})
        assert r.status_code in (200, 202, 409), r.text
        responses.append(r.content)

        def settled() -> bool:
            con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True)
            try:
                (n,) = con.execute("select count(*) from instance "
                                   "where state != 'received'").fetchone()
            finally:
                con.close()
            return n >= 2

        wait_for(settled, 60)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers=headers) as c:
            studies = c.get("/api/studies")
            assert studies.status_code == 200
            responses.append(studies.content)
            for study in studies.json()["items"]:
                responses.append(c.get(f"/api/studies/{study['id']}").content)
            for path in ("/api/quarantine", "/api/jobs", "/api/outbox", "/metrics"):
                responses.append(c.get(path).content)
    log = node.log_path.read_bytes()
    audit = (node.data_dir / "audit.jsonl").read_bytes()
    # and what the node keeps: files (the vault rows are encrypted), the database dump
    stored = bytearray()
    for f in sorted(node.data_dir.rglob("*")):
        if f.is_file() and "keys" not in f.parts and not f.name.startswith("dicomnode.db"):
            stored += f.read_bytes()
    con = sqlite3.connect(node.data_dir / "dicomnode.db")
    try:
        stored += "\n".join(con.iterdump()).encode()
    finally:
        con.close()

    # the malformed values did make pydicom complain (kind kept, value dropped)
    assert b"Unknown encoding <value>" in log
    assert b"<value>" in log
    for name, blob in [("node log", log), ("audit trail", audit), ("stored data", stored)] + [
        (f"API response {i}", b) for i, b in enumerate(responses)
    ]:
        assert CANARY.encode() not in blob, f"canary in the {name}"
    for line in audit.splitlines():
        json.loads(line)  # still one JSON object per line


def test_canary_through_the_offline_cli_never_printed(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "malformed.dcm").write_bytes(part10(malformed(1603)))
    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{data}"\n[deid]\nsecret = '
                      '"a-fixed-test-secret-of-at-least-32-chars!"\n')
    res = subprocess.run(
        [sys.executable, "-W", "always", "-m", "dicomnode", "deid", str(src), "--out",
         str(tmp_path / "out"), "--config", str(config)],
        capture_output=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    printed = res.stdout + res.stderr
    assert b"Unknown encoding <value>" in printed  # the warning came, without its value
    assert CANARY.encode() not in printed
    for f in (tmp_path / "out").glob("*.dcm"):
        assert CANARY.encode() not in f.read_bytes()
    assert list((tmp_path / "out").glob("*.dcm"))

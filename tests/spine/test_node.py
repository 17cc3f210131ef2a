"""The node as a real process, driven by dcmtk over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nodeutil import (
    DCMTK_ENV,
    STORESCU,
    NodeProcess,
    dataset_bytes,
    echoscu,
    storescu,
    wait_for,
    write_study,
)
from pydicom import dcmread

from dicomnode.dicom.phantom import make_ct_study
from dicomnode.dicom.pseudonym import Pseudonymizer


def db_rows(node: NodeProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def pseudonymizer(node: NodeProcess) -> Pseudonymizer:
    return Pseudonymizer((node.data_dir / "keys" / "node.key").read_bytes().strip())


def test_echo_store_50_and_complete_once(tmp_path: Path, ct50_files: list[Path]) -> None:
    with NodeProcess(tmp_path) as node:
        res = echoscu(node.port)
        assert res.returncode == 0, res.stderr
        t0 = time.monotonic()
        res = storescu(node.port, ct50_files)
        assert res.returncode == 0, res.stderr + res.stdout
        [study] = node.studies()
        assert (study["series"], study["instances"]) == (1, 50)
        assert study["modalities"] == ["CT"]
        done = wait_for(lambda: [s for s in node.studies() if s["hooked_version"] == 1], 30)
        assert time.monotonic() - t0 >= 2.0  # not before the quiet period
        assert done[0]["state"] == "complete" and done[0]["completed_reason"] == "quiet-period"
        time.sleep(1.5)  # several more completion checks: nothing fires again
        jobs = db_rows(node, "select status, count(*) from job where task = 'study_complete' "
                             "group by status")
        assert jobs == [("done", 1)]
        # the identified spool is emptied once each de-identified copy is durable
        assert list((node.data_dir / "spool").rglob("*.dcm")) == []
        files = list((node.data_dir / "archive").rglob("*.dcm"))
        assert len(files) == 50
        sent_uid = str(dcmread(ct50_files[0]).StudyInstanceUID)
        assert study["study_key"] == pseudonymizer(node).uid(sent_uid) != sent_uid
        assert all(sent_uid not in str(f) for f in files)
        assert {str(dcmread(f).StudyInstanceUID) for f in files} == {study["study_key"]}
    assert node.proc is not None and node.proc.returncode == 0


def _compress(src: Path, dst: Path, how: str) -> None:
    if how == "j2k":  # dcmtk 3.6.7 has no JPEG 2000 encoder; pydicom's openjpeg plugin does
        from pydicom.uid import JPEG2000Lossless

        ds = dcmread(src)
        ds.compress(JPEG2000Lossless)
        ds.save_as(dst, enforce_file_format=True)
        return
    tool = {
        "jls": ["/usr/bin/dcmcjpls"],
        "rle": ["/usr/bin/dcmcrle"],
        "jpeg-lossless": ["/usr/bin/dcmcjpeg", "+e1"],
        "jpeg-extended": ["/usr/bin/dcmcjpeg", "+ee"],
        "deflated": ["/usr/bin/dcmconv", "+td"],
    }[how]
    subprocess.run([*tool, str(src), str(dst)], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("how", "propose", "ts"),
    [
        ("jls", "-xt", "1.2.840.10008.1.2.4.80"),
        ("j2k", "-xv", "1.2.840.10008.1.2.4.90"),
        ("rle", "-xr", "1.2.840.10008.1.2.5"),
        ("jpeg-lossless", "-xs", "1.2.840.10008.1.2.4.70"),
        ("jpeg-extended", "-xx", "1.2.840.10008.1.2.4.51"),
        ("deflated", "-xd", "1.2.840.10008.1.2.1.99"),
    ],
)
def test_compressed_objects_stored_byte_identical(
    tmp_path: Path, ct50_files: list[Path], how: str, propose: str, ts: str
) -> None:
    sources = []
    for i, f in enumerate(ct50_files[:3]):
        dst = tmp_path / f"{how}{i}.dcm"
        _compress(f, dst, how)
        assert str(dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
        sources.append(dst)
    with NodeProcess(tmp_path / "node", {"deid": {"spool_retention_s": 3600.0}}) as node:
        res = storescu(node.port, sources, propose)
        assert res.returncode == 0, res.stderr + res.stdout
        p = pseudonymizer(node)
        wait_for(lambda: not db_rows(node, "select id from instance where state = 'received'"), 30)
        for src in sources:
            ds = dcmread(src)
            # the de-identified copy keeps the pixel data bytes: no transcoding anywhere
            [archived] = (node.data_dir / "archive").rglob(f"{p.uid(ds.SOPInstanceUID)}.*.dcm")
            clean = dcmread(archived)
            assert str(clean.file_meta.TransferSyntaxUID) == ts
            assert clean.PixelData == ds.PixelData
            [stored] = (node.data_dir / "spool").rglob(f"{p.uid(ds.SOPInstanceUID)}.*.dcm")
            assert str(dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
            if how == "deflated":
                # PS3.5 A.5: a deflated stream of odd length travels with one pad byte
                # (dcmconv's file has none); the node keeps exactly what came over the wire.
                assert dataset_bytes(stored) in (dataset_bytes(src), dataset_bytes(src) + b"\0")
            else:
                assert dataset_bytes(stored) == dataset_bytes(src)


def test_unknown_calling_ae_is_rejected(tmp_path: Path, ct50_files: list[Path]) -> None:
    config = {"scp": {"accept_any_ae": False}, "peers": {"ct": {"ae_title": "CT_SCANNER"}}}
    with NodeProcess(tmp_path, config) as node:
        assert echoscu(node.port, aet="CT_SCANNER").returncode == 0
        bad = echoscu(node.port, aet="INTRUDER")
        assert bad.returncode != 0
        assert "Rejected" in bad.stderr + bad.stdout
        res = storescu(node.port, ct50_files[:2], aet="INTRUDER")
        assert res.returncode != 0
        assert node.studies() == []
        assert "association rejected: INTRUDER" in node.log_text()


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[scp]\nport = 70000\n")
    for args in (["config", "check", str(cfg)], ["serve", "--config", str(cfg)]):
        res = subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 2
        assert res.stderr.strip().count("\n") == 0
        assert "scp.port" in res.stderr and "Traceback" not in res.stderr
    cfg.write_text("[scp]\nprot = 1\n")  # a typo is an error, not silently ignored
    res = subprocess.run([sys.executable, "-m", "dicomnode", "config", "check", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "scp.prot" in res.stderr
    res = subprocess.run([sys.executable, "-m", "dicomnode", "config", "check",
                          str(Path(__file__).parents[2] / "config" / "node.example.toml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["scp"]["port"] == 11112


def test_env_overrides_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("ae_title = 'FROMFILE'\n[scp]\nport = 4000\n")
    res = subprocess.run(
        [sys.executable, "-m", "dicomnode", "config", "check", str(cfg)],
        capture_output=True, text=True, timeout=60,
        env={**DCMTK_ENV, "DICOMNODE_SCP__PORT": "4001"},
    )
    out = json.loads(res.stdout)
    assert (out["ae_title"], out["scp"]["port"]) == ("FROMFILE", 4001)


def _acknowledged(storescu_log: str) -> list[str]:
    """Files storescu saw acknowledged with Success, from its -v log."""
    acked, current = [], None
    for line in storescu_log.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_kill_9_during_send_loses_nothing_acknowledged(tmp_path: Path) -> None:
    study = make_ct_study(n_slices=300, rows=256, columns=256, seed=300, patient_id="PAT-KILL")
    files = write_study(study, tmp_path / "src")
    node = NodeProcess(tmp_path / "node", {"deid": {"spool_retention_s": 3600.0}}).start()
    sender = subprocess.Popen(
        [STORESCU, "-v", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
         *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV,
    )
    wait_for(lambda: node.data_dir.joinpath("dicomnode.db").exists()
             and db_rows(node, "select count(*) from instance")[0][0] >= 80, 60, 0.02)
    assert node.proc is not None
    killed_pid = node.proc.pid
    node.kill()
    out, _ = sender.communicate(timeout=60)
    acked = _acknowledged(out)
    assert 0 < len(acked) < 300, "the kill should land mid-transfer"

    node.start()  # same data dir
    try:
        p = pseudonymizer(node)
        stored = {r[0]: r[1] for r in db_rows(node, "select sop_key, spool_path from instance")}
        by_key = {p.uid(dcmread(f, stop_before_pixels=True).SOPInstanceUID): Path(f) for f in files}
        for f in acked:
            key = p.uid(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            assert key in stored, f"acknowledged {f} lost"
        # nothing beyond what was acknowledged, except the one in flight whose
        # response the kill swallowed; every indexed file is whole and identical
        assert len(stored) - len(acked) <= 1
        for key, rel in stored.items():
            assert dataset_bytes(node.data_dir / rel) == dataset_bytes(by_key[key])
        # the killed process's partial writes are gone; the new one holds only its empty
        # spare files (storage/spool.py)
        assert not list((node.data_dir / "tmp").glob(f"*-{killed_pid}"))
        # (a non-empty file here is a write of the new process in flight: the restarted
        # node de-identifies at once; each such write must end, renamed away)
        in_flight = [f for f in (node.data_dir / "tmp").rglob("*")
                     if f.is_file() and f.stat().st_size > 0]
        wait_for(lambda: not any(f.exists() for f in in_flight), 30, 0.05)
        # the study still completes after the restart
        wait_for(lambda: db_rows(node, "select state, hooked_version from study")
                 == [("complete", 1)], 30)
        # and the modality's re-send of everything is accepted, duplicates idempotent
        res = storescu(node.port, files)
        assert res.returncode == 0, res.stderr
        assert db_rows(node, "select count(*) from instance")[0][0] == 300
    finally:
        node.stop()


def test_sigterm_lets_running_association_finish(tmp_path: Path) -> None:
    study = make_ct_study(n_slices=150, rows=64, columns=64, seed=7, patient_id="PAT-TERM")
    files = write_study(study, tmp_path / "src")
    node = NodeProcess(tmp_path / "node", {"scp": {"shutdown_grace_s": 30.0}}).start()
    sender = subprocess.Popen(
        [STORESCU, "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
         *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV,
    )
    wait_for(lambda: node.data_dir.joinpath("dicomnode.db").exists()
             and db_rows(node, "select count(*) from instance")[0][0] >= 20, 60, 0.02)
    assert node.stop() == 0
    out, _ = sender.communicate(timeout=60)
    assert sender.returncode == 0, out  # the running association was allowed to finish
    assert db_rows(node, "select count(*) from instance")[0][0] == 150
    assert not [f for f in (node.data_dir / "tmp").rglob("*") if f.is_file()]


def test_node_on_postgresql(tmp_path: Path, pg_url: str, ct50_files: list[Path]) -> None:
    with NodeProcess(tmp_path, {"database_url": pg_url}) as node:
        assert storescu(node.port, ct50_files).returncode == 0
        wait_for(lambda: [s for s in node.studies() if s["hooked_version"] == 1], 30)
        [study] = node.studies()
        assert (study["series"], study["instances"], study["state"]) == (1, 50, "complete")
    assert not (node.data_dir / "dicomnode.db").exists()


def test_studies_refuses_a_database_behind_the_code(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path)
    res = node.cli("studies", check=False)
    assert res.returncode == 1 and "dicomnode db upgrade" in res.stderr
    assert "database at revision" in node.cli("db", "upgrade").stdout
    assert node.cli("studies").stdout.strip() == "no studies"


def test_resend_is_idempotent_and_changed_object_replaces(tmp_path: Path,
                                                          ct50_files: list[Path]) -> None:
    with NodeProcess(tmp_path / "node") as node:
        files = ct50_files[:5]
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: node.studies()[0]["hooked_version"] == 1, 30)
        # same bytes again, after the identified copies are gone: the keyed digest knows
        assert storescu(node.port, files).returncode == 0
        spool, archive = node.data_dir / "spool", node.data_dir / "archive"
        assert list(spool.rglob("*.dcm")) == [] and len(list(archive.rglob("*.dcm"))) == 5
        [s] = node.studies()
        assert (s["state"], s["version"], s["instances"]) == ("complete", 1, 5)
        # same SOP Instance UID, other bytes: the newer object wins and the study reopens
        ds = dcmread(files[0])
        ds.WindowCenter = 41
        changed = tmp_path / "changed.dcm"
        ds.save_as(changed, enforce_file_format=True)
        assert storescu(node.port, [changed]).returncode == 0
        [s] = node.studies()
        assert (s["version"], s["instances"]) == (2, 5)  # reopened as version 2
        wait_for(lambda: node.studies()[0]["hooked_version"] == 2, 30)
        key = pseudonymizer(node).uid(ds.SOPInstanceUID)
        [stored] = archive.rglob(f"{key}.*.dcm")  # the earlier copy is gone
        assert dcmread(stored).WindowCenter == 41
        assert len(list(archive.rglob("*.dcm"))) == 5 and list(spool.rglob("*.dcm")) == []


def test_lost_index_rows_are_rebuilt_from_the_spool(tmp_path: Path, ct50_files: list[Path]) -> None:
    """A power cut can lose SQLite's last (synchronous=NORMAL) commits; the fsynced spool
    file is the record, and start-up indexes it again."""
    config = {"jobs": {"workers": {"ingest": 0}}, "completion": {"quiet_period_s": 600.0}}
    node = NodeProcess(tmp_path / "node", config).start()
    assert storescu(node.port, ct50_files[:4]).returncode == 0
    node.stop()
    con = sqlite3.connect(node.data_dir / "dicomnode.db")
    with con:
        con.execute("delete from instance where id in (select id from instance limit 2)")
    con.close()
    assert db_rows(node, "select count(*) from instance")[0][0] == 2
    node.start()
    try:
        assert db_rows(node, "select count(*) from instance")[0][0] == 4
        assert "indexed 2 spool file(s)" in node.log_text()
        assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 4
    finally:
        node.stop()

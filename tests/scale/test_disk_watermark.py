"""The disk watermark: new data refused before the disk is full, taken again after.

A unit test drives :class:`DiskGuard` through a free-space probe the test sets (the
node's admission check, its A-ASSOCIATE-RJ and the STOW-RS 503 included); one test runs
a node on a real 48 MB tmpfs, fills it past the watermark and checks that dcmtk's
storescu is refused transiently, then stores everything once space is freed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
from pathlib import Path

import httpx
import pytest
from nodeutil import NodeProcess, storescu, wait_for, write_study
from prometheus_client import REGISTRY

from dicomnode.api import ApiServer, ApiServices, create_api
from dicomnode.app import create_node
from dicomnode.config import load_settings
from dicomnode.dicom.phantom import make_ct_study
from dicomnode.pipeline.dicomweb import encode_multipart
from dicomnode.scp.gate import AssociationRequest, Rejection
from dicomnode.storage.diskguard import DiskGuard, Usage

GB = 1024**3


class Disk:
    """A filesystem the test sets: total and free bytes."""

    def __init__(self, total: int, free: int) -> None:
        self.total, self.free = total, free

    def __call__(self, path: Path) -> Usage:
        return Usage(self.total, self.total - self.free, self.free)


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


def test_guard_states_warn_refuse_resume_and_audit(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings(None, {"data_dir": tmp_path, "storage": {
        "min_free_gb": 2, "warn_free_gb": 5, "max_used_percent": 97,
        "disk_check_interval_s": 0, "disk_retry_after_s": 30}})
    disk = Disk(100 * GB, 50 * GB)
    g = DiskGuard(tmp_path, s.storage, probe=disk)
    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    assert g.refusal() is None and g.retry_after() is None
    assert _gauge("dicomnode_disk_state") == 0 and _gauge("dicomnode_disk_free_bytes") == 50 * GB
    disk.free = 4 * GB  # warning: still taking data
    assert g.refusal() is None and _gauge("dicomnode_disk_state") == 1
    disk.free = GB * 5 // 2  # above min_free_gb but 97.5% used: the percentage refuses
    assert "max_used_percent" in (g.refusal() or "")
    assert g.retry_after() == 30 and _gauge("dicomnode_disk_state") == 2
    disk.free = 1 * GB
    why = g.refusal()
    assert why is not None and "min_free_gb" in why
    disk.free = 20 * GB
    assert g.refusal() is None and _gauge("dicomnode_disk_state") == 0
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "dicomnode.audit" and "disk_watermark" in r.getMessage()]
    # one line per transition, not per check
    assert [(d["Detail"]["was"], d["Detail"]["state"]) for d in lines] == [
        ("ok", "warning"), ("warning", "refusing"), ("refusing", "ok")]


def test_unreadable_disk_lets_the_write_decide(tmp_path: Path) -> None:
    s = load_settings(None, {"data_dir": tmp_path, "storage": {"disk_check_interval_s": 0}})

    def broken(path: Path) -> Usage:
        raise OSError(5, "Input/output error")

    assert DiskGuard(tmp_path, s.storage, probe=broken).refusal() is None


def test_node_rejects_transiently_and_stow_answers_503(tmp_path: Path) -> None:
    pw = tmp_path / "p.password"
    pw.write_text("peer-password-1234\n")
    pw.chmod(0o600)
    s = load_settings(None, {
        "data_dir": str(tmp_path / "data"), "routing": {"rules": []},
        "api": {"host": "127.0.0.1", "port": 0}, "scp": {"processes": 1, "accept_any_ae": True},
        "storage": {"min_free_gb": 1, "disk_check_interval_s": 0, "disk_retry_after_s": 45},
        "peers": {"p": {"ae_title": "PEER", "stow_credentials": {
            "username": "peer", "password_file": str(pw)}}}})
    node = create_node(s)
    disk = Disk(10 * GB, GB // 2)
    node.disk.probe = disk
    assert node.server is not None
    node.server.disk.probe = disk  # type: ignore[union-attr]
    request = AssociationRequest("127.0.0.1", 40000, "MODALITY", "DICOMNODE", False)
    ds = make_ct_study(seed=1800, n_slices=1, rows=16, columns=16).datasets[0]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body, ct = encode_multipart([buf.getvalue()])
    svc = ApiServices.from_context(node.ctx, node.sessions, node.ingestor, node.disk.retry_after)
    server = ApiServer(create_api(svc, s.api), "127.0.0.1", 0)
    server.start()
    try:
        rj = node.server.admit(request)  # type: ignore[union-attr]
        assert isinstance(rj, Rejection)
        # PS3.8 9.3.4: result 2 rejected-transient, source 3 service-provider
        # (presentation), reason 2 local-limit-exceeded
        assert rj.pdu() == struct.pack(">BBIBBBB", 0x03, 0, 4, 0, 2, 3, 2)
        r = httpx.post(f"http://127.0.0.1:{server.port}/dicom-web/studies", content=body,
                       headers={"Content-Type": ct}, auth=("peer", "peer-password-1234"),
                       timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "45"
        assert node.index.stored_paths() == set()
        disk.free = 5 * GB  # space returns: both take data again, nothing to restart
        assert node.server.admit(request) is None  # type: ignore[union-attr]
        node.server.slots.release()  # type: ignore[union-attr]  # admit took a slot
        r = httpx.post(f"http://127.0.0.1:{server.port}/dicom-web/studies", content=body,
                       headers={"Content-Type": ct}, auth=("peer", "peer-password-1234"),
                       timeout=30)
        assert r.status_code == 200
        assert len(node.index.stored_paths()) == 1
    finally:
        server.stop()
        node.engine.dispose()
        node.files.close()


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 48 MB tmpfs mounted for the test (root only; skipped where mounting is denied)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_storescu_refused_on_a_full_small_filesystem_then_stores_everything(
        tmp_path: Path, small_fs: Path) -> None:
    study = make_ct_study(n_slices=20, rows=64, columns=64, seed=1801, patient_id="DISK-1")
    files = write_study(study, tmp_path / "study")
    node = NodeProcess(tmp_path / "node", {"storage": {
        "min_free_gb": 16 / 1024, "warn_free_gb": 24 / 1024, "disk_check_interval_s": 0,
        "fsync": False}}, data_dir=small_fs / "data")
    with node:
        ballast = small_fs / "ballast"
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        with open(ballast, "wb") as f:  # leave ~8 MB: below the 16 MB watermark
            f.write(b"\0" * (free - 8 * 1024**2))
        refused = storescu(node.port, files)
        assert refused.returncode != 0
        out = refused.stdout + refused.stderr
        assert "Rejected Transient" in out or "rejected-transient" in out.lower(), out
        assert "Local Limit Exceeded" in out or "local-limit-exceeded" in out.lower(), out
        assert "disk watermark" in node.log_text()
        ballast.unlink()  # space returns: the sender's retry is taken, no restart
        wait_for(lambda: storescu(node.port, files[:1]).returncode == 0, 30)
        res = storescu(node.port, files)
        assert res.returncode == 0, res.stdout + res.stderr
        wait_for(lambda: sum(s["instances"] for s in node.studies()) == len(files), 30)
    audit = (node.data_dir / "audit.jsonl").read_text()
    assert '"disk_watermark"' in audit and '"refusing"' in audit


def test_enospc_with_the_watermark_off_still_answers_a700(tmp_path: Path,
                                                          small_fs: Path) -> None:
    study = make_ct_study(n_slices=3, rows=64, columns=64, seed=1802, patient_id="DISK-2")
    files = write_study(study, tmp_path / "study")
    node = NodeProcess(tmp_path / "node", {"storage": {"min_free_gb": 0, "warn_free_gb": 0,
                                                       "fsync": False, "spare_files": 0}},
                       data_dir=small_fs / "data")
    with node:
        ballast = small_fs / "ballast"
        with open(ballast, "wb", buffering=0) as f:  # the whole filesystem: writes fail
            for chunk in (1024**2, 4096):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError:
                    pass
        res = storescu(node.port, files, "-v")
        out = (res.stdout + res.stderr).lower()
        # dcmtk names 0xA7xx "Refused: OutOfResources"; the node answers 0xA700
        assert "refused: outofresources" in out, out
        assert node.studies() == []  # nothing kept of the refused object
        ballast.unlink()
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: sum(s["instances"] for s in node.studies()) == len(files), 30)

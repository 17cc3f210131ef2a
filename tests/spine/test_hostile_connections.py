"""Connections that never associate, slow and noisy hosts, and many modalities at once.

Real sockets against ``dicomnode serve``: bare TCP connect-and-close (port probes, load
balancer health checks), peers that trickle one byte a second, silent and failed TLS
handshakes, and sixteen dcmtk storescu associations at once across receiving processes.
A loopback host other than 127.0.0.1 (127.0.0.2, ...) stands for another machine.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from nodeutil import (
    DCMTK_ENV,
    STORESCU,
    NodeProcess,
    echoscu,
    free_port,
    make_pki,
    storescu,
    wait_for,
    write_study,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.dicom.phantom import make_ct_study

API_TOKEN = "hostile-test-token-0123456789"


def node_config(**scp: object) -> dict[str, object]:
    return {
        "scp": scp,
        "api": {"enabled": True, "port": free_port(), "token": API_TOKEN, "metrics_public": True},
    }


def metric(node: NodeProcess, name: str, **labels: str) -> float:
    """A counter's value from the node's /metrics (0 when absent)."""
    port = node.config["api"]["port"]  # type: ignore[index]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}_total\{{{want}\}} ([0-9.e+]+)$" if want else rf"^{name}_total ([0-9.e+]+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def audit_lines(node: NodeProcess, event: str) -> list[dict]:
    path = node.data_dir / "audit.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in lines if m.get("event") == event]


def connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def a_associate_rq(calling: str = "PROBE", called: str = "DICOMNODE") -> bytes:
    """A minimal A-ASSOCIATE-RQ (PS3.8 9.3.2): Verification, Implicit VR Little Endian."""
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    app_ctx = item(0x10, b"1.2.840.10008.3.1.1.1")
    pres = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1")
                + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + bytes(32) + app_ctx + pres + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


@pytest.mark.parametrize("processes", [1, 2])
def test_bare_connections_free_their_slots_at_once(tmp_path: Path, processes: int) -> None:
    config = node_config(processes=processes, max_associations=4, drop_audit_interval_s=3600.0)
    with NodeProcess(tmp_path / "node", config) as node:
        before = metric(node, "dicomnode_connections_dropped", reason="closed")
        for _ in range(40):
            socket.create_connection(("127.0.0.1", node.port), timeout=5).close()
        # pynetdicom alone held a slot per connection for the ACSE timeout (30 s): four
        # slots, forty probes, "Local Limit Exceeded" for the next modality
        t0 = time.monotonic()
        res = echoscu(node.port, "-to", "5", "-ta", "5", "-td", "5")
        assert res.returncode == 0, res.stderr + res.stdout
        assert time.monotonic() - t0 < 5
        wait_for(lambda: metric(node, "dicomnode_connections_dropped", reason="closed")
                 >= before + 40, 10)
        # audited, but at most one line per source address and interval (per process)
        lines = [m for m in audit_lines(node, "connection_dropped")
                 if m["ActiveParticipant"][0].get("NetworkAccessPointID") == "127.0.0.1"]
        assert 1 <= len(lines) <= processes
    # on stop, what was held back is written: every drop is in the trail
    lines = [m for m in audit_lines(node, "connection_dropped")
             if m["ActiveParticipant"][0].get("NetworkAccessPointID") == "127.0.0.1"]
    assert sum(m["Detail"]["reasons"].get("closed", 0) for m in lines) >= 40


def test_slow_senders_never_stall_a_good_sender(tmp_path: Path, ct50_files: list[Path]) -> None:
    """Thirty peers trickling an A-ASSOCIATE-RQ one byte a second (and reconnecting when
    dropped) while storescu sends three studies: it never fails."""
    config = node_config(processes=2, max_associations=4, preassociation_timeout_s=3.0)
    stop = threading.Event()
    with NodeProcess(tmp_path / "node", config) as node:
        rq = a_associate_rq()

        def trickle(source: str) -> None:
            while not stop.is_set():
                try:
                    s = connect_from(source, node.port)
                except OSError:
                    time.sleep(0.2)
                    continue
                try:
                    for byte in rq:
                        if stop.wait(1.0):
                            break
                        s.sendall(bytes([byte]))
                except OSError:
                    pass  # dropped by the node: connect again
                finally:
                    s.close()

        slow = [threading.Thread(target=trickle, args=(f"127.0.0.{2 + i % 3}",), daemon=True)
                for i in range(30)]
        for t in slow:
            t.start()
        try:
            time.sleep(1.5)
            for _ in range(3):
                res = storescu(node.port, ct50_files, "-to", "10", "-ta", "10")
                assert res.returncode == 0, res.stderr + res.stdout
            assert echoscu(node.port, "-to", "5", "-ta", "5").returncode == 0
            wait_for(lambda: metric(node, "dicomnode_connections_dropped", reason="timeout")
                     >= 30, 20)
        finally:
            stop.set()
            for t in slow:
                t.join(5)
        [study] = node.studies()
        assert study["instances"] == 50


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _rss_and_threads(pid: int) -> tuple[int, int]:
    pids = _tree(pid)
    return (sum(_status(p, "VmRSS") for p in pids) // 1024,
            sum(_status(p, "Threads") for p in pids))


def _short_connections(port: int, n: int) -> None:
    rq = a_associate_rq()
    for i in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            kind = i % 4
            if kind == 1:
                s.sendall(b"GET / HTTP/1.1\r\n\r\n")  # answered with A-ABORT
            elif kind == 2:
                s.sendall(rq[: len(rq) // 2])  # half a request, then gone
            elif kind == 3:
                s.sendall(b"\x01\x00")  # two bytes, then gone


def test_memory_stays_flat_over_5000_short_connections(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "node", node_config(processes=2)) as node:
        assert node.proc is not None
        _short_connections(node.port, 500)  # warm up: allocator pools, caches
        assert echoscu(node.port).returncode == 0
        time.sleep(1.0)
        rss0, threads0 = _rss_and_threads(node.proc.pid)
        _short_connections(node.port, 5000)
        assert echoscu(node.port).returncode == 0
        time.sleep(1.0)
        rss1, threads1 = _rss_and_threads(node.proc.pid)
        # pynetdicom alone kept two threads per connection for the ACSE timeout:
        # ~150 MB per 1,500 connections
        assert rss1 - rss0 < 20, f"RSS grew from {rss0} to {rss1} MiB"
        assert threads1 - threads0 < 8, f"threads grew from {threads0} to {threads1}"
        wait_for(lambda: sum(metric(node, "dicomnode_connections_dropped", reason=r)
                             for r in ("closed", "not_dicom", "incomplete")) >= 5500, 10)


def test_tls_handshakes_run_off_the_accept_path(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    config = node_config(processes=1, drop_audit_interval_s=3600.0)
    config["scp"]["tls"] = {"mode": "separate", "port": tls_port,  # type: ignore[index]
                            "cert_file": pki["server_crt"], "key_file": pki["server_key"],
                            "ca_file": pki["ca"]}
    tls = ["+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca"])]
    with NodeProcess(tmp_path / "node", config) as node:
        # five silent TCP connections to the TLS port: pynetdicom would run the handshake
        # of the first in its accept loop and wait there for ever
        silent = [connect_from("127.0.0.2", tls_port) for _ in range(5)]
        try:
            res = echoscu(tls_port, "-to", "5", "-ta", "5", *tls)
            assert res.returncode == 0, res.stderr + res.stdout
        finally:
            for s in silent:
                s.close()
        # a plain DICOM client on the TLS port fails its handshake: counted and audited
        assert echoscu(tls_port, "-to", "5").returncode != 0
        wait_for(lambda: metric(node, "dicomnode_connections_dropped", reason="tls_handshake")
                 >= 1, 10)
        wait_for(lambda: audit_lines(node, "tls_handshake_failed")
                 or [m for m in audit_lines(node, "connection_dropped")
                     if "tls_handshake" in m["Detail"]["reasons"]], 10)


def test_one_noisy_host_cannot_lock_the_others_out(tmp_path: Path) -> None:
    config = node_config(processes=1, max_pending_per_source=4, preassociation_timeout_s=30.0)
    with NodeProcess(tmp_path / "node", config) as node:
        noisy = [connect_from("127.0.0.3", node.port) for _ in range(8)]
        try:
            def closed_by_node(s: socket.socket) -> bool:
                s.settimeout(0.05)
                try:
                    return s.recv(1) == b""
                except TimeoutError:
                    return False
                except OSError:
                    return True

            # beyond its four pending connections the noisy host is turned away at once...
            dropped = wait_for(lambda: [s for s in noisy if closed_by_node(s)], 5)
            time.sleep(0.3)
            dropped = [s for s in noisy if s in dropped or closed_by_node(s)]
            assert len(dropped) == 4
            # ...while everyone else still gets in
            assert echoscu(node.port, "-to", "5", "-ta", "5").returncode == 0
            assert metric(node, "dicomnode_connections_dropped", reason="source_limit") == 4
        finally:
            for s in noisy:
                s.close()


def test_slots_count_associations_across_processes(tmp_path: Path) -> None:
    config = node_config(processes=2, max_associations=2)
    with NodeProcess(tmp_path / "node", config) as node:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(2)]
        assert all(a.is_established for a in held)
        # a bare connection is no association: it changes nothing
        probe = socket.create_connection(("127.0.0.1", node.port))
        try:
            third = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
            assert third.is_rejected
            rj = third.acceptor.primitive
            # transient, service-provider (presentation), local limit exceeded (PS3.8 9.3.4)
            assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
            held[0].release()
            fourth = wait_for(lambda: (a := ae.associate("127.0.0.1", node.port,
                                                         ae_title="DICOMNODE")).is_established
                              and a, 10)
            assert fourth.send_c_echo().Status == 0x0000
            fourth.release()
        finally:
            probe.close()
            for a in held:
                if a.is_established:
                    a.release()
        assert [m for m in audit_lines(node, "association_rejected")
                if "local limit exceeded" in m.get("EventOutcomeDescription", "")]


def test_sixteen_modalities_at_once_across_processes(tmp_path: Path) -> None:
    """Sixteen storescu associations at once, each a different study: no failure, every
    instance indexed exactly once, and more than one receiving process did the work."""
    n_slices = 30
    studies = [write_study(make_ct_study(n_slices=n_slices, rows=64, columns=64, seed=100 + i,
                                         patient_id=f"PAT-{i:02d}"), tmp_path / f"s{i}")
               for i in range(16)]
    config = node_config(processes=2, max_associations=16)
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        procs = [subprocess.Popen([STORESCU, "-aet", f"MOD{i:02d}", "-aec", "DICOMNODE",
                                   "127.0.0.1", str(node.port), *map(str, files)],
                                  env=DCMTK_ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for i, files in enumerate(studies)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        failed = [o for p, o in zip(procs, outs, strict=True) if p.returncode != 0]
        assert not failed, failed[0][-2000:]
        rows = node.studies()
        assert len(rows) == 16
        assert sorted(r["instances"] for r in rows) == [n_slices] * 16
        with sqlite3.connect(node.data_dir / "dicomnode.db") as db:
            total, distinct = db.execute(
                "select count(*), count(distinct sop_key) from instance").fetchone()
        assert total == distinct == 16 * n_slices
        wait_for(lambda: metric(node, "dicomnode_instances_received") >= 16 * n_slices, 10)
    finally:
        node.stop()
    served = [int(m) for m in re.findall(r"stopped after (\d+) association", node.log_text())]
    assert len(served) == 2 and sum(served) == 16 and min(served) > 0, served

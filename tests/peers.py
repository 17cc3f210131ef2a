"""Start real peers for tests and benchmarks: dcmtk storescp, Orthanc, dicomnode.

Every dcmtk process (and Orthanc, whose DICOM server is dcmtk) gets ``TCP_NODELAY=1``:
with dcmtk's defaults, Nagle's algorithm and delayed ACKs hold loopback at about 17
instances/s instead of about 600 (shared/reference/perf-baseline.md 2c).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeutil import DCMTK_ENV, NodeProcess, free_port, wait_port

ORTHANC = "/usr/sbin/Orthanc"


@dataclass
class Receiver:
    """A running receiver: its AE title, port and how to stop it."""

    name: str
    ae_title: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    node: NodeProcess | None = None
    http_port: int | None = None
    workdir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        elif self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_storescp(workdir: Path, *, fork: bool = False, max_pdu: int | None = None) -> Receiver:
    """dcmtk storescp writing every object to ``workdir/out``."""
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = ["/usr/bin/storescp", "-aet", "STORESCP", "-od", str(out)]
    if fork:
        args.append("--fork")
    if max_pdu:
        args += ["-pdu", str(max_pdu)]
    proc = subprocess.Popen([*args, str(port)], env=DCMTK_ENV, cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "storescp.log", "wb"))
    wait_port(port, proc=proc)
    return Receiver("storescp", "STORESCP", port, proc=proc, workdir=workdir)


def start_orthanc(workdir: Path, modalities: dict[str, Sequence[Any]] | None = None,
                  extra: dict[str, Any] | None = None, *, port: int | None = None,
                  http_port: int | None = None) -> Receiver:
    """Orthanc with its defaults (SQLite index, files on disk) on loopback ports.

    ``modalities`` is Orthanc's ``DicomModalities`` (name -> [AET, host, port]).
    Starting it again on the same ``workdir`` and ports restarts the same PACS.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port, http = port or free_port(), http_port or free_port()
    config = {
        "Name": "dicomnode-test-pacs",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "DicomModalities": modalities or {},
        **(extra or {}),
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    proc = subprocess.Popen([ORTHANC, str(cfg)], env=DCMTK_ENV, cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "orthanc.log", "ab"))
    wait_port(http, proc=proc, timeout=60)
    wait_port(port, proc=proc, timeout=60)
    return Receiver("orthanc", "ORTHANC", port, proc=proc, http_port=http, workdir=workdir)


def orthanc_get(receiver: Receiver, path: str) -> Any:
    """GET an Orthanc REST resource as JSON."""
    with urllib.request.urlopen(f"http://127.0.0.1:{receiver.http_port}{path}", timeout=30) as r:
        return json.loads(r.read())


def start_dicomnode(workdir: Path, config: dict[str, Any] | None = None) -> Receiver:
    """``dicomnode serve`` (durable writes on, any calling AE accepted)."""
    node = NodeProcess(workdir, config).start()
    return Receiver("dicomnode", "DICOMNODE", node.port, node=node, workdir=workdir)


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def send(port: int, files: Sequence[Path], *, associations: int = 1, aec: str = "ANY-SCP",
         extra_args: Sequence[str] = ()) -> float:
    """Send ``files`` with ``associations`` parallel storescu processes; return wall seconds."""
    chunks = [list(files[i::associations]) for i in range(associations)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", aec, *extra_args,
                          "127.0.0.1", str(port), *map(str, chunk)],
                         env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for chunk in chunks
    ]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - t0
    bad = [e for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
    if bad:
        raise RuntimeError(f"storescu failed: {bad[0][-500:]!r}")
    return wall


def machine() -> str:
    """One line about this machine."""
    cpus = os.cpu_count()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{cpus} cores ({model}), Python {sys.version.split()[0]}"

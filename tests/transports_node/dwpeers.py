"""Real DICOMweb and HL7 peers for the transport tests: Orthanc with its DICOMweb plugin
(Debian ``orthanc-dicomweb``), the node with STOW-RS open to a peer, an MLLP listener."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from nodeutil import NodeProcess, free_port
from peers import Receiver, start_orthanc

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PEER_USER, PEER_PASSWORD = "orthanc", "stow-secret-of-orthanc"
PACS_USER, PACS_PASSWORD = "node", "pacs-secret-of-node"


def start_dicomweb_orthanc(workdir: Path, *, servers: dict[str, Any] | None = None,
                           users: dict[str, str] | None = None, port: int | None = None,
                           http_port: int | None = None,
                           extra: dict[str, Any] | None = None) -> Receiver:
    """Orthanc with DICOMweb at ``/dicom-web/``; ``users`` turns basic auth on."""
    config: dict[str, Any] = {
        **(extra or {}),
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers or {}},
    }
    if users:
        config |= {"AuthenticationEnabled": True, "RegisteredUsers": users}
    return start_orthanc(workdir, extra=config, port=port, http_port=http_port)


def orthanc_client(pacs: Receiver, auth: tuple[str, str] | None = None) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{pacs.http_port}", auth=auth, timeout=120)


def write_secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def stow_node(workdir: Path, config: dict[str, Any] | None = None,
              secret: str = "a-fixed-test-secret-of-at-least-32-chars!") -> NodeProcess:
    """A node whose API serves STOW-RS to the peer ``orthanc`` (basic auth)."""
    from nodeutil import deep_merge

    pw = write_secret(workdir / "secrets" / "orthanc.password", PEER_PASSWORD)
    base: dict[str, Any] = {
        "api": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
        "deid": {"secret": secret},
        "peers": {"orthanc": {"ae_title": "ORTHANC", "transport": "dicomweb",
                              "stow_credentials": {"username": PEER_USER,
                                                   "password_file": str(pw)}}},
        "routing": {"rules": []},
    }
    return NodeProcess(workdir, deep_merge(base, config or {}))


def stow_url(node: NodeProcess) -> str:
    return f"http://127.0.0.1:{node.config['api']['port']}/dicom-web"


Reply = Callable[[str], str]


def ack(message: str, code: str = "AA", text: str = "") -> str:
    """An HL7 ACK of ``message`` (original mode), framed for MLLP."""
    fields = message.split("\r", 1)[0].split("|")
    control = fields[9]
    msa = f"MSA|{code}|{control}" + (f"|{text}" if text else "")
    body = (f"MSH|^~\\&|RIS|HOSP|{fields[2]}|{fields[3]}|20260101000000||ACK^R01^ACK|"
            f"A{control}|P|2.5.1\r{msa}\r")
    return "\x0b" + body + "\x1c\r"


@contextmanager
def mllp_listener(reply: Reply | None = None) -> Iterator[tuple[int, list[str]]]:
    """An hl7apy MLLP server on a free port; yields (port, messages received).

    ``reply(message)`` gives the framed answer (default: AA).
    """
    from hl7apy.mllp import AbstractHandler, MLLPServer

    received: list[str] = []
    answer = reply or (lambda m: ack(m))

    class Handler(AbstractHandler):
        def reply(self) -> str:
            received.append(self.incoming_message)
            return answer(self.incoming_message)

    port = free_port()
    server = MLLPServer("127.0.0.1", port, {"ORU^R01^ORU_R01": (Handler,)}, timeout=10)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield port, received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0

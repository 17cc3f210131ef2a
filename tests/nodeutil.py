"""Helpers shared by the tests and benchmarks: ports, phantom files, the node as a subprocess.

Peers are real programs: dcmtk's tools are called by absolute path (pynetdicom
installs console scripts of the same names into the venv), always with
``TCP_NODELAY=1`` (without it dcmtk's write-write-read pattern stalls on
delayed ACKs, perf-baseline.md 2c).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicomnode.dicom.phantom import PhantomStudy

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
FINDSCU = "/usr/bin/findscu"
STORESCP = "/usr/bin/storescp"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met after {timeout} s")
        time.sleep(interval)


def write_study(study: PhantomStudy, directory: Path) -> list[Path]:
    """Write a phantom study's slices as DICOM files; return their paths in slice order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(study.datasets):
        p = directory / f"slice{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, after its preamble and file meta."""
    raw = Path(path).read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    # preamble + "DICM" (132), the (0002,0000) UL element (12), then the group itself
    return raw[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer for test configurations (tables, scalars, lists)."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    out = [f"{k} = {_toml_value(v)}" for k, v in scalars]
    for k, v in tables:
        name = f"{prefix}.{k}" if prefix else k
        out.append(f"\n[{name}]")
        out.append(to_toml(v, name))
    return "\n".join(out) + "\n"


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        nested = isinstance(v, Mapping) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if nested else v
    return out


class NodeProcess:
    """``dicomnode serve`` as a subprocess with its own config, data dir and port.

    Parameters
    ----------
    workdir
        Holds ``node.toml``, ``data/`` and ``node.log``.
    config
        Merged over the test defaults (loopback, a free port, short quiet period).
    """

    def __init__(self, workdir: Path, config: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, command: list[str] | None = None,
                 data_dir: Path | None = None) -> None:
        self.command = command or ["serve"]
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        defaults: dict[str, Any] = {
            "ae_title": "DICOMNODE",
            "data_dir": str(data_dir or workdir / "data"),
            "scp": {"host": "127.0.0.1", "port": self.port, "accept_any_ae": True,
                    "shutdown_grace_s": 5.0},
            "completion": {"quiet_period_s": 2.0, "check_interval_s": 0.2},
            "jobs": {"poll_interval_s": 0.1},
            "api": {"enabled": False},
        }
        self.config = deep_merge(defaults, config or {})
        self.port = int(self.config["scp"]["port"])
        self.config_path = workdir / "node.toml"
        self.config_path.write_text(to_toml(self.config))
        self.log_path = workdir / "node.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data_dir"])

    def start(self, wait_port_no: int | None = None) -> NodeProcess:
        log = open(self.log_path, "ab")
        seen = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", *self.command, "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
        )
        log.close()
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.command} exited: {self.log_text()[-2000:]}")
            return " serving as " in self.log_path.read_bytes()[seen:].decode(errors="replace")

        if self.command[0] == "serve":
            wait_port(wait_port_no or self.port, proc=self.proc)
        # ready once it says so: a node with receiving processes (scp.processes) listens
        # before they have started, and answers once they have
        wait_for(ready, 60)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``python -m dicomnode ARGS --config node.toml``."""
        res = subprocess.run(
            [sys.executable, "-m", "dicomnode", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, env=self.env, timeout=120,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"dicomnode {' '.join(args)} -> {res.returncode}: {res.stderr}")
        return res

    def studies(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("studies", "--json").stdout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def storescu(port: int, files: Iterable[Path], *args: str, aet: str = "STORESCU",
             aec: str = "DICOMNODE", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu to 127.0.0.1:port."""
    return subprocess.run(
        [STORESCU, "-aet", aet, "-aec", aec, *args, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout,
    )


def echoscu(port: int, *args: str, aet: str = "ECHOSCU",
            aec: str = "DICOMNODE") -> subprocess.CompletedProcess[str]:
    """dcmtk echoscu to 127.0.0.1:port."""
    return subprocess.run(
        [ECHOSCU, "-aet", aet, "-aec", aec, *args, "127.0.0.1", str(port)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=60,
    )


def make_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (PEM)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("dicomnode test CA"))
          .issuer_name(name("dicomnode test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": directory / "ca.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"dicomnode test {role}"))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                    critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[f"{role}_crt"] = directory / f"{role}.crt"
        out[f"{role}_key"] = directory / f"{role}.key"
        out[f"{role}_crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, out[f"{role}_key"])
    return out

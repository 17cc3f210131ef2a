"""Loading (or, in the embedded demo default, creating) the node's secrets."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

from dicomnode.config import DeidSettings
from dicomnode.errors import ConfigError

__all__ = ["load_secret", "vault_key"]

log = logging.getLogger(__name__)

_MIN_LEN = 32


def _read_key_file(path: Path, key: str) -> bytes:
    try:
        raw = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) < _MIN_LEN:
        raise ConfigError(f"{key}: {path} holds {len(raw)} bytes, at least {_MIN_LEN} needed")
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by group or others; chmod 600 it", path)
    return raw


def load_secret(settings: DeidSettings, data_dir: Path, name: str = "node") -> bytes:
    """Return the master secret for pseudonyms (``name="node"``) or the vault key (``"vault"``).

    Order: the configured value (usually from ``DICOMNODE_DEID__SECRET`` /
    ``DICOMNODE_DEID__VAULT_KEY``), then the configured file, then
    ``<data_dir>/keys/<name>.key``, created with mode 0600 only when
    ``deid.generate_secret`` is true.

    Raises
    ------
    ConfigError
        No usable secret and generation is off, or a configured one is unusable.
    """
    value, file, key = (
        (settings.secret, settings.secret_file, "deid.secret")
        if name == "node"
        else (settings.vault_key, settings.vault_key_file, "deid.vault_key")
    )
    if value is not None:
        raw = value.get_secret_value().encode()
        if len(raw) < _MIN_LEN:
            raise ConfigError(f"{key}: at least {_MIN_LEN} characters needed")
        return raw
    if file is not None:
        return _read_key_file(file, f"{key}_file")
    path = data_dir / "keys" / f"{name}.key"
    if path.exists():
        return _read_key_file(path, f"{key}_file")
    if not settings.generate_secret:
        raise ConfigError(
            f"{key}_file: no {key.split('.')[1].replace('_', ' ')} configured and "
            f"deid.generate_secret is false; set {key}_file or "
            f"DICOMNODE_{key.upper().replace('.', '__')}"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    log.warning(
        "generated %s in %s (embedded demo default); back it up: without it %s",
        name + " key",
        path,
        "pseudonyms change" if name == "node" else "results cannot be re-identified",
    )
    return path.read_bytes().strip()


def vault_key(settings: DeidSettings, data_dir: Path) -> bytes:
    """The 32-byte AES key of the vault, derived (SHA-256) from its configured secret."""
    return hashlib.sha256(load_secret(settings, data_dir, "vault")).digest()

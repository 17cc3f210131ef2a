"""Keyed, deterministic pseudonyms (deid.md 5.3).

Every pseudonym is an HMAC-SHA256 of the original value under a sub-key derived
from one master secret with HKDF, so the same input gives the same output in
every study, association and restart, and nobody without the secret can link a
pseudonym back by dictionary attack. Reversal needs the vault.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

__all__ = ["Pseudonymizer", "derive_key"]

_UID_MAX = 64


def derive_key(master: bytes, purpose: str, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``master`` for one ``purpose``; no salt, info=purpose."""
    if len(master) < 16:
        raise ValueError(f"master secret must be at least 16 bytes, got {len(master)}")
    prk = hmac.new(b"\x00" * 32, master, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + purpose.encode() + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _norm(value: str) -> str:
    # DICOM pads with spaces (and NUL for UIDs); the same identity must hash the same.
    return value.strip(" \x00")


@dataclass(frozen=True)
class Pseudonymizer:
    """Pseudonyms under one master secret.

    Parameters
    ----------
    master
        The node's secret (at least 16 bytes; 32 recommended).
    min_shift_days, max_shift_days
        The per-patient date shift is ``-(min + h mod (max - min + 1))`` days, never 0.
    prefix
        Prefix of pseudonymous Patient IDs.
    """

    master: bytes
    min_shift_days: int = 365
    max_shift_days: int = 3650
    prefix: str = "P"

    def __post_init__(self) -> None:
        if not 1 <= self.min_shift_days <= self.max_shift_days:
            raise ValueError(
                "date shift range must satisfy 1 <= min_shift_days <= max_shift_days, "
                f"got {self.min_shift_days}..{self.max_shift_days}"
            )
        for purpose in ("uid", "pid", "date", "text", "digest"):
            object.__setattr__(
                self, f"_k_{purpose}", derive_key(self.master, f"dicomnode/{purpose}")
            )

    def _mac(self, purpose: str, value: str) -> bytes:
        key: bytes = getattr(self, f"_k_{purpose}")
        return hmac.new(key, value.encode("utf-8"), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """``2.25.<int>`` from the first 128 bits of the HMAC, with UUIDv4 version/variant bits.

        Valid by construction: at most 44 characters, digits and dots, no leading zero.
        """
        original = _norm(original)
        if not original:
            raise ValueError("cannot pseudonymise an empty UID")
        n = int.from_bytes(self._mac("uid", original)[:16], "big")
        n = (n & ~(0xF << 76)) | (0x4 << 76)  # version 4
        n = (n & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
        return f"2.25.{n}"

    @staticmethod
    def patient_key(patient_id: str, issuer: str = "") -> str:
        """The identity a pseudonym is derived from: issuer and ID, padding removed."""
        return f"{_norm(issuer)}\x1f{_norm(patient_id)}"

    def patient_id(self, patient_key: str) -> str:
        """Pseudonymous Patient ID: prefix + 16 base32 characters of the HMAC."""
        digest = base64.b32encode(self._mac("pid", patient_key)).decode("ascii")
        return f"{self.prefix}{digest[:16]}"

    def date_shift_days(self, patient_key: str) -> int:
        """Whole days to add to every date of this patient (negative, never 0)."""
        span = self.max_shift_days - self.min_shift_days + 1
        h = int.from_bytes(self._mac("date", patient_key)[:8], "big")
        return -(self.min_shift_days + h % span)

    def text(self, kind: str, value: str, length: int = 16) -> str:
        """A short keyed pseudonym for identifiers such as AccessionNumber or StudyID."""
        digest = base64.b32encode(self._mac("text", f"{kind}\x1f{_norm(value)}")).decode("ascii")
        return digest[:length]

    def content_digest(self, data: bytes) -> str:
        """Keyed digest of an object's bytes: recognises a re-sent object without keeping
        it, and nobody without the secret can test a file against it."""
        key: bytes = self._k_digest
        return hmac.new(key, data, hashlib.sha256).hexdigest()

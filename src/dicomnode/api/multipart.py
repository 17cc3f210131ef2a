"""A streaming reader of ``multipart/related`` bodies (RFC 2046 5.1, RFC 2387).

STOW-RS bodies are ``multipart/related; type="application/dicom"``, which the
form parsers of web frameworks do not read (they know ``multipart/form-data``).
:class:`MultipartReader` takes the body in chunks and yields each part as soon as
its closing delimiter has arrived, so an instance can be stored while the next one
is still on the wire, and only one part at a time is held in memory. A part is
never yielded before its delimiter: a body cut short yields nothing of the part it
cuts, and :meth:`MultipartReader.close` says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MultipartError", "MultipartReader", "Part", "PartTooLarge", "parse_content_type"]

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf";\s*({_TOKEN})\s*=\s*(\"(?:[^\"\\\\]|\\\\.)*\"|{_TOKEN})")


class MultipartError(ValueError):
    """The body is not a readable multipart body (HTTP 400)."""


class PartTooLarge(MultipartError):
    """A part is larger than the reader's limit (HTTP 413)."""


@dataclass(frozen=True)
class Part:
    """One body part: its headers (names lower-cased) and content."""

    headers: dict[str, str]
    content: bytes

    @property
    def content_type(self) -> str:
        """The part's media type, lower-case, without parameters ("" when absent)."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """(media type, parameters) of a Content-Type header; names lower-cased, quotes
    removed."""
    media, _, rest = value.partition(";")
    params = {}
    for name, raw in _PARAM.findall(";" + rest):
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[name.lower()] = raw
    return media.strip().lower(), params


class MultipartReader:
    """Feed body chunks with :meth:`feed`; complete parts come back as they end.

    Parameters
    ----------
    boundary
        The ``boundary`` parameter of the Content-Type.
    max_part_bytes
        The largest part accepted (:class:`PartTooLarge` past it).

    Raises
    ------
    MultipartError
        The boundary is unusable.
    """

    def __init__(self, boundary: str, max_part_bytes: int) -> None:
        # RFC 2046 caps it at 70; Orthanc's DICOMweb client sends 72 (tolerant in)
        if not 1 <= len(boundary) <= 256:
            raise MultipartError("the multipart boundary must be 1 to 256 characters")
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._buf = bytearray(b"\r\n")  # the first delimiter may open the body
        self._max = max_part_bytes
        self._started = False
        self._done = False
        self._scan_from = 0
        self.parts = 0

    def feed(self, chunk: bytes) -> list[Part]:
        """Add ``chunk``; return the parts it completed (possibly none).

        Raises
        ------
        MultipartError
            Malformed part headers, or data after the closing delimiter is ignored
            (RFC 2046 epilogue) but a missing opening delimiter is an error.
        PartTooLarge
            A part grew past ``max_part_bytes``.
        """
        if self._done:
            return []
        self._buf += chunk
        out: list[Part] = []
        d = self._delimiter
        while True:
            at = self._buf.find(d, self._scan_from)
            if at < 0:
                # keep enough of the tail to find a delimiter split across chunks
                self._scan_from = max(0, len(self._buf) - len(d) - 1)
                if self._started and len(self._buf) > self._max + 4096:
                    raise PartTooLarge(f"a part is larger than {self._max} bytes")
                if not self._started and len(self._buf) > 65536:
                    raise MultipartError("no multipart delimiter in the first 64 KiB")
                return out
            after = at + len(d)
            if len(self._buf) < after + 2:
                self._scan_from = at
                return out  # wait for the two bytes that say what kind of delimiter
            if bytes(self._buf[after:after + 2]) == b"--":
                if self._started:
                    out.append(self._part(memoryview(self._buf)[:at]))
                self._done = True
                self._buf = bytearray()
                return out
            eol = self._buf.find(b"\r\n", after)
            if eol < 0:
                self._scan_from = at
                return out  # wait for the end of the delimiter line
            if self._buf[after:eol].strip(b" \t"):
                raise MultipartError("unexpected characters after a multipart delimiter")
            if self._started:
                out.append(self._part(memoryview(self._buf)[:at]))
            # else: the preamble before the first delimiter is discarded (RFC 2046)
            self._started = True
            del self._buf[:eol + 2]
            self._scan_from = 0

    def _part(self, raw: memoryview) -> Part:
        head_end = bytes(raw[:min(len(raw), 16384)]).find(b"\r\n\r\n")
        if bytes(raw[:2]) == b"\r\n":  # a part without headers
            return Part({}, bytes(raw[2:]))
        if head_end < 0:
            raise MultipartError("a part's headers do not end with an empty line")
        headers: dict[str, str] = {}
        for line in bytes(raw[:head_end]).decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise MultipartError("a part header is not 'Name: value'")
            headers[name.strip().lower()] = value.strip()
        self.parts += 1
        return Part(headers, bytes(raw[head_end + 4:]))

    def close(self) -> None:
        """The body has ended.

        Raises
        ------
        MultipartError
            It ended before the closing delimiter (truncated), or had no part.
        """
        if not self._done:
            if not self._started:
                raise MultipartError("the body has no multipart delimiter")
            raise MultipartError("the body ends before its closing delimiter (truncated)")
        if self.parts == 0:
            raise MultipartError("the multipart body has no part")

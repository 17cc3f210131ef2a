"""The model package format: read, write and check ``model.toml`` + ``model.onnx``.

A model package is a directory, or a ``.zip`` / ``.tar.gz`` / ``.tgz`` archive
of one, holding::

    model.onnx    the network (one float32 input, one float32 output)
    model.toml    what the network expects and produces (below)

``model.toml`` (format 1)::

    format = 1
    name = "demo-lesion"                # [A-Za-z0-9._-]+
    version = "1.0.0"
    task = "segmentation"               # or "classification"
    description = "..."                 # optional
    sha256 = "<hex of model.onnx>"

    [input]
    name = "image"                      # graph input name
    modality = "CT"                     # DICOM Modality (0008,0060) of the series it reads
    orientation = "axial"               # axial | coronal | sagittal slices
    layout = "NCHW"                     # 2D slices, C = 1 (the only layout of format 1)
    spacing_mm = [1.5, 1.5]             # in-plane (row, column) target spacing, or "native"
    size = "any"                        # [H, W]: pad/crop each slice to this; "any": keep
    size_multiple = 4                   # with size = "any": pad H and W up to a multiple
    batch_size = 8                      # slices per run() call
    pad_value = -1000.0                 # optional, real units; default: volume minimum
    normalization = { kind = "window", center = 40.0, width = 400.0 }
    # or { kind = "zscore", mean = 0.0, std = 1.0 } (mean/std left out: per volume)
    # or { kind = "none" }

    [outputs]
    name = "logits"                     # graph output name
    kind = "logits"                     # or "probabilities" (activation already applied)
    activation = "sigmoid"              # sigmoid: one channel per label;
                                        # softmax: channel 0 is background, then the labels
    min_component_mm3 = 0.0             # optional: drop smaller connected components

    [[outputs.labels]]                  # numbered 1, 2, ... in channel order
    number = 1
    name = "Lesion"
    category = {scheme = "SCT", value = "49755003", meaning = "Morphologically abnormal structure"}
    type = { scheme = "SCT", value = "108369006", meaning = "Neoplasm" }
    color = [255, 64, 64]
    threshold = 0.5

    [provenance]                        # optional, free-form scalars (training seed, Dice, ...)

This module also holds the *semantics* of the input contract (normalisation,
in-plane resampling, pad/crop) as pure numpy functions, because training must
prepare slices exactly as the runtime does and ``dicomnode.training`` may not
import ``dicomnode.inference``: both import this module.

The graph side (reading an ONNX graph's signature and checking it against
``model.toml``) is :mod:`dicomnode.modelpkg.graph`; writing packages is
:mod:`dicomnode.modelpkg.write`.
"""

from __future__ import annotations

import hashlib
import math
import re
import tarfile
import tomllib
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dicomnode.errors import ModelLoadError

if TYPE_CHECKING:
    from dicomnode.modelpkg.format2 import ModelPackage2

__all__ = [
    "FORMAT_VERSION",
    "Code",
    "InputContract",
    "Label",
    "ModelPackage",
    "Normalization",
    "OutputContract",
    "load_model_package",
    "read_model_package",
    "sha256_of",
]

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ORIENTATIONS = ("axial", "coronal", "sagittal")
_ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 8.8): coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Label:
    """One output label: its number in the label mask and how a SEG describes it.

    ``category`` and ``type`` are the SEG's Segmented Property Category / Type
    (CID 7150 / 7151, e.g. SNOMED CT). ``threshold`` is the probability at or above
    which a voxel (or, for classification, the volume) is assigned this label.
    """

    number: int
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int]
    threshold: float = 0.5


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation of the input, in real units (HU for CT).

    ``window``: clip to ``[center - width/2, center + width/2]`` and scale to [0, 1].
    ``zscore``: ``(x - mean) / std``; with mean/std None they are the volume's own.
    ``none``: pass through.
    """

    kind: Literal["window", "zscore", "none"]
    center: float | None = None
    width: float | None = None
    mean: float | None = None
    std: float | None = None

    def needs_volume_stats(self) -> bool:
        """Whether :meth:`apply` needs the whole volume's mean and std."""
        return self.kind == "zscore" and (self.mean is None or self.std is None)

    def apply(self, x: np.ndarray, volume_stats: tuple[float, float] | None = None) -> np.ndarray:
        """Normalise ``x`` (any shape) to float32; a new array.

        Parameters
        ----------
        x
            Values in real units.
        volume_stats
            (mean, std) of the whole volume; needed for z-score without fixed stats.

        Raises
        ------
        ValueError
            Z-score without fixed stats and without ``volume_stats``.
        """
        if self.kind == "window":
            if self.center is None or self.width is None:
                raise ValueError("a window needs center and width")
            lo = self.center - self.width / 2
            x32 = np.asarray(x, dtype=np.float32)
            out = np.clip(x32, np.float32(lo), np.float32(lo + self.width))  # a new array
            out -= np.float32(lo)
            out *= np.float32(1.0 / self.width)
            return out
        if self.kind == "zscore":
            mean, std = self.mean, self.std
            if mean is None or std is None:
                if volume_stats is None:
                    raise ValueError("z-score without fixed mean/std needs volume_stats")
                mean, std = volume_stats
            out = np.asarray(x, dtype=np.float32) - np.float32(mean)
            out *= np.float32(1.0 / max(std, 1e-6))
            return out
        return np.array(x, dtype=np.float32, copy=True)


@dataclass(frozen=True)
class InputContract:
    """What the network reads: 2D slices of one orientation, layout NCHW with C = 1."""

    name: str
    modality: str
    orientation: str
    layout: str
    spacing_mm: tuple[float, float] | None
    """In-plane (row, column) target spacing; None = native (no resampling)."""
    size: tuple[int, int] | None
    """Pad/crop every slice to (H, W); None = keep the (resampled) size."""
    size_multiple: int
    """With ``size`` None: pad H and W up to a multiple of this (network strides)."""
    batch_size: int
    normalization: Normalization
    pad_value: float | None = None
    """Padding in real units; None = the volume's minimum."""


@dataclass(frozen=True)
class OutputContract:
    """What the network produces: one float32 output, per-label channels."""

    name: str
    kind: Literal["logits", "probabilities"]
    activation: Literal["sigmoid", "softmax"]
    labels: tuple[Label, ...]
    min_component_mm3: float = 0.0

    @property
    def channels(self) -> int:
        """Channels the graph output must have."""
        return len(self.labels) + (1 if self.activation == "softmax" else 0)


@dataclass(frozen=True)
class ModelPackage:
    """A model package whose ``model.toml`` is valid and whose checksum matched.

    Graph agreement is only known once :func:`check_against_graph` ran
    (:func:`load_model_package` does).
    """

    name: str
    version: str
    task: Literal["segmentation", "classification"]
    input: InputContract
    outputs: OutputContract
    sha256: str
    source: Path
    """The package directory or archive."""
    description: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    onnx_member: str | None = None
    """Inside an archive: the member name of model.onnx; None for a directory."""

    @property
    def onnx_path(self) -> Path | None:
        """``model.onnx`` on disk, or None when the package is an archive."""
        return None if self.onnx_member is not None else self.source / "model.onnx"

    @property
    def labels(self) -> tuple[Label, ...]:
        return self.outputs.labels

    def read_onnx_bytes(self) -> bytes:
        """The bytes of model.onnx.

        Raises
        ------
        ModelLoadError
            The file is gone or no longer matches ``sha256``.
        """
        data = _read_member(self.source, self.onnx_member) if self.onnx_member else None
        if data is None:
            try:
                data = (self.source / "model.onnx").read_bytes()
            except OSError as exc:
                raise ModelLoadError(
                    f"model.onnx: cannot read ({exc.strerror}) (package: {self.source})"
                ) from exc
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ModelLoadError(
                f"model.toml: sha256: model.onnx changed since loading (package: {self.source})"
            )
        return data


# --------------------------------------------------------------------------- reading


class _Fields:
    """Typed access to one TOML table that names the full key in every error."""

    def __init__(self, table: Mapping[str, Any], prefix: str, where: Path) -> None:
        self.table, self.prefix, self.where, self.used = table, prefix, where, set()

    def error(self, key: str, msg: str) -> ModelLoadError:
        return ModelLoadError(f"model.toml: {self.prefix}{key}: {msg} (package: {self.where})")

    def get(self, key: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise self.error(key, "missing")
            return default
        value = self.table[key]
        # bool is an int in Python; TOML's true is not a number here.
        if isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)
        ):
            raise self.error(key, f"expected {_tname(types)}, got {value!r}")
        if not isinstance(value, types):
            raise self.error(key, f"expected {_tname(types)}, got {value!r}")
        return value

    def choice(self, key: str, choices: Sequence[str], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def sub(self, key: str, default: Any = ...) -> _Fields:
        return _Fields(self.get(key, dict, default), f"{self.prefix}{key}.", self.where)

    def done(self) -> None:
        extra = sorted(set(self.table) - self.used)
        if extra:
            raise self.error(extra[0], "unknown key")


def _tname(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
        bool: "a boolean",
    }
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in ts))


def _code(f: _Fields, key: str) -> Code:
    c = f.sub(key)
    code = Code(c.get("scheme", str), c.get("value", str), c.get("meaning", str))
    c.done()
    if not (code.scheme and code.value and code.meaning):
        raise f.error(key, "scheme, value and meaning must be non-empty")
    return code


def _parse_input(f: _Fields) -> InputContract:
    name = f.get("name", str)
    modality = f.get("modality", str)
    if not re.fullmatch(r"[A-Z]{2,16}", modality):
        raise f.error("modality", f"expected a DICOM Modality such as CT or MR, got {modality!r}")
    orientation = f.choice("orientation", _ORIENTATIONS, "axial")
    layout = f.choice("layout", ("NCHW",), "NCHW")
    spacing = f.get("spacing_mm", (str, list), "native")
    if isinstance(spacing, str):
        if spacing != "native":
            raise f.error(
                "spacing_mm", f'expected "native" or [row, column] in mm, got {spacing!r}'
            )
        spacing_mm = None
    else:
        if len(spacing) != 2 or not all(_is_num(v) and 0 < v < 100 for v in spacing):
            raise f.error("spacing_mm", f"expected two positive numbers (mm), got {spacing!r}")
        spacing_mm = (float(spacing[0]), float(spacing[1]))
    size_v = f.get("size", (str, list), "any")
    if isinstance(size_v, str):
        if size_v != "any":
            raise f.error("size", f'expected "any" or [H, W], got {size_v!r}')
        size = None
    else:
        if len(size_v) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size_v
        ):
            raise f.error("size", f"expected two positive integers [H, W], got {size_v!r}")
        size = (size_v[0], size_v[1])
    multiple = f.get("size_multiple", int, 1)
    if multiple < 1:
        raise f.error("size_multiple", f"must be at least 1, got {multiple}")
    batch = f.get("batch_size", int)
    if not 1 <= batch <= 4096:
        raise f.error("batch_size", f"must be 1-4096, got {batch}")
    pad = f.get("pad_value", (int, float), None)
    n = f.sub("normalization")
    kind = n.choice(
        "kind",
        ("window", "zscore", "none"),
        "window" if "center" in n.table or "width" in n.table else ...,
    )
    norm = Normalization(
        kind=kind,  # type: ignore[arg-type]
        center=_opt_float(n, "center", kind == "window"),
        width=_opt_float(n, "width", kind == "window"),
        mean=_opt_float(n, "mean", False) if kind == "zscore" else None,
        std=_opt_float(n, "std", False) if kind == "zscore" else None,
    )
    n.done()
    if norm.kind == "window" and not (norm.width and norm.width > 0):
        raise n.error("width", f"must be positive, got {norm.width}")
    if norm.kind == "zscore" and (norm.mean is None) != (norm.std is None):
        raise n.error("std", "give both mean and std, or neither (per-volume statistics)")
    if norm.std is not None and norm.std <= 0:
        raise n.error("std", f"must be positive, got {norm.std}")
    f.done()
    return InputContract(
        name,
        modality,
        orientation,
        layout,
        spacing_mm,
        size,
        multiple,
        batch,
        norm,
        None if pad is None else float(pad),
    )


def _opt_float(f: _Fields, key: str, required: bool) -> float | None:
    v = f.get(key, (int, float), ... if required else None)
    return None if v is None else float(v)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _parse_label(f: _Fields, i: int, item: object) -> Label:
    """``labels[i]`` of an outputs table: numbered ``i + 1`` (channel order = label order)."""
    if not isinstance(item, dict):
        raise f.error(f"labels[{i}]", "expected a table")
    lf = _Fields(item, f"{f.prefix}labels[{i}].", f.where)
    number = lf.get("number", int)
    if number != i + 1:
        # Channel order = label order, and SEG segment numbers start at 1 and increase
        # by 1 (PS3.3 C.8.20.2), so the numbers carry no extra freedom.
        raise lf.error(
            "number",
            f"labels must be numbered 1, 2, ... in order; expected {i + 1}, got {number}",
        )
    lname = lf.get("name", str)
    if not lname.strip() or len(lname) > 64:
        raise lf.error("name", "must be 1-64 characters (SEG Segment Label is LO)")
    color = lf.get("color", list)
    if len(color) != 3 or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color
    ):
        raise lf.error("color", f"expected 3 integers 0-255 (RGB), got {color!r}")
    threshold = float(lf.get("threshold", (int, float), 0.5))
    if not 0.0 < threshold < 1.0:
        raise lf.error("threshold", f"must be strictly between 0 and 1, got {threshold}")
    label = Label(
        number,
        lname,
        _code(lf, "category"),
        _code(lf, "type"),
        (color[0], color[1], color[2]),
        threshold,
    )
    lf.done()
    return label


def _parse_outputs(f: _Fields) -> OutputContract:
    name = f.get("name", str)
    kind = f.choice("kind", ("logits", "probabilities"))
    activation = f.choice("activation", ("sigmoid", "softmax"), "sigmoid")
    min_mm3 = float(f.get("min_component_mm3", (int, float), 0.0))
    if min_mm3 < 0:
        raise f.error("min_component_mm3", f"must be >= 0, got {min_mm3}")
    raw = f.get("labels", list)
    if not raw:
        raise f.error("labels", "at least one label is required")
    if len(raw) > 255:
        raise f.error("labels", f"at most 255 labels fit a uint8 label mask, got {len(raw)}")
    labels = [_parse_label(f, i, item) for i, item in enumerate(raw)]
    f.done()
    names = [lb.name for lb in labels]
    if len(set(names)) != len(names):
        raise f.error("labels", f"label names must be unique, got {names}")
    return OutputContract(name, kind, activation, tuple(labels), min_mm3)  # type: ignore[arg-type]


def _parse_toml(text: str, where: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelLoadError(f"model.toml: not valid TOML: {exc} (package: {where})") from None


def parse_model_toml(text: str, where: Path) -> dict[str, Any]:
    """Parse and validate ``model.toml`` text; return the fields of :class:`ModelPackage`.

    Raises
    ------
    ModelLoadError
        Naming the first invalid key.
    """
    top = _Fields(_parse_toml(text, where), "", where)
    fmt = top.get("format", int, FORMAT_VERSION)
    if fmt != FORMAT_VERSION:
        raise top.error("format", f"this node reads format {FORMAT_VERSION}, got {fmt}")
    name = top.get("name", str)
    if not _NAME_RE.match(name):
        raise top.error("name", f"expected 1-64 of [A-Za-z0-9._-], got {name!r}")
    version = top.get("version", str)
    if not _NAME_RE.match(version):
        raise top.error("version", f"expected 1-64 of [A-Za-z0-9._-], got {version!r}")
    task = top.choice("task", ("segmentation", "classification"))
    sha = top.get("sha256", str).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise top.error("sha256", "expected 64 hexadecimal digits")
    fields = {
        "name": name,
        "version": version,
        "task": task,
        "description": top.get("description", str, ""),
        "sha256": sha,
        "input": _parse_input(top.sub("input")),
        "outputs": _parse_outputs(top.sub("outputs")),
    }
    prov = top.get("provenance", dict, {})
    for key, value in prov.items():
        if not isinstance(value, str | int | float | bool):
            raise top.error(f"provenance.{key}", "expected a string, number or boolean")
    fields["provenance"] = dict(prov)
    top.done()
    return fields


def _archive_members(path: Path) -> dict[str, int]:
    """Member name -> size for the regular files of a zip or tar archive."""
    try:
        if path.name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                return {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}
        with tarfile.open(path, "r:gz") as tf:
            return {m.name: m.size for m in tf.getmembers() if m.isfile()}
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise ModelLoadError(f"{path.name}: cannot read archive: {exc}") from exc


def _read_member(path: Path, member: str) -> bytes:
    try:
        if path.name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                return zf.read(member)
        with tarfile.open(path, "r:gz") as tf:
            fh = tf.extractfile(member)
            if fh is None:
                raise ModelLoadError(f"{path.name}: {member} is not a regular file")
            return fh.read()
    except (OSError, KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise ModelLoadError(f"{path.name}: cannot read {member}: {exc}") from exc


def _find_in_archive(path: Path) -> tuple[str, str]:
    """(model.toml member, model.onnx member): at the root or in one top-level folder."""
    members = _archive_members(path)
    for name in members:
        p = PurePosixPath(name)
        # Nothing is extracted, but refuse archives that would escape if someone did.
        if p.is_absolute() or ".." in p.parts:
            raise ModelLoadError(f"{path.name}: unsafe member name {name!r}")
    tomls = [
        m
        for m in members
        if PurePosixPath(m).name == "model.toml" and len(PurePosixPath(m).parts) <= 2
    ]
    if len(tomls) != 1:
        raise ModelLoadError(
            f"{path.name}: expected one model.toml at the root or in one folder, found {len(tomls)}"
        )
    onnx = str(PurePosixPath(tomls[0]).with_name("model.onnx"))
    if onnx not in members:
        raise ModelLoadError(f"{path.name}: {onnx} is missing")
    return tomls[0], onnx


def sha256_of(data: bytes | Path) -> str:
    """Hex SHA-256 of bytes or of a file (read in 1 MiB blocks)."""
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    with open(data, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _format_of(path: Path) -> int:
    try:
        data = _parse_toml((path / "model.toml").read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"model.toml: cannot read: {exc} (package: {path})") from exc
    fmt = data.get("format", FORMAT_VERSION)
    if fmt not in (1, 2) or isinstance(fmt, bool):
        raise ModelLoadError(f"model.toml: format: this node reads formats 1 and 2, got {fmt!r} "
                             f"(package: {path})")
    return int(fmt)


def _read_format2(path: Path) -> ModelPackage2:
    from dicomnode.modelpkg.format2 import ModelPackage2, parse_format2

    text = (path / "model.toml").read_text(encoding="utf-8")
    fields = parse_format2(_Fields(_parse_toml(text, path), "", path), path)
    for i, member in enumerate(fields["members"]):
        file = path / member.file
        if not file.is_file():
            raise ModelLoadError(f"{member.file}: missing (package: {path})")
        actual = sha256_of(file)
        if actual != member.sha256:
            raise ModelLoadError(
                f"model.toml: members[{i}].sha256: declared {member.sha256[:12]}..., "
                f"{member.file} has {actual[:12]}... (package: {path})"
            )
    for i, case in enumerate(fields["golden"]):
        if not (path / case.file).is_file():
            raise ModelLoadError(f"model.toml: validation.cases[{i}].file: {case.file} is "
                                 f"missing (package: {path})")
    return ModelPackage2(source=path, **fields)


def read_model_package(path: Path | str) -> ModelPackage | ModelPackage2:
    """Read a package and check ``model.toml`` and the checksum, not the graph.

    Parameters
    ----------
    path
        A package directory, or a ``.zip`` / ``.tar.gz`` / ``.tgz`` archive of one.

    Raises
    ------
    ModelLoadError
        Missing files, invalid ``model.toml`` (the message names the key), or a
        ``sha256`` that does not match ``model.onnx``.
    """
    path = Path(path)
    onnx_member = None
    if path.is_dir() and (path / "model.toml").is_file():
        fmt = _format_of(path)
        if fmt == 2:
            return _read_format2(path)
    if path.is_dir():
        toml_file, onnx_file = path / "model.toml", path / "model.onnx"
        for f in (toml_file, onnx_file):
            if not f.is_file():
                raise ModelLoadError(f"{f.name}: missing (package: {path})")
        try:
            text = toml_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"model.toml: cannot read: {exc} (package: {path})") from exc
        actual = sha256_of(onnx_file)
    elif path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES):
        toml_member, onnx_member = _find_in_archive(path)
        try:
            text = _read_member(path, toml_member).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"model.toml: not UTF-8 (package: {path})") from exc
        actual = sha256_of(_read_member(path, onnx_member))
    else:
        raise ModelLoadError(f"{path}: not a model package (a directory, .zip, .tar.gz or .tgz)")
    fields = parse_model_toml(text, path)
    if fields["sha256"] != actual:
        raise ModelLoadError(
            f"model.toml: sha256: declared {fields['sha256'][:12]}..., model.onnx has "
            f"{actual[:12]}... (package: {path})"
        )
    return ModelPackage(source=path, onnx_member=onnx_member, **fields)


def load_model_package(path: Path | str) -> ModelPackage | ModelPackage2:
    """Read a package and check it completely: ``model.toml``, checksum and graph.

    Parameters
    ----------
    path
        A package directory, or a ``.zip`` / ``.tar.gz`` / ``.tgz`` archive of one.

    Returns
    -------
    ModelPackage
        Frozen; :meth:`ModelPackage.read_onnx_bytes` re-checks the checksum.

    Raises
    ------
    ModelLoadError
        Any disagreement, naming the model.toml field.
    ModelError
        Neither onnxruntime nor onnx is installed.
    """
    # modelgraph imports this module, so it is imported here, when a package is loaded
    from dicomnode.modelpkg.graph import check_against_graph, read_graph_signature

    pkg = read_model_package(path)
    if isinstance(pkg, ModelPackage):
        check_against_graph(pkg, read_graph_signature(pkg.read_onnx_bytes()))
    else:
        from dicomnode.modelpkg.graph import check_format2_against_graph

        for i in range(len(pkg.members)):
            check_format2_against_graph(pkg, i, read_graph_signature(pkg.member_bytes(i)))
    return pkg

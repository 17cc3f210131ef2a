"""Writing model packages: ``model.toml`` text from contracts, and the package directory.

The inverse of :func:`dicomnode.modelpkg.format1.parse_model_toml`; what is written is
read back before it is kept.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from dicomnode.modelpkg.format1 import (
    FORMAT_VERSION,
    Code,
    InputContract,
    ModelPackage,
    OutputContract,
    parse_model_toml,
    read_model_package,
    sha256_of,
)

__all__ = ["render_model_toml", "write_model_package"]


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value)
            if math.isfinite(value)
            else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _code_dict(code: Code) -> dict[str, str]:
    return {"scheme": code.scheme, "value": code.value, "meaning": code.meaning}


def render_model_toml(
    *,
    name: str,
    version: str,
    task: str,
    input: InputContract,
    outputs: OutputContract,
    sha256: str,
    description: str = "",
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """``model.toml`` text for these fields (the inverse of :func:`parse_model_toml`)."""
    norm: dict[str, Any] = {"kind": input.normalization.kind}
    for key in ("center", "width", "mean", "std"):
        if getattr(input.normalization, key) is not None:
            norm[key] = float(getattr(input.normalization, key))
    lines = [
        f"format = {FORMAT_VERSION}",
        f"name = {_toml_value(name)}",
        f"version = {_toml_value(version)}",
        f"task = {_toml_value(task)}",
        f"description = {_toml_value(description)}",
        f"sha256 = {_toml_value(sha256)}",
        "",
        "[input]",
        f"name = {_toml_value(input.name)}",
        f"modality = {_toml_value(input.modality)}",
        f"orientation = {_toml_value(input.orientation)}",
        f"layout = {_toml_value(input.layout)}",
        f"spacing_mm = {_toml_value(list(input.spacing_mm) if input.spacing_mm else 'native')}",
        f"size = {_toml_value(list(input.size) if input.size else 'any')}",
        f"size_multiple = {input.size_multiple}",
        f"batch_size = {input.batch_size}",
    ]
    if input.pad_value is not None:
        lines.append(f"pad_value = {_toml_value(float(input.pad_value))}")
    lines += [
        f"normalization = {_toml_value(norm)}",
        "",
        "[outputs]",
        f"name = {_toml_value(outputs.name)}",
        f"kind = {_toml_value(outputs.kind)}",
        f"activation = {_toml_value(outputs.activation)}",
        f"min_component_mm3 = {_toml_value(float(outputs.min_component_mm3))}",
    ]
    for lb in outputs.labels:
        lines += [
            "",
            "[[outputs.labels]]",
            f"number = {lb.number}",
            f"name = {_toml_value(lb.name)}",
            f"category = {_toml_value(_code_dict(lb.category))}",
            f"type = {_toml_value(_code_dict(lb.type))}",
            f"color = {_toml_value(list(lb.color))}",
            f"threshold = {_toml_value(float(lb.threshold))}",
        ]
    if provenance:
        lines += ["", "[provenance]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in provenance.items()]
    return "\n".join(lines) + "\n"


def write_model_package(
    directory: Path | str,
    model: bytes,
    *,
    name: str,
    version: str,
    task: Literal["segmentation", "classification"],
    input: InputContract,
    outputs: OutputContract,
    description: str = "",
    provenance: Mapping[str, Any] | None = None,
) -> ModelPackage:
    """Write ``model.onnx`` and ``model.toml`` (with the checksum) into ``directory``.

    The directory is created if missing; existing ``model.onnx`` / ``model.toml``
    are replaced (each written to a temporary name, then renamed). The graph is
    not checked here: call :func:`load_model_package` on the result for that.

    Returns
    -------
    ModelPackage
        The package as read back.

    Raises
    ------
    ModelLoadError
        The fields do not make a valid ``model.toml``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = render_model_toml(
        name=name,
        version=version,
        task=task,
        input=input,
        outputs=outputs,
        sha256=sha256_of(model),
        description=description,
        provenance=provenance,
    )
    parse_model_toml(text, directory)  # refuse to write what we could not read back
    for fname, data in (("model.onnx", model), ("model.toml", text.encode("utf-8"))):
        tmp = directory / f".{fname}.tmp"
        tmp.write_bytes(data)
        tmp.replace(directory / fname)
    return read_model_package(directory)


def render_toml_document(doc: Mapping[str, Any]) -> str:
    """TOML text for a nested mapping: scalars, arrays and inline tables at the top of each
    table, sub-tables as ``[a.b]``, lists of tables as ``[[a.b]]``."""

    def emit(table: Mapping[str, Any], prefix: str, out: list[str]) -> None:
        subs, arrays = [], []
        for key, value in table.items():
            if isinstance(value, Mapping) and prefix == "" or (
                isinstance(value, Mapping) and any(isinstance(v, Mapping | list)
                                                   for v in value.values())
            ):
                subs.append((key, value))
            elif (isinstance(value, list | tuple) and value
                  and all(isinstance(v, Mapping) for v in value) and prefix != ""
                  and key in ("labels", "cases")):
                arrays.append((key, value))
            else:
                out.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in subs:
            name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
            out.append("")
            out.append(f"[{name}]")
            emit(value, name, out)
        for key, items in arrays:
            name = f"{prefix}.{_toml_key(key)}"
            for item in items:
                out.append("")
                out.append(f"[[{name}]]")
                emit(item, name, out)

    lines: list[str] = []
    emit(doc, "", lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def write_format2_package(
    directory: Path | str,
    members: Mapping[str, bytes],
    document: Mapping[str, Any],
    *,
    extra_files: Mapping[str, bytes] | None = None,
) -> Any:
    """Write a format 2 package: ``members`` (file name -> ONNX bytes), golden cases and
    other ``extra_files`` (relative name -> bytes), and ``model.toml`` from ``document``
    (the TOML as a mapping, without ``format`` and ``members``, which are filled in).

    Returns the package as read back (:class:`~dicomnode.modelpkg.format2.ModelPackage2`).

    Raises
    ------
    ModelLoadError
        The document does not make a valid format 2 ``model.toml``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"format": 2}
    doc.update({k: v for k, v in document.items() if k in ("name", "version", "task",
                                                              "description")})
    doc["members"] = [{"file": name, "sha256": sha256_of(data)} for name, data in members.items()]
    doc.update({k: v for k, v in document.items() if k not in doc})
    text = render_toml_document(doc)
    files = {**members, **(extra_files or {}), "model.toml": text.encode("utf-8")}
    for fname, data in files.items():
        target = directory / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return read_model_package(directory)

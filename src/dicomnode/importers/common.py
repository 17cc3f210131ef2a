"""What both importers share: the ONNX export and its check, golden cases, the report."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import ImportRefused

__all__ = ["ImportReport", "affine_for_axes", "export_checked", "golden_npz", "package_name"]

# letter → LPS unit vector (DICOM patient coordinates: +x left, +y posterior, +z superior)
_LPS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0),
        "S": (0, 0, 1), "I": (0, 0, -1)}


@dataclass
class ImportReport:
    """What an import did: the package written and the figures that justify it."""

    package: Path
    members: list[str]
    max_abs_diff: list[float]
    """ONNX Runtime vs PyTorch on a random patch, per member."""
    golden: list[dict[str, Any]] = field(default_factory=list)
    """The node's golden-case results on the written package (Dice per label)."""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"package": str(self.package), "members": self.members,
                "max_abs_diff": self.max_abs_diff, "golden": self.golden,
                "notes": self.notes, "seconds": round(self.seconds, 2)}


def package_name(raw: str) -> str:
    """A package name ([A-Za-z0-9._-], 1-64) from a dataset or bundle name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.")[:64]
    return name or "imported"


def affine_for_axes(axes: str, spacing: tuple[float, ...]) -> np.ndarray:
    """The LPS affine of an array whose axis ``i`` runs toward ``axes[i]`` with ``spacing[i]``
    mm, first voxel at the origin."""
    out = np.eye(4)
    for i, letter in enumerate(axes):
        out[:3, i] = np.asarray(_LPS[letter], float) * float(spacing[i])
    return out


def export_checked(net: Any, shape: tuple[int, ...], *, seed: int = 0,
                   rtol: float = 1e-3) -> tuple[bytes, float]:
    """Export ``net`` to ONNX with the static input ``shape`` and check ONNX Runtime against
    PyTorch on a random input of that shape: max |ORT − torch| must stay within
    ``rtol × max(1, max |torch|)``.

    Raises
    ------
    ImportRefused
        The exported graph does not reproduce the network.
    """
    import torch

    from dicomnode.modelpkg.graph import cpu_session
    from dicomnode.training.export import export_static

    onnx = export_static(net, shape)
    x = np.random.default_rng(seed).normal(0.0, 1.0, shape).astype(np.float32)
    with torch.inference_mode():
        ref = net.cpu().eval()(torch.from_numpy(x))
    ref = np.asarray((ref[0] if isinstance(ref, list | tuple) else ref).numpy())
    sess = cpu_session(onnx)
    if sess is None:
        raise ImportRefused("onnxruntime is not installed: the exported graph cannot be checked")
    got = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])
    if got.shape != ref.shape:
        raise ImportRefused(f"the exported graph gives shape {got.shape}, PyTorch {ref.shape}")
    diff = float(np.abs(got - ref).max())
    if not diff <= rtol * max(1.0, float(np.abs(ref).max())):
        raise ImportRefused(f"ONNX Runtime differs from PyTorch by {diff:.3g} on a random patch")
    return onnx, diff


def golden_npz(volume: np.ndarray, affine: np.ndarray, labels: np.ndarray) -> bytes:
    """A golden case file: the input volume, its LPS affine, the expected label mask."""
    buf = io.BytesIO()
    np.savez_compressed(buf, volume=volume.astype(np.float32), affine=affine.astype(np.float64),
                        labels=labels.astype(np.uint16))
    return buf.getvalue()


def phantom(shape: tuple[int, ...], modality: str, seed: int = 0) -> np.ndarray:
    """A synthetic body of the modality's intensities: CT in HU (air, soft tissue, a brighter
    lesion, noise); anything else MR-like (background exactly 0, tissue around 300-700)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum(g**2 for g in grids)
    body = r2 < 0.6
    lesion = ((grids[0] + 0.1) ** 2 + grids[1] ** 2 + (grids[2] - 0.2) ** 2) < 0.05
    noise = rng.normal(0.0, 30.0, shape)
    if modality.upper() == "CT":
        out = -900.0 + 940.0 * body + 300.0 * lesion + noise
    else:
        out = np.where(body, 400.0 + 300.0 * lesion + noise, 0.0)
    return out.astype(np.float32)

"""Network axes as patient directions, and reorienting a volume to them.

A volume's index axes run toward patient directions (PS3.3 C.7.6.1.1.1 letters: L/R,
A/P, S/I). The node's volumes are (slice, row, column) arrays with an LPS affine, so an
axial head-first supine stack is ``SPL``: slices toward superior, rows toward
posterior, columns toward the patient's left. A model package states the directions
its network axes run toward (``input.axes``): nnU-Net models trained on SimpleITK-read
DICOM conversions see ``SPL``, TotalSegmentator ``SAR``, MONAI bundles after
``Orientation(axcodes="RAS")`` ``RAS``. Reorienting is a permutation and flips only
(no resampling); a stack whose axes are more than 30 degrees from every body axis is
oblique and refused unless the package allows it (then the nearest codes are used).

Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dicomnode.errors import InferenceError

__all__ = ["Reorientation", "axcodes", "reorientation"]

_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))
"""(negative, positive) direction letters of the LPS patient axes x, y, z."""
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "I": "S", "S": "I"}
_OBLIQUE_COS = math.cos(math.radians(30))


def axcodes(directions: np.ndarray, *, allow_oblique: bool = False) -> str:
    """The patient direction each index axis runs toward.

    Parameters
    ----------
    directions
        (3, 3) matrix whose column ``k`` is the LPS direction of index axis ``k`` (the
        affine's first three columns, any length).
    allow_oblique
        Accept axes far from every body axis (the nearest direction is used).

    Raises
    ------
    InferenceError
        An axis is oblique (and not allowed), or two axes run along one body axis.
    """
    codes = []
    for k in range(3):
        d = np.asarray(directions[:, k], dtype=float)
        d = d / np.linalg.norm(d)
        i = int(np.argmax(np.abs(d)))
        if abs(d[i]) < _OBLIQUE_COS and not allow_oblique:
            raise InferenceError(
                f"index axis {k} is oblique (more than 30 degrees from every body axis); the "
                "model's package does not allow oblique volumes"
            )
        codes.append(_LETTERS[i][1 if d[i] > 0 else 0])
    if len({frozenset((c, _OPPOSITE[c])) for c in codes}) != 3:
        raise InferenceError(f"index axes {''.join(codes)} do not span the three body axes")
    return "".join(codes)


@dataclass(frozen=True)
class Reorientation:
    """Network axis ``i`` is volume axis ``perm[i]``, reversed where ``flips[i]``."""

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Volume axes -> network axes, on the last three axes of ``array`` (a view)."""
        lead = array.ndim - 3
        out = np.transpose(array, [*range(lead), *(lead + p for p in self.perm)])
        for i, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, lead + i)
        return out

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Network axes -> volume axes, on the last three axes of ``array`` (a view)."""
        lead = array.ndim - 3
        out = array
        for i, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, lead + i)
        inverse = np.argsort(self.perm)
        return np.transpose(out, [*range(lead), *(lead + int(p) for p in inverse)])

    def spacing(self, volume_spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Volume-axis spacing in network-axis order."""
        return tuple(float(volume_spacing[p]) for p in self.perm)  # type: ignore[return-value]


def reorientation(volume_codes: str, network_codes: str) -> Reorientation:
    """The permutation and flips that take ``volume_codes`` axes to ``network_codes``.

    Raises
    ------
    ValueError
        The codes do not name the same three body axes.
    """
    perm, flips = [], []
    for target in network_codes:
        for k, code in enumerate(volume_codes):
            if code == target:
                perm.append(k)
                flips.append(False)
                break
            if code == _OPPOSITE[target]:
                perm.append(k)
                flips.append(True)
                break
        else:
            raise ValueError(f"{network_codes!r} is not a reordering of {volume_codes!r}")
    if sorted(perm) != [0, 1, 2]:
        raise ValueError(f"{network_codes!r} is not a reordering of {volume_codes!r}")
    return Reorientation((perm[0], perm[1], perm[2]), (flips[0], flips[1], flips[2]))

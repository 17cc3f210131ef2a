"""Result kinds: what a model's result becomes, one encoder module per kind.

=====  ==================================================  ======================  =========
kind   object                                              for                     module
=====  ==================================================  ======================  =========
SEG    DICOM Segmentation (binary, one segment per label)  segmentation models     ``seg``
SR     TID 1500 Measurement Report (Comprehensive 3D SR)   every model             ``sr``
PM     Parametric Map of an explanation map                image models, positive  ``pm``
KEY    key image: the map over the image (Secondary        image models, positive  ``key``
       Capture, RGB)
=====  ==================================================  ======================  =========

A package lists what it produces (format 2 ``[results] kinds``; format 1: SEG and SR);
``[results] seg`` / ``sr`` switch those two off node-wide; a destination takes the kinds
its ``kinds`` names. Each encoder takes the :class:`~.job.EncodeJob` and returns the
objects it built (none, one, or one per positive label and image), all with UIDs derived
from (study version, model version, kind, what the object is about), so a rerun makes
the same objects and a redelivery never a second one.
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataset import Dataset

from dicomnode.pipeline.kinds import key, pm, seg, sr
from dicomnode.pipeline.kinds.job import EncodeJob

__all__ = ["ENCODERS", "SERIES_NUMBER", "EncodeJob", "kinds_of"]

Encoder = Callable[[EncodeJob], list[Dataset]]

ENCODERS: dict[str, Encoder] = {
    "SEG": seg.encode,
    "SR": sr.encode,
    "PM": pm.encode,
    "KEY": key.encode,
}
"""In encoding order: an SR about a segmentation references the SEG built before it."""

SERIES_NUMBER = {k: m.SERIES_NUMBER for k, m in (("SEG", seg), ("SR", sr), ("PM", pm),
                                                ("KEY", key))}


def kinds_of(package_kinds: tuple[str, ...], *, seg_on: bool, sr_on: bool) -> list[str]:
    """The kinds to build, in :data:`ENCODERS` order."""
    off = {k for k, on in (("SEG", seg_on), ("SR", sr_on)) if not on}
    return [k for k in ENCODERS if k in package_kinds and k not in off]

"""The storage SOP classes the node accepts: pynetdicom's, plus retired ones still sent.

pynetdicom offers the storage SOP classes of the current standard. Archives and older
modalities still send objects of retired classes (PS3.4 Annex B lists them as retired,
PS3.6 Table A-1 keeps their UIDs): ultrasound stored before 1996 under the original
Ultrasound (Multi-frame) Image Storage, nuclear medicine under its retired class, the
trial SR and VL classes. A node next to a PACS receives what the PACS holds, so these
are offered too and stored like any other object (nothing is transcoded).

They are registered with pynetdicom's storage service (``register_uid``), once per
process, so that pynetdicom hands their C-STORE requests to the storage handler.
"""

from __future__ import annotations

import threading

from pynetdicom import AllStoragePresentationContexts, sop_class
from pynetdicom.service_class import StorageServiceClass

__all__ = ["RETIRED_STORAGE_SOP_CLASSES", "storage_sop_classes"]

RETIRED_STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.6": "UltrasoundImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.3": "UltrasoundMultiFrameImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.5": "NuclearMedicineImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.12.3": "XRayAngiographicBiPlaneImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.77.1": "VLImageStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.77.2": "VLMultiFrameImageStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.1": "TextSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.2": "AudioSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.3": "DetailSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.4": "ComprehensiveSRStorageTrialRetired",
}
"""Retired storage SOP classes (PS3.6 Table A-1) that real archives still hold."""

_lock = threading.Lock()


def _register() -> None:
    with _lock:
        for uid, keyword in RETIRED_STORAGE_SOP_CLASSES.items():
            if getattr(sop_class, keyword, None) is None:
                sop_class.register_uid(uid, keyword, StorageServiceClass)


def storage_sop_classes() -> list[str]:
    """Every storage SOP class UID the SCP offers, pynetdicom's first."""
    _register()
    out = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    out += [uid for uid in RETIRED_STORAGE_SOP_CLASSES if uid not in out]
    return out

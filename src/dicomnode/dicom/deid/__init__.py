"""De-identification and re-identification (PS3.15 Annex E), pure: no I/O.

De-identify with a :class:`Deidentifier` (one per node: it caches the compiled
Table E.1-1 and pseudonyms); store :attr:`DeidentifiedInstance.uid_map` and
:attr:`DeidentifiedInstance.identity` in the vault; re-identify outgoing results
with :func:`reidentify`, which ends with the :func:`assert_no_pseudonyms` guard.
See deid.md section 5 for the specification this implements.
"""

from dicomnode.dicom.deid.codec import DeidentifiedBytes as DeidentifiedBytes
from dicomnode.dicom.deid.codec import deidentify_bytes as deidentify_bytes
from dicomnode.dicom.deid.codec import encode as encode
from dicomnode.dicom.deid.codec import read as read
from dicomnode.dicom.deid.engine import Deidentifier as Deidentifier
from dicomnode.dicom.deid.engine import deidentify as deidentify
from dicomnode.dicom.deid.options import CID_7050 as CID_7050
from dicomnode.dicom.deid.options import DeidOptions as DeidOptions
from dicomnode.dicom.deid.options import MaskRule as MaskRule
from dicomnode.dicom.deid.options import PatientNameStyle as PatientNameStyle
from dicomnode.dicom.deid.options import PrivateTagRule as PrivateTagRule
from dicomnode.dicom.deid.options import Region as Region
from dicomnode.dicom.deid.options import RiskFlag as RiskFlag
from dicomnode.dicom.deid.records import DeidentifiedInstance as DeidentifiedInstance
from dicomnode.dicom.deid.records import IdentityRecord as IdentityRecord
from dicomnode.dicom.deid.records import UIDMapEntry as UIDMapEntry
from dicomnode.dicom.deid.reid import MARKER_KEYWORDS as MARKER_KEYWORDS
from dicomnode.dicom.deid.reid import assert_no_pseudonyms as assert_no_pseudonyms
from dicomnode.dicom.deid.reid import reidentify as reidentify

__all__ = [
    "CID_7050",
    "MARKER_KEYWORDS",
    "DeidOptions",
    "DeidentifiedBytes",
    "DeidentifiedInstance",
    "Deidentifier",
    "IdentityRecord",
    "MaskRule",
    "PatientNameStyle",
    "PrivateTagRule",
    "Region",
    "RiskFlag",
    "UIDMapEntry",
    "assert_no_pseudonyms",
    "deidentify",
    "deidentify_bytes",
    "encode",
    "read",
    "reidentify",
]

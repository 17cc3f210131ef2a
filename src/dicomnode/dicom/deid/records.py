"""What de-identification returns besides the clean dataset: the vault records.

Every record is a frozen dataclass of JSON-able fields (str, int, None, tuples of
str) with ``to_json()``/``from_json()``, so that the caller can encrypt and store it
(the identity vault, deid.md 5.4). They hold patient data: never log them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.dicom.deid.options import RiskFlag

__all__ = ["DeidentifiedInstance", "IdentityRecord", "UIDMapEntry"]


@dataclass(frozen=True)
class UIDMapEntry:
    """One replaced UID: ``pseudonym`` (in the de-identified data) -> ``original``."""

    pseudonym: str
    original: str

    def to_json(self) -> dict[str, str]:
        return {"pseudonym": self.pseudonym, "original": self.original}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> UIDMapEntry:
        return cls(pseudonym=data["pseudonym"], original=data["original"])


@dataclass(frozen=True)
class IdentityRecord:
    """Original Patient and General Study module values, with their pseudonyms.

    Everything :func:`~dicomnode.dicom.deid.reid.reidentify` needs to rebuild those
    modules on an outgoing object. A value is None when the attribute was absent
    from the input and ``""`` when it was present and empty. Person names are in
    their DICOM string form (``Family^Given``, ``=``-separated groups).

    Attributes
    ----------
    specific_character_set
        The input's Specific Character Set (``\\``-joined), so that restored names can
        be encoded again.
    patient_pseudonym
        The pseudonymous Patient ID (also the basis of the pseudonymous name).
    date_shift_days
        Whole days added to every date of this patient (0 when dates were not shifted).
    pseudo_study_instance_uid, pseudo_accession_number, pseudo_study_id
        The values the de-identified instances carry.
    """

    patient_name: str | None
    patient_id: str
    issuer_of_patient_id: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    patient_age: str | None
    study_instance_uid: str
    accession_number: str | None
    study_id: str | None
    study_date: str | None
    study_time: str | None
    referring_physician_name: str | None
    study_description: str | None
    specific_character_set: str | None
    patient_pseudonym: str
    date_shift_days: int
    pseudo_study_instance_uid: str
    pseudo_accession_number: str | None
    pseudo_study_id: str | None
    placer_order_number: str | None = None
    """Placer Order Number / Imaging Service Request (0040,2016), if the modality sent it."""
    filler_order_number: str | None = None
    """Filler Order Number / Imaging Service Request (0040,2017), if the modality sent it."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IdentityRecord:
        names = {f.name for f in fields(cls)}
        # the order numbers came later: identities stored before them have none
        missing = names - data.keys() - {"placer_order_number", "filler_order_number"}
        if missing:
            raise ValueError(f"IdentityRecord.from_json: missing fields {sorted(missing)}")
        return cls(**{k: data[k] for k in names if k in data})

    def pseudonyms(self) -> tuple[str, ...]:
        """The non-UID pseudonyms an outgoing object must not carry (for the guard)."""
        return tuple(
            v
            for v in (self.patient_pseudonym, self.pseudo_accession_number, self.pseudo_study_id)
            if v
        )


@dataclass(frozen=True)
class DeidentifiedInstance:
    """The result of de-identifying one instance.

    Attributes
    ----------
    dataset
        The de-identified dataset, with new File Meta (``dataset.file_meta``) and a
        zero preamble. It shares unchanged raw elements and values (Pixel Data bytes)
        with the input, which is not modified.
    uid_map
        Every UID replaced, pseudonym -> original, in first-seen order, each once.
    identity
        Original Patient/Study values for the vault.
    flags
        Pixel and content risks found (:class:`RiskFlag`); the caller decides.
    quarantine
        True when a flag is in ``DeidOptions.quarantine_flags``: the default policy
        is not to store this instance in the de-identified corpus.
    methods
        CID 7050 codes written to De-identification Method Code Sequence.
    pixels_cleaned
        A :class:`~dicomnode.dicom.deid.options.MaskRule` blanked pixels (113101 claimed).
    """

    dataset: Dataset
    uid_map: tuple[UIDMapEntry, ...]
    identity: IdentityRecord
    flags: tuple[RiskFlag, ...]
    quarantine: bool
    methods: tuple[str, ...]
    pixels_cleaned: bool

    @property
    def sop_instance_uid(self) -> str:
        """The pseudonymous SOP Instance UID."""
        return str(self.dataset.SOPInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        """The pseudonymous Series Instance UID."""
        return str(self.dataset.SeriesInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        """The pseudonymous Study Instance UID."""
        return self.identity.pseudo_study_instance_uid

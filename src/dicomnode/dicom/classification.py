"""Build a TID 1500 Measurement Report for an image classifier's labels.

One report per study and model. After the header items of TID 1500 (language, the node
as device observer, Procedure Reported), Imaging Measurements holds one TID 1501
"Measurement and Qualitative Evaluation Group" per (image, label):

- Tracking Identifier: the label's name and the image (e.g. "Nodule (image 1)");
  Tracking Unique Identifier derived from the image's SOP Instance UID, the model and
  the label, so that a rerun of the same model on the same image keeps it;
- Source image of the group (the classified image, TID 1501 "Image Library Entry"
  reference through highdicom's ``SourceImageForMeasurementGroup``);
- Finding Type / Category: the label's codes;
- Algorithm Identification (TID 4019);
- one qualitative evaluation (concept: the label's type code, value
  (52101004, SCT, "Present") at or above the package threshold, else
  (272519000, SCT, "Absent"), CID 240);
- one measurement (TID 300): (122157, DCM, "Probability"), unit (1, UCUM, "no units"),
  the model's probability.

The report-level Qualitative Evaluations container (as in :mod:`dicomnode.dicom.sr`)
repeats present/absent per label type over all images, for a worklist summary.

Pure: no files, no network. A bad argument raises ``ValueError`` naming it.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.dicom.findings import (
    AlgorithmSpec,
    CodeTriple,
    DeviceSpec,
    InstanceReference,
    as_code,
    check_lo,
    check_uid,
    derived_uid,
)
from dicomnode.dicom.sr import ABSENT, PRESENT, QUALITATIVE_EVALUATIONS, finish_report

__all__ = ["PROBABILITY", "ClassifiedLabel", "build_classification_report"]

PROBABILITY = CodeTriple("DCM", "122157", "Probability")
_NO_UNITS = CodeTriple("UCUM", "1", "no units")
_PROCEDURES = {
    "CR": codes.cid100.ImagingProcedure,
    "DX": codes.cid100.ImagingProcedure,
}


def _concept(code: CodeTriple) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


@dataclass(frozen=True)
class ClassifiedLabel:
    """What the classifier said about one label on one image."""

    image_index: int
    """Index into the report's ``source_images``."""
    label: str
    """The label's name (Tracking Identifier)."""
    finding_type: CodeTriple
    finding_category: CodeTriple
    probability: float
    threshold: float

    def __post_init__(self) -> None:
        if not isinstance(self.image_index, int) or self.image_index < 0:
            raise ValueError(f"ClassifiedLabel.image_index must be an int >= 0, "
                             f"got {self.image_index!r}")
        check_lo(self.label, "ClassifiedLabel.label")
        object.__setattr__(self, "finding_type",
                           as_code(self.finding_type, "ClassifiedLabel.finding_type"))
        object.__setattr__(self, "finding_category",
                           as_code(self.finding_category, "ClassifiedLabel.finding_category"))
        for name in ("probability", "threshold"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"ClassifiedLabel.{name} must be in [0, 1], got {v!r}")
            object.__setattr__(self, name, v)

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


def build_classification_report(
    source_images: Sequence[Dataset],
    labels: Sequence[ClassifiedLabel],
    algorithm: AlgorithmSpec,
    *,
    device: DeviceSpec,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    supersedes: InstanceReference | None = None,
    content_datetime: _dt.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one classifier on one study's images.

    Parameters
    ----------
    source_images
        The classified images (headers suffice; one study). Patient and study
        attributes come from the first; all are listed as evidence.
    labels
        One entry per (image, label); at least one.
    algorithm, device
        The model (TID 4019) and the node (General Equipment, TID 1004 observer).
    series_instance_uid, sop_instance_uid, series_number
        Used as given (the caller derives deterministic ones).
    supersedes
        An earlier report of the same study this one replaces (Predecessor Documents
        Sequence, Purpose of Reference "Replaced report", CID 7009).
    content_datetime
        Content and Series Date/Time and Instance Creation; None uses now.

    Raises
    ------
    ValueError
        No images or labels, images of several studies, an image index out of range,
        a bad identifier.
    """
    if not source_images:
        raise ValueError("source_images is empty")
    if not labels:
        raise ValueError("labels is empty: a classifier reports every label it has")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in source_images}
    if len(studies) != 1 or studies == {""}:
        raise ValueError("source_images must share one StudyInstanceUID")
    for i, lb in enumerate(labels):
        if not isinstance(lb, ClassifiedLabel):
            raise ValueError(f"labels[{i}] is a {type(lb).__name__}, expected ClassifiedLabel")
        if lb.image_index >= len(source_images):
            raise ValueError(f"labels[{i}].image_index is {lb.image_index}, "
                             f"but there are {len(source_images)} source images")
    check_uid(series_instance_uid, "series_instance_uid")
    check_uid(sop_instance_uid, "sop_instance_uid")
    if supersedes is not None and supersedes.sop_instance_uid == sop_instance_uid:
        raise ValueError("supersedes references the SOP instance being built")
    first = source_images[0]
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, family=algorithm.family.to_code(),
        manufacturer=algorithm.source,
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=str(device.device_observer_uid),
            name=device.device_observer_name or device.manufacturer_model_name,
            manufacturer_name=device.manufacturer,
            model_name=device.manufacturer_model_name,
            serial_number=device.device_serial_number,
        ),
    )
    groups = []
    for lb in labels:
        image = source_images[lb.image_index]
        tracking_uid = derived_uid("classification", str(image.SOPInstanceUID),
                                   algorithm.name, lb.label)
        identifier = f"{lb.label} (image {lb.image_index + 1})"[:64]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid,
                                                         identifier=identifier),
            finding_type=_concept(lb.finding_type),
            finding_category=_concept(lb.finding_category),
            algorithm_id=algorithm_id,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(image)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=_concept(lb.finding_type),
                value=_concept(PRESENT if lb.present else ABSENT),
            )],
            measurements=[hd.sr.Measurement(
                name=_concept(PROBABILITY), value=lb.probability, unit=_concept(_NO_UNITS),
            )],
        ))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURES.get(str(first.get("Modality", "")),
                                           codes.cid100.ImagingProcedure),
        imaging_measurements=groups,
    )
    root = report[0]
    by_type: dict[CodeTriple, bool] = {}
    for lb in labels:
        by_type[lb.finding_type] = by_type.get(lb.finding_type, False) or lb.present
    summary = hd.sr.ContainerContentItem(
        name=_concept(QUALITATIVE_EVALUATIONS),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    summary.ContentSequence = hd.sr.ContentSequence([
        hd.sr.CodeContentItem(name=_concept(code), value=_concept(PRESENT if p else ABSENT),
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for code, p in by_type.items()
    ])
    root.ContentSequence.append(summary)
    previous = None
    if supersedes is not None:
        pre = Dataset()
        pre.StudyInstanceUID = supersedes.study_instance_uid
        pre.SeriesInstanceUID = supersedes.series_instance_uid
        pre.SOPClassUID = supersedes.sop_class_uid
        pre.SOPInstanceUID = supersedes.sop_instance_uid
        previous = [pre]
    dates = {}
    if content_datetime is not None:
        dates = {"content_date": content_datetime.date(),
                 "content_time": content_datetime.time(),
                 "series_date": content_datetime.date(),
                 "series_time": content_datetime.time()}
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(source_images),
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.manufacturer_model_name,
        software_versions=device.software_versions,
        device_serial_number=device.device_serial_number,
        institution_name=device.institution_name,
        series_description=f"{algorithm.name} {algorithm.version} SR"[:64],
        is_complete=True,
        previous_versions=previous,
        **dates,
    )
    return finish_report(sr, replaces=supersedes is not None,
                         content_datetime=content_datetime)

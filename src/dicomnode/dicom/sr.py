"""Build a TID 1500 Measurement Report (Comprehensive 3D SR) about a model's SEG.

One report per study and model. Its content tree (PS3.16 TID 1500):

- Language, Observer Context with the node as device observer (TID 1002/1004:
  Device Observer UID, Name, Manufacturer, Model Name, Serial Number),
  Procedure Reported (CID 100).
- Imaging Measurements (126010, DCM): one TID 1411 "Volumetric ROI
  Measurements and Qualitative Evaluations" group per :class:`Finding`, whose
  region is the SEG segment (Referenced Segment: SEG SOP instance + segment
  number, with the source series as Source Series for Segmentation). Tracking
  Identifier is the finding's label; Tracking Unique Identifier is the SEG
  segment's Tracking UID, linking group and segment. Finding Type / Category
  are the segment's property type / category. Algorithm Identification (TID
  4019: name, version, family, source, parameters) is attached to the group.
  Measurements (TID 300):

  ====================  ==================================  =======================  ===========
  Finding field         Concept name                        Derivation (CID 7464)    Unit (UCUM)
  ====================  ==================================  =======================  ===========
  volume_mm3            (118565006, SCT, "Volume")          –                        mm3
  max_diameter_mm       (81827009, SCT, "Diameter")         (56851009, SCT,          mm
                                                            "Maximum")
  mean_intensity        (112031, DCM, "Attenuation          (373098007, SCT,         [hnsf'U]
                        Coefficient")                       "Mean")
  ====================  ==================================  =======================  ===========

  (the name/derivation pairs follow the dcmqi/QIICR TID 1500 convention; mean
  intensity is written for CT only, since HU is its unit).
  Then one group per :class:`ComponentFinding` (a finding one by one: one connected
  component of a segment, IHE AI Results style): its own Tracking Identifier and UID,
  volume, 3D diameter, Long axis (103339001, SCT) and Short axis (103340004, SCT) in
  mm, mean HU; its region a Referenced Segment (the SEG segment it belongs to) with the
  source images it spans as Source Image for Segmentation; its location two items
  extending TID 1411 (concept (128138, DCM, "Center of Mass"), CID 219): a SCOORD3D
  POINT in the source Frame of Reference and a SCOORD POINT SELECTED FROM the source
  image nearest the centroid.
- Qualitative Evaluations (C0034375, UMLS, "Qualitative Evaluations"), TID 1500
  row 12, the report-level summary a PACS or worklist can show: one CODE item
  per distinct segment property type of the SEG, concept name = that type
  (e.g. (108369006, SCT, "Neoplasm")), value (52101004, SCT, "Present") when a
  finding of that type has a volume above 0, else (272519000, SCT, "Absent")
  (CID 240 "Present-Absent"). With no findings at all, this is the report's
  only content after the header items (Imaging Measurements is optional in
  TID 1500; highdicom's MeasurementReport needs at least one group, so that
  case is assembled from highdicom content items directly).

A report that supersedes an earlier one lists it in Predecessor Documents
Sequence (PS3.3 C.17.2, the standard mechanism for SR), with Purpose of
Reference (121360, DCM, "Replaced report") from CID 7009.

Pure: no files, no network. Arguments are validated before anything is built;
a bad one raises ``ValueError`` naming it (actual vs expected).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from dicomnode.dicom.findings import (
    AlgorithmSpec,
    CodeTriple,
    ComponentFinding,
    DeviceSpec,
    Finding,
    InstanceReference,
    as_code,
    check_lo,
    check_uid,
    derived_uid,
    pin_times,
)
from dicomnode.dicom.seg import REPLACED_PURPOSE

__all__ = [
    "ABSENT",
    "CENTER_OF_MASS",
    "ComponentFinding",
    "PRESENT",
    "QUALITATIVE_EVALUATIONS",
    "Finding",
    "build_measurement_report",
]

PRESENT = CodeTriple("SCT", "52101004", "Present")
ABSENT = CodeTriple("SCT", "272519000", "Absent")
QUALITATIVE_EVALUATIONS = CodeTriple("UMLS", "C0034375", "Qualitative Evaluations")
_DIAMETER = CodeTriple("SCT", "81827009", "Diameter")
_LONG_AXIS = CodeTriple("SCT", "103339001", "Long axis")
_SHORT_AXIS = CodeTriple("SCT", "103340004", "Short axis")
CENTER_OF_MASS = CodeTriple("DCM", "128138", "Center of Mass")
"""Concept name of a finding's location items (CID 219, as a geometric purpose)."""
_ATTENUATION = CodeTriple("DCM", "112031", "Attenuation Coefficient")
_LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
_PROCEDURES = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
}
_TYPE2_SOURCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def _concept(code: CodeTriple) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _check_sources(source_datasets: Sequence[Dataset]) -> None:
    if len(source_datasets) == 0:
        raise ValueError("source_datasets is empty, expected the source series' instances")
    for i, ds in enumerate(source_datasets):
        if not isinstance(ds, Dataset):
            raise ValueError(
                f"source_datasets[{i}] is a {type(ds).__name__}, expected a pydicom Dataset"
            )
        for keyword in ("SOPClassUID", "SOPInstanceUID"):
            if keyword not in ds:
                raise ValueError(f"source_datasets[{i}] lacks {keyword}")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        values = {str(ds.get(keyword, "")) for ds in source_datasets}
        if len(values) != 1 or values == {""}:
            raise ValueError(
                f"source_datasets must share one {keyword}, got {len(values)} different values"
            )
    for keyword in _TYPE2_SOURCE:
        if keyword not in source_datasets[0]:
            raise ValueError(
                f"source_datasets[0] lacks {keyword} (Type 2: keep it present, empty if need be)"
            )


def _segment_items(
    segmentation: Dataset, source_series_uid: str, study_uid: str
) -> dict[int, Dataset]:
    if not isinstance(segmentation, Dataset):
        raise ValueError(
            f"segmentation must be a pydicom Dataset, got {type(segmentation).__name__}"
        )
    if str(segmentation.get("SOPClassUID", "")) not in (
        SegmentationStorage,
        _LABEL_MAP_SEGMENTATION_STORAGE,
    ):
        raise ValueError("segmentation is not a Segmentation (SOPClassUID)")
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if keyword not in segmentation:
            raise ValueError(f"segmentation lacks {keyword}")
    if str(segmentation.StudyInstanceUID) != study_uid:
        raise ValueError("segmentation belongs to another study than source_datasets")
    referenced = {
        str(s.get("SeriesInstanceUID", ""))
        for s in segmentation.get("ReferencedSeriesSequence", [])
    }
    if source_series_uid not in referenced:
        raise ValueError(
            "segmentation does not reference the series of source_datasets "
            "(ReferencedSeriesSequence)"
        )
    items = {int(item.SegmentNumber): item for item in segmentation.get("SegmentSequence", [])}
    items.pop(0, None)  # LABELMAP background
    if not items:
        raise ValueError("segmentation has no SegmentSequence items")
    return items


def _code_of(item: Dataset, keyword: str) -> CodeTriple:
    c = item[keyword][0]
    return CodeTriple(str(c.CodingSchemeDesignator), str(c.CodeValue), str(c.CodeMeaning))


def _measurements(finding: Finding) -> list[hd.sr.Measurement]:
    # The group's Algorithm Identification covers its measurements; repeating
    # it on each (TID 300 allows it) only adds noise.
    out = [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=finding.volume_mm3,
            unit=codes.UCUM.CubicMillimeter,
        )
    ]
    if finding.max_diameter_mm is not None:
        out.append(
            hd.sr.Measurement(
                name=_concept(_DIAMETER),
                value=finding.max_diameter_mm,
                unit=codes.UCUM.Millimeter,
                derivation=codes.SCT.Maximum,
            )
        )
    if finding.mean_intensity is not None:
        out.append(
            hd.sr.Measurement(
                name=_concept(_ATTENUATION),
                value=finding.mean_intensity,
                unit=codes.UCUM.HounsfieldUnit,
                derivation=codes.SCT.Mean,
            )
        )
    return out


def _component_measurements(c: ComponentFinding) -> list[hd.sr.Measurement]:
    out = [
        hd.sr.Measurement(
            name=codes.SCT.Volume, value=c.volume_mm3, unit=codes.UCUM.CubicMillimeter
        )
    ]
    if c.max_diameter_mm is not None:
        out.append(
            hd.sr.Measurement(
                name=_concept(_DIAMETER),
                value=c.max_diameter_mm,
                unit=codes.UCUM.Millimeter,
                derivation=codes.SCT.Maximum,
            )
        )
    for code, value in ((_LONG_AXIS, c.long_axis_mm), (_SHORT_AXIS, c.short_axis_mm)):
        if value is not None:
            out.append(
                hd.sr.Measurement(name=_concept(code), value=value, unit=codes.UCUM.Millimeter)
            )
    if c.mean_intensity is not None:
        out.append(
            hd.sr.Measurement(
                name=_concept(_ATTENUATION),
                value=c.mean_intensity,
                unit=codes.UCUM.HounsfieldUnit,
                derivation=codes.SCT.Mean,
            )
        )
    return out


def _source_frame(
    source_datasets: Sequence[Dataset], frame_numbers: Sequence[int] | None, index: int
) -> tuple[Dataset, int | None]:
    if frame_numbers is None:
        return source_datasets[index], None
    return source_datasets[0], int(frame_numbers[index])


def _component_group(
    c: ComponentFinding,
    *,
    item: Dataset,
    segmentation: Dataset,
    source_datasets: Sequence[Dataset],
    frame_numbers: Sequence[int] | None,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One TID 1411 group about one component: its region is its SEG segment restricted
    to the source images it spans (Referenced Segment with those images as Source Image
    for Segmentation; naming SEG frames instead is not allowed together with the
    segment number, PS3.3 C.17.3.2.1), its location a SCOORD3D point (patient
    coordinates) and a SCOORD point on the source image nearest the centroid."""
    sources = [_source_frame(source_datasets, frame_numbers, i) for i in c.frames]
    if frame_numbers is None:
        source_images = [
            hd.sr.SourceImageForSegmentation(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
            for ds, _ in sources
        ]
    else:
        ds0 = source_datasets[0]
        source_images = [
            hd.sr.SourceImageForSegmentation(
                str(ds0.SOPClassUID),
                str(ds0.SOPInstanceUID),
                referenced_frame_numbers=[int(f) for _, f in sources],  # type: ignore[misc]
            )
        ]
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=c.tracking_uid, identifier=c.tracking_identifier
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(segmentation.SOPClassUID),
            sop_instance_uid=str(segmentation.SOPInstanceUID),
            segment_number=c.label_number,
            source_images=source_images,
        ),
        finding_type=_concept(_code_of(item, "SegmentedPropertyTypeCodeSequence")),
        finding_category=_concept(_code_of(item, "SegmentedPropertyCategoryCodeSequence")),
        algorithm_id=algorithm_id,
        measurements=_component_measurements(c),
    )
    # Location: TID 1411 is extensible and has no row for a centre point, so the two
    # items below extend it (concept from CID 219); a reader that does not know them
    # skips them (dcmqi's tid1500reader does).
    content = group[0].ContentSequence
    ds, frame = _source_frame(source_datasets, frame_numbers, c.centroid_frame)
    for_uid = str(ds.get("FrameOfReferenceUID", "") or source_datasets[0].get(
        "FrameOfReferenceUID", ""))
    if for_uid:
        content.append(
            hd.sr.Scoord3DContentItem(
                name=_concept(CENTER_OF_MASS),
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.array([c.centroid_mm], dtype=np.float64),
                frame_of_reference_uid=for_uid,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    point = hd.sr.ScoordContentItem(
        name=_concept(CENTER_OF_MASS),
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([c.centroid_pixel], dtype=np.float64),
        pixel_origin_interpretation=(
            hd.sr.PixelOriginInterpretationValues.FRAME if frame is not None else None
        ),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    point.ContentSequence = [
        hd.sr.SourceImageForRegion(
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            referenced_frame_numbers=[frame] if frame is not None else None,
        )
    ]
    content.append(point)
    return group


def _qualitative_container(
    segment_items: dict[int, Dataset], findings: Sequence[Finding]
) -> hd.sr.ContainerContentItem:
    present_numbers = {f.label_number for f in findings if f.volume_mm3 > 0}
    by_type: dict[CodeTriple, bool] = {}
    for number in sorted(segment_items):
        code = _code_of(segment_items[number], "SegmentedPropertyTypeCodeSequence")
        by_type[code] = by_type.get(code, False) or number in present_numbers
    container = hd.sr.ContainerContentItem(
        name=_concept(QUALITATIVE_EVALUATIONS),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=_concept(code),
                value=_concept(PRESENT if present else ABSENT),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for code, present in by_type.items()
        ]
    )
    return container


def build_measurement_report(
    source_datasets: Sequence[Dataset],
    segmentation: Dataset,
    findings: Sequence[Finding],
    algorithm: AlgorithmSpec,
    *,
    device: DeviceSpec,
    components: Sequence[ComponentFinding] = (),
    frame_numbers: Sequence[int] | None = None,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    procedure_reported: CodeTriple | None = None,
    series_description: str | None = None,
    supersedes: InstanceReference | None = None,
    content_datetime: _dt.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report for one model's results on one series.

    Parameters
    ----------
    source_datasets
        The source images (headers suffice), e.g. ``Volume.headers``; patient
        and study attributes are copied from the first, and all are recorded
        as evidence (Current Requested Procedure Evidence Sequence).
    segmentation
        The SEG the findings are about (as built by
        :func:`dicomnode.dicom.seg.build_seg`; headers suffice). It must
        reference the source series.
    findings
        At most one per SEG segment (the per-label totals); empty for a negative report.
    components
        The findings one by one (connected components), each its own group after the
        totals: Tracking Identifier and UID as given, volume, 3D diameter, long and
        short axis, mean HU, its centroid as a SCOORD3D point and as a SCOORD point on
        the nearest source image, and its region as a Referenced Segment naming the
        SEG frames of its segment it lies in and the source images it spans.
    frame_numbers
        One multi-frame source: the frame number of each mask frame (as for the SEG);
        components' frame indices index it. None: they index ``source_datasets``.
    algorithm
        The model (TID 4019 Algorithm Identification).
    device
        The node: General Equipment and the device observer (TID 1004).
    series_instance_uid, sop_instance_uid, series_number, instance_number
        Identifiers, used as given (the caller derives deterministic ones).
    procedure_reported
        CID 100 code; None picks "<modality> unspecified body region" (LOINC)
        for CT/MR/PT/NM and (363679005, SCT, "Imaging procedure") otherwise.
    series_description
        None gives "<algorithm name> <version> SR".
    supersedes
        An earlier report (same study) this one replaces: Predecessor
        Documents Sequence with Purpose of Reference "Replaced report".
    content_datetime
        Content, Series and Instance Creation Date/Time; None uses now.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Completion Flag COMPLETE, Verification Flag UNVERIFIED, Preliminary
        Flag PRELIMINARY (no human has signed it).

    Raises
    ------
    ValueError
        An argument is invalid: empty or mixed sources; a SEG of another study
        or not referencing the source series; a finding for a segment the SEG
        does not have, or two findings for one segment; mean intensity for a
        non-CT series; bad identifiers; a component of an unknown segment, naming a
        frame that does not exist, or sharing a tracking UID with another.
    """
    _check_sources(source_datasets)
    src = source_datasets[0]
    study_uid = str(src.StudyInstanceUID)
    source_series_uid = str(src.SeriesInstanceUID)
    segment_items = _segment_items(segmentation, source_series_uid, study_uid)
    if not isinstance(algorithm, AlgorithmSpec):
        raise ValueError(f"algorithm must be an AlgorithmSpec, got {type(algorithm).__name__}")
    if not isinstance(device, DeviceSpec):
        raise ValueError(f"device must be a DeviceSpec, got {type(device).__name__}")
    seen: dict[int, int] = {}
    for i, f in enumerate(findings):
        if not isinstance(f, Finding):
            raise ValueError(f"findings[{i}] is a {type(f).__name__}, expected Finding")
        if f.label_number not in segment_items:
            raise ValueError(
                f"findings[{i}].label_number is {f.label_number}, "
                "but the segmentation has segments "
                f"{sorted(segment_items)}"
            )
        if f.label_number in seen:
            raise ValueError(
                f"findings[{i}] and findings[{seen[f.label_number]}] both refer to segment "
                f"{f.label_number}; a measurement group's region is the whole segment, "
                "so give each lesion its own segment"
            )
        seen[f.label_number] = i
        if f.mean_intensity is not None and str(src.get("Modality", "")) != "CT":
            raise ValueError(
                f"findings[{i}].mean_intensity is set, but the source Modality is not CT "
                "(mean intensity is written in HU)"
            )
    n_frames = len(frame_numbers) if frame_numbers is not None else len(source_datasets)
    if frame_numbers is not None and len(source_datasets) != 1:
        raise ValueError("frame_numbers is only for one multi-frame source")
    uids: set[str] = set()
    for i, c in enumerate(components):
        if not isinstance(c, ComponentFinding):
            raise ValueError(f"components[{i}] is a {type(c).__name__}, expected ComponentFinding")
        if c.label_number not in segment_items:
            raise ValueError(
                f"components[{i}].label_number is {c.label_number}, but the segmentation "
                f"has segments {sorted(segment_items)}"
            )
        if max(c.frames) >= n_frames or c.centroid_frame >= n_frames:
            raise ValueError(
                f"components[{i}] names a frame beyond the {n_frames} source frames"
            )
        if c.tracking_uid in uids:
            raise ValueError(f"components[{i}].tracking_uid is used by another component")
        uids.add(c.tracking_uid)
        if c.mean_intensity is not None and str(src.get("Modality", "")) != "CT":
            raise ValueError(
                f"components[{i}].mean_intensity is set, but the source Modality is not CT"
            )
    check_uid(series_instance_uid, "series_instance_uid")
    check_uid(sop_instance_uid, "sop_instance_uid")
    for name, value in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
            raise ValueError(f"{name} must be an int in 1..2147483647 (IS), got {value!r}")
    if procedure_reported is None:
        procedure = _PROCEDURES.get(str(src.get("Modality", "")), codes.cid100.ImagingProcedure)
    else:
        procedure = as_code(procedure_reported, "procedure_reported").to_code()
    if series_description is None:
        series_description = f"{algorithm.name} {algorithm.version} SR"[:64]
    check_lo(series_description, "series_description")
    if supersedes is not None:
        if not isinstance(supersedes, InstanceReference):
            raise ValueError(
                f"supersedes must be an InstanceReference, got {type(supersedes).__name__}"
            )
        if supersedes.study_instance_uid != study_uid:
            raise ValueError(
                "supersedes must reference an instance of the same study as source_datasets"
            )
        if supersedes.sop_instance_uid == sop_instance_uid:
            raise ValueError("supersedes references the SOP instance being built")

    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        family=algorithm.family.to_code(),
        manufacturer=algorithm.source,
        parameters=[f"{k}={v}" for k, v in algorithm.parameters.items()]
        if algorithm.parameters
        else None,
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
    observation_context = hd.sr.ObservationContext(observer_device_context=observer)

    groups = []
    for f in findings:
        item = segment_items[f.label_number]
        tracking_uid = str(item.get("TrackingUID", "")) or derived_uid(
            sop_instance_uid, "tracking", f.label_number
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f.label),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(segmentation.SOPClassUID),
                    sop_instance_uid=str(segmentation.SOPInstanceUID),
                    segment_number=f.label_number,
                    source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
                ),
                finding_type=_concept(_code_of(item, "SegmentedPropertyTypeCodeSequence")),
                finding_category=_concept(_code_of(item, "SegmentedPropertyCategoryCodeSequence")),
                algorithm_id=algorithm_id,
                measurements=_measurements(f),
            )
        )

    for c in components:
        groups.append(
            _component_group(
                c,
                item=segment_items[c.label_number],
                segmentation=segmentation,
                source_datasets=source_datasets,
                frame_numbers=frame_numbers,
                algorithm_id=algorithm_id,
            )
        )

    qualitative = _qualitative_container(segment_items, findings)
    if groups:
        report = hd.sr.MeasurementReport(
            observation_context=observation_context,
            procedure_reported=procedure,
            imaging_measurements=groups,
        )
        root = report[0]
    else:
        # TID 1500 makes Imaging Measurements optional; highdicom's
        # MeasurementReport does not, so build the same header items by hand.
        root = hd.sr.ContainerContentItem(
            name=codes.cid7021.ImagingMeasurementReport, template_id="1500"
        )
        root.ContentSequence = hd.sr.ContentSequence(
            [
                *hd.sr.LanguageOfContentItemAndDescendants(
                    hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
                ),
                *observation_context,
                hd.sr.CodeContentItem(
                    name=codes.DCM.ProcedureReported,
                    value=procedure,
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
                ),
            ]
        )
    root.ContentSequence.append(qualitative)

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
        dates = {
            "content_date": content_datetime.date(),
            "content_time": content_datetime.time(),
            "series_date": content_datetime.date(),
            "series_time": content_datetime.time(),
        }
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_datasets, segmentation],
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.manufacturer_model_name,
        software_versions=device.software_versions,
        device_serial_number=device.device_serial_number,
        institution_name=device.institution_name,
        series_description=series_description,
        is_complete=True,
        previous_versions=previous,
        **dates,
    )
    return finish_report(sr, replaces=supersedes is not None,
                         content_datetime=content_datetime)


def finish_report(sr: hd.sr.Comprehensive3DSR, *, replaces: bool,
                  content_datetime: _dt.datetime | None) -> hd.sr.Comprehensive3DSR:
    """Mark the predecessors of a superseding report as replaced and pin its times.

    Purpose of Reference sits on the Referenced SOP Sequence item (the level dciodvfy
    accepts it at); CID 7009 "Replaced report".
    """
    if replaces:
        purpose = _concept(REPLACED_PURPOSE)
        for study in sr.PredecessorDocumentsSequence:
            for series in study.ReferencedSeriesSequence:
                for sop in series.ReferencedSOPSequence:
                    sop.PurposeOfReferenceCodeSequence = [purpose]
    if content_datetime is not None:
        pin_times(sr, content_datetime)
    return sr

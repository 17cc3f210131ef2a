"""The node's labels as training data for the ecosystems the models came from.

:func:`write_nnunet_raw` writes an nnU-Net v2 raw dataset (``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``, ``dataset.json``) that ``nnUNetv2_plan_and_preprocess``
accepts, plus ``splits_final.json`` with every patient's studies in one fold (nnU-Net's
own splits are by case, which puts a patient's studies on both sides; copy the file into
``nnUNet_preprocessed/DatasetXXX_Name/`` after planning) and a MONAI datalist
(``datalist.json``: ``training`` entries with ``image``, ``label`` and ``fold``, as
``monai.data.load_decathlon_datalist`` and Auto3DSeg read them) over the same files.

Geometry: the NIfTI files carry the DICOM geometry (the RAS affine a DICOM converter
writes), so nnU-Net's SimpleITK reader returns the node's (slice, row, column) arrays:
a model trained on them has the training axes :func:`~dicomnode.importers.nnunet.
axes_from_image` reads back (``SPL`` for axial head-first series), and re-imports with
them. Case names are ``case_0000``...; ``dicomnode_cases.json`` maps them to the node's
pseudonymous study keys. Nothing identifying is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import ImportRefused

__all__ = ["LabelledVolume", "node_labelled_volumes", "patient_folds", "write_nnunet_raw"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class LabelledVolume:
    """One labelled series: (slice, row, column) arrays, the LPS affine of that order, and
    pseudonymous study and patient keys."""

    volume: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    study_key: str
    patient_pseudonym: str


def patient_folds(patients: Iterable[str], k: int = 5, seed: int = 0) -> dict[str, int]:
    """Fold 0..k-1 per patient: patients ordered by the keyed hash the node's splits use
    (:func:`dicomnode.training.dataset.split_unit`), then dealt round-robin, so that every
    fold has a patient once there are k (a hash interval alone leaves folds empty on small
    data). Deterministic for a set of patients; a new patient may move others."""
    from dicomnode.training.dataset import split_unit

    ordered = sorted(set(patients), key=lambda p: (split_unit(p, seed), p))
    return {p: i % k for i, p in enumerate(ordered)}


def _save(array: np.ndarray, lps_affine: np.ndarray, path: Path, dtype: type) -> None:
    import nibabel as nib

    data = np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)).astype(dtype)
    nib.save(nib.Nifti1Image(data, _LPS_TO_RAS @ lps_affine[:, [2, 1, 0, 3]]), str(path))


def write_nnunet_raw(cases: Iterable[LabelledVolume], root: Path | str, *, dataset_id: int,
                     name: str, labels: Mapping[str, int], channel: str = "CT",
                     folds: int = 5, seed: int = 0) -> Path:
    """Write ``root/DatasetXXX_name`` (nnU-Net raw) with splits by patient and a MONAI
    datalist; returns the dataset folder.

    Raises
    ------
    ImportRefused
        Bad id or name, a mask with a label not in ``labels``, shapes that differ, or fewer
        patients than folds.
    """
    if not 1 <= dataset_id <= 999:
        raise ImportRefused(f"dataset id {dataset_id}: nnU-Net takes 1-999")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ImportRefused(f"dataset name {name!r}: letters, digits, _ and - only")
    if labels.get("background") != 0 or sorted(labels.values()) != list(range(len(labels))):
        raise ImportRefused("labels must map background to 0 and number the rest 1..N")
    folder = Path(root) / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    known = set(labels.values())
    index: dict[str, dict[str, str]] = {}
    for n, case in enumerate(cases):
        if case.volume.shape != case.mask.shape or case.volume.ndim != 3:
            raise ImportRefused(f"study {case.study_key}: volume and mask shapes differ")
        extra = set(np.unique(case.mask).tolist()) - known
        if extra:
            raise ImportRefused(f"study {case.study_key}: label values {sorted(extra)} are not "
                                "in the labels")
        cid = f"case_{n:04d}"
        _save(case.volume, case.affine, folder / "imagesTr" / f"{cid}_0000.nii.gz", np.float32)
        _save(case.mask, case.affine, folder / "labelsTr" / f"{cid}.nii.gz", np.uint8)
        index[cid] = {"study": case.study_key, "patient": case.patient_pseudonym}
    fold_of = patient_folds((v["patient"] for v in index.values()), folds, seed)
    if len(fold_of) < folds:
        raise ImportRefused(f"{len(fold_of)} patients cannot fill {folds} folds")
    splits = [{"train": sorted(c for c, v in index.items() if fold_of[v["patient"]] != f),
               "val": sorted(c for c, v in index.items() if fold_of[v["patient"]] == f)}
              for f in range(folds)]
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": channel}, "labels": dict(labels), "numTraining": len(index),
        "file_ending": ".nii.gz", "name": name,
        "description": "labels exported by dicomnode (consensus of annotator SEGs)"},
        indent=2))
    (folder / "splits_final.json").write_text(json.dumps(splits, indent=2))
    (folder / "datalist.json").write_text(json.dumps({"training": [
        {"image": f"imagesTr/{c}_0000.nii.gz", "label": f"labelsTr/{c}.nii.gz",
         "fold": fold_of[v["patient"]]} for c, v in index.items()]}, indent=2))
    (folder / "dicomnode_cases.json").write_text(json.dumps(index, indent=2))
    return folder


def node_labelled_volumes(ctx: Any) -> tuple[dict[str, int], Iterator[LabelledVolume]]:
    """The node's labelled studies (the learning loop's consensus of annotator SEGs, as
    :class:`~dicomnode.pipeline.learning.NodeLabelSource` gives them to retraining) with
    their series geometry; and the label names → numbers of the learning model.

    ``ctx`` is the node's task context (:func:`dicomnode.app.create_node`).
    """
    from dicomnode.modelpkg import read_model_package
    from dicomnode.pipeline.learning import NodeLabelSource, _series_volume

    model = ctx.settings.learning.model
    active = ctx.registry.active(model)
    if active is None:
        raise ImportRefused(f"no active version of the learning model {model!r}: its labels "
                            "name the mask values")
    labels = {"background": 0}
    labels.update({lb.name: lb.number for lb in read_model_package(active.path).labels})
    source = NodeLabelSource(ctx)

    def volumes() -> Iterator[LabelledVolume]:
        for study in source.studies():
            case = source.load(study)
            study_id = ctx.index.study_id_of(study.study_key)
            truths = ctx.labels.for_study(study_id)
            geometry = _series_volume(ctx, study_id, truths[0].series_key)
            yield LabelledVolume(case.volume, case.mask, np.asarray(geometry.affine),
                                 study.study_key, study.patient_pseudonym)

    return labels, volumes()

"""Helpers of the learning-loop tests: labelled phantom studies and in-memory fakes.

``FakeSource`` and ``FakeRegistry`` implement the protocols of
:mod:`dicomnode.training.retrain` the way the node does, except that they keep their
state in memory: the registry holds real package directories and runs them with the
real serving runtime (``OnnxModel``), so the gate measures what the node would run.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.dicom.phantom import make_ct_study
from dicomnode.dicom.volume import assemble_volume
from dicomnode.inference.runtime import OnnxModel
from dicomnode.modelpkg.format1 import load_model_package
from dicomnode.training.data import Case
from dicomnode.training.dataset import DatasetCard, StudyInfo
from dicomnode.training.evaluate import Predictor
from dicomnode.training.retrain import ActiveModel

# Small phantoms: 16 slices of 64 x 64 at 1.5 mm, lesions of 5-9 mm radius. The
# "new site" has eight vessel distractors (as bright as lesions) per study; the old
# model's site had none, so it learned "bright = lesion".
SPEC: dict[str, Any] = {"n_slices": 16, "rows": 64, "columns": 64, "lesion_radius_mm": (5.0, 9.0)}
NEW_SITE_VESSELS = 8


@dataclass(frozen=True)
class LabelledStudy:
    info: StudyInfo
    case: Case


def labelled_phantom(
    seed: int,
    patient: str,
    *,
    institution: str = "INST-A",
    n_vessels: int = NEW_SITE_VESSELS,
    flagged: bool = False,
    **spec: Any,
) -> LabelledStudy:
    """A phantom study as the node would hold it: volume assembled from its DICOM
    instances, ground truth = the phantom's lesion mask, pseudonymous metadata."""
    st = make_ct_study(seed=seed, patient_id=patient, n_vessels=n_vessels, **{**SPEC, **spec})
    vol = assemble_volume(st.datasets)
    # The mask is in the phantom's slice order; the volume must be too.
    assert vol.sop_instance_uids == tuple(str(ds.SOPInstanceUID) for ds in st.datasets)
    key = f"STUDY-{seed}"
    ds = st.datasets[0]
    info = StudyInfo(
        study_key=key,
        patient_pseudonym=f"PSN-{patient}",
        modality=str(ds.Modality),
        manufacturer=str(ds.Manufacturer),
        institution=institution,
        labels=("Lesion",) if st.mask.any() else (),
        annotators=2 if flagged else 1,
        flagged=flagged,
    )
    return LabelledStudy(info, Case(np.array(vol.array), st.mask, vol.spacing, ""))


@dataclass
class FakeSource:
    """A :class:`LabeledStudySource` over labelled studies held in memory.

    ``corrupt(info, case)`` replaces what :meth:`load` returns (labels made wrong on
    purpose). ``loaded`` lists the study keys loaded, in order.
    """

    studies_: list[LabelledStudy]
    new_labels: int = 100
    corrupt: Callable[[StudyInfo, Case], Case] | None = None
    loaded: list[str] = field(default_factory=list)

    def new_label_count(self) -> int:
        return self.new_labels

    def studies(self) -> Iterable[StudyInfo]:
        return [s.info for s in self.studies_]

    def load(self, study: StudyInfo) -> Case:
        self.loaded.append(study.study_key)
        (found,) = [s for s in self.studies_ if s.info.study_key == study.study_key]
        case = found.case
        return self.corrupt(study, case) if self.corrupt is not None else case


@dataclass
class Version:
    path: Path
    status: str
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)


class FakeRegistry:
    """A :class:`RegistryOps` with versions in a dict and packages under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions: dict[tuple[str, str], Version] = {}
        self.events: list[tuple[str, str, str]] = []
        self._models: dict[Path, OnnxModel] = {}

    def _model(self, path: Path) -> OnnxModel:
        if path not in self._models:
            self._models[path] = OnnxModel.load(path)
        return self._models[path]

    def add(self, package_dir: Path, status: str, reason: str = "") -> str:
        pkg = load_model_package(package_dir)
        dest = self.root / pkg.name / pkg.version
        shutil.copytree(package_dir, dest)
        self.versions[(pkg.name, pkg.version)] = Version(dest, status, reason)
        return pkg.version

    def status(self, name: str, version: str) -> str:
        return self.versions[(name, version)].status

    def predictor_of(self, name: str, version: str) -> Predictor:
        return self._model(self.versions[(name, version)].path).predict_mask

    # --- RegistryOps
    def active_predictor(self, name: str) -> ActiveModel | None:
        for (n, v), rec in self.versions.items():
            if n == name and rec.status == "active":
                return ActiveModel(v, self._model(rec.path).predict_mask)
        return None

    def predictor(self, package_dir: Path) -> Predictor:
        return self._model(Path(package_dir)).predict_mask

    def next_version(self, name: str) -> str:
        return str(1 + sum(1 for n, _ in self.versions if n == name))

    def register_candidate(
        self, package_dir: Path, metrics: Mapping[str, Any], card: DatasetCard
    ) -> str:
        version = self.add(package_dir, "candidate")
        name = load_model_package(package_dir).name
        rec = self.versions[(name, version)]
        rec.metrics, rec.card = dict(metrics), card.to_dict()
        self.events.append(("register", name, version))
        return version

    def promote(self, name: str, version: str, reason: str) -> None:
        for (n, _), rec in self.versions.items():
            if n == name and rec.status == "active":
                rec.status = "retired"
        rec = self.versions[(name, version)]
        rec.status, rec.reason = "active", reason
        self.events.append(("promote", name, version))

    def reject(self, name: str, version: str, reason: str) -> None:
        rec = self.versions[(name, version)]
        rec.status, rec.reason = "rejected", reason
        self.events.append(("reject", name, version))


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary in-plane dilation by ``steps`` pixels (4-neighbourhood), numpy only."""
    m = mask.astype(bool)
    for _ in range(steps):
        out = m.copy()
        out[:, 1:] |= m[:, :-1]
        out[:, :-1] |= m[:, 1:]
        out[:, :, 1:] |= m[:, :, :-1]
        out[:, :, :-1] |= m[:, :, 1:]
        m = out
    return m.astype(np.uint8)


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary in-plane erosion (the dilation of the background)."""
    return (1 - dilate(1 - mask.astype(np.uint8), steps)).astype(np.uint8)

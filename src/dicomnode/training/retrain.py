"""One retraining run: labelled studies → candidate model → gate → promoted or rejected.

:func:`retrain` is a plain function the node's scheduler calls (``max_instances=1``).
It reaches the node only through two protocols the composition root implements:

- :class:`LabeledStudySource`: which labelled studies exist (metadata only) and how to
  load one as a :class:`~dicomnode.training.data.Case`; how many labels arrived since
  the last run;
- :class:`RegistryOps`: the active model's predictor, a predictor for a package
  directory (the serving runtime's ``OnnxModel.load(dir).predict_mask``), the next
  version, and registering / promoting / rejecting a candidate.

This package never imports :mod:`dicomnode.inference`; the predictors come in
through :class:`RegistryOps`, so the gate measures exactly what the node would run.

Steps: (1) skip unless ``min_new_labels`` labels arrived since the last run;
(2) list the studies, drop flagged ones (annotators disagree) unless
``include_flagged``; (3) split by patient pseudonym (:func:`split_by_patient`, keyed
hash, fixed ``split_seed``) and build the dataset card; (4) train
(:func:`~dicomnode.training.train.train_package`: best checkpoint on the validation
split, exported to ONNX and parity-checked; for a format 2 volume model,
:func:`~dicomnode.training.train3d.train_volume_package`, a 3D U-Net with the active
package's conventions); (5) score candidate and active model on
the test split through their predictors; (6) register the candidate with its metrics
and card; (7) apply the gate (:mod:`dicomnode.training.gate`) and promote or reject.
Every random choice is seeded (split, training, bootstrap), so the same data and
settings give the same outcome.
"""

from __future__ import annotations

import enum
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from dicomnode.modelpkg.format1 import InputContract, Label
from dicomnode.training.data import Case
from dicomnode.training.dataset import (
    SPLITS,
    DatasetCard,
    StudyInfo,
    build_dataset_card,
    split_by_patient,
)
from dicomnode.training.evaluate import Evaluation, Predictor, evaluate
from dicomnode.training.gate import GateDecision, GatePolicy, decide_evaluations
from dicomnode.training.train import TrainConfig, train_package
from dicomnode.training.train3d import Train3dConfig, train_volume_package

__all__ = [
    "ActiveModel",
    "LabeledStudySource",
    "RegistryOps",
    "RetrainOutcome",
    "RetrainSettings",
    "RetrainStatusValues",
    "retrain",
]

CARD_JSON, CARD_MARKDOWN = "dataset-card.json", "dataset-card.md"
"""Written into the candidate's package directory, so the card travels with the model."""


class LabeledStudySource(Protocol):
    """Where labelled studies come from (the node's index and spool, or a test fake)."""

    def new_label_count(self) -> int:
        """Labels (new or changed ground truths) that arrived since the last completed run."""
        ...

    def studies(self) -> Iterable[StudyInfo]:
        """Every study that has a ground truth: pseudonymous metadata, no pixels.

        ``flagged`` is the annotators' disagreement flag of
        :func:`dicomnode.training.labels.assess_annotations`.
        """
        ...

    def load(self, study: StudyInfo) -> Case:
        """The study's volume, spacing and consensus label map (label numbers of the model).

        ``case_id`` may be left empty; :func:`retrain` sets it to ``study.study_key``.
        """
        ...


@dataclass(frozen=True)
class ActiveModel:
    """The version serving now and its predictor."""

    version: str
    predict: Predictor


class RegistryOps(Protocol):
    """What :func:`retrain` needs from the model registry and the serving runtime."""

    def active_predictor(self, name: str) -> ActiveModel | None:
        """The active version of ``name`` with its predictor, or None (no model yet)."""
        ...

    def predictor(self, package_dir: Path) -> Predictor:
        """A predictor running the package in ``package_dir`` as the node would serve it."""
        ...

    def next_version(self, name: str) -> str:
        """An unused version string for a new candidate of ``name``."""
        ...

    def register_candidate(
        self, package_dir: Path, metrics: Mapping[str, Any], card: DatasetCard
    ) -> str:
        """Store the package as a candidate with its metrics and card; return its version."""
        ...

    def promote(self, name: str, version: str, reason: str) -> None:
        """Make the candidate the active version."""
        ...

    def reject(self, name: str, version: str, reason: str) -> None:
        """Keep the candidate as rejected, with the gate's reason."""
        ...


@dataclass(frozen=True)
class RetrainSettings:
    """What and how to retrain.

    Raises
    ------
    ValueError
        No labels, label numbers not 1..n, a validation or test fraction of 0, or
        ``min_new_labels`` < 0.
    """

    name: str
    """Model name (the registry's key)."""
    contract: InputContract | None
    """The 2D contract a :class:`~dicomnode.training.unet.UNet2d` is trained with; None
    with ``volume_template``."""
    labels: tuple[Label, ...]
    """Output labels in channel order, numbered 1..n."""
    work_dir: Path
    """Each run writes ``work_dir/<name>/<version>/package`` (the candidate, with its
    dataset card) and ``.../checkpoints/best.pt``. Left in place after the run: the
    registry copies the package, and the caller decides when to delete the rest."""
    train_config: TrainConfig = field(default_factory=TrainConfig)
    gate: GatePolicy = field(default_factory=GatePolicy)
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    """Keep it fixed across runs: test patients then never enter training."""
    min_new_labels: int = 1
    include_flagged: bool = False
    """Train on studies whose annotators disagreed (default: leave them out)."""
    min_component_mm3: float = 0.0
    description: str = ""
    volume_template: Path | None = None
    """A format 2 volume package (the active one): the candidate is a
    :class:`~dicomnode.training.unet.UNet3d` trained with its conventions
    (:func:`~dicomnode.training.train3d.train_volume_package`) instead of a 2D network."""
    train3d_config: Train3dConfig = field(default_factory=Train3dConfig)
    """Hyper-parameters of the 3D trainer (with ``volume_template``)."""

    def __post_init__(self) -> None:
        if (self.contract is None) == (self.volume_template is None):
            raise ValueError("give either contract (2D) or volume_template (3D), not both")
        if not self.labels:
            raise ValueError("labels: at least one label is required")
        numbers = [lb.number for lb in self.labels]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"labels: numbers must be 1..n in channel order, got {numbers}")
        if len(self.fractions) != 3 or self.fractions[1] <= 0 or self.fractions[2] <= 0:
            raise ValueError(
                f"fractions: train, val and test must all be > 0, got {self.fractions}"
            )
        if self.min_new_labels < 0:
            raise ValueError(f"min_new_labels must be >= 0, got {self.min_new_labels}")


class RetrainStatusValues(enum.StrEnum):
    """How a run ended."""

    SKIPPED = "skipped"
    """Nothing trained (too few new labels or too little data); see the reason."""
    PROMOTED = "promoted"
    REJECTED = "rejected"
    """A candidate was trained and registered but failed the gate."""


@dataclass(frozen=True)
class RetrainOutcome:
    """The record of one run (the node stores it; ``metrics`` is JSON-ready)."""

    status: RetrainStatusValues
    reason: str
    name: str
    new_labels: int
    version: str | None = None
    """The candidate's version; None when skipped."""
    active_version: str | None = None
    """The version serving before this run."""
    decision: GateDecision | None = None
    card: DatasetCard | None = None
    package_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of ``load``, ``train``, ``evaluate`` and ``total``."""
    candidate_evaluation: Evaluation | None = field(default=None, repr=False, compare=False)
    active_evaluation: Evaluation | None = field(default=None, repr=False, compare=False)


def _eval_dict(ev: Evaluation) -> dict[str, Any]:
    return {
        "mean": {str(k): v for k, v in ev.mean.items()},
        "ci": {str(k): list(v) for k, v in ev.ci.items()},
        "pooled": {str(k): v for k, v in ev.pooled.items()},
        "per_case": {c.case_id: {str(k): v for k, v in c.dice.items()} for c in ev.per_case},
    }


def retrain(
    source: LabeledStudySource,
    registry_ops: RegistryOps,
    settings: RetrainSettings,
) -> RetrainOutcome:
    """Train a candidate on the labelled studies and promote it only if the gate says so.

    Parameters
    ----------
    source
        The labelled studies.
    registry_ops
        Predictors and the registry's candidate / promote / reject operations.
    settings
        Model, contract, training and gate settings.

    Returns
    -------
    RetrainOutcome
        ``skipped`` (with the reason: too few new labels, fewer than three usable
        patients), ``promoted`` or ``rejected`` (with the gate's reason).

    Raises
    ------
    ValueError
        The source lists a study twice, or a loaded case does not fit the model
        (e.g. label numbers above the model's).
    ModelError
        The exported candidate fails its parity check.
    """
    t0 = time.perf_counter()
    name = settings.name
    new = int(source.new_label_count())

    def skipped(reason: str) -> RetrainOutcome:
        return RetrainOutcome(RetrainStatusValues.SKIPPED, reason, name, new,
                              seconds={"total": time.perf_counter() - t0})

    if new < settings.min_new_labels:
        return skipped(
            f"{new} new label(s) since the last run, {settings.min_new_labels} needed"
        )
    infos = list(source.studies())
    dup = sorted(k for k, n in Counter(i.study_key for i in infos).items() if n > 1)
    if dup:
        raise ValueError(f"source lists studies twice: {dup[:5]}")
    flagged = [i for i in infos if i.flagged]
    usable = infos if settings.include_flagged else [i for i in infos if not i.flagged]
    excluded = {} if settings.include_flagged or not flagged else {"flagged": len(flagged)}
    n_patients = len({i.patient_pseudonym for i in usable})
    if n_patients < len(SPLITS):
        return skipped(
            f"{len(usable)} usable labelled studies from {n_patients} patient(s); "
            f"train, validation and test need at least {len(SPLITS)} patients"
            + (f" ({len(flagged)} flagged studies left out)" if excluded else "")
        )
    parts = split_by_patient(usable, settings.fractions, settings.split_seed)
    card = build_dataset_card(
        parts,
        name=name,
        seed=settings.split_seed,
        fractions=settings.fractions,
        excluded=excluded,
        notes=(
            f"{new} new label(s) since the previous run.",
            "Flagged studies (annotators disagree) were "
            + ("included." if settings.include_flagged else "left out."),
        ),
    )

    ta = time.perf_counter()
    # Per-case scores and logs name the pseudonymous study key, whatever the source set.
    cases = {s: [replace(source.load(i), case_id=i.study_key) for i in parts[s]] for s in SPLITS}
    t_load = time.perf_counter() - ta

    active = registry_ops.active_predictor(name)
    version = registry_ops.next_version(name)
    run_dir = Path(settings.work_dir) / name / version
    package_dir = run_dir / "package"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # left by a run that crashed before registering this version
    tb = time.perf_counter()
    provenance = {
        "data": f"{card.studies['train']} train / {card.studies['val']} val labelled "
        f"studies; split seed {settings.split_seed}",
        "test_studies": card.studies["test"],
    }
    if settings.volume_template is not None:
        pkg, result = train_volume_package(
            cases["train"], cases["val"], package_dir, template=settings.volume_template,
            version=version, config=settings.train3d_config,
            description=settings.description, provenance=provenance)
    else:
        assert settings.contract is not None  # __post_init__
        pkg, result = train_package(
            cases["train"],
            cases["val"],
            package_dir,
            name=name,
            version=version,
            contract=settings.contract,
            labels=settings.labels,
            config=settings.train_config,
            work_dir=run_dir / "checkpoints",
            description=settings.description,
            min_component_mm3=settings.min_component_mm3,
            provenance=provenance,
        )
    t_train = time.perf_counter() - tb
    (package_dir / CARD_JSON).write_text(card.to_json(), encoding="utf-8")
    (package_dir / CARD_MARKDOWN).write_text(card.to_markdown(), encoding="utf-8")

    tc = time.perf_counter()
    label_numbers = [lb.number for lb in settings.labels]
    seed = settings.gate.seed
    cand_eval = evaluate(
        cases["test"], registry_ops.predictor(package_dir), label_numbers, seed=seed
    )
    act_eval = (
        evaluate(cases["test"], active.predict, label_numbers, seed=seed)
        if active is not None else None
    )
    decision = decide_evaluations(cand_eval, act_eval, settings.gate)
    t_eval = time.perf_counter() - tc

    metrics: dict[str, Any] = {
        "test": {
            "candidate": _eval_dict(cand_eval),
            "active": None if act_eval is None else _eval_dict(act_eval),
            "active_version": None if active is None else active.version,
        },
        "gate": decision.as_dict(),
        "train": {
            "best_val_dice": result.best_dice,
            "best_step": result.best_step,
            "steps": result.steps,
            "stopped_early": result.stopped_early,
            "seconds": round(result.seconds, 2),
            "sha256": None if pkg is None else pkg.sha256,
        },
        "split": {"seed": settings.split_seed, "studies": dict(card.studies),
                  "patients": dict(card.patients), "excluded": dict(card.excluded)},
        "new_labels": new,
    }
    registered = registry_ops.register_candidate(package_dir, metrics, card)
    if decision.promote:
        registry_ops.promote(name, registered, decision.reason)
        status = RetrainStatusValues.PROMOTED
    else:
        registry_ops.reject(name, registered, decision.reason)
        status = RetrainStatusValues.REJECTED
    return RetrainOutcome(
        status=status,
        reason=decision.reason,
        name=name,
        new_labels=new,
        version=registered,
        active_version=None if active is None else active.version,
        decision=decision,
        card=card,
        package_dir=package_dir,
        metrics=metrics,
        seconds={"load": t_load, "train": t_train, "evaluate": t_eval,
                 "total": time.perf_counter() - t0},
        candidate_evaluation=cand_eval,
        active_evaluation=act_eval,
    )

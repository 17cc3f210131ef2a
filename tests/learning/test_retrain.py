"""retrain(): skips, and the learning loop end to end on phantoms with the real runtime.

The story of the end-to-end tests: the active model (version 1) was trained at a site
whose studies had no vessel distractors, so it learned "bright = lesion". Labelled
studies from a new site, with vessels as bright as lesions, arrive; retraining on them
must give a model that is better on held-out phantoms of the new site by at least 0.2
Dice, and the gate must promote it. A candidate trained on wrong (empty) labels must
be rejected and the active model kept.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from learningtools import FakeRegistry, FakeSource, LabelledStudy, labelled_phantom

from dicomnode.training.data import Case, phantom_cases
from dicomnode.training.dataset import split_by_patient
from dicomnode.training.demo import DEMO_CONTRACT, DEMO_LABEL
from dicomnode.training.evaluate import evaluate
from dicomnode.training.gate import GatePolicy
from dicomnode.training.retrain import (
    CARD_JSON,
    CARD_MARKDOWN,
    RetrainOutcome,
    RetrainSettings,
    RetrainStatusValues,
    retrain,
)
from dicomnode.training.train import TrainConfig, train_package

NAME = "lesion"
CONFIG = TrainConfig(steps=300, batch_size=8, lr=5e-3, patch=32, base=8, levels=3,
                     val_every=25, patience=10, seed=0, threads=2, progress=False)
FRACTIONS = (0.6, 0.2, 0.2)
GATE = GatePolicy(margin=0.05, floor=0.5, min_cases=3)


def _settings(work: Path, **kw: Any) -> RetrainSettings:
    args: dict[str, Any] = {
        "name": NAME, "contract": DEMO_CONTRACT, "labels": (DEMO_LABEL,), "work_dir": work,
        "train_config": CONFIG, "gate": GATE, "fractions": FRACTIONS, "split_seed": 0,
        "min_new_labels": 5,
    }
    args.update(kw)
    return RetrainSettings(**args)


@pytest.fixture(scope="module")
def new_site() -> list[LabelledStudy]:
    """20 patients (the first four with two studies) plus two flagged studies whose
    labels are wrong (empty): 26 labelled studies of the new site."""
    studies = []
    seed = 9500
    for p in range(20):
        for _ in range(2 if p < 4 else 1):
            studies.append(labelled_phantom(seed, f"NEW-{p:02d}",
                                            institution="INST-A" if p % 2 else "INST-B"))
            seed += 1
    for p in range(20, 22):
        s = labelled_phantom(seed, f"NEW-{p:02d}", flagged=True)
        studies.append(LabelledStudy(s.info, replace(s.case, mask=np.zeros_like(s.case.mask))))
        seed += 1
    return studies


@pytest.fixture(scope="module")
def held_out() -> list[Case]:
    """Fresh phantoms of the new site, in no split."""
    return [labelled_phantom(9700 + i, f"HELD-{i}").case for i in range(8)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> FakeRegistry:
    """A registry whose active version 1 learned lesions without vessel distractors."""
    root = tmp_path_factory.mktemp("registry")
    spec = {"n_slices": 16, "rows": 64, "columns": 64, "lesion_radius_mm": (5.0, 9.0),
            "n_vessels": 0}
    pkg, _ = train_package(
        phantom_cases(range(9100, 9106), **spec), phantom_cases(range(9110, 9112), **spec),
        root / "build" / "v1", name=NAME, version="1", contract=DEMO_CONTRACT,
        labels=[DEMO_LABEL], config=replace(CONFIG, steps=200),
    )
    reg = FakeRegistry(root / "store")
    reg.add(root / "build" / "v1", "active")
    return reg


@pytest.fixture(scope="module")
def learned(new_site: list[LabelledStudy], registry: FakeRegistry,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[RetrainOutcome, FakeSource]:
    source = FakeSource(new_site, new_labels=26)
    outcome = retrain(source, registry, _settings(tmp_path_factory.mktemp("work")))
    return outcome, source


@pytest.mark.slow
def test_retraining_on_new_labels_is_promoted_and_better(
    learned: tuple[RetrainOutcome, FakeSource], registry: FakeRegistry, held_out: list[Case]
) -> None:
    outcome, _ = learned
    assert outcome.status is RetrainStatusValues.PROMOTED, outcome.reason
    assert (outcome.version, outcome.active_version) == ("2", "1")
    assert registry.status(NAME, "2") == "active" and registry.status(NAME, "1") == "retired"
    assert registry.events == [("register", NAME, "2"), ("promote", NAME, "2")]
    d = outcome.decision
    assert d is not None and d.promote and d.difference is not None
    assert d.difference >= GATE.margin and d.difference_ci is not None and d.difference_ci[0] > 0
    assert registry.versions[(NAME, "2")].reason == outcome.reason == d.reason
    # The key figure: on held-out phantoms the promoted model beats the old one.
    old = evaluate(held_out, registry.predictor_of(NAME, "1")).mean[1]
    new = evaluate(held_out, registry.predictor_of(NAME, "2")).mean[1]
    assert new - old >= 0.2, (old, new)


@pytest.mark.slow
def test_flagged_studies_are_left_out(learned: tuple[RetrainOutcome, FakeSource]) -> None:
    outcome, source = learned
    assert outcome.card is not None and outcome.card.excluded == {"flagged": 2}
    assert sum(outcome.card.studies.values()) == 24 and sum(outcome.card.patients.values()) == 20
    assert not {"STUDY-9524", "STUDY-9525"} & set(source.loaded)
    assert len(source.loaded) == 24


@pytest.mark.slow
def test_test_patients_never_train(learned: tuple[RetrainOutcome, FakeSource],
                                   new_site: list[LabelledStudy]) -> None:
    outcome, _ = learned
    assert outcome.candidate_evaluation is not None
    test_keys = {c.case_id for c in outcome.candidate_evaluation.per_case}
    by_key = {s.info.study_key: s.info.patient_pseudonym for s in new_site}
    test_patients = {by_key[k] for k in test_keys}
    card = outcome.card
    assert card is not None and card.studies["test"] == len(test_keys) >= GATE.min_cases
    assert len(test_patients) == card.patients["test"]
    usable = [s.info for s in new_site if not s.info.flagged]
    parts = split_by_patient(usable, FRACTIONS, 0)
    assert {i.study_key for i in parts["test"]} == test_keys
    assert not test_patients & {i.patient_pseudonym for i in parts["train"] + parts["val"]}


@pytest.mark.slow
def test_candidate_is_registered_with_metrics_and_card(
    learned: tuple[RetrainOutcome, FakeSource], registry: FakeRegistry
) -> None:
    outcome, _ = learned
    rec = registry.versions[(NAME, "2")]
    assert outcome.card is not None
    assert rec.card == outcome.card.to_dict()
    assert json.loads((rec.path / CARD_JSON).read_text()) == outcome.card.to_dict()
    assert (rec.path / CARD_MARKDOWN).read_text() == outcome.card.to_markdown()
    metrics = json.loads(json.dumps(rec.metrics))  # JSON-ready as the registry stores it
    assert metrics["gate"]["promote"] is True
    assert metrics["test"]["active_version"] == "1"
    assert set(metrics["test"]["candidate"]["per_case"]) == set(
        metrics["test"]["active"]["per_case"])
    assert metrics["split"]["studies"] == outcome.card.studies
    assert metrics["new_labels"] == 26
    assert set(outcome.seconds) == {"load", "train", "evaluate", "total"}


@pytest.mark.slow
def test_candidate_trained_on_wrong_labels_is_rejected(
    learned: tuple[RetrainOutcome, FakeSource], new_site: list[LabelledStudy],
    registry: FakeRegistry, tmp_path: Path,
) -> None:
    assert learned[0].status is RetrainStatusValues.PROMOTED
    usable = [s.info for s in new_site if not s.info.flagged]
    test_keys = {i.study_key for i in split_by_patient(usable, FRACTIONS, 0)["test"]}

    def empty_labels(info: Any, case: Case) -> Case:
        # Training and validation labels wiped; the test split keeps the true ones.
        if info.study_key in test_keys:
            return case
        return replace(case, mask=np.zeros_like(case.mask))

    source = FakeSource(new_site, new_labels=7, corrupt=empty_labels)
    outcome = retrain(source, registry, _settings(tmp_path))
    assert outcome.status is RetrainStatusValues.REJECTED
    assert (outcome.version, outcome.active_version) == ("3", "2")
    assert registry.status(NAME, "3") == "rejected" and registry.status(NAME, "2") == "active"
    assert registry.versions[(NAME, "3")].reason == outcome.reason
    assert "< margin" in outcome.reason and "below the floor" in outcome.reason
    assert registry.events[-2:] == [("register", NAME, "3"), ("reject", NAME, "3")]


def test_skipped_when_too_few_new_labels(new_site: list[LabelledStudy], tmp_path: Path) -> None:
    source = FakeSource(new_site, new_labels=4)
    reg = FakeRegistry(tmp_path / "store")
    outcome = retrain(source, reg, _settings(tmp_path))
    assert outcome.status is RetrainStatusValues.SKIPPED
    assert outcome.reason == "4 new label(s) since the last run, 5 needed"
    assert outcome.version is None and source.loaded == [] and reg.events == []


def test_skipped_with_fewer_than_three_patients(new_site: list[LabelledStudy],
                                                tmp_path: Path) -> None:
    few = [s for s in new_site if s.info.patient_pseudonym in ("PSN-NEW-00", "PSN-NEW-01")]
    flagged = [s for s in new_site if s.info.flagged]
    source = FakeSource(few + flagged, new_labels=10)
    outcome = retrain(source, FakeRegistry(tmp_path / "store"), _settings(tmp_path))
    assert outcome.status is RetrainStatusValues.SKIPPED
    assert outcome.reason == (
        "4 usable labelled studies from 2 patient(s); train, validation and test need at "
        "least 3 patients (2 flagged studies left out)"
    )
    assert source.loaded == []


def test_source_listing_a_study_twice(new_site: list[LabelledStudy], tmp_path: Path) -> None:
    source = FakeSource(new_site[:3] + new_site[:1])
    with pytest.raises(ValueError, match="source lists studies twice: \\['STUDY-9500'\\]"):
        retrain(source, FakeRegistry(tmp_path / "store"), _settings(tmp_path))


def test_first_model_and_determinism(new_site: list[LabelledStudy], tmp_path: Path) -> None:
    """No active model: the floor alone decides. Two runs give the same model and figures."""
    quick = replace(CONFIG, steps=6, val_every=3)
    small = [s for s in new_site if not s.info.flagged][:12]
    outcomes = []
    for run in ("a", "b"):
        reg = FakeRegistry(tmp_path / run / "store")
        settings = _settings(tmp_path / run, train_config=quick,
                             gate=replace(GATE, floor=0.0, min_cases=1))
        outcomes.append((retrain(FakeSource(small), reg, settings), reg))
    (a, reg_a), (b, _) = outcomes
    assert a.status is RetrainStatusValues.PROMOTED and a.active_version is None
    assert a.reason.startswith("no active model; candidate mean Dice")
    assert reg_a.status(NAME, "1") == "active"
    assert a.metrics["train"]["sha256"] == b.metrics["train"]["sha256"]
    assert a.metrics["test"] == b.metrics["test"] and a.decision == b.decision
    assert a.card == b.card
    # The same weak model against a floor it cannot reach is refused.
    reg = FakeRegistry(tmp_path / "c" / "store")
    settings = _settings(tmp_path / "c", train_config=quick,
                         gate=replace(GATE, floor=0.99, min_cases=1))
    c = retrain(FakeSource(small), reg, settings)
    assert c.status is RetrainStatusValues.REJECTED and "below the floor 0.9900" in c.reason
    assert reg.status(NAME, "1") == "rejected"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"labels": ()}, "at least one label"),
        ({"labels": (replace(DEMO_LABEL, number=2),)}, "numbers must be 1..n"),
        ({"fractions": (0.8, 0.2, 0.0)}, "must all be > 0"),
        ({"min_new_labels": -1}, "min_new_labels must be >= 0"),
    ],
)
def test_settings_invalid(overrides: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        _settings(tmp_path, **overrides)

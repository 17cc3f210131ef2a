"""Patient-level split (keyed hash) and the dataset card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from dicomnode.training.dataset import (
    SPLITS,
    StudyInfo,
    assign_split,
    build_dataset_card,
    split_by_patient,
    split_unit,
)


@dataclass(frozen=True)
class Item:
    patient_pseudonym: str
    study_key: str


def _items(n_patients: int, prefix: str = "PSN", studies_per_patient: int = 2) -> list[Item]:
    return [
        Item(f"{prefix}-{p:04d}", f"{prefix}-{p:04d}-S{s}")
        for p in range(n_patients)
        for s in range(1 + p % studies_per_patient)
    ]


def _patients(part: list[Item]) -> set[str]:
    return {it.patient_pseudonym for it in part}


def test_no_patient_in_two_splits_for_any_seed() -> None:
    items = _items(40, studies_per_patient=3)
    for seed in range(300):
        parts = split_by_patient(items, (0.6, 0.2, 0.2), seed)
        sets = [_patients(parts[s]) for s in SPLITS]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), seed
        assert sum(len(p) for p in parts.values()) == len(items)


def test_every_split_non_empty_from_three_patients() -> None:
    for n in range(3, 9):
        items = _items(n, prefix=f"N{n}")
        for seed in range(200):
            parts = split_by_patient(items, seed=seed)
            assert all(parts[s] for s in SPLITS), (n, seed, {s: len(parts[s]) for s in SPLITS})
            sets = [_patients(parts[s]) for s in SPLITS]
            assert sum(len(x) for x in sets) == n


def test_fewer_patients_than_splits_are_not_repaired() -> None:
    parts = split_by_patient(_items(2), seed=0)
    assert sum(len(p) for p in parts.values()) == len(_items(2))


def test_split_is_deterministic() -> None:
    items = _items(30)
    a = split_by_patient(items, seed=7)
    b = split_by_patient(list(items), seed=7)
    assert a == b
    assert a != split_by_patient(items, seed=8)
    # Input order is kept inside each split.
    for s in SPLITS:
        assert a[s] == [it for it in items if it in a[s]]


def test_split_does_not_depend_on_the_process_hash_seed() -> None:
    code = (
        "from dicomnode.training.dataset import assign_split;"
        "print([assign_split(f'PSN-{i}', seed=3) for i in range(40)])"
    )
    outs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=60, check=True)
        outs.add(res.stdout)
    assert len(outs) == 1
    assert outs.pop().strip() == str([assign_split(f"PSN-{i}", seed=3) for i in range(40)])


def test_split_is_stable_when_patients_are_added() -> None:
    old = _items(60, prefix="OLD")
    before = split_by_patient(old, seed=11)
    after = split_by_patient(old + _items(200, prefix="NEW"), seed=11)
    for s in SPLITS:
        assert _patients(before[s]) <= _patients(after[s]), s
    # Without repair every patient is where its own hash puts it.
    for s in SPLITS:
        assert all(assign_split(it.patient_pseudonym, seed=11) == s for it in after[s])


def test_fractions_are_met_for_many_patients() -> None:
    parts = split_by_patient(_items(3000, studies_per_patient=1), (0.7, 0.15, 0.15), seed=0)
    shares = [len(parts[s]) / 3000 for s in SPLITS]
    assert shares == pytest.approx([0.7, 0.15, 0.15], abs=0.03)


def test_zero_fraction_split_stays_empty() -> None:
    parts = split_by_patient(_items(20), (0.8, 0.2, 0.0), seed=0)
    assert parts["test"] == [] and parts["train"] and parts["val"]


def test_split_unit_is_in_unit_interval_and_keyed() -> None:
    u = [split_unit(f"PSN-{i}", 0) for i in range(500)]
    assert all(0 <= x < 1 for x in u)
    assert split_unit("PSN-1", 0) != split_unit("PSN-1", 1)


def test_custom_key() -> None:
    rows = [("PSN-1", "a"), ("PSN-1", "b"), ("PSN-2", "c"), ("PSN-3", "d")]
    parts = split_by_patient(rows, seed=0, key=lambda r: r[0])
    assert sorted(r for s in SPLITS for r in parts[s]) == sorted(rows)
    assert any(("PSN-1", "a") in parts[s] and ("PSN-1", "b") in parts[s] for s in SPLITS)


@pytest.mark.parametrize(
    "fractions",
    [(0.7, 0.3), (0.5, 0.5, 0.5), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)],
)
def test_split_by_patient_invalid_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_by_patient(_items(5), fractions)


def test_split_by_patient_empty_pseudonym() -> None:
    with pytest.raises(ValueError, match="patient_pseudonym: empty"):
        split_by_patient([Item("", "s")])


INFOS = {
    "train": [
        StudyInfo("S1", "P1", "CT", "Acme", "INST-A", ("Lesion",)),
        StudyInfo("S2", "P1", "CT", "Acme", "INST-A", ("Lesion", "Vessel")),
        StudyInfo("S3", "P2", "MR", "Other", "INST-B", ()),
    ],
    "val": [StudyInfo("S4", "P3", "CT", "", "INST-B", ("Lesion",))],
    "test": [
        StudyInfo("S5", "P4", "CT", "Acme", "INST-A", ("Vessel",)),
        StudyInfo("S6", "P5", "CT", "Acme", "INST-C", ("Lesion",)),
    ],
}


def test_dataset_card_counts_match_the_inputs() -> None:
    card = build_dataset_card(INFOS, name="lesion", seed=3, fractions=(0.7, 0.15, 0.15),
                              excluded={"flagged": 2}, notes=("a note",))
    assert card.studies == {"train": 3, "val": 1, "test": 2}
    assert card.patients == {"train": 2, "val": 1, "test": 2}
    assert card.totals["modality"] == {"CT": 5, "MR": 1}
    assert card.totals["manufacturer"] == {"(unknown)": 1, "Acme": 4, "Other": 1}
    assert card.totals["institution"] == {"INST-A": 3, "INST-B": 2, "INST-C": 1}
    assert card.totals["label"] == {"(none)": 1, "Lesion": 4, "Vessel": 2}
    assert card.by_split["train"]["label"] == {"(none)": 1, "Lesion": 2, "Vessel": 1}
    assert card.by_split["test"]["institution"] == {"INST-A": 1, "INST-C": 1}
    assert card.by_split["val"]["manufacturer"] == {"(unknown)": 1}
    for fld in card.FIELDS:  # per-split counts add up to the totals
        for value, total in card.totals[fld].items():
            assert sum(card.by_split[s][fld].get(value, 0) for s in SPLITS) == total
    assert card.excluded == {"flagged": 2} and card.seed == 3


def test_dataset_card_renderings() -> None:
    card = build_dataset_card(INFOS, name="lesion", seed=3, fractions=(0.7, 0.15, 0.15),
                              excluded={"flagged": 2}, notes=("a note",))
    assert json.loads(card.to_json()) == card.to_dict()
    assert json.loads(card.to_json())["by_split"]["train"]["modality"] == {"CT": 2, "MR": 1}
    md = card.to_markdown()
    assert md.startswith("# Dataset card: lesion\n")
    assert "| studies | 3 | 1 | 2 | 6 |" in md
    assert "| patients | 2 | 1 | 2 | 5 |" in md
    assert "| INST-A | 2 | 0 | 1 | 3 |" in md
    assert "| Lesion | 2 | 1 | 1 | 4 |" in md
    assert "Excluded studies: flagged 2." in md and "- a note" in md


def test_dataset_card_from_a_split() -> None:
    infos = [StudyInfo(f"S{i}", f"P{i % 7}", "CT", "Acme", "INST-A", ("Lesion",))
             for i in range(20)]
    parts = split_by_patient(infos, seed=0)
    card = build_dataset_card(parts, name="m", seed=0, fractions=(0.7, 0.15, 0.15))
    assert card.studies == {s: len(parts[s]) for s in SPLITS}
    assert sum(card.patients.values()) == 7


def test_dataset_card_patient_in_two_splits() -> None:
    bad = {"train": [StudyInfo("S1", "P1", "CT")], "test": [StudyInfo("S2", "P1", "CT")]}
    with pytest.raises(ValueError, match="patient 'P1' is in both 'train' and 'test'"):
        build_dataset_card(bad, name="m", seed=0, fractions=(0.7, 0.15, 0.15))


def test_dataset_card_study_twice() -> None:
    bad = {"train": [StudyInfo("S1", "P1", "CT"), StudyInfo("S1", "P1", "CT")]}
    with pytest.raises(ValueError, match="study 'S1' is listed twice"):
        build_dataset_card(bad, name="m", seed=0, fractions=(0.7, 0.15, 0.15))


def test_dataset_card_unknown_split() -> None:
    with pytest.raises(ValueError, match="unknown split names"):
        build_dataset_card({"holdout": []}, name="m", seed=0, fractions=(0.7, 0.15, 0.15))

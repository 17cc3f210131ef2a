"""Labelled studies → a patient-level train / validation / test split and a dataset card.

**Split.** :func:`split_by_patient` puts every patient (by pseudonym) into one split,
decided by a keyed hash of (seed, pseudonym) alone: BLAKE2b keyed with the seed maps
the pseudonym to a number u in [0, 1), and u falls into the train, validation or test
interval of ``fractions``. Python's ``hash`` is not used: it is salted per process, so
the split would change with every restart. Consequences:

- no patient can appear in two splits, for any seed: all of a patient's studies share
  one u (this holds by construction, not by a check);
- the same (pseudonyms, fractions, seed) always give the same split, on any machine;
- adding patients does not move existing ones: a patient's u does not depend on who
  else is in the data set. The one exception is the small-data repair below.

The fractions are met in expectation only; with few patients the split sizes vary.
With three or more patients every split whose fraction is non-zero gets at least
one: an empty split takes the patient of the largest split whose u lies nearest to
its interval. That repair depends on the other patients, so a patient moved by it
may move back once more patients arrive (only ever while some split would
otherwise be empty). Keep the seed fixed across training runs: a new seed
reshuffles everyone and lets earlier test patients into training.

**Card.** :class:`DatasetCard` counts studies (and patients) by split and by modality,
manufacturer, institution pseudonym and label, and renders as JSON and Markdown. It
holds only pseudonymous values.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

__all__ = [
    "SPLITS",
    "DatasetCard",
    "StudyInfo",
    "assign_split",
    "build_dataset_card",
    "split_by_patient",
    "split_unit",
]

T = TypeVar("T")

SPLITS = ("train", "val", "test")
"""Split names, in order; ``fractions`` follow this order."""


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ValueError(f"fractions: three values (train, val, test) expected, got {fractions}")
    f = tuple(float(x) for x in fractions)
    if any(not x >= 0 for x in f) or abs(sum(f) - 1.0) > 1e-9 or f[0] <= 0:
        raise ValueError(
            f"fractions: non-negative, summing to 1, train > 0 expected, got {fractions}"
        )
    return f  # type: ignore[return-value]


def split_unit(patient_pseudonym: str, seed: int) -> float:
    """The patient's position u in [0, 1): BLAKE2b-64 of the pseudonym keyed by the seed.

    Raises
    ------
    ValueError
        An empty pseudonym (every unidentified patient would share one split).
    """
    if not patient_pseudonym:
        raise ValueError("patient_pseudonym: empty")
    h = hashlib.blake2b(
        patient_pseudonym.encode("utf-8"),
        digest_size=8,
        key=str(int(seed)).encode("ascii"),
        person=b"dicomnode-split1",
    )
    return int.from_bytes(h.digest(), "big") / 2.0**64


def _interval(fractions: tuple[float, float, float], k: int) -> tuple[float, float]:
    lo = sum(fractions[:k])
    return lo, lo + fractions[k]


def assign_split(
    patient_pseudonym: str, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> str:
    """The split a patient's hash puts it in, before any small-data repair.

    Returns
    -------
    str
        ``"train"``, ``"val"`` or ``"test"``.

    Raises
    ------
    ValueError
        Invalid fractions or an empty pseudonym.
    """
    f = _check_fractions(fractions)
    u = split_unit(patient_pseudonym, seed)
    for k in (0, 1):
        if u < _interval(f, k)[1]:
            return SPLITS[k]
    return SPLITS[2] if f[2] > 0 else SPLITS[1] if f[1] > 0 else SPLITS[0]


def _pseudonym_attr(item: Any) -> str:
    return str(item.patient_pseudonym)


def split_by_patient(
    items: Iterable[T],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    *,
    key: Callable[[T], str] = _pseudonym_attr,
) -> dict[str, list[T]]:
    """Split items (studies, cases) so that each patient's items land in one split.

    Parameters
    ----------
    items
        Anything with a patient pseudonym (by default its ``patient_pseudonym``).
    fractions
        Expected (train, val, test) shares of *patients*; non-negative, sum 1, train > 0.
    seed
        Key of the hash; the same seed gives the same split.
    key
        The item's patient pseudonym.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}``, items in their input order.
        With three or more patients, every split with a non-zero fraction is non-empty.

    Raises
    ------
    ValueError
        Invalid fractions or an empty pseudonym.
    """
    f = _check_fractions(fractions)
    items = list(items)
    patients = list(dict.fromkeys(key(it) for it in items))
    where = {p: assign_split(p, f, seed) for p in patients}
    wanted = [s for s, x in zip(SPLITS, f, strict=True) if x > 0]
    if len(patients) >= len(wanted):
        u = {p: split_unit(p, seed) for p in patients}
        members = {s: sorted(p for p in patients if where[p] == s) for s in SPLITS}
        for k, s in enumerate(SPLITS):
            if s not in wanted or members[s]:
                continue
            # The largest split gives up the patient nearest to the empty interval
            # (ties: the smaller u), so the repair is deterministic and moves little.
            donor = max(SPLITS, key=lambda d: (len(members[d]), -SPLITS.index(d)))
            lo, hi = _interval(f, k)
            moved = min(members[donor], key=lambda p: (max(lo - u[p], u[p] - hi, 0.0), u[p]))
            members[donor].remove(moved)
            members[s].append(moved)
            where[moved] = s
    out: dict[str, list[T]] = {s: [] for s in SPLITS}
    for it in items:
        out[where[key(it)]].append(it)
    return out


@dataclass(frozen=True)
class StudyInfo:
    """What the dataset card records of one labelled study (pseudonymous values only)."""

    study_key: str
    """The node's pseudonymous study key."""
    patient_pseudonym: str
    modality: str
    manufacturer: str = ""
    institution: str = ""
    """The institution's pseudonym (never its name)."""
    labels: tuple[str, ...] = ()
    """Names of the labels present in the study's ground truth."""
    annotators: int = 1
    flagged: bool = False
    """Annotators disagreed (see :mod:`dicomnode.training.labels`)."""


def _counts(infos: Iterable[StudyInfo], attr: str) -> dict[str, int]:
    c: Counter[str] = Counter()
    for info in infos:
        values = getattr(info, attr)
        if isinstance(values, tuple):  # labels: a study counts once per label it holds
            for v in values or ("(none)",):
                c[v] += 1
        else:
            c[values or "(unknown)"] += 1
    return dict(sorted(c.items()))


@dataclass(frozen=True)
class DatasetCard:
    """Counts describing the data of one training run; see :func:`build_dataset_card`.

    ``by_split[split][field][value]`` is a number of studies, for field in
    ``modality``, ``manufacturer``, ``institution`` and ``label`` (a study with two
    labels counts once for each); ``totals`` is the same over all splits.
    """

    name: str
    seed: int
    fractions: tuple[float, float, float]
    studies: dict[str, int]
    """Studies per split."""
    patients: dict[str, int]
    """Patients per split."""
    totals: dict[str, dict[str, int]]
    by_split: dict[str, dict[str, dict[str, int]]]
    excluded: dict[str, int] = field(default_factory=dict)
    """Studies left out, by reason (e.g. ``flagged``)."""
    notes: tuple[str, ...] = ()

    FIELDS: ClassVar[tuple[str, ...]] = ("modality", "manufacturer", "institution", "label")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the registry stores it with the model version)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "fractions": list(self.fractions),
            "studies": dict(self.studies),
            "patients": dict(self.patients),
            "totals": {k: dict(v) for k, v in self.totals.items()},
            "by_split": {s: {k: dict(v) for k, v in d.items()} for s, d in self.by_split.items()},
            "excluded": dict(self.excluded),
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """Indented JSON with sorted keys (stable for diffs)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_markdown(self) -> str:
        """Human-readable: a summary, then one table per field (values x splits)."""
        lines = [
            f"# Dataset card: {self.name}",
            "",
            f"Split by patient pseudonym (keyed hash, seed {self.seed}, fractions "
            f"train/val/test {self.fractions[0]:g}/{self.fractions[1]:g}/{self.fractions[2]:g}).",
            "",
            "| | " + " | ".join(SPLITS) + " | total |",
            "|---|" + "---:|" * (len(SPLITS) + 1),
            "| studies | " + " | ".join(str(self.studies[s]) for s in SPLITS)
            + f" | {sum(self.studies.values())} |",
            "| patients | " + " | ".join(str(self.patients[s]) for s in SPLITS)
            + f" | {sum(self.patients.values())} |",
        ]
        if self.excluded:
            lines += ["", "Excluded studies: "
                      + ", ".join(f"{k} {v}" for k, v in sorted(self.excluded.items())) + "."]
        for fld in self.FIELDS:
            lines += ["", f"## Studies by {fld}", "",
                      f"| {fld} | " + " | ".join(SPLITS) + " | total |",
                      "|---|" + "---:|" * (len(SPLITS) + 1)]
            for value, total in self.totals[fld].items():
                cells = [str(self.by_split[s][fld].get(value, 0)) for s in SPLITS]
                lines.append(f"| {_md(value)} | " + " | ".join(cells) + f" | {total} |")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def build_dataset_card(
    splits: Mapping[str, Sequence[StudyInfo]],
    *,
    name: str,
    seed: int,
    fractions: Sequence[float],
    excluded: Mapping[str, int] | None = None,
    notes: Sequence[str] = (),
) -> DatasetCard:
    """Count the studies of each split.

    Parameters
    ----------
    splits
        ``{"train": infos, "val": infos, "test": infos}`` as from :func:`split_by_patient`
        (a missing split counts as empty).
    name
        The model name the data set trains.
    seed, fractions
        As given to :func:`split_by_patient` (recorded, not re-applied).
    excluded
        Studies left out, by reason.
    notes
        Free text lines for the card.

    Raises
    ------
    ValueError
        An unknown split name, a patient in two splits, or a study listed twice.
    """
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"splits: unknown split names {sorted(unknown)}; expected {SPLITS}")
    parts = {s: list(splits.get(s, ())) for s in SPLITS}
    seen_patient: dict[str, str] = {}
    seen_study: set[str] = set()
    for s, infos in parts.items():
        for info in infos:
            other = seen_patient.setdefault(info.patient_pseudonym, s)
            if other != s:
                raise ValueError(
                    f"patient {info.patient_pseudonym!r} is in both {other!r} and {s!r}"
                )
            if info.study_key in seen_study:
                raise ValueError(f"study {info.study_key!r} is listed twice")
            seen_study.add(info.study_key)
    attrs = {"modality": "modality", "manufacturer": "manufacturer",
             "institution": "institution", "label": "labels"}
    by_split = {s: {fld: _counts(parts[s], a) for fld, a in attrs.items()} for s in SPLITS}
    everyone = [i for s in SPLITS for i in parts[s]]
    totals = {fld: _counts(everyone, a) for fld, a in attrs.items()}
    return DatasetCard(
        name=name,
        seed=int(seed),
        fractions=_check_fractions(fractions),
        studies={s: len(parts[s]) for s in SPLITS},
        patients={s: len({i.patient_pseudonym for i in parts[s]}) for s in SPLITS},
        totals=totals,
        by_split=by_split,
        excluded=dict(sorted((excluded or {}).items())),
        notes=tuple(notes),
    )

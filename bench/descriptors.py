"""Clean Descriptors throughput: descriptor values cleaned per second, one core.

    .venv/bin/python bench/descriptors.py [--reps 7] [--values 5000]

Builds ``--values`` distinct descriptors from realistic parts (modality, anatomy,
technique with units and levels) with, in every other value, an identifier planted
in one of several written forms (dates in four languages, times, phone numbers,
room/MRN numbers), and times ``DescriptorCleaner.clean`` over all of them (the
cleaner itself has no cache; the engine caches per distinct value, so a study pays
this once per distinct descriptor, not per instance). Prints the median (min-max) of
``--reps`` repetitions in values/s. ``PYTHONPATH`` picks the implementation: point it
at another checkout's ``src`` to compare.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

if not any(p.endswith("src") for p in sys.path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dicomnode.dicom.deid.descriptors import DescriptorCleaner  # noqa: E402

PARTS = [
    "CT", "MR", "PET/CT", "chest", "abdomen pelvis", "head", "L-SPINE", "C3-C4", "T2 SAG",
    "AX T1W 3D", "5 mm", "1.25mm", "3.0 T", "120 kV", "2 of 3", "DWI b1000", "phase 2",
    "arterial", "C+", "FLAIR", "0.625 mm lung", "WB 60 min",
]
PLANTS = [
    "12/05/2023", "12.05.23", "2023-05-12", "12 March 2023", "12. März 2023", "1er janvier 2023",
    "5 de mayo de 2023", "14:30", "14h30", "+49 30 1234 5678", "555 123 4567", "Room 12",
    "MRN 4711", "Hauptstraße 12", "Dr. Smith 55F",
]


def values(n: int, seed: int = 16) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(PARTS, rng.randint(2, 5))
        if i % 2:
            words.insert(rng.randint(0, len(words)), rng.choice(PLANTS))
        out.append(" ".join(words) + f" {chr(65 + i % 26)}{i}")  # distinct values
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--values", type=int, default=5000)
    args = ap.parse_args()
    data = values(args.values)
    clean = DescriptorCleaner().clean
    for v in data[:200]:  # warm-up
        clean(v)
    rates = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for v in data:
            clean(v)
        rates.append(len(data) / (time.perf_counter() - t0))
    print(f"{statistics.median(rates):.0f} values/s (min {min(rates):.0f}, max {max(rates):.0f}),"
          f" {1e6 / statistics.median(rates):.1f} us/value")


if __name__ == "__main__":
    main()

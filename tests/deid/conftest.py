"""Fixtures of the de-identification tests: a small CT series and a SEG made on it."""

from __future__ import annotations

import pytest
from deidutil import make_seg
from pydicom.dataset import Dataset

from dicomnode.dicom.phantom import make_ct_study


@pytest.fixture(scope="session")
def ct_series() -> list[Dataset]:
    """Four 16x16 phantom CT slices of one series (planted patient identifiers)."""
    return make_ct_study(n_slices=4, rows=16, columns=16, n_lesions=0, n_vessels=0).datasets


@pytest.fixture(scope="session")
def seg_and_sources(ct_series: list[Dataset]) -> tuple[Dataset, list[Dataset]]:
    """A SEG built by highdicom on the *original* CT (for de-identifying a SEG)."""
    return make_seg(ct_series), ct_series

"""Fixtures of the DICOM-core tests: a phantom study, its volume, strict pydicom validation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom import config

from dicomnode.dicom.phantom import PhantomStudy, make_ct_study
from dicomnode.dicom.volume import Volume, assemble_volume


@pytest.fixture(autouse=True)
def strict_pydicom() -> Iterator[None]:
    """Invalid values raise on reading and writing, so nothing we build is silently bent."""
    settings = config.settings
    old = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = config.RAISE
    settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = old


@pytest.fixture(scope="session")
def study() -> PhantomStudy:
    """A 32-slice 128×128 CT phantom with lesions (the phantom's defaults, seed 3)."""
    return make_ct_study(seed=3, n_lesions=3)


@pytest.fixture(scope="session")
def volume(study: PhantomStudy) -> Volume:
    return assemble_volume(study.datasets)

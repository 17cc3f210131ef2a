"""The 3D trainer's pieces: the network's shapes, cases prepared as the runtime prepares
volumes (image and labels on one grid), and the patch checks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dicomnode.modelpkg.normalize import normalize_value
from dicomnode.training.data import phantom_cases
from dicomnode.training.demo3d import DEMO3D_INFERENCE, DEMO3D_SPEC
from dicomnode.training.train3d import Train3dConfig, prepare_volume_case, train_volume
from dicomnode.training.unet import UNet2d, UNet3d


def test_unet3d_keeps_the_patch_shape_and_the_2d_layout() -> None:
    net = UNet3d(2, base=4, levels=3).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 8, 16, 24)).shape == (1, 2, 8, 16, 24)
    # the same state-dict keys as the 2D network (checkpoints, retraining)
    assert set(net.state_dict()) == set(UNet2d(2, base=4, levels=3).state_dict())


def test_cases_are_prepared_on_the_network_grid_with_their_labels() -> None:
    # 1.2 mm pixels and 2.5 mm slices -> 1.5 x 1.5 x 3 mm, padded to the 16 x 64 x 64 patch
    [case] = phantom_cases([9401], n_slices=12, rows=60, columns=50, pixel_spacing_mm=1.2,
                           slice_thickness_mm=2.5, n_lesions=2, lesion_radius_mm=(6, 9),
                           n_vessels=0)
    assert case.mask.any()
    pv = prepare_volume_case(case, DEMO3D_SPEC, DEMO3D_INFERENCE, 1)
    assert pv.image.shape == pv.targets.shape[1:] == (16, 64, 64)  # 10 x 48 x 40, padded
    inside = pv.targets[0] > 0
    # lesions (110 HU) z-score to 0.7, tissue (40 HU) to 0: the labels sit on the lesions
    assert pv.image[inside].mean() > 0.45 > pv.image[~inside & (pv.image > -1)].mean()
    assert pv.fill == pytest.approx(normalize_value(-1000.0, DEMO3D_SPEC.normalization,
                                                    case.volume))
    assert pv.image[0, 0, 0] == pytest.approx(pv.fill)  # the padding is air
    # the label volume survives resampling (within the interpolation at its edges)
    voxel_ratio = (2.5 * 1.2 * 1.2) / (3.0 * 1.5 * 1.5)
    assert inside.sum() == pytest.approx(case.mask.sum() * voxel_ratio, rel=0.15)


def test_training_patch_must_fit_the_package_patch() -> None:
    cases = phantom_cases([9402], n_slices=8, rows=32, columns=32)
    with pytest.raises(ValueError, match="exceeds the package's patch"):
        train_volume(cases, cases, DEMO3D_SPEC, replace(DEMO3D_INFERENCE, patch=(8, 32, 32)),
                     [0.5], Train3dConfig(train_patch=(16, 32, 32)))
    with pytest.raises(ValueError, match="not a multiple"):
        train_volume(cases, cases, DEMO3D_SPEC, replace(DEMO3D_INFERENCE, patch=(10, 32, 32)),
                     [0.5], Train3dConfig())

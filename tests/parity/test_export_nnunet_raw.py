"""The node's labels as an nnU-Net raw dataset (and MONAI datalist) that nnU-Net accepts.

Labelled phantom studies of several patients are written with
:func:`write_nnunet_raw`; ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``
(nnU-Net's own checks: file names, geometry of image vs label, label values) must accept
it and plan a 3d_fullres configuration; the splits keep every patient in one fold; MONAI's
``load_decathlon_datalist`` reads the datalist; nnU-Net's reader gives back the node's arrays
and the importer's training axes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2")
pytest.importorskip("monai")

from test_parity_nnunet import axial_affine, phantom  # noqa: E402

from dicomnode.errors import ImportRefused  # noqa: E402
from dicomnode.importers.datasets import LabelledVolume, write_nnunet_raw  # noqa: E402
from dicomnode.importers.nnunet import axes_from_image  # noqa: E402

pytestmark = pytest.mark.slow

LABELS = {"background": 0, "liver": 1, "tumor": 2}


def _cases() -> list[LabelledVolume]:
    out = []
    for n in range(6):  # 6 studies of 5 patients (patient p0 has two)
        volume = phantom((12, 32, 28), seed=n)
        mask = (volume > -200).astype(np.uint8) + (volume > 250).astype(np.uint8)
        out.append(LabelledVolume(volume, mask, axial_affine((3.0, 1.0, 1.1)),
                                  study_key=f"S{n}", patient_pseudonym=f"p{max(0, n - 1)}"))
    return out


def test_raw_dataset_is_accepted_by_nnunet(tmp_path: Path) -> None:
    folder = write_nnunet_raw(_cases(), tmp_path / "raw", dataset_id=901, name="NodeLabels",
                              labels=LABELS, folds=5)
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"),
               nnUNet_preprocessed=str(tmp_path / "pre"), nnUNet_results=str(tmp_path / "res"),
               OMP_NUM_THREADS="1")
    exe = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    run = subprocess.run([str(exe), "-d", "901", "--verify_dataset_integrity", "-c",
                          "3d_fullres", "-np", "1", "-npfp", "1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    plans = json.loads((tmp_path / "pre" / folder.name / "nnUNetPlans.json").read_text())
    assert "3d_fullres" in plans["configurations"]
    assert len(list((tmp_path / "pre" / folder.name / "nnUNetPlans_3d_fullres").glob("*.b2nd"))
               + list((tmp_path / "pre" / folder.name / "nnUNetPlans_3d_fullres")
                      .glob("*.npz"))) >= 6

    splits = json.loads((folder / "splits_final.json").read_text())
    index = json.loads((folder / "dicomnode_cases.json").read_text())
    for split in splits:
        train = {index[c]["patient"] for c in split["train"]}
        val = {index[c]["patient"] for c in split["val"]}
        assert not train & val  # no patient on both sides
    assert sorted(c for s in splits for c in s["val"]) == sorted(index)

    from monai.data import load_decathlon_datalist

    items = load_decathlon_datalist(str(folder / "datalist.json"), base_dir=str(folder))
    assert len(items) == 6 and all(Path(i["image"]).is_file() for i in items)

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image, props = SimpleITKIO().read_images([str(folder / "imagesTr" / "case_0000_0000.nii.gz")])
    np.testing.assert_allclose(image[0], _cases()[0].volume, atol=1e-3)
    np.testing.assert_allclose(props["spacing"], (3.0, 1.0, 1.1))
    assert axes_from_image(folder / "imagesTr" / "case_0000_0000.nii.gz") == "SPL"


def test_unknown_label_values_are_refused(tmp_path: Path) -> None:
    case = _cases()[0]
    with pytest.raises(ImportRefused, match="label values \\[2\\]"):
        write_nnunet_raw([case], tmp_path, dataset_id=902, name="X",
                         labels={"background": 0, "liver": 1}, folds=1)

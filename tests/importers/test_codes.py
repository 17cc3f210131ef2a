"""Label names → SNOMED CT codes for imported models, and the post-processing ops they map to."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom.sr.codedict import codes

from dicomnode.errors import ImportRefused
from dicomnode.importers.codes import DEFAULT_NAMES, code_labels, load_mapping
from dicomnode.inference.sliding import _postprocess
from dicomnode.modelpkg.format2 import PostOp


def test_defaults_are_the_dicom_dictionary_codes() -> None:
    labels, generic = code_labels([(1, "Liver"), (2, "inferior_vena-cava"), (3, "Tumour")])
    assert generic == []
    assert [(lb["type"]["value"], lb["type"]["meaning"]) for lb in labels] == [
        ("10200004", "Liver"), ("64131007", "Inferior vena cava"), ("108369006", "Tumor")]
    assert labels[0]["category"]["value"] == "91723000"  # Anatomical Structure
    assert labels[2]["category"]["value"] == "49755003"  # Morphologically Altered Structure
    for keyword, _ in DEFAULT_NAMES.values():  # every default resolves in PS3.16
        assert getattr(codes.SCT, keyword).scheme_designator == "SCT"


def test_uncoded_labels_are_refused_unless_generic(tmp_path: Path) -> None:
    with pytest.raises(ImportRefused, match="labels without a code: 'organ', 'blob'"):
        code_labels([(1, "organ"), (2, "blob"), (3, "spleen")])
    labels, generic = code_labels([(1, "organ"), (3, "spleen")], generic=True)
    assert generic == ["organ"] and labels[0]["type"]["meaning"] == "Anatomical Structure"
    assert labels[1]["type"]["value"] == "78961009"


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_mapping_file_wins_over_defaults(tmp_path: Path, suffix: str) -> None:
    entry = {"category": {"scheme": "SCT", "value": "91723000",
                          "meaning": "Anatomical Structure"},
             "type": {"scheme": "SCT", "value": "71854001", "meaning": "Colon"},
             "color": [1, 2, 3]}
    path = tmp_path / f"codes{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"Organ": entry, "liver": entry}))
    else:
        path.write_text("\n".join(
            f'[{n}]\ncategory = {{ scheme = "SCT", value = "91723000", meaning = '
            f'"Anatomical Structure" }}\ntype = {{ scheme = "SCT", value = "71854001", '
            f'meaning = "Colon" }}\ncolor = [1, 2, 3]\n' for n in ("Organ", "liver")))
    labels, _ = code_labels([(1, "organ"), (2, "Liver")], mapping=load_mapping(path))
    assert [lb["type"]["value"] for lb in labels] == ["71854001", "71854001"]
    assert labels[0]["color"] == [1, 2, 3]


def test_bad_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "codes.json"
    path.write_text(json.dumps({"organ": {"category": {"scheme": "SCT"}, "type": {}}}))
    with pytest.raises(ImportRefused, match="organ.category: expected a code"):
        load_mapping(path)


def _outputs(*ops: PostOp) -> SimpleNamespace:
    return SimpleNamespace(postprocess=ops, labels=[SimpleNamespace(number=n) for n in (1, 2)])


def test_keep_largest_connectivity_and_together() -> None:
    labels = np.zeros((1, 6, 6), np.uint8)
    labels[0, 0, 0] = labels[0, 1, 1] = 1  # touch diagonally only
    labels[0, 4, 4] = labels[0, 4, 5] = labels[0, 5, 5] = 1  # the largest face-connected one
    labels[0, 2, 0:3] = 2  # label 2, face-touching (1, 1)
    face = _postprocess(labels.copy(), _outputs(PostOp("keep_largest_component", (1,))),
                        (1.0, 1.0, 1.0))
    assert face[0, 0, 0] == 0 and face[0, 4, 4] == 1
    # nnU-Net's union of labels, full connectivity: both diagonal voxels join the row
    # of label 2 (5 voxels), which outgrows the 3-voxel component of label 1
    together = _postprocess(labels.copy(), _outputs(PostOp(
        "keep_largest_component", (1, 2), connectivity="full", together=True)), (1.0,) * 3)
    assert together[0, 2, 0] == 2 and together[0, 0, 0] == 1 and together[0, 4, 4] == 0

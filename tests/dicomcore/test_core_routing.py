"""Routing rules on real-looking studies (dicomnode.dicom.routing), and the rule language."""

from __future__ import annotations

import copy

import pytest
from pydicom.dataset import Dataset

from dicomnode.config import ConfigError, load_settings
from dicomnode.dicom.findings import derived_uid
from dicomnode.dicom.phantom import PhantomStudy
from dicomnode.dicom.routing import route_study


def _rules(tmp_path, toml: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "node.toml"
    path.write_text(toml)
    return load_settings(path).routing.rules


def test_toml_rules_say_any_modality_and_any_plane(tmp_path) -> None:  # type: ignore[no-untyped-def]
    [rule] = _rules(tmp_path, """
[[routing.rules]]
name = "anything"
models = ["m"]
modality = "*"
plane = "any"
min_slices = 1
""")
    assert (rule.modality, rule.plane, rule.min_slices) == (None, None, 1)


def test_a_bad_regular_expression_is_a_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="view_position"):
        _rules(tmp_path, '[[routing.rules]]\nname = "x"\nmodels = ["m"]\nview_position = "(PA"\n')


def _mr_sagittal(study: PhantomStudy, n: int) -> list[Dataset]:
    out = []
    for k, ds in enumerate(copy.deepcopy(study.datasets[:n])):
        ds.Modality = "MR"
        ds.SeriesInstanceUID = derived_uid("mr series")
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [float(k), 0.0, 0.0]
        out.append(ds)
    return out


def test_min_slices_one_and_wildcards_route_a_single_sagittal_mr_slice(
    study: PhantomStudy, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    rules = _rules(tmp_path, """
[[routing.rules]]
name = "mr"
models = ["mr-model"]
modality = "MR"
plane = "*"
min_slices = 1
""")
    decision = route_study({"s": _mr_sagittal(study, 1)}, rules, calling_ae=None)

    assert [r.model for r in decision.routes] == ["mr-model"]
    assert "SAGITTAL series of 1 slices" in decision.routes[0].reason


def test_a_malformed_value_costs_only_its_series(study: PhantomStudy, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    broken = copy.deepcopy(study.datasets[:4])
    for ds in broken:
        ds.SeriesInstanceUID = derived_uid("broken series")
        # Series Number "1A": pydicom raises when it converts the value
        ds._dict[Tag(0x00200011)] = RawDataElement(Tag(0x00200011), "IS", 2, b"1A", 0, False, True)
        ds._dict[Tag(0x00280008)] = RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)
    rules = _rules(tmp_path, '[[routing.rules]]\nname = "ct"\nmodels = ["m"]\nmin_slices = 8\n')

    decision = route_study({"bad": broken, "good": list(study.datasets)}, rules, calling_ae=None)

    assert [(r.model, r.series_key) for r in decision.routes] == [("m", "good")]


def test_rules_select_radiographs_by_view_position(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def radiograph(view: str) -> Dataset:
        ds = Dataset()
        ds.Modality = "DX"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.SOPInstanceUID = derived_uid("dx", view)
        ds.SeriesInstanceUID = derived_uid("dx series", view)
        ds.ViewPosition = view
        ds.PresentationIntentType = "FOR PRESENTATION"
        return ds

    rules = _rules(tmp_path, """
[[routing.rules]]
name = "chest-pa"
models = ["cxr"]
modality = "DX"
view_position = "^PA$"
presentation_intent = "PRESENTATION"
plane = "*"
min_slices = 1
""")
    decision = route_study({"lat": [radiograph("LL")], "pa": [radiograph("PA")]}, rules,
                           calling_ae=None)

    # a radiograph makes no volume: the rule's filters pick it, the slice-model path
    # (not yet for images) says why it does not run
    assert not decision.routes
    [(name, reason)] = decision.skipped
    assert name == "chest-pa" and "1 candidates" in reason and "no volume" in reason

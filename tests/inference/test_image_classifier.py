"""The bundled radiograph demo through the image-model runtime: accuracy on held-out
phantoms, MONOCHROME1/MONOCHROME2 agreement, occlusion saliency on the nodule, and the
package's input rules (view, presentation intent)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from scipy import ndimage

from dicomnode.dicom.radiograph import make_chest_radiograph
from dicomnode.errors import InferenceError
from dicomnode.inference.image_model import ImageModel
from dicomnode.inference.package import DEMO_CXR_MODEL, demo_model_paths
from dicomnode.inference.runtime import RuntimeOptions
from dicomnode.modelpkg.format1 import read_model_package

HELD_OUT = range(19100, 19160)  # tests use seeds 19000 and above (none seen in training)


@pytest.fixture(scope="module")
def model() -> ImageModel:
    [path] = [p for p in demo_model_paths() if p.name == DEMO_CXR_MODEL]
    options = RuntimeOptions(providers=["CPUExecutionProvider"])
    return ImageModel.load(read_model_package(path), options)


def test_held_out_accuracy_is_at_least_0_9(model: ImageModel) -> None:
    right = 0
    for k, seed in enumerate(HELD_OUT):
        ph = make_chest_radiograph(seed=seed, nodule=k % 2 == 0)
        out = model.classify(ph.dataset)
        right += (1 in out.positive) == ph.has_nodule
    assert right / len(HELD_OUT) >= 0.9, f"accuracy {right}/{len(HELD_OUT)}"


def test_monochrome1_and_monochrome2_give_the_same_probability(model: ImageModel) -> None:
    for seed in (19200, 19201, 19202):
        m2 = make_chest_radiograph(seed=seed, photometric="MONOCHROME2")
        m1 = make_chest_radiograph(seed=seed, photometric="MONOCHROME1")
        assert not np.array_equal(m1.dataset.PixelData, m2.dataset.PixelData)
        p2 = model.classify(m2.dataset).probabilities[1]
        p1 = model.classify(m1.dataset).probabilities[1]
        assert abs(p1 - p2) <= 1e-3, (seed, p1, p2)


def test_occlusion_saliency_peaks_on_the_nodule(model: ImageModel) -> None:
    hits = total = 0
    passes = set()
    for seed in range(19300, 19340):
        ph = make_chest_radiograph(seed=seed, nodule=True)
        if 1 not in model.classify(ph.dataset).positive:
            continue  # the map explains a positive call
        smap, info = model.explain(ph.dataset, 1)
        assert smap.shape == ph.nodule.shape
        passes.add(info["passes"])
        peak = np.unravel_index(int(np.argmax(smap)), smap.shape)
        # the nodule's mask, widened by the occlusion patch's half-width on the image (a
        # patch that covers any of the nodule hides it)
        total += 1
        hits += bool(ph.nodule[peak])
    assert total >= 15
    assert hits / total >= 0.9, f"peak inside the nodule in {hits}/{total}"
    assert all(p > 1 for p in passes)


def test_views_and_presentation_intents_the_package_refuses(model: ImageModel) -> None:
    lateral = make_chest_radiograph(seed=19400, view_position="LL")
    with pytest.raises(InferenceError, match="View Position LL"):
        model.classify(lateral.dataset)
    raw = make_chest_radiograph(seed=19401, presentation_intent="FOR PROCESSING")
    with pytest.raises(InferenceError, match="Presentation Intent Type FOR PROCESSING"):
        model.classify(raw.dataset)


def test_a_graph_map_output_is_used_as_the_explanation(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from dicomnode.modelpkg.write import write_format2_package
    from dicomnode.training.cxr_demo import CXR_SPEC  # noqa: F401 (the demo's input rules)

    class Net(torch.nn.Module):
        # logit: the brightest 8x8 mean; map: the 8x8 mean itself (where it looked)
        def forward(self, x):
            m = torch.nn.functional.avg_pool2d(x, 9, stride=1, padding=4)
            return m.amax(dim=(2, 3)) * 4.0, m

    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter
        torch.onnx.export(Net(), torch.zeros(1, 1, 64, 64), buf, input_names=["image"],
                          output_names=["logits", "where"], dynamo=False)
    label = {"number": 1, "name": "Bright", "threshold": 0.5, "color": [255, 0, 0],
             "category": {"scheme": "SCT", "value": "404684003", "meaning": "Clinical finding"},
             "type": {"scheme": "SCT", "value": "786838002", "meaning": "Pulmonary nodule"}}
    doc = {"name": "where-net", "version": "1", "task": "classification",
           "input": {"kind": "image", "name": "image", "modality": ["DX"], "size": [64, 64],
                     "normalization": [{"kind": "bits_linear", "low": 0.0, "high": 1.0}]},
           "inference": {"mode": "whole", "patch": [64, 64]},
           "outputs": {"name": "logits", "kind": "logits", "activation": "sigmoid",
                       "labels": [label]},
           "results": {"kinds": ["SR", "PM"]},
           "explain": {"method": "output", "output": "where"}}
    pkg = write_format2_package(tmp_path / "pkg", {"m.onnx": buf.getvalue()}, doc)
    net = ImageModel.load(pkg, RuntimeOptions(providers=["CPUExecutionProvider"]))
    ph = make_chest_radiograph(seed=19500, nodule=True)
    smap, info = net.explain(ph.dataset, 1)
    assert info["passes"] == 1 and smap.shape == ph.nodule.shape
    # the graph's map is the image's local mean: brightest on the dense spine/body
    centre = ndimage.center_of_mass(smap > np.percentile(smap, 99))
    assert 0 < centre[0] < smap.shape[0] and 0 < centre[1] < smap.shape[1]


REAL_DX = (Path(__file__).resolve().parents[1] / "data" / "realworld"
           / "ImagingDataCommons+highdicom" / "data" / "test_files" / "dx_image.dcm")


def test_a_real_chest_film(model: ImageModel) -> None:
    """A vendor DX (Fujifilm, via highdicom's test data): MONOCHROME1, 8 bits, 169 x 211,
    no View Position. The package declares PA/AP, so it is refused with that reason; told
    the view, it runs, and the same film rewritten MONOCHROME2 gives the same probability
    (the inversion on a real header, not only on our phantoms)."""
    ds = dcmread(REAL_DX)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "ViewPosition" not in ds
    with pytest.raises(InferenceError, match="View Position"):
        model.classify(ds)
    ds.ViewPosition = "PA"
    p1 = model.classify(ds).probabilities[1]
    assert 0.0 <= p1 <= 1.0
    m2 = copy.deepcopy(ds)
    stored = m2.pixel_array
    m2.PixelData = ((1 << int(ds.BitsStored)) - 1 - stored).astype(stored.dtype).tobytes()
    m2.PhotometricInterpretation = "MONOCHROME2"
    m2.PresentationLUTShape = "IDENTITY"
    p2 = model.classify(m2).probabilities[1]
    assert abs(p1 - p2) <= 1e-3, (p1, p2)
    smap, info = model.explain(ds, 1)
    assert smap.shape == (ds.Rows, ds.Columns) and np.isfinite(smap).all()

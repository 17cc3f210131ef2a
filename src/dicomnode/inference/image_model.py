"""Run a format 2 image package: a radiograph classifier on one DX/CR/MG/SC image.

In order (the package's ``[input]`` fields in brackets):

1. refuse the image when its Presentation Intent Type or View Position is not among the
   package's [``presentation_intent``, ``view_position``] (a FOR PROCESSING image is
   "intended to be further processed before being displayed", PS3.3 C.8.11.1.1.1; a
   lateral view is not what a PA classifier learned);
2. read it as stored, MONOCHROME1 inverted [``monochrome1``], the VOI transform only when
   declared [``voi``] (:func:`dicomnode.dicom.image.load_image`);
3. crop the centred square [``crop``] and resize to the network size [``size``]
   (linear, anti-aliased when shrinking, as skimage's ``resize`` that torchxrayvision
   uses);
4. normalise [``normalization``], e.g. ``bits_linear`` -1024..1024 for torchxrayvision;
5. one channel, or grey replicated to three [``channels``];
6. the network, every member, logits averaged; sigmoid per label or softmax
   [``outputs.activation``]; a label is present at or above its ``threshold``.

**Occlusion sensitivity** (:meth:`ImageModel.saliency`) explains a label without
anything from the network but forward passes: a patch of the image is replaced by the
image's mean, and the drop in the label's probability is the patch's importance;
patches overlap by half, and the map is brought back onto the original image's pixel
grid (undoing the resize and the crop). It works on any ONNX classifier; a time budget
caps the number of patches (the stride grows until it fits).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from dicomnode.dicom.image import ProjectionImage, load_image
from dicomnode.errors import InferenceError, ModelError
from dicomnode.modelpkg.format2 import ImageInput, ModelPackage2
from dicomnode.modelpkg.image import prepare_image

__all__ = ["ImageModel", "ImageOutput", "PreparedImage"]


@dataclass(frozen=True)
class PreparedImage:
    """The network input of one image, and how to map back onto the image."""

    tensor: np.ndarray = field(repr=False)
    """(channels, H, W) float32."""
    crop: tuple[slice, slice]
    """The square taken from the image."""
    image: ProjectionImage


@dataclass(frozen=True)
class ImageOutput:
    """What a classifier said about one image."""

    probabilities: dict[int, float]
    """Label number -> probability."""
    positive: tuple[int, ...]
    """Labels at or above their threshold."""
    sop_instance_uid: str
    seconds: dict[str, float]


class ImageModel:
    """A format 2 image package with one ONNX Runtime session per member."""

    def __init__(self, package: ModelPackage2, sessions: list[Any]) -> None:
        if not isinstance(package.input, ImageInput):
            raise ModelError(f"{package.name}: not an image package")
        self.package = package
        self.spec: ImageInput = package.input
        self.sessions = sessions
        self.providers: tuple[str, ...] = tuple(sessions[0].get_providers())
        self.lock = threading.Lock()

    @classmethod
    def load(cls, package: ModelPackage2, options: Any = None) -> ImageModel:
        """Create one session per member and check each against its graph.

        Raises
        ------
        ModelLoadError, ModelError
            As for volume packages.
        """
        from dicomnode.inference.runtime import RuntimeOptions, create_session
        from dicomnode.modelpkg.graph import GraphSignature, check_format2_against_graph

        options = options or RuntimeOptions()
        sessions = []
        for i in range(len(package.members)):
            session = create_session(package.member_bytes(i), options,
                                     f"{package.members[i].file} (package: {package.source})")
            check_format2_against_graph(package, i, GraphSignature.from_session(session))
            sessions.append(session)
        return cls(package, sessions)

    # -- input -------------------------------------------------------------------------------

    def check(self, ds: Dataset) -> None:
        """Refuse an image the package does not accept (step 1).

        Raises
        ------
        InferenceError
            With the attribute and its accepted values.
        """
        from dicomnode.dicom.image import image_attributes

        attrs = image_attributes(ds)
        intent = attrs["presentation_intent"] or _intent_of_class(str(ds.get("SOPClassUID", "")))
        if self.spec.presentation_intent and intent not in self.spec.presentation_intent:
            raise InferenceError(
                f"Presentation Intent Type {intent or 'absent'}, the model accepts "
                f"{' or '.join(self.spec.presentation_intent)}"
            )
        if self.spec.view_position and attrs["view_position"] not in self.spec.view_position:
            raise InferenceError(
                f"View Position {attrs['view_position'] or 'absent'}, the model accepts "
                f"{' or '.join(self.spec.view_position)}"
            )
        modality = str(ds.get("Modality", "") or "")
        if modality not in self.spec.modality:
            raise InferenceError(
                f"Modality {modality or 'absent'}, the model accepts "
                f"{' or '.join(self.spec.modality)}"
            )

    def prepare(self, ds: Dataset) -> PreparedImage:
        """Steps 1-5: the network input of ``ds``.

        Raises
        ------
        InferenceError
            Refused (step 1), or a colour or undecodable image.
        """
        self.check(ds)
        image = load_image(ds, invert_monochrome1=self.spec.monochrome1 == "invert",
                           voi=self.spec.voi)
        try:
            tensor, crop = prepare_image(image, self.spec)
        except ValueError as exc:
            raise InferenceError(str(exc)) from None
        return PreparedImage(tensor=tensor, crop=crop, image=image)

    # -- the network ---------------------------------------------------------------------------

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, channels, H, W) -> (N, labels) probabilities, members' logits averaged."""
        pkg = self.package
        b = pkg.inference.batch
        out = []
        for start in range(0, len(batch), b):
            chunk = batch[start:start + b]
            x = np.zeros((b, *batch.shape[1:]), np.float32)
            x[:len(chunk)] = chunk
            logits = None
            for session in self.sessions:
                try:
                    (y,) = session.run([pkg.outputs.name], {pkg.input.name: x})
                except Exception as exc:  # onnxruntime's exceptions have no common base
                    raise ModelError(f"{pkg.name} {pkg.version}: onnxruntime failed: "
                                     f"{type(exc).__name__}") from exc
                y = np.asarray(y, np.float32).reshape(b, -1)
                logits = y if logits is None else logits + y
            assert logits is not None
            logits /= np.float32(len(self.sessions))
            out.append(logits[:len(chunk)])
        logits = np.concatenate(out)
        if pkg.outputs.kind == "probabilities":
            probs = logits
        elif pkg.outputs.activation == "sigmoid":
            probs = 1.0 / (1.0 + np.exp(-logits))
        else:
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
        if pkg.outputs.activation == "softmax":
            probs = probs[:, 1:]  # channel 0: no finding
        return probs.astype(np.float64)

    def classify(self, ds: Dataset) -> ImageOutput:
        """The package's labels on one image.

        Raises
        ------
        InferenceError
            The image is refused (with the reason) or unreadable.
        ModelError
            ONNX Runtime failed.
        """
        with self.lock:
            t0 = time.perf_counter()
            prep = self.prepare(ds)
            t1 = time.perf_counter()
            probs = self._probabilities(prep.tensor[None])[0]
            t2 = time.perf_counter()
        labels = self.package.outputs.labels
        by_label = {lb.number: float(probs[i]) for i, lb in enumerate(labels)}
        positive = tuple(lb.number for lb in labels if by_label[lb.number] >= lb.threshold)
        return ImageOutput(by_label, positive, prep.image.sop_instance_uid,
                           {"prepare": t1 - t0, "run": t2 - t1, "total": t2 - t0})

    def explain(self, ds: Dataset, label: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The package's explanation of ``label`` on ``ds`` (``[explain]``): occlusion
        sensitivity (:meth:`saliency`) or the graph's own map output (:meth:`output_map`).

        Raises
        ------
        ModelError
            The package has no ``[explain]``, or ONNX Runtime failed.
        InferenceError
            As :meth:`classify`.
        """
        ex = self.package.explain
        if ex is None:
            raise ModelError(f"{self.package.name}: the package has no [explain]")
        if ex.method == "output":
            return self.output_map(ds, label)
        return self.saliency(ds, label, patch_fraction=ex.patch_fraction, budget_s=ex.budget_s)

    def output_map(self, ds: Dataset, label: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The map the graph itself provides for ``label`` (output ``[explain] output``,
        (N, labels, H, W) on the network grid, members averaged), brought back onto the
        image's pixel grid as :meth:`saliency` does."""
        pkg = self.package
        ex = pkg.explain
        if ex is None or ex.output is None:
            raise ModelError(f"{pkg.name}: the package names no map output")
        numbers = [lb.number for lb in pkg.outputs.labels]
        if label not in numbers:
            raise ValueError(f"label {label} is not one of the package's {numbers}")
        k = numbers.index(label)
        with self.lock:
            t0 = time.perf_counter()
            prep = self.prepare(ds)
            x = np.zeros((pkg.inference.batch, *prep.tensor.shape), np.float32)
            x[0] = prep.tensor
            total = None
            for session in self.sessions:
                try:
                    (m,) = session.run([ex.output], {pkg.input.name: x})
                except Exception as exc:  # onnxruntime's exceptions have no common base
                    raise ModelError(f"{pkg.name} {pkg.version}: onnxruntime failed: "
                                     f"{type(exc).__name__}") from exc
                m = np.asarray(m, np.float32)
                if m.ndim != 4 or m.shape[1] != len(numbers):
                    raise ModelError(f"{pkg.name}: output {ex.output} has shape {m.shape}, "
                                     f"expected (N, {len(numbers)}, H, W)")
                total = m[0, k] if total is None else total + m[0, k]
            assert total is not None
            grid = total / np.float32(len(self.sessions))
            seconds = time.perf_counter() - t0
        out = self._back(grid, prep)
        return out, {"passes": 1, "seconds": round(seconds, 3)}

    @staticmethod
    def _back(grid: np.ndarray, prep: PreparedImage) -> np.ndarray:
        """A network-grid map onto the original image's pixels (zero outside the crop)."""
        h, w = grid.shape
        rows, cols = prep.image.shape[:2]
        crop = prep.crop
        ch, cw = crop[0].stop - crop[0].start, crop[1].stop - crop[1].start
        back = ndimage.zoom(grid, (ch / h, cw / w), order=1, mode="nearest", grid_mode=True)
        out = np.zeros((rows, cols), np.float32)
        out[crop] = back[:ch, :cw]
        return out

    def saliency(self, ds: Dataset, label: int, *, patch_fraction: float = 0.125,
                 budget_s: float = 10.0) -> tuple[np.ndarray, dict[str, Any]]:
        """Occlusion sensitivity of ``label`` on ``ds`` (see the module docstring).

        Returns
        -------
        (map, info)
            ``map``: (rows, columns) float32 on the original image, the drop of the
            label's probability when that region is hidden (0 where hiding changes
            nothing, outside the crop 0). ``info``: patch and stride in network pixels,
            forward passes, seconds, and the probability it explains.

        Raises
        ------
        InferenceError, ModelError
            As :meth:`classify`.
        """
        numbers = [lb.number for lb in self.package.outputs.labels]
        if label not in numbers:
            raise ValueError(f"label {label} is not one of the package's {numbers}")
        k = numbers.index(label)
        with self.lock:
            t0 = time.perf_counter()
            prep = self.prepare(ds)
            base = self._probabilities(prep.tensor[None])[0, k]
            # one pass's cost, the least of three: a single timing on a loaded machine
            # can double and halve the map's resolution with it
            t_one = time.perf_counter() - t0
            for _ in range(2):
                t1 = time.perf_counter()
                self._probabilities(prep.tensor[None])
                t_one = min(t_one, time.perf_counter() - t1)
            _, h, w = prep.tensor.shape
            p = max(2, int(round(min(h, w) * patch_fraction)))
            stride = max(1, p // 4)
            # fewer, larger steps until the passes fit the budget (each costs one forward)
            while True:
                n = (math.ceil((h - p) / stride) + 1) * (math.ceil((w - p) / stride) + 1)
                if n * max(t_one, 1e-4) <= budget_s or stride >= p:
                    break
                stride = min(p, stride * 2)
            # hidden = the image's mean, Zeiler & Fergus's grey square (arXiv:1311.2901)
            fill = np.float32(prep.tensor.mean())
            starts_y = sorted({min(y, h - p) for y in range(0, h, stride)})
            starts_x = sorted({min(x, w - p) for x in range(0, w, stride)})
            windows = [(y, x) for y in starts_y for x in starts_x]
            drop = np.zeros((h, w), np.float64)
            count = np.zeros((h, w), np.float64)
            # each window's drop weighs most at its centre: a pixel's value is then led
            # by the windows centred on it, not by every window that merely touches it
            # (a box average is flat over the whole union of windows covering a finding)
            weight = np.outer(np.hanning(p + 2)[1:-1], np.hanning(p + 2)[1:-1])
            b = self.package.inference.batch
            for i in range(0, len(windows), max(b, 8)):
                chunk = windows[i:i + max(b, 8)]
                batch = np.repeat(prep.tensor[None], len(chunk), axis=0)
                for j, (y, x) in enumerate(chunk):
                    batch[j, :, y:y + p, x:x + p] = fill
                probs = self._probabilities(batch)[:, k]
                for (y, x), q in zip(chunk, probs, strict=True):
                    drop[y:y + p, x:x + p] += (base - q) * weight
                    count[y:y + p, x:x + p] += weight
            grid = (drop / np.maximum(count, 1e-6)).astype(np.float32)
            seconds = time.perf_counter() - t0
        out = self._back(grid, prep)
        info = {"patch": p, "stride": stride, "passes": len(windows) + 3,
                "seconds": round(seconds, 3), "forward_s": round(t_one, 4),
                "probability": float(base)}
        return out, info


def _intent_of_class(sop_class_uid: str) -> str:
    """The Presentation Intent a DX/MG/IO SOP class implies when the attribute is absent
    (PS3.4 B.5: "For Presentation" and "For Processing" storage classes)."""
    processing = {"1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2.1",
                  "1.2.840.10008.5.1.4.1.1.1.3.1"}
    presentation = {"1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2",
                    "1.2.840.10008.5.1.4.1.1.1.3"}
    if sop_class_uid in processing:
        return "FOR PROCESSING"
    if sop_class_uid in presentation:
        return "FOR PRESENTATION"
    return ""

"""Run a model package on a volume with ONNX Runtime.

One :class:`OnnxModel` holds one ``InferenceSession`` for one model version;
:class:`ModelSessions` keeps one per (name, version, sha256) for the node.

Concurrency: ONNX Runtime sessions are thread-safe, but two studies on one GPU
at once only compete for its memory. :meth:`OnnxModel.run` therefore holds the
model's :attr:`~OnnxModel.lock` for the whole volume, which serialises jobs on
*one session*. Serialising jobs of *different* models that share a GPU is the
caller's job (e.g. one worker thread per GPU queue, or one lock per device).

onnxruntime is imported lazily: the node installs it as the ``[cpu]`` or
``[gpu]`` extra, never both (they overwrite each other's provider libraries,
microsoft/onnxruntime#26996).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dicomnode.errors import ModelError, ModelLoadError
from dicomnode.inference.postprocess import Finding, activate, assign_labels, find_components
from dicomnode.inference.preprocess import prepare
from dicomnode.modelpkg.format1 import ModelPackage, read_model_package
from dicomnode.modelpkg.graph import GraphSignature, check_against_graph
from dicomnode.modelpkg.grid import from_model_grid

__all__ = [
    "InferenceOutput",
    "ModelSessions",
    "OnnxModel",
    "RuntimeOptions",
    "create_session",
    "load_runner",
    "import_onnxruntime",
    "resolve_providers",
]

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_TRT = "TensorrtExecutionProvider"


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module.

    Raises
    ------
    ModelError
        It is not installed, with the extras that install it.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError(
            "onnxruntime is not installed: install dicomnode[cpu] (CPU) or dicomnode[gpu] "
            "(CUDA), not both"
        ) from exc
    return onnxruntime


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are created (the node's ``[inference]`` settings).

    ``providers``: ``"auto"`` (CUDA when onnxruntime-gpu lists it, else CPU) or an
    explicit ordered list of ONNX Runtime execution provider names.
    ``intra_op_threads`` / ``inter_op_threads``: 0 = ONNX Runtime's default (all cores).
    ``engine_cache_dir``: where the TensorRT provider keeps its built engines (keyed by
    the graph, so a restart does not rebuild them); ``tensorrt_fp16``: let TensorRT run
    in half precision.
    """

    providers: str | tuple[str, ...] = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    engine_cache_dir: str | None = None
    tensorrt_fp16: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.providers, str) and self.providers != "auto":
            raise ModelError(
                f'providers: expected "auto" or a list of names, got {self.providers!r}'
            )
        if not isinstance(self.providers, str):
            object.__setattr__(self, "providers", tuple(self.providers))
            if not self.providers:
                raise ModelError("providers: the list is empty")
        for key in ("intra_op_threads", "inter_op_threads"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ModelError(f"{key}: expected an integer >= 0, got {getattr(self, key)!r}")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> RuntimeOptions:
        """From a settings mapping with any of the field names (others are ignored)."""
        keys = ("providers", "intra_op_threads", "inter_op_threads")
        return cls(**{k: settings[k] for k in keys if k in settings})


def resolve_providers(
    setting: str | Sequence[str], available: Sequence[str] | None = None
) -> list[str]:
    """The execution providers to ask for, in order.

    Parameters
    ----------
    setting
        ``"auto"`` or explicit names.
    available
        ``onnxruntime.get_available_providers()``; looked up when None.

    Raises
    ------
    ModelError
        An explicit provider that this onnxruntime build does not have.
    """
    if available is None:
        available = import_onnxruntime().get_available_providers()
    if isinstance(setting, str):
        return [_CUDA, _CPU] if _CUDA in available else [_CPU]
    missing = [p for p in setting if p not in available]
    if missing:
        raise ModelError(
            f"providers: {', '.join(missing)} not available in this onnxruntime "
            f"(available: {', '.join(available)}); CUDA needs the dicomnode[gpu] extra"
        )
    return list(setting)


def create_session(model: bytes, options: RuntimeOptions, what: str) -> Any:
    """An ONNX Runtime session over ``model`` with the node's providers and threads.

    Raises
    ------
    ModelLoadError
        onnxruntime cannot load the bytes (``what`` names them).
    ModelError
        onnxruntime is missing or a provider is unavailable.
    """
    ort = import_onnxruntime()
    providers = resolve_providers(options.providers, ort.get_available_providers())
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # ORT's own warnings go to stderr, not to our logs
    chosen: list[Any] = list(providers)
    if _TRT in providers:
        # Engine cache in the data directory: building a TensorRT engine takes minutes;
        # the cache is keyed by the graph, so a new model version builds its own.
        trt: dict[str, Any] = {"trt_fp16_enable": options.tensorrt_fp16}
        if options.engine_cache_dir:
            Path(options.engine_cache_dir).mkdir(parents=True, exist_ok=True)
            trt.update({"trt_engine_cache_enable": True,
                        "trt_engine_cache_path": options.engine_cache_dir})
        chosen[providers.index(_TRT)] = (_TRT, trt)
    try:
        return ort.InferenceSession(model, sess_options=so, providers=chosen)
    except Exception as exc:  # onnxruntime's exceptions have no useful common base
        raise ModelLoadError(f"{what}: onnxruntime cannot load it: {exc}") from exc


@dataclass(frozen=True)
class InferenceOutput:
    """What one run produced, on the volume's original (z, y, x) grid."""

    model_name: str
    model_version: str
    model_sha256: str
    task: str
    mask: np.ndarray | None = field(repr=False)
    """Segmentation: (z, y, x) uint8 label numbers, 0 = none. Classification: None."""
    probabilities: np.ndarray | None = field(repr=False)
    """With ``return_probabilities``: (labels, z, y, x) float16, label order, as the
    network gave them (small components are not removed here); else None."""
    findings: tuple[Finding, ...]
    """Segmentation: connected components per label. Classification: empty."""
    label_probabilities: Mapping[int, float]
    """Classification: label number → probability for the volume (mean over slices).
    Segmentation: empty."""
    positive_labels: tuple[int, ...]
    """Classification: labels whose probability reaches their threshold. Segmentation:
    labels with at least one finding."""
    providers: tuple[str, ...]
    """The session's providers as ONNX Runtime reports them (with "auto", CUDA is
    missing here when onnxruntime-gpu could not initialise it and fell back to CPU)."""
    seconds: Mapping[str, float]
    """Wall time: ``run`` (the graph), ``other`` (pre- and postprocessing), ``total``."""
    plan: Mapping[str, Any] = field(default_factory=dict)
    """Format 2: shapes, windows, passes and estimated bytes of the run."""


class OnnxModel:
    """One model version and its ONNX Runtime session. Build with :meth:`load`."""

    def __init__(self, package: ModelPackage, session: Any) -> None:
        self.package = package
        self.session = session
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        self.lock = threading.Lock()
        """Held by :meth:`run` for a whole volume."""

    @classmethod
    def load(
        cls, package: ModelPackage | Path | str, options: RuntimeOptions | None = None
    ) -> OnnxModel:
        """Create the session and check the package against its graph.

        Parameters
        ----------
        package
            A package path (directory or archive) or an already read package.
        options
            Providers and threads; defaults to ``RuntimeOptions()``.

        Raises
        ------
        ModelLoadError
            The package is invalid or disagrees with the graph.
        ModelError
            onnxruntime missing, a provider unavailable, or the session cannot be created.
        """
        options = options or RuntimeOptions()
        pkg = package if isinstance(package, ModelPackage) else read_model_package(package)
        if not isinstance(pkg, ModelPackage):
            raise ModelLoadError(f"{pkg.source}: a format {pkg.format} package; OnnxModel "
                                 "runs format 1 (see inference.sliding)")
        model_bytes = pkg.read_onnx_bytes()  # re-checks sha256 against what we load
        session = create_session(model_bytes, options, f"model.onnx (package: {pkg.source})")
        check_against_graph(pkg, GraphSignature.from_session(session))
        return cls(pkg, session)

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        """Run the graph on a prepared (N, 1, H, W) float32 batch; the raw output.

        Raises
        ------
        ModelError
            ONNX Runtime failed.
        """
        pkg = self.package
        try:
            (out,) = self.session.run(
                [pkg.outputs.name], {pkg.input.name: np.ascontiguousarray(x, np.float32)}
            )
        except Exception as exc:  # onnxruntime's exceptions have no useful common base
            raise ModelError(f"{pkg.name} {pkg.version}: onnxruntime failed: {exc}") from exc
        return np.asarray(out)

    def run(
        self,
        volume: np.ndarray,
        spacing: tuple[float, float, float],
        *,
        return_probabilities: bool = False,
    ) -> InferenceOutput:
        """Run the model on a whole volume.

        Parameters
        ----------
        volume
            (z, y, x) in real units (HU for CT, rescale already applied), slices in
            the contract's orientation.
        spacing
            (dz, dy, dx) in mm.
        return_probabilities
            Also return per-label probabilities as float16 (segmentation only).

        Returns
        -------
        InferenceOutput
            Mask and findings on the original grid (segmentation), or per-label
            probabilities for the volume, the mean over its slices (classification).

        Raises
        ------
        InferenceError
            The volume or spacing cannot be used.
        ModelError
            ONNX Runtime failed.

        Notes
        -----
        Memory beyond the input and the returned arrays is one batch of network
        input plus one batch of probabilities per label on the original grid.
        """
        with self.lock:
            return self._run(volume, spacing, return_probabilities)

    def infer_volume(self, array: np.ndarray, affine: np.ndarray,
                     spacing: tuple[float, float, float]) -> InferenceOutput:
        """:meth:`run` on a volume given as the node holds it (the affine is not needed:
        format 1 reads slices as stored)."""
        del affine
        return self.run(array, spacing)

    def predict_mask(self, volume: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        """The (z, y, x) uint8 label mask only (for evaluation); see :meth:`run`."""
        out = self.run(volume, spacing)
        if out.mask is None:
            raise ModelError(f"{self.package.name}: a {self.package.task} model has no mask")
        return out.mask

    def _run(
        self, volume: np.ndarray, spacing: tuple[float, float, float], want_probs: bool
    ) -> InferenceOutput:
        pkg = self.package
        outputs = pkg.outputs
        t0 = time.perf_counter()
        prep = prepare(volume, spacing, pkg.input)
        z, y, x = volume.shape
        seg = pkg.task == "segmentation"
        first = 1 if outputs.activation == "softmax" else 0  # channel of label 1
        mask = np.zeros((z, y, x), np.uint8) if seg else None
        probs = np.zeros((len(outputs.labels), z, y, x), np.float16) if seg and want_probs else None
        sums = np.zeros(outputs.channels, np.float64)
        t_run = 0.0
        for k, batch in prep.batches(volume, pkg.input):
            ta = time.perf_counter()
            raw = self.run_batch(batch)
            t_run += time.perf_counter() - ta
            p = activate(raw, outputs)
            if not seg:
                sums += p.sum(axis=0, dtype=np.float64)
                continue
            p = from_model_grid(p, prep.geometry)
            mask[k : k + len(p)] = assign_labels(p, outputs)  # type: ignore[index]
            if probs is not None:
                probs[:, k : k + len(p)] = np.moveaxis(p[:, first:], 1, 0)
        findings: tuple[Finding, ...] = ()
        label_probs: dict[int, float] = {}
        if seg:
            names = {lb.number: lb.name for lb in outputs.labels}
            mask, findings = find_components(
                mask,
                volume,
                spacing,
                names,
                min_volume_mm3=outputs.min_component_mm3,  # type: ignore[arg-type]
            )
            positive = tuple(sorted({f.label for f in findings}))
        else:
            mean = sums / z
            label_probs = {lb.number: float(mean[first + i]) for i, lb in enumerate(outputs.labels)}
            positive = tuple(
                lb.number for lb in outputs.labels if label_probs[lb.number] >= lb.threshold
            )
        total = time.perf_counter() - t0
        # Pre- and postprocessing interleave batch by batch; "other" is everything but the graph.
        seconds = {"run": t_run, "other": total - t_run, "total": total}
        return InferenceOutput(
            model_name=pkg.name,
            model_version=pkg.version,
            model_sha256=pkg.sha256,
            task=pkg.task,
            mask=mask,
            probabilities=probs,
            findings=findings,
            label_probabilities=label_probs,
            positive_labels=positive,
            providers=self.providers,
            seconds=seconds,
        )


class ModelSessions:
    """One :class:`OnnxModel` per model version (name, version, sha256), created on first use.

    Thread-safe. A new version of a package (another sha256) gets a new session;
    the old one stays until :meth:`evict` or :meth:`clear`, so a running job keeps
    the version it started with.
    """

    def __init__(self, options: RuntimeOptions | None = None,
                 memory_budget_mb: float | None = None) -> None:
        self.options = options or RuntimeOptions()
        self.memory_budget_mb = memory_budget_mb
        self._models: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, path: Path | str) -> Any:
        """The model for the package at ``path`` (read and checksummed on every call):
        an :class:`OnnxModel` (format 1) or a
        :class:`~dicomnode.inference.sliding.SlidingWindowModel` (format 2 volume).

        Raises
        ------
        ModelLoadError, ModelError
            As :meth:`OnnxModel.load`.
        """
        pkg = read_model_package(path)
        key = (pkg.name, pkg.version, pkg.sha256)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = load_runner(pkg, self.options,
                                                        self.memory_budget_mb)
            return model

    def evict(self, name: str, version: str) -> int:
        """Forget the sessions of one model version; return how many."""
        with self._lock:
            keys = [k for k in self._models if k[:2] == (name, version)]
            for k in keys:
                del self._models[k]
            return len(keys)

    def clear(self) -> None:
        """Forget every session."""
        with self._lock:
            self._models.clear()


def load_runner(pkg: Any, options: RuntimeOptions, memory_budget_mb: float | None) -> Any:
    """The runner of a package: :class:`OnnxModel` for format 1, the sliding-window model
    for a format 2 volume package, the image model for a format 2 image package.

    Raises
    ------
    ModelLoadError, ModelError
        As the runner's ``load``.
    """
    if isinstance(pkg, ModelPackage):
        return OnnxModel.load(pkg, options)
    from dicomnode.inference.image_model import ImageModel
    from dicomnode.inference.sliding import SlidingWindowModel
    from dicomnode.modelpkg.format2 import VolumeInput

    if not isinstance(pkg.input, VolumeInput):
        return ImageModel.load(pkg, options)
    return SlidingWindowModel.load(pkg, options, memory_budget_mb)

"""Run a format 2 volume package: the whole pipeline its ecosystem runs, under a memory budget.

In order (the package's fields in brackets; semantics in :mod:`dicomnode.modelpkg`):

1. reorient the volume to the network's axes by permutation and flips [``input.axes``];
2. crop to the non-zero box [``input.crop_to_nonzero``] (nnU-Net);
3. normalise before or after 4 [``input.normalize_stage``, ``input.normalization``];
4. resample to the network spacing [``input.spacing_mm``, ``input.resample``];
5. pad to the patch, centred [``inference.pad``];
6. slide the patch over the volume [``inference.tiling``], each window through every
   member (fold) and every mirroring [``inference.mirror_axes``], logits averaged, windows
   blended [``inference.blend``];
7. back to the original grid [``outputs.resample_back``, ``outputs.back_order``], labels
   by argmax (softmax) or threshold / regions painted in order (sigmoid);
8. undo padding, cropping and reorientation: a label mask of exactly the input's shape;
9. post-process [``outputs.postprocess``].

**Streaming.** Windows are run in raster order, network axis 0 slowest. A plane of the
blend accumulator is final once no later window covers it; final planes go straight
through steps 7 and 8 (resampling back with orders 0 and 1 is separable, so each output
plane needs one or two network planes) and are freed. Peak memory is therefore the
input, the prepared volume, ``channels x (patch[0] + step) x`` one network plane for the
accumulator, and one label mask, never ``channels x`` the whole volume (the resampling
of the full logits is what exhausts memory in nnU-Net deployments, MIC-DKFZ/nnUNet#2912).

**Static shapes.** Every run feeds exactly ``[batch, channels, *patch]`` (the last batch
padded with zeros): each new shape costs a CUDA algorithm search (microsoft/
onnxruntime#6978).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dicomnode.errors import InferenceError, ModelError
from dicomnode.modelpkg.format2 import ModelPackage2, Outputs, VolumeInput
from dicomnode.modelpkg.prepare import Prepared, prepare_volume
from dicomnode.modelpkg.resample import back_maps
from dicomnode.modelpkg.tiling import gaussian_weights, tile_starts

__all__ = ["Prepared", "SlidingOutput", "SlidingWindowModel", "prepare_volume"]

_MB = 1 << 20


def _activate(x: np.ndarray, outputs: Outputs, axis: int = 0) -> np.ndarray:
    if outputs.kind == "probabilities":
        return x
    if outputs.activation == "sigmoid":
        p = np.tanh(x * np.float32(0.5))  # never overflows, unlike exp(-x)
        p += np.float32(1.0)
        p *= np.float32(0.5)
        return p
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _decide(values: np.ndarray, outputs: Outputs, activated: bool) -> np.ndarray:
    """(C, ...) logits or probabilities -> label numbers (...)."""
    dtype = np.uint8 if max(lb.number for lb in outputs.labels) < 256 else np.uint16
    if outputs.activation == "softmax":
        # argmax is the same on logits and probabilities
        return values.argmax(axis=0).astype(dtype)
    probs = values if activated else _activate(values, outputs)
    out = np.zeros(values.shape[1:], dtype)
    if outputs.regions:
        for region in outputs.regions:  # painted in order: later wins
            # strictly above 0.5, as nnU-Net paints regions (label_handling.py): a logit of
            # exactly 0 (e.g. outside its crop) stays background
            out[probs[region.channel] > 0.5] = region.label
        return out
    thr = np.array([lb.threshold for lb in outputs.labels], np.float32)
    thr = thr.reshape((-1,) + (1,) * (values.ndim - 1))
    scored = np.where(probs >= thr, probs, np.float32(-1.0))
    best = scored.argmax(axis=0)
    hit = np.take_along_axis(scored, best[None], axis=0)[0] >= 0
    out[hit] = (best[hit] + 1).astype(dtype)
    return out


@dataclass(frozen=True)
class SlidingOutput:
    """A volume package's result on the input grid."""

    labels: np.ndarray = field(repr=False)
    """(z, y, x) label numbers on the input volume's grid (uint8, uint16 above 255 labels)."""
    seconds: dict[str, float]
    plan: dict[str, Any]
    """What was run: shapes, windows, passes, estimated peak bytes (for logs and benchmarks)."""
    logits: np.ndarray | None = field(default=None, repr=False)
    """With ``keep_logits``: (C, z, y, x) values resampled back (logits, or probabilities
    for ``resample_back = "probabilities"``); background outside the cropped box. For
    parity tests and small volumes only: this is the array streaming avoids."""


class SlidingWindowModel:
    """A format 2 volume package with one ONNX Runtime session per member."""

    def __init__(self, package: ModelPackage2, sessions: Sequence[Any],
                 memory_budget_mb: float | None = None) -> None:
        if not isinstance(package.input, VolumeInput):
            raise ModelError(f"{package.name}: not a volume package")
        self.package = package
        self.sessions = list(sessions)
        self.memory_budget_mb = memory_budget_mb
        self.providers: tuple[str, ...] = tuple(self.sessions[0].get_providers())
        self.lock = threading.Lock()

    @classmethod
    def load(cls, package: ModelPackage2, options: Any = None,
             memory_budget_mb: float | None = None) -> SlidingWindowModel:
        """Create one session per member and check each against its graph.

        Raises
        ------
        ModelLoadError
            A member disagrees with ``model.toml``.
        ModelError
            onnxruntime missing, or a session cannot be created.
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
        return cls(package, sessions, memory_budget_mb)

    def infer_volume(self, array: np.ndarray, affine: np.ndarray,
                     spacing: tuple[float, float, float]) -> Any:
        """:meth:`run`, then findings per connected component, as the node's results need.

        Returns
        -------
        dicomnode.inference.runtime.InferenceOutput
        """
        from dicomnode.inference.postprocess import find_components
        from dicomnode.inference.runtime import InferenceOutput

        pkg = self.package
        out = self.run(array, affine)
        names = {lb.number: lb.name for lb in pkg.outputs.labels}
        mask, findings = find_components(out.labels, array, spacing, names)
        return InferenceOutput(
            model_name=pkg.name,
            model_version=pkg.version,
            model_sha256=pkg.sha256,
            task=pkg.task,
            mask=mask,
            probabilities=None,
            findings=findings,
            label_probabilities={},
            positive_labels=tuple(sorted({f.label for f in findings})),
            providers=self.providers,
            seconds=out.seconds,
            plan=out.plan,
        )

    # -- the network ----------------------------------------------------------------------

    def _run(self, session: Any, x: np.ndarray) -> np.ndarray:
        pkg = self.package
        try:
            if "CUDAExecutionProvider" in self.providers:
                # IO binding: the input is copied to the device once and the output
                # buffer is bound, instead of ONNX Runtime copying both inside run()
                # (onnxruntime.ai/docs/performance/tune-performance/iobinding.html)
                binding = session.io_binding()
                binding.bind_cpu_input(pkg.input.name, x)
                binding.bind_output(pkg.outputs.name, "cuda")
                session.run_with_iobinding(binding)
                return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)
            (out,) = session.run([pkg.outputs.name], {pkg.input.name: x})
        except Exception as exc:  # onnxruntime's exceptions have no useful common base
            raise ModelError(f"{pkg.name} {pkg.version}: onnxruntime failed: "
                             f"{type(exc).__name__}") from exc
        return np.asarray(out, dtype=np.float32)

    def predict_members(self, x: np.ndarray) -> list[np.ndarray]:
        """Per member, the logits on one static batch averaged over the mirrorings
        (nnU-Net's ``_internal_maybe_mirror_and_predict``)."""
        spec = self.package.inference
        subsets = [c for r in range(1, len(spec.mirror_axes) + 1)
                   for c in itertools.combinations(spec.mirror_axes, r)]
        out = []
        for session in self.sessions:
            pred = self._run(session, x)
            for axes in subsets:
                flip = tuple(a + 2 for a in axes)
                flipped = np.ascontiguousarray(np.flip(x, flip))
                pred += np.flip(self._run(session, flipped), flip)
            pred /= np.float32(len(subsets) + 1)
            out.append(pred)
        return out

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """Logits averaged over every member and mirroring, on one static batch."""
        preds = self.predict_members(x)
        total = preds[0]
        for p in preds[1:]:
            total += p
        if len(preds) > 1:
            total /= np.float32(len(preds))
        return total

    # -- the pipeline ---------------------------------------------------------------------

    def estimate_bytes(self, shape: Sequence[int], prepared_shape: Sequence[int]) -> int:
        """Bytes beyond the input: prepared volume, accumulator slab, windows, one output
        plane set and the label mask (the budget check's estimate)."""
        spec, out = self.package.inference, self.package.outputs
        c = out.channels
        d0, d1, d2 = prepared_shape
        p0 = spec.patch[0]
        acc = 2 if spec.accumulate == "float16" else 4
        slab = c * (p0 + max(1, int(p0 * spec.tiling.step)) + 2) * d1 * d2 * acc
        windows = spec.batch * (1 + c) * int(np.prod(spec.patch)) * 4 * 2
        plane_back = c * int(shape[1]) * int(shape[2]) * 8 * 3
        labels = int(np.prod(shape)) * 2
        prepared = int(np.prod(prepared_shape)) * 4 * 2
        return slab + windows + plane_back + labels + prepared

    def run(self, array: np.ndarray, affine: np.ndarray, *, keep_logits: bool = False
            ) -> SlidingOutput:
        """The label mask of ``array`` (z, y, x, real units) whose voxel (k, i, j) lies at
        ``affine @ (k, i, j, 1)`` (LPS, mm).

        Raises
        ------
        InferenceError
            The volume cannot be prepared (oblique, empty) or needs more memory than
            ``inference.memory_budget_mb`` allows (the estimate is in the message).
        ModelError
            ONNX Runtime failed.
        """
        with self.lock:
            return self._run_volume(np.asarray(array), np.asarray(affine, dtype=float),
                                    keep_logits)

    def _run_volume(self, array: np.ndarray, affine: np.ndarray, keep_logits: bool
                    ) -> SlidingOutput:
        pkg = self.package
        spec, outputs = pkg.inference, pkg.outputs
        t0 = time.perf_counter()
        inp = pkg.input
        assert isinstance(inp, VolumeInput)
        prep = prepare_volume(array, affine, inp, spec.patch, spec.pad.mode, spec.pad.value,
                              spec.pad.space)
        t_prep = time.perf_counter() - t0
        d = prep.data.shape[1:]
        if spec.mode == "whole" and tuple(d) != tuple(spec.patch):
            raise InferenceError(
                f"the prepared volume {tuple(prep.network_shape)} is larger than the network's "
                f"fixed input {tuple(spec.patch)} (inference.mode = whole)"
            )
        need = self.estimate_bytes(array.shape, d)
        if self.memory_budget_mb is not None and need > self.memory_budget_mb * _MB:
            raise InferenceError(
                f"the model needs about {need / _MB:.0f} MB beyond the input for this volume; "
                f"inference.memory_budget_mb is {self.memory_budget_mb:.0f}"
            )
        starts = [
            tile_starts(n, p, flavour=spec.tiling.flavour, step=spec.tiling.step,
                        overlap=spec.tiling.overlap)
            for n, p in zip(d, spec.patch, strict=True)
        ]
        weights = (
            gaussian_weights(spec.patch, flavour=spec.blend.flavour,
                             sigma_scale=spec.blend.sigma_scale)
            if spec.blend.kind == "gaussian" else np.ones(spec.patch, np.float32)
        )
        back = _Back(self, prep, keep_logits)
        counts = {"windows": 0, "seconds": 0.0}
        for plane, logits in self._blend(prep.data, starts, weights, counts):
            back.add(plane, logits)
        back.finish()
        t_net, windows = float(counts["seconds"]), int(counts["windows"])
        labels = prep.reorient.invert(back.labels)
        labels = np.ascontiguousarray(labels)
        logits = None
        if back.kept is not None:
            logits = np.ascontiguousarray(prep.reorient.invert(back.kept))
        labels = _postprocess(labels, outputs, tuple(float(np.linalg.norm(affine[:3, k]))
                                                     for k in range(3)))
        total = time.perf_counter() - t0
        n_passes = len(self.sessions) * 2 ** len(spec.mirror_axes)
        return SlidingOutput(
            labels=labels,
            seconds={"prepare": t_prep, "run": t_net, "other": total - t_prep - t_net,
                     "total": total},
            plan={
                "input_shape": list(array.shape),
                "network_shape": list(prep.network_shape),
                "padded_shape": list(d),
                "windows": windows,
                "passes_per_window": n_passes,
                "estimated_bytes": need,
            },
            logits=logits,
        )

    def _blend(self, data: np.ndarray, starts: list[list[int]], weights: np.ndarray,
               counts: dict[str, float]) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (plane index, (C, d1, d2) blended logits) in plane order, each once;
        ``counts`` gets the windows run and the seconds spent in the network.

        ``accumulate = "float32"``: members and mirrorings are averaged per window, then
        blended in float32. ``"float16"``: nnU-Net's arithmetic exactly: each member
        (fold) blended on its own in half precision (logits x Gaussian summed into a
        float16 accumulator, the weights into a float16 sum, divided in half
        precision), then the members' planes summed and divided in half precision.
        """
        spec = self.package.inference
        c = self.package.outputs.channels
        p0, p1, p2 = spec.patch
        _, d0, d1, d2 = data.shape
        half = spec.accumulate == "float16"
        n_acc = len(self.sessions) if half else 1
        acc_dtype = np.float16 if half else np.float32
        rows = sorted(set(starts[0]))
        depth = p0 + (max(b - a for a, b in itertools.pairwise(rows)) if len(rows) > 1 else 0)
        accs = [np.zeros((c, depth, d1, d2), acc_dtype) for _ in range(n_acc)]
        wsum = np.zeros((depth, d1, d2), acc_dtype)
        w_win = weights.astype(acc_dtype)

        def final(k: int) -> np.ndarray:
            planes = [acc[:, k] / wsum[k] for acc in accs]
            total = planes[0]
            for p in planes[1:]:
                total = total + p
            if len(planes) > 1:
                total = total / acc_dtype(len(planes))
            return total.astype(np.float32)

        base = rows[0]
        emitted = 0
        for r, s0 in enumerate(rows):
            # shift the ring: planes before s0 are final
            if s0 > base:
                shift = s0 - base
                for k in range(shift):
                    yield base + k, final(k)
                    emitted += 1
                for acc in accs:
                    acc[:, : depth - shift] = acc[:, shift:]
                    acc[:, depth - shift:] = 0
                wsum[: depth - shift] = wsum[shift:]
                wsum[depth - shift:] = 0
                base = s0
            tiles = [(s0, s1, s2) for s1 in starts[1] for s2 in starts[2]]
            for batch in _chunks(tiles, spec.batch):
                x = np.zeros((spec.batch, data.shape[0], p0, p1, p2), np.float32)
                for b, (a0, a1, a2) in enumerate(batch):
                    x[b] = data[:, a0:a0 + p0, a1:a1 + p1, a2:a2 + p2]
                t1 = time.perf_counter()
                preds = self.predict_members(x) if half else [self.predict_batch(x)]
                counts["seconds"] += time.perf_counter() - t1
                counts["windows"] += len(batch)
                for b, (a0, a1, a2) in enumerate(batch):
                    o = a0 - base
                    sl = (slice(o, o + p0), slice(a1, a1 + p1), slice(a2, a2 + p2))
                    for acc, pred in zip(accs, preds, strict=True):
                        acc[(slice(None), *sl)] += pred[b] * weights
                    wsum[sl] += w_win
            if r == len(rows) - 1:
                for k in range(d0 - base):
                    yield base + k, final(k)
                    emitted += 1
        if emitted != d0:
            raise ModelError(f"sliding window covered {emitted} of {d0} planes")


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class _Back:
    """Steps 7-8 plane by plane: network planes in, label planes of the cropped (reoriented)
    volume out, written into the reoriented full-size label mask."""

    def __init__(self, model: SlidingWindowModel, prep: Prepared, keep: bool = False) -> None:
        pkg = model.package
        self.outputs = pkg.outputs
        inp = pkg.input
        assert isinstance(inp, VolumeInput)
        self.prep = prep
        self.mode = self.outputs.resample_back
        order = 0 if self.mode == "labels" else self.outputs.back_order
        aniso = -1 if self.mode == "labels" else self.outputs.back_anisotropic_order
        self.maps = back_maps(
            prep.network_shape, prep.cropped_shape, prep.network_spacing, prep.cropped_spacing,
            grid=inp.resample.grid, order=order, anisotropic_order=aniso,
            ratio=inp.resample.anisotropy_ratio,
        )
        dtype = np.uint8 if max(lb.number for lb in self.outputs.labels) < 256 else np.uint16
        self.labels = np.zeros(prep.reoriented_shape, dtype)
        self.u0 = prep.unpad[0] if len(prep.unpad) == 3 else prep.unpad[-3]
        self.network: OrderedDict[int, np.ndarray] = OrderedDict()
        self.next_out = 0
        self.kept = None
        if keep and self.mode != "labels":
            # outside the cropped box every voxel is background, as nnU-Net reverts it
            probs = self.mode == "probabilities"
            self.kept = np.full((self.outputs.channels, *prep.reoriented_shape),
                                0.0 if probs else -1e4, np.float32)
            if self.outputs.activation == "softmax":
                self.kept[0] = 1.0 if probs else 0.0

    def _inplane(self, plane: np.ndarray) -> np.ndarray:
        """(C, n1, n2) network plane -> (C, m1, m2) on the cropped grid, as the mode needs."""
        if self.mode == "probabilities":
            plane = _activate(plane, self.outputs, axis=0)
        elif self.mode == "labels":
            plane = _decide(plane, self.outputs, activated=False)[None]
        plane = self.maps[1].apply(plane, 1)
        return self.maps[2].apply(plane, 2)

    def add(self, index: int, plane: np.ndarray) -> None:
        start, stop = self.u0.start, self.u0.stop
        if not start <= index < stop:
            return  # padding
        u = self.prep.unpad
        plane = plane[(slice(None), u[-2], u[-1])]
        self.network[index - start] = self._inplane(plane)
        self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)
        if self.next_out != self.maps[0].n_out:
            raise ModelError(f"resampling back produced {self.next_out} of "
                             f"{self.maps[0].n_out} planes")

    def _emit(self, final: bool) -> None:
        amap = self.maps[0]
        have = max(self.network) if self.network else -1
        while self.next_out < amap.n_out:
            j = self.next_out
            needed = amap.needs(j)
            if needed.stop - 1 > have and not final:
                return
            lo = self.network[int(amap.lo[j])]
            if amap.order == 0 or amap.w[j] == 0:
                values = lo
            else:
                hi = self.network[int(amap.hi[j])]
                values = lo + (hi - lo) * np.float32(amap.w[j])
            if self.mode == "labels":
                label_plane = values[0].astype(self.labels.dtype)
            else:
                label_plane = _decide(values, self.outputs,
                                      activated=self.mode == "probabilities")
            crop = self.prep.crop
            self.labels[crop[0].start + j, crop[1], crop[2]] = label_plane
            if self.kept is not None:
                self.kept[:, crop[0].start + j, crop[1], crop[2]] = values
            self.next_out += 1
            # forget network planes no later output plane reads
            if self.next_out < amap.n_out:
                keep_from = int(amap.lo[self.next_out])
                for k in [k for k in self.network if k < keep_from]:
                    del self.network[k]


def _postprocess(labels: np.ndarray, outputs: Outputs,
                 spacing: tuple[float, float, float]) -> np.ndarray:
    from scipy import ndimage

    voxel = float(np.prod(spacing))
    for op in outputs.postprocess:
        numbers = op.labels or tuple(lb.number for lb in outputs.labels)
        structure = ndimage.generate_binary_structure(labels.ndim,
                                                      labels.ndim if op.connectivity == "full"
                                                      else 1)
        groups = [numbers] if op.together else [(n,) for n in numbers]
        for group in groups:
            comp, n = ndimage.label(np.isin(labels, group), structure)
            if n == 0:
                continue
            sizes = np.bincount(comp.ravel())[1:]
            if op.op == "keep_largest_component":
                keep = int(np.argmax(sizes)) + 1
                labels[(comp > 0) & (comp != keep)] = 0
            else:
                small = np.flatnonzero(sizes * voxel < op.min_mm3) + 1
                labels[np.isin(comp, small)] = 0
    return labels

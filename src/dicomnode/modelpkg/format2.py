"""Model package format 2: every convention named, for 3D patch networks and images.

Format 1 (:mod:`.format1`) implied its conventions: 2D slices as stored, in-plane
spacing, one network. The segmentation models hospitals run are 3D patch networks
(nnU-Net v2, MONAI bundles) whose ecosystems differ in almost every convention: array
axes, orientation, resampling grid, normalisation order, tiling, blending, padding, how
logits go back to the original grid. Format 2 names each one (its fields below, each
with the ecosystems' values), so that one runtime runs both exactly and an importer
refuses, with the reason, what it cannot express.

::

    format = 2
    name = "abdomen-organs"
    version = "1.0.0"
    task = "segmentation"
    members = [ { file = "fold_0.onnx", sha256 = "<hex>" },   # same signature; logits averaged
                { file = "fold_1.onnx", sha256 = "<hex>" } ]

    [input]
    kind = "volume"                   # volume | image
    name = "input"                    # graph input name
    modality = ["CT"]
    axes = "SAR"                      # patient direction each network axis runs toward
    spacing_mm = [1.5, 1.5, 1.5]      # network-axis order, or "native"
    resample = { grid = "center", order = 3, anisotropic_order = 0, anisotropy_ratio = 3.0 }
    crop_to_nonzero = false           # nnU-Net crops to the (hole-filled) non-zero box
    normalize_stage = "before_resample"   # nnU-Net; MONAI bundles: "after_resample"
    normalization = [ { kind = "clip", lower = -1004.0, upper = 1588.0 },
                      { kind = "zscore", mean = 249.4, std = 347.3 } ]

    [inference]
    mode = "sliding_window"           # slices (format 1) | whole | sliding_window
    patch = [128, 128, 128]
    batch = 2                         # the graph input is [2, 1, 128, 128, 128]
    tiling = { flavour = "nnunet", step = 0.5 }     # or { flavour = "monai", overlap = 0.5 }
    blend = { kind = "gaussian", flavour = "nnunet", sigma_scale = 0.125 }  # or "constant"
    pad = { mode = "constant", value = 0.0, space = "normalized" }
    mirror_axes = [0, 1, 2]           # [] = no test-time mirroring
    accumulate = "float32"            # float16: nnU-Net's accumulators, half the memory

    [outputs]
    name = "logits"
    kind = "logits"                   # or probabilities
    activation = "softmax"            # softmax: channel 0 is background | sigmoid
    resample_back = "logits"          # logits (nnU-Net) | probabilities | labels
    back_order = { order = 1, anisotropic_order = 0 }
    postprocess = [ { op = "keep_largest_component", labels = [1] } ]
    # regions (sigmoid): regions = [ { channel = 0, label = 1 }, ... ] painted in order
    [[outputs.labels]]
    number = 1
    name = "Liver"
    category = { scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }
    type = { scheme = "SCT", value = "10200004", meaning = "Liver" }
    color = [221, 130, 101]

    [[validation.cases]]              # run at add/activate; activation refused below min_dice
    file = "golden/case0.npz"
    min_dice = 0.98

The numpy semantics of these fields are in :mod:`.axes`, :mod:`.normalize`,
:mod:`.resample` and :mod:`.tiling`; :mod:`dicomnode.inference.sliding` runs them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dicomnode.errors import ModelLoadError
from dicomnode.modelpkg.format1 import (
    _NAME_RE,
    Code,
    Label,
    _Fields,
    _is_num,
)

__all__ = [
    "AXES_LETTERS",
    "RESULT_KINDS",
    "Blend",
    "Explain",
    "GoldenCase",
    "ImageInput",
    "InferenceSpec",
    "Member",
    "ModelPackage2",
    "NormStep",
    "Outputs",
    "Pad",
    "PostOp",
    "Region",
    "Resample",
    "Tiling",
    "VolumeInput",
    "parse_format2",
]

AXES_LETTERS = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
"""Patient direction letters (PS3.3 C.7.6.1.1.1) and their opposites."""


@dataclass(frozen=True)
class Member:
    """One ONNX network of the package (a fold); all members share one signature."""

    file: str
    sha256: str


@dataclass(frozen=True)
class Resample:
    """How the volume is resampled to ``spacing_mm`` (and, for ``back_order``, back).

    ``grid``: ``center`` keeps the field of view (nnU-Net, skimage ``resize``):
    ``n' = round(n * s / t)``, output voxel ``j`` samples input ``(j + 0.5) * n / n' - 0.5``;
    ``corner`` keeps the first voxel (MONAI ``Spacing``): ``n' = round((n - 1) * s / t + 1)``,
    output ``j`` samples input ``j * t / s``. Edges are clamped in both.
    ``order``: 0 nearest, 1 linear, 3 cubic spline. When the largest spacing exceeds
    ``anisotropy_ratio`` times the smallest (of the source or, failing that, of the
    target) and exactly one axis is the coarse one, that axis uses ``anisotropic_order``
    (nnU-Net's ``order_z``); ``anisotropic_order = -1`` switches this off (MONAI).
    """

    grid: Literal["center", "corner"] = "center"
    order: int = 3
    anisotropic_order: int = 0
    anisotropy_ratio: float = 3.0


@dataclass(frozen=True)
class NormStep:
    """One step of the normalisation chain (applied in order; see :mod:`.normalize`)."""

    kind: Literal["clip", "zscore", "scale_range", "minmax", "window", "bits_linear", "none"]
    lower: float | None = None
    upper: float | None = None
    mean: float | None = None
    std: float | None = None
    mask: Literal["all", "nonzero", "nonzero_filled"] = "all"
    a_min: float | None = None
    a_max: float | None = None
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = False
    center: float | None = None
    width: float | None = None


@dataclass(frozen=True)
class VolumeInput:
    """A volume model's input: one series, reoriented, resampled and normalised."""

    name: str
    modality: tuple[str, ...]
    axes: str
    spacing_mm: tuple[float, float, float] | None
    resample: Resample
    normalization: tuple[NormStep, ...]
    normalize_stage: Literal["before_resample", "after_resample"] = "before_resample"
    crop_to_nonzero: bool = False
    channels: int = 1
    allow_oblique: bool = False
    min_slices: int = 1
    """Fewest slices a volume must have (a 3D network trained on chest CTs has nothing
    to say about a 3-slice scout): fewer is refused with that reason."""
    kind: Literal["volume"] = "volume"


@dataclass(frozen=True)
class ImageInput:
    """An image model's input: one 2D image (CR, DX, MG, SC) as the package declares."""

    name: str
    modality: tuple[str, ...]
    size: tuple[int, int]
    normalization: tuple[NormStep, ...]
    presentation_intent: tuple[str, ...] = ()
    """Accepted Presentation Intent Type values; () accepts any."""
    view_position: tuple[str, ...] = ()
    monochrome1: Literal["invert", "keep"] = "invert"
    voi: Literal["none", "window", "voi_lut"] = "none"
    crop: Literal["center_square", "none"] = "center_square"
    resize_order: int = 1
    channels: int = 1
    kind: Literal["image"] = "image"


@dataclass(frozen=True)
class Tiling:
    """Where windows go: ``nnunet`` (``step``, a fraction of the patch) or ``monai``
    (``overlap``); see :func:`dicomnode.modelpkg.tiling.tile_starts`."""

    flavour: Literal["nnunet", "monai"] = "nnunet"
    step: float = 0.5
    overlap: float = 0.25


@dataclass(frozen=True)
class Blend:
    """How overlapping windows are weighted: ``gaussian`` (each ecosystem's kernel) or
    ``constant``."""

    kind: Literal["gaussian", "constant"] = "gaussian"
    flavour: Literal["nnunet", "monai"] = "nnunet"
    sigma_scale: float = 0.125


@dataclass(frozen=True)
class Pad:
    """Padding of a volume smaller than the patch: centred, ``value`` in ``space``."""

    mode: Literal["constant", "edge"] = "constant"
    value: float = 0.0
    space: Literal["normalized", "real"] = "normalized"


@dataclass(frozen=True)
class InferenceSpec:
    """How the network is run over the prepared volume."""

    mode: Literal["whole", "sliding_window"]
    patch: tuple[int, ...]
    batch: int = 1
    tiling: Tiling = Tiling()
    blend: Blend = Blend()
    pad: Pad = Pad()
    mirror_axes: tuple[int, ...] = ()
    accumulate: Literal["float32", "float16"] = "float32"


@dataclass(frozen=True)
class Region:
    """A sigmoid output channel painted as ``label`` where its probability >= 0.5."""

    channel: int
    label: int


@dataclass(frozen=True)
class PostOp:
    """A post-processing step on the label mask."""

    op: Literal["keep_largest_component", "remove_small_components"]
    labels: tuple[int, ...] = ()
    """Labels it applies to; () = every label."""
    min_mm3: float = 0.0
    connectivity: Literal["face", "full"] = "face"
    """Which neighbours touch: ``face`` (6 in 3D) or ``full`` (26 in 3D; nnU-Net's and
    MONAI's ``KeepLargestConnectedComponent`` default)."""
    together: bool = False
    """Treat ``labels`` as one foreground (nnU-Net's ``labels_or_regions`` list: one
    largest component of their union) instead of each label on its own (MONAI's
    ``independent=True``)."""


@dataclass(frozen=True)
class Outputs:
    """What the network produces and how it becomes a label mask."""

    name: str
    kind: Literal["logits", "probabilities"]
    activation: Literal["softmax", "sigmoid"]
    labels: tuple[Label, ...]
    resample_back: Literal["logits", "probabilities", "labels"] = "logits"
    back_order: int = 1
    back_anisotropic_order: int = 0
    regions: tuple[Region, ...] = ()
    """sigmoid only: channel -> label, painted in this order (later wins)."""
    postprocess: tuple[PostOp, ...] = ()

    @property
    def channels(self) -> int:
        """Channels the graph output must have."""
        if self.regions:
            return len(self.regions)
        return len(self.labels) + (1 if self.activation == "softmax" else 0)


RESULT_KINDS = ("SEG", "SR", "PM", "KEY")
"""Objects a package can produce: DICOM SEG, TID 1500 SR, Parametric Map (explanation
maps), KEY (a rendered key image: the explanation over the source, Secondary Capture)."""


@dataclass(frozen=True)
class Explain:
    """How the runtime explains a positive label (``[explain]``)."""

    method: Literal["occlusion", "output"] = "occlusion"
    """``occlusion``: occlusion sensitivity by forward passes only (any classifier);
    ``output``: the graph's own map, output ``output`` (N, labels, H, W)."""
    budget_s: float = 10.0
    """Occlusion: the forward passes must fit in this many seconds (the stride grows)."""
    patch_fraction: float = 0.125
    """Occlusion: the hidden patch's side as a fraction of the network input's."""
    output: str | None = None


@dataclass(frozen=True)
class GoldenCase:
    """An input volume and the labels the package must produce on it (``.npz``: ``volume``
    (z, y, x) float32, ``affine`` 4x4 LPS, ``labels`` (z, y, x) uint8/uint16)."""

    file: str
    min_dice: float


@dataclass(frozen=True)
class ModelPackage2:
    """A format 2 package whose ``model.toml`` is valid and whose member checksums matched."""

    name: str
    version: str
    task: Literal["segmentation", "classification"]
    members: tuple[Member, ...]
    input: VolumeInput | ImageInput
    inference: InferenceSpec
    outputs: Outputs
    source: Path
    golden: tuple[GoldenCase, ...] = ()
    results: tuple[str, ...] = ("SEG", "SR")
    """The kinds of object the package's results become (:data:`RESULT_KINDS`)."""
    explain: Explain | None = None
    """Explanation maps for positive labels (image packages); None: none."""
    description: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    format: int = 2

    @property
    def labels(self) -> tuple[Label, ...]:
        return self.outputs.labels

    @property
    def sha256(self) -> str:
        """The package's identity: SHA-256 over the members' checksums, in order."""
        h = hashlib.sha256()
        for m in self.members:
            h.update(m.sha256.encode("ascii"))
        return h.hexdigest()

    def member_bytes(self, index: int) -> bytes:
        """The bytes of member ``index``.

        Raises
        ------
        ModelLoadError
            The file is gone or no longer matches its ``sha256``.
        """
        member = self.members[index]
        try:
            data = (self.source / member.file).read_bytes()
        except OSError as exc:
            raise ModelLoadError(
                f"{member.file}: cannot read ({exc.strerror}) (package: {self.source})"
            ) from exc
        if hashlib.sha256(data).hexdigest() != member.sha256:
            raise ModelLoadError(
                f"model.toml: members[{index}].sha256: {member.file} changed since loading "
                f"(package: {self.source})"
            )
        return data


# --------------------------------------------------------------------------- parsing


def _floats(f: _Fields, key: str, n: int | None, default: Any = ..., positive: bool = False
            ) -> tuple[float, ...] | None:
    v = f.get(key, list, default)
    if v is None:
        return None
    if (n is not None and len(v) != n) or not all(_is_num(x) for x in v):
        raise f.error(key, f"expected {n or 'some'} numbers, got {v!r}")
    if positive and not all(x > 0 for x in v):
        raise f.error(key, f"expected positive numbers, got {v!r}")
    return tuple(float(x) for x in v)


def _ints(f: _Fields, key: str, default: Any = ...) -> tuple[int, ...]:
    v = f.get(key, list, default)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise f.error(key, f"expected integers, got {v!r}")
    return tuple(int(x) for x in v)


def _num(f: _Fields, key: str, default: Any = ...) -> float | None:
    v = f.get(key, (int, float), default)
    if v is None:
        return None
    if not _is_num(v):
        raise f.error(key, f"expected a finite number, got {v!r}")
    return float(v)


def _modalities(f: _Fields) -> tuple[str, ...]:
    raw = f.get("modality", (str, list))
    values = [raw] if isinstance(raw, str) else raw
    if not values or not all(isinstance(v, str) and re.fullmatch(r"[A-Z]{2,16}", v)
                             for v in values):
        raise f.error("modality", f"expected DICOM Modality values such as CT, got {raw!r}")
    return tuple(values)


def _axes(f: _Fields) -> str:
    axes = f.get("axes", str)
    letters = [AXES_LETTERS.get(c) for c in axes]
    pairs = {frozenset((c, AXES_LETTERS[c])) for c in axes if c in AXES_LETTERS}
    if len(axes) != 3 or None in letters or len(pairs) != 3:
        raise f.error("axes", f"expected three patient directions, one per body axis, as in "
                              f"SAR, RAS or LPS, got {axes!r}")
    return axes


def _norm_chain(f: _Fields) -> tuple[NormStep, ...]:
    raw = f.get("normalization", list, [])
    steps = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise f.error(f"normalization[{i}]", "expected a table")
        s = _Fields(item, f"{f.prefix}normalization[{i}].", f.where)
        kind = s.choice("kind", ("clip", "zscore", "scale_range", "minmax", "window",
                                 "bits_linear", "none"))
        if kind == "clip":
            step = NormStep(kind, lower=_num(s, "lower"), upper=_num(s, "upper"))
            if step.lower is not None and step.upper is not None and step.lower > step.upper:
                raise s.error("upper", "must not be below lower")
        elif kind == "zscore":
            mean, std = _num(s, "mean", None), _num(s, "std", None)
            if (mean is None) != (std is None):
                raise s.error("std", "give both mean and std, or neither (per-image statistics)")
            if std is not None and std <= 0:
                raise s.error("std", f"must be positive, got {std}")
            step = NormStep(kind, mean=mean, std=std,
                            mask=s.choice("mask", ("all", "nonzero", "nonzero_filled"), "all"))  # type: ignore[arg-type]
        elif kind == "scale_range":
            step = NormStep(kind, a_min=_num(s, "a_min"), a_max=_num(s, "a_max"),
                            b_min=float(_num(s, "b_min", 0.0) or 0.0),
                            b_max=float(_num(s, "b_max", 1.0) or 0.0),
                            clip=bool(s.get("clip", bool, False)))
            if step.a_min == step.a_max:
                raise s.error("a_max", "must differ from a_min")
        elif kind == "minmax":
            step = NormStep(kind, b_min=float(_num(s, "b_min", 0.0) or 0.0),
                            b_max=float(_num(s, "b_max", 1.0) or 0.0))
        elif kind == "bits_linear":
            step = NormStep(kind, b_min=float(_num(s, "low", 0.0) or 0.0),
                            b_max=float(_num(s, "high", 1.0) or 0.0))
        elif kind == "window":
            step = NormStep(kind, center=_num(s, "center"), width=_num(s, "width"))
            if not (step.width and step.width > 0):
                raise s.error("width", "must be positive")
        else:
            step = NormStep(kind)
        s.done()
        steps.append(step)
    return tuple(steps)


def _parse_volume_input(f: _Fields) -> VolumeInput:
    spacing = f.get("spacing_mm", (str, list), "native")
    if isinstance(spacing, str):
        if spacing != "native":
            raise f.error("spacing_mm", f'expected "native" or three numbers, got {spacing!r}')
        spacing_mm = None
    else:
        spacing_mm = _floats(f, "spacing_mm", 3, positive=True)
    r = f.sub("resample", {})
    resample = Resample(
        grid=r.choice("grid", ("center", "corner"), "center"),  # type: ignore[arg-type]
        order=int(r.get("order", int, 3)),
        anisotropic_order=int(r.get("anisotropic_order", int, 0)),
        anisotropy_ratio=float(_num(r, "anisotropy_ratio", 3.0) or 3.0),
    )
    if resample.order not in (0, 1, 3):
        raise r.error("order", f"expected 0, 1 or 3, got {resample.order}")
    if resample.anisotropic_order not in (-1, 0, 1, 3):
        raise r.error("anisotropic_order", "expected 0, 1, 3, or -1 (no special axis)")
    r.done()
    channels = f.get("channels", int, 1)
    if channels != 1:
        raise f.error("channels", "one series per model (several channels are not supported "
                                  "yet)")
    out = VolumeInput(
        name=f.get("name", str),
        modality=_modalities(f),
        axes=_axes(f),
        spacing_mm=spacing_mm,  # type: ignore[arg-type]
        resample=resample,
        normalization=_norm_chain(f),
        normalize_stage=f.choice("normalize_stage", ("before_resample", "after_resample"),
                                 "before_resample"),  # type: ignore[arg-type]
        crop_to_nonzero=bool(f.get("crop_to_nonzero", bool, False)),
        channels=channels,
        allow_oblique=bool(f.get("allow_oblique", bool, False)),
        min_slices=int(f.get("min_slices", int, 1)),
    )
    if out.min_slices < 1:
        raise f.error("min_slices", "must be at least 1")
    f.done()
    return out


def _parse_image_input(f: _Fields) -> ImageInput:
    size = _ints(f, "size")
    if len(size) != 2 or not all(s > 0 for s in size):
        raise f.error("size", f"expected [height, width], got {list(size)!r}")
    out = ImageInput(
        name=f.get("name", str),
        modality=_modalities(f),
        size=(size[0], size[1]),
        normalization=_norm_chain(f),
        presentation_intent=tuple(f.get("presentation_intent", list, [])),
        view_position=tuple(f.get("view_position", list, [])),
        monochrome1=f.choice("monochrome1", ("invert", "keep"), "invert"),  # type: ignore[arg-type]
        voi=f.choice("voi", ("none", "window", "voi_lut"), "none"),  # type: ignore[arg-type]
        crop=f.choice("crop", ("center_square", "none"), "center_square"),  # type: ignore[arg-type]
        resize_order=int(f.get("resize_order", int, 1)),
        channels=int(f.get("channels", int, 1)),
    )
    if out.channels not in (1, 3):
        raise f.error("channels", "expected 1, or 3 (grey replicated)")
    f.done()
    return out


def _parse_inference(f: _Fields, spatial: int) -> InferenceSpec:
    mode = f.choice("mode", ("whole", "sliding_window"))
    patch = _ints(f, "patch")
    if len(patch) != spatial or not all(p > 0 for p in patch):
        raise f.error("patch", f"expected {spatial} positive sizes, got {list(patch)!r}")
    batch = f.get("batch", int, 1)
    if not 1 <= batch <= 256:
        raise f.error("batch", f"must be 1-256, got {batch}")
    t = f.sub("tiling", {})
    tiling = Tiling(
        flavour=t.choice("flavour", ("nnunet", "monai"), "nnunet"),  # type: ignore[arg-type]
        step=float(_num(t, "step", 0.5) or 0.5),
        overlap=float(_num(t, "overlap", 0.25) or 0.0),
    )
    if not 0 < tiling.step <= 1:
        raise t.error("step", f"must be in (0, 1], got {tiling.step}")
    if not 0 <= tiling.overlap < 1:
        raise t.error("overlap", f"must be in [0, 1), got {tiling.overlap}")
    t.done()
    b = f.sub("blend", {})
    blend = Blend(
        kind=b.choice("kind", ("gaussian", "constant"), "gaussian"),  # type: ignore[arg-type]
        flavour=b.choice("flavour", ("nnunet", "monai"), tiling.flavour),  # type: ignore[arg-type]
        sigma_scale=float(_num(b, "sigma_scale", 0.125) or 0.125),
    )
    b.done()
    p = f.sub("pad", {})
    pad = Pad(
        mode=p.choice("mode", ("constant", "edge"), "constant"),  # type: ignore[arg-type]
        value=float(_num(p, "value", 0.0) or 0.0),
        space=p.choice("space", ("normalized", "real"), "normalized"),  # type: ignore[arg-type]
    )
    p.done()
    mirror = _ints(f, "mirror_axes", [])
    if any(not 0 <= a < spatial for a in mirror) or len(set(mirror)) != len(mirror):
        raise f.error("mirror_axes", f"expected distinct axes in 0..{spatial - 1}")
    out = InferenceSpec(
        mode=mode,  # type: ignore[arg-type]
        patch=patch,
        batch=batch,
        tiling=tiling,
        blend=blend,
        pad=pad,
        mirror_axes=mirror,
        accumulate=f.choice("accumulate", ("float32", "float16"), "float32"),  # type: ignore[arg-type]
    )
    f.done()
    return out


def _parse_labels(f: _Fields) -> tuple[Label, ...]:
    from dicomnode.modelpkg.format1 import _parse_label

    raw = f.get("labels", list)
    if not raw:
        raise f.error("labels", "at least one label is required")
    if len(raw) > 65535:
        raise f.error("labels", "at most 65535 labels")
    labels = tuple(_parse_label(f, i, item) for i, item in enumerate(raw))
    names = [lb.name for lb in labels]
    if len(set(names)) != len(names):
        raise f.error("labels", f"label names must be unique, got {names}")
    return labels


def _parse_outputs(f: _Fields, task: str) -> Outputs:
    labels = _parse_labels(f)
    activation = f.choice("activation", ("softmax", "sigmoid"))
    regions_raw = f.get("regions", list, [])
    regions = []
    for i, item in enumerate(regions_raw):
        if not isinstance(item, dict):
            raise f.error(f"regions[{i}]", "expected a table")
        rf = _Fields(item, f"{f.prefix}regions[{i}].", f.where)
        region = Region(channel=int(rf.get("channel", int)), label=int(rf.get("label", int)))
        rf.done()
        if region.label not in {lb.number for lb in labels}:
            raise rf.error("label", f"no label numbered {region.label}")
        regions.append(region)
    if regions and activation != "sigmoid":
        raise f.error("regions", "regions need activation = \"sigmoid\"")
    if regions and sorted(r.channel for r in regions) != list(range(len(regions))):
        raise f.error("regions", "channels must be 0..N-1, each once")
    ops = []
    for i, item in enumerate(f.get("postprocess", list, [])):
        if not isinstance(item, dict):
            raise f.error(f"postprocess[{i}]", "expected a table")
        of = _Fields(item, f"{f.prefix}postprocess[{i}].", f.where)
        op = PostOp(
            op=of.choice("op", ("keep_largest_component", "remove_small_components")),  # type: ignore[arg-type]
            labels=_ints(of, "labels", []),
            min_mm3=float(_num(of, "min_mm3", 0.0) or 0.0),
            connectivity=of.choice("connectivity", ("face", "full"), "face"),  # type: ignore[arg-type]
            together=bool(of.get("together", bool, False)),
        )
        of.done()
        ops.append(op)
    bo = f.sub("back_order", {})
    back_order = int(bo.get("order", int, 1))
    back_aniso = int(bo.get("anisotropic_order", int, 0))
    if back_order not in (0, 1) or back_aniso not in (-1, 0, 1):
        raise bo.error("order", "resampling back streams plane by plane: orders 0 or 1 "
                                "(anisotropic_order -1 for none)")
    bo.done()
    out = Outputs(
        name=f.get("name", str),
        kind=f.choice("kind", ("logits", "probabilities")),  # type: ignore[arg-type]
        activation=activation,  # type: ignore[arg-type]
        labels=labels,
        resample_back=f.choice("resample_back", ("logits", "probabilities", "labels"),
                               "logits"),  # type: ignore[arg-type]
        back_order=back_order,
        back_anisotropic_order=back_aniso,
        regions=tuple(regions),
        postprocess=tuple(ops),
    )
    if task == "classification" and out.resample_back != "logits":
        raise f.error("resample_back", "classification models have nothing to resample")
    f.done()
    return out


def parse_format2(top: _Fields, where: Path) -> dict[str, Any]:
    """The fields of :class:`ModelPackage2` from a parsed ``model.toml`` (format 2).

    Raises
    ------
    ModelLoadError
        Naming the first invalid key.
    """
    name = top.get("name", str)
    if not _NAME_RE.match(name):
        raise top.error("name", f"expected 1-64 of [A-Za-z0-9._-], got {name!r}")
    version = top.get("version", str)
    if not _NAME_RE.match(version):
        raise top.error("version", f"expected 1-64 of [A-Za-z0-9._-], got {version!r}")
    task = top.choice("task", ("segmentation", "classification"))
    members = []
    for i, item in enumerate(top.get("members", list)):
        if not isinstance(item, dict):
            raise top.error(f"members[{i}]", "expected a table")
        mf = _Fields(item, f"members[{i}].", where)
        member = Member(file=mf.get("file", str), sha256=mf.get("sha256", str).lower())
        mf.done()
        if "/" in member.file or "\\" in member.file or not member.file.endswith(".onnx"):
            raise mf.error("file", f"expected a .onnx file in the package folder, got "
                                   f"{member.file!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", member.sha256):
            raise mf.error("sha256", "expected 64 hexadecimal digits")
        members.append(member)
    if not members:
        raise top.error("members", "at least one ONNX member is required")
    if len({m.file for m in members}) != len(members):
        raise top.error("members", "each member file once")
    inp = top.sub("input")
    kind = inp.choice("kind", ("volume", "image"))
    inp.used.discard("kind")
    inp.table = {k: v for k, v in inp.table.items() if k != "kind"}
    input_spec: VolumeInput | ImageInput = (
        _parse_volume_input(inp) if kind == "volume" else _parse_image_input(inp)
    )
    spatial = 3 if kind == "volume" else 2
    inference = _parse_inference(top.sub("inference"), spatial)
    if isinstance(input_spec, ImageInput) and (
        inference.mode != "whole" or inference.patch != input_spec.size
    ):
        raise top.error("inference.patch", "an image package runs the whole image: mode = "
                                           "\"whole\" and patch = input.size")
    outputs = _parse_outputs(top.sub("outputs"), task)
    golden = []
    val = top.sub("validation", {})
    for i, item in enumerate(val.get("cases", list, [])):
        if not isinstance(item, dict):
            raise val.error(f"cases[{i}]", "expected a table")
        cf = _Fields(item, f"validation.cases[{i}].", where)
        case = GoldenCase(file=cf.get("file", str), min_dice=float(_num(cf, "min_dice", 0.95)
                                                                    or 0.0))
        cf.done()
        if ".." in Path(case.file).parts or Path(case.file).is_absolute():
            raise cf.error("file", "must be inside the package")
        if not 0 < case.min_dice <= 1:
            raise cf.error("min_dice", "must be in (0, 1]")
        golden.append(case)
    val.done()
    kinds = _parse_results(top.sub("results", {}), task)
    raw_explain = top.get("explain", dict, None)
    explain = _parse_explain(
        None if raw_explain is None else _Fields(raw_explain, "explain.", where), input_spec)
    if explain is None and ("PM" in kinds or "KEY" in kinds):
        raise top.error("results.kinds", "PM and KEY are explanation maps: add [explain]")
    prov = top.get("provenance", dict, {})
    for key, value in prov.items():
        if not isinstance(value, str | int | float | bool):
            raise top.error(f"provenance.{key}", "expected a string, number or boolean")
    fields = {
        "name": name,
        "version": version,
        "task": task,
        "description": top.get("description", str, ""),
        "members": tuple(members),
        "input": input_spec,
        "inference": inference,
        "outputs": outputs,
        "golden": tuple(golden),
        "results": kinds,
        "explain": explain,
        "provenance": dict(prov),
    }
    top.get("format", int)
    top.done()
    return fields


def _parse_results(f: _Fields, task: str) -> tuple[str, ...]:
    default = ["SEG", "SR"] if task == "segmentation" else ["SR"]
    kinds = f.get("kinds", list, default)
    bad = [k for k in kinds if k not in RESULT_KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise f.error("kinds", f"expected distinct values of {list(RESULT_KINDS)}, got {kinds!r}")
    if task == "classification" and "SEG" in kinds:
        raise f.error("kinds", "a classifier has no segmentation to encode")
    f.done()
    return tuple(kinds)


def _parse_explain(f: _Fields | None, input_spec: VolumeInput | ImageInput) -> Explain | None:
    if f is None:
        return None
    if not isinstance(input_spec, ImageInput):
        raise f.error("method", "explanation maps are for image packages")
    out = Explain(
        method=f.choice("method", ("occlusion", "output"), "occlusion"),  # type: ignore[arg-type]
        budget_s=float(_num(f, "budget_s", 10.0) or 10.0),
        patch_fraction=float(_num(f, "patch_fraction", 0.125) or 0.125),
        output=f.get("output", str, None),
    )
    if not 0 < out.budget_s <= 600:
        raise f.error("budget_s", f"must be in (0, 600], got {out.budget_s}")
    if not 0 < out.patch_fraction <= 0.5:
        raise f.error("patch_fraction", f"must be in (0, 0.5], got {out.patch_fraction}")
    if (out.method == "output") != (out.output is not None):
        raise f.error("output", "name the graph output with method = \"output\" (only then)")
    f.done()
    return out


def code_of(code: Code) -> dict[str, str]:
    """A :class:`Code` as the table ``model.toml`` writes."""
    return {"scheme": code.scheme, "value": code.value, "meaning": code.meaning}

"""MONAI bundle → format 2 package (``dicomnode models import-monai``).

Reads ``configs/metadata.json`` and the inference config (``inference.json`` or
``.yaml``) with MONAI's own ``ConfigParser``. Every transform of ``preprocessing`` and
``postprocessing`` is checked by name *before* anything is instantiated (so no bundle code
runs for a refused bundle), then instantiated and read from the objects themselves
(references and expressions resolved by MONAI):

=============================  =====================================================
bundle                         format 2
=============================  =====================================================
``Orientationd.axcodes``       ``input.axes`` (or ``axes`` given to the importer)
``Spacingd`` pixdim, mode      ``spacing_mm``, ``resample`` (corner grid, order 0/1)
``ScaleIntensityRanged``       ``scale_range`` (a/b min/max, clip)
``NormalizeIntensityd``        ``zscore`` (nonzero → mask "nonzero"; subtrahend/divisor)
``ScaleIntensityd``            ``minmax`` (minv, maxv)
position vs ``Spacingd``       ``normalize_stage``
``SlidingWindowInferer``       patch, batch, monai tiling (overlap), blend mode and
                               sigma, pad mode and value
``Activationsd`` softmax       ``activation = "softmax"``
``Invertd`` position           ``resample_back`` logits / probabilities / labels,
                               ``nearest_interp`` → back order 0
``KeepLargestConnected...``    ``keep_largest_component`` (applied_labels,
                               independent, connectivity)
=============================  =====================================================

Refused with the reason: ``Lambda``/``Lambdad``, ``scripts.*`` and any transform not in
these tables (custom code or semantics format 2 cannot express), sigmoid outputs, several
input channels, a bundle without ``Orientationd`` (its network axes would depend on the
reader) or without ``Invertd`` (masks in network space).

**Golden case.** The bundle's own pipeline (its reader, transforms, inferer, network and
post-processing) runs on a DICOM-derived volume: a phantom in DICOM geometry written as
NIfTI with the affine a DICOM conversion gives, read back by the bundle's ``LoadImaged``.
With a *reference case* (a DICOM-derived volume and a mask known to be right, e.g. from a
reviewed SEG) the bundle's own output is first compared with the reference; a bundle whose
declared orientation is wrong for DICOM input (Medical Segmentation Decathlon-trained
bundles, Project-MONAI/model-zoo#766) fails here, at import, and the importer names the
axis codes under which the bundle's own inference matches.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import ImportRefused
from dicomnode.importers.codes import code_labels, load_mapping
from dicomnode.importers.common import (
    ImportReport,
    export_checked,
    golden_npz,
    package_name,
    phantom,
)
from dicomnode.modelpkg.format2 import AXES_LETTERS

__all__ = ["bundle_inference", "import_monai", "read_bundle"]

_PRE_MAPPED = {"Orientationd", "Spacingd", "ScaleIntensityRanged", "NormalizeIntensityd",
               "ScaleIntensityd"}
_PRE_NEUTRAL = {"LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "ToTensord",
                "AddChanneld", "CastToTyped", "ToDeviced"}
_POST_MAPPED = {"Activationsd", "AsDiscreted", "KeepLargestConnectedComponentd", "Invertd"}
_POST_NEUTRAL = {"EnsureTyped", "ToTensord", "ToDeviced", "SaveImaged", "CopyItemsd",
                 "DeleteItemsd", "SqueezeDimd"}
_POST_SKIPPED = {"SaveImaged"}  # writes files: not run by the importer
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _short(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if isinstance(target, str) else repr(target)


def _scan_code(node: Any, where: str) -> None:
    """Refuse expressions that define code (lambdas, imports, exec) in a config section."""
    if isinstance(node, dict):
        for k, v in node.items():
            _scan_code(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _scan_code(v, f"{where}[{i}]")
    elif isinstance(node, str) and node.startswith("$") and any(
            w in node for w in ("lambda", "import", "exec(", "eval(", "__")):
        raise ImportRefused(f"{where}: custom code in an expression ({node[:60]!r}); format 2 "
                            "runs no Python")


class Bundle:
    """A bundle's parsed config and its instantiated, checked components."""

    def __init__(self, root: Path, parser: Any, metadata: dict[str, Any]) -> None:
        self.root, self.parser, self.metadata = root, parser, metadata
        self.pre: list[tuple[str, Any]] = []
        self.post: list[tuple[str, Any]] = []
        self.inferer: Any = None
        self.network: Any = None
        self.network_source = ""


def _transforms(parser: Any, section: str) -> tuple[str, list[dict[str, Any]]]:
    raw = parser.get(section)
    if raw is None:
        raise ImportRefused(f"the inference config has no {section!r}")
    if isinstance(raw, dict) and _short(raw.get("_target_")) == "Compose":
        items = raw.get("transforms")
        if not isinstance(items, list):
            raise ImportRefused(f"{section}: Compose without a list of transforms")
        return f"{section}#transforms", items
    raise ImportRefused(f"{section}: expected a Compose of transforms, got "
                        f"{_short(raw.get('_target_')) if isinstance(raw, dict) else raw!r}")


def _check_names(items: list[dict[str, Any]], section: str, allowed: set[str]) -> list[str]:
    names = []
    for i, item in enumerate(items):
        target = item.get("_target_") if isinstance(item, dict) else None
        name = _short(target)
        if not isinstance(target, str) or target.startswith(("scripts.", "$", "@")):
            raise ImportRefused(f"{section}[{i}]: {target!r} is custom code; format 2 runs no "
                                "Python")
        if name in ("Lambda", "Lambdad"):
            raise ImportRefused(f"{section}[{i}]: {name} runs arbitrary Python; format 2 "
                                "cannot express it (remove it or map it by hand)")
        if name not in allowed:
            raise ImportRefused(f"{section}[{i}]: {name} has no format 2 equivalent")
        _scan_code(item, f"{section}[{i}]")
        names.append(name)
    return names


def read_bundle(bundle_dir: Path | str) -> Bundle:
    """Parse and check a bundle; instantiate its transforms, inferer and network (weights
    loaded). Nothing is instantiated before every transform name has been checked.

    Raises
    ------
    ImportRefused
        Missing files, refused transforms, custom code.
    """
    import torch
    from monai.bundle import ConfigParser

    root = Path(bundle_dir)
    meta_path = root / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise ImportRefused(f"{root.name}: configs/metadata.json is missing (not a bundle)")
    config = next((root / "configs" / f"inference.{ext}" for ext in ("json", "yaml", "yml")
                   if (root / "configs" / f"inference.{ext}").is_file()), None)
    if config is None:
        raise ImportRefused(f"{root.name}: no configs/inference.json or .yaml")
    parser = ConfigParser()
    try:
        parser.read_meta(str(meta_path))
        parser.read_config(str(config))
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{config.name}: cannot be read ({exc})") from None
    parser["bundle_root"] = str(root)
    parser["device"] = "$torch.device('cpu')"
    metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    bundle = Bundle(root, parser, metadata)

    pre_key, pre_items = _transforms(parser, "preprocessing")
    post_key, post_items = _transforms(parser, "postprocessing")
    pre_names = _check_names(pre_items, "preprocessing", _PRE_MAPPED | _PRE_NEUTRAL)
    post_names = _check_names(post_items, "postprocessing", _POST_MAPPED | _POST_NEUTRAL)
    inferer_raw = parser.get("inferer")
    if not isinstance(inferer_raw, dict) or _short(inferer_raw.get("_target_")) != \
            "SlidingWindowInferer":
        raise ImportRefused("inferer: only SlidingWindowInferer is mapped, got "
                            f"{_short(inferer_raw.get('_target_')) if isinstance(inferer_raw, dict) else inferer_raw!r}")  # noqa: E501
    _scan_code(inferer_raw, "inferer")

    bundle.pre = [(n, parser.get_parsed_content(f"{pre_key}#{i}", instantiate=True))
                  for i, n in enumerate(pre_names)]
    bundle.post = [(n, parser.get_parsed_content(f"{post_key}#{i}", instantiate=True))
                   for i, n in enumerate(post_names) if n not in _POST_SKIPPED]
    bundle.inferer = parser.get_parsed_content("inferer", instantiate=True)

    pt, ts = root / "models" / "model.pt", root / "models" / "model.ts"
    if pt.is_file() and parser.get("network_def") is not None:
        _scan_code(parser.get("network_def"), "network_def")
        net = parser.get_parsed_content("network_def", instantiate=True)
        state = torch.load(pt, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        net.load_state_dict(state)
        bundle.network, bundle.network_source = net.eval(), "models/model.pt"
    elif ts.is_file():
        bundle.network = torch.jit.load(str(ts), map_location="cpu").eval()
        bundle.network_source = "models/model.ts"
    else:
        raise ImportRefused("no network: models/model.pt with network_def, or models/model.ts")
    return bundle


def _one(value: Any) -> Any:
    return value[0] if isinstance(value, list | tuple) else value


def _mode_order(mode: Any) -> int:
    mode = str(getattr(mode, "value", mode))
    if mode in ("bilinear", "linear", "trilinear"):
        return 1
    if mode == "nearest":
        return 0
    raise ImportRefused(f"Spacingd mode {mode!r}: format 2 resamples with orders 0 and 1 here")


def _map_input(bundle: Bundle, axes: str | None) -> dict[str, Any]:
    axcodes, spacing, order, norm = None, None, 1, []
    stage_of_norm: list[str] = []
    for name, t in bundle.pre:
        if name == "Orientationd":
            o = t.ornt_transform
            if o.labels not in (None, (("L", "R"), ("P", "A"), ("I", "S"))) or \
                    o.as_closest_canonical:
                raise ImportRefused("Orientationd with custom labels or as_closest_canonical "
                                    "is not mapped")
            axcodes = str(o.axcodes).upper()
        elif name == "Spacingd":
            if axcodes is None and any(n == "Orientationd" for n, _ in bundle.pre):
                raise ImportRefused("Spacingd before Orientationd: its pixdim follows the "
                                    "reader's axes, not the network's; not mapped")
            s = t.spacing_transform
            if s.diagonal or s.scale_extent or bool(_one(t.align_corners)) or \
                    bool(_one(t.scale_extent)):
                raise ImportRefused("Spacingd with diagonal, scale_extent or align_corners is "
                                    "not mapped")
            if str(getattr(_one(t.padding_mode), "value", _one(t.padding_mode))) != "border":
                raise ImportRefused("Spacingd padding_mode other than border is not mapped")
            spacing = [float(v) for v in np.asarray(s.pixdim, float).ravel()]
            if len(spacing) == 1:
                spacing = spacing * 3
            order = _mode_order(_one(t.mode))
        elif name == "ScaleIntensityRanged":
            sc = t.scaler
            norm.append({"kind": "scale_range", "a_min": float(sc.a_min),
                         "a_max": float(sc.a_max), "b_min": float(sc.b_min),
                         "b_max": float(sc.b_max), "clip": bool(sc.clip)})
        elif name == "NormalizeIntensityd":
            n = t.normalizer
            step: dict[str, Any] = {"kind": "zscore",
                                    "mask": "nonzero" if n.nonzero else "all"}
            if n.subtrahend is not None or n.divisor is not None:
                if n.subtrahend is None or n.divisor is None:
                    raise ImportRefused("NormalizeIntensityd with only one of subtrahend and "
                                        "divisor is not mapped")
                step.update(mean=float(_one(n.subtrahend)), std=float(_one(n.divisor)))
            norm.append(step)
        elif name == "ScaleIntensityd":
            sc = t.scaler
            if sc.factor is not None or sc.minv is None or sc.maxv is None:
                raise ImportRefused("ScaleIntensityd with factor is not mapped")
            norm.append({"kind": "minmax", "b_min": float(sc.minv), "b_max": float(sc.maxv)})
        else:
            continue
        if name in ("ScaleIntensityRanged", "NormalizeIntensityd", "ScaleIntensityd"):
            stage_of_norm.append("after_resample" if spacing is not None else "before_resample")
    if axcodes is None and axes is None:
        raise ImportRefused("no Orientationd: the network's axes would depend on the image "
                            "reader; give the axis codes (--axes)")
    if len(set(stage_of_norm)) > 1:
        raise ImportRefused("intensity transforms both before and after Spacingd are not "
                            "mapped")
    inp = {"kind": "volume", "name": "input",
           "axes": (axes or axcodes or "").upper(),
           "spacing_mm": spacing if spacing is not None else "native",
           "resample": {"grid": "corner", "order": order, "anisotropic_order": -1},
           "normalize_stage": stage_of_norm[0] if stage_of_norm else "after_resample",
           "normalization": norm or [{"kind": "none"}]}
    return inp


def _map_inference(bundle: Bundle) -> dict[str, Any]:
    inf = bundle.inferer
    roi = [int(r) for r in inf.roi_size]
    if len(roi) != 3 or min(roi) < 1:
        raise ImportRefused(f"SlidingWindowInferer roi_size {roi}: expected three sizes")
    mode = str(getattr(inf.mode, "value", inf.mode))
    if mode not in ("gaussian", "constant"):
        raise ImportRefused(f"SlidingWindowInferer mode {mode!r} is not mapped")
    pad_mode = str(getattr(inf.padding_mode, "value", inf.padding_mode))
    if pad_mode == "constant":
        pad = {"mode": "constant", "value": float(inf.cval), "space": "normalized"}
    elif pad_mode == "replicate":
        pad = {"mode": "edge", "value": 0.0, "space": "normalized"}
    else:
        raise ImportRefused(f"SlidingWindowInferer padding_mode {pad_mode!r} is not mapped")
    sigma = inf.sigma_scale
    if isinstance(sigma, list | tuple):
        if len(set(sigma)) != 1:
            raise ImportRefused("per-axis sigma_scale is not mapped")
        sigma = sigma[0]
    return {"mode": "sliding_window", "patch": roi, "batch": int(inf.sw_batch_size),
            "tiling": {"flavour": "monai", "overlap": float(_one(inf.overlap))},
            "blend": {"kind": mode, "flavour": "monai", "sigma_scale": float(sigma)},
            "pad": pad}


def _map_outputs(bundle: Bundle) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    activation, stage, back, ops = None, "logits", 1, []
    resample_back = None
    for name, t in bundle.post:
        if name == "Activationsd":
            if bool(_one(t.sigmoid)):
                raise ImportRefused("sigmoid outputs (overlapping channels) are not mapped")
            if _one(t.other) is not None:
                raise ImportRefused("Activationsd with 'other' runs custom code")
            if bool(_one(t.softmax)):
                activation, stage = "softmax", "probabilities"
        elif name == "AsDiscreted":
            if not bool(_one(t.argmax)) or _one(t.to_onehot) not in (None, False) or \
                    _one(t.threshold) is not None:
                raise ImportRefused("AsDiscreted other than argmax is not mapped")
            stage = "labels"
        elif name == "Invertd":
            if resample_back is not None:
                raise ImportRefused("Invertd twice is not mapped")
            resample_back = stage
            back = 0 if bool(_one(t.nearest_interp)) else 1
        elif name == "KeepLargestConnectedComponentd":
            c = t.converter
            if resample_back is None:
                raise ImportRefused("KeepLargestConnectedComponentd in network space (before "
                                    "Invertd) is not mapped")
            if c.is_onehot or (c.num_components or 1) != 1:
                raise ImportRefused("KeepLargestConnectedComponentd on one-hot data or with "
                                    "num_components > 1 is not mapped")
            if c.connectivity not in (None, 1, 3):
                raise ImportRefused(f"connectivity {c.connectivity} is not mapped (1 or 3)")
            ops.append({"op": "keep_largest_component",
                        "labels": [int(v) for v in (c.applied_labels or [])],
                        "together": not c.independent,
                        "connectivity": "face" if c.connectivity == 1 else "full"})
    if resample_back is None:
        raise ImportRefused("no Invertd: the bundle's masks stay in network space; the node "
                            "returns masks on the input grid")
    if resample_back == "labels":
        back = 0
    fmt = bundle.metadata.get("network_data_format", {}).get("outputs", {})
    out = next(iter(fmt.values()), {}) if fmt else {}
    channel_def = out.get("channel_def") or {}
    if not channel_def:
        raise ImportRefused("metadata.json names no output channels (channel_def)")
    names = {int(k): str(v) for k, v in channel_def.items()}
    if sorted(names) != list(range(len(names))) or len(names) < 2:
        raise ImportRefused("channel_def must number channels 0..N-1, 0 the background")
    outputs = {"name": "logits", "kind": "logits", "activation": activation or "softmax",
               "resample_back": resample_back,
               "back_order": {"order": back, "anisotropic_order": -1}}
    if ops:
        outputs["postprocess"] = ops
    return outputs, [(k, v) for k, v in sorted(names.items()) if k != 0]


def _input_meta(bundle: Bundle) -> tuple[str, int]:
    fmt = bundle.metadata.get("network_data_format", {}).get("inputs", {})
    inp = next(iter(fmt.values()), {}) if fmt else {}
    channels = int(inp.get("num_channels", 1))
    if channels != 1:
        raise ImportRefused(f"the network takes {channels} input channels; the node feeds one "
                            "series per model")
    return str(inp.get("modality", "CT")).upper(), channels


def _dicom_to_nifti(volume: np.ndarray, lps_affine: np.ndarray, path: Path) -> None:
    """Write a DICOM-ordered volume (k, i, j) + LPS affine as NIfTI the way DICOM converters
    do: data index (x, y, z) = (j, i, k), RAS affine."""
    import nibabel as nib

    data = np.ascontiguousarray(volume.transpose(2, 1, 0))
    affine = _LPS_TO_RAS @ lps_affine[:, [2, 1, 0, 3]]
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))


def bundle_inference(bundle: Bundle, volume: np.ndarray, lps_affine: np.ndarray,
                     axcodes: str | None = None) -> np.ndarray:
    """The bundle's own pipeline (reader, transforms, inferer, network, post-processing) on a
    DICOM-derived volume; the label mask in the volume's (k, i, j) order. ``axcodes``
    replaces ``Orientationd``'s for this run."""
    import torch
    from monai.transforms import Compose

    image_key = next((t.keys[0] for n, t in bundle.pre if n == "LoadImaged"), "image")
    pred_key = next((t.keys[0] for n, t in bundle.post if hasattr(t, "keys")), "pred")
    saved = None
    for name, t in bundle.pre:
        if name == "Orientationd" and axcodes is not None:
            saved = t.ornt_transform.axcodes
            t.ornt_transform.axcodes = axcodes
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "case.nii.gz"
            _dicom_to_nifti(volume, lps_affine, path)
            pre = Compose([t for _, t in bundle.pre])
            d = pre({image_key: str(path)})
            with torch.no_grad():
                d[pred_key] = bundle.inferer(d[image_key][None].float(), bundle.network)[0]
            post = Compose([t for _, t in bundle.post])
            d = post(d)
    finally:
        if saved is not None:
            for name, t in bundle.pre:
                if name == "Orientationd":
                    t.ornt_transform.axcodes = saved
    labels = np.asarray(d[pred_key].detach().cpu().numpy() if hasattr(d[pred_key], "detach")
                        else d[pred_key])
    if labels.ndim == 4:
        labels = labels.argmax(0) if labels.shape[0] > 1 else labels[0]
    return np.rint(labels).astype(np.uint16).transpose(2, 1, 0)


def _golden_volume(inp: dict[str, Any], patch: list[int], modality: str,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """An axial phantom in DICOM order (k → S, i → P, j → L) covering a quarter more than a
    patch in each network axis, at a spacing the bundle resamples."""
    spacing = inp["spacing_mm"] if inp["spacing_mm"] != "native" else [1.0, 1.0, 1.0]
    body = {"S": 0, "I": 0, "P": 1, "A": 1, "L": 2, "R": 2}
    extent_mm = [0.0, 0.0, 0.0]
    for a, letter in enumerate(inp["axes"]):
        extent_mm[body[letter]] = 1.25 * patch[a] * float(spacing[a])
    dicom_spacing = [0.0, 0.0, 0.0]
    for a, letter in enumerate(inp["axes"]):
        dicom_spacing[body[letter]] = 0.8 * float(spacing[a])
    shape = tuple(max(4, int(round(e / s))) for e, s in zip(extent_mm, dicom_spacing,
                                                              strict=True))
    affine = np.eye(4)
    affine[:3, 0] = [0, 0, dicom_spacing[0]]
    affine[:3, 1] = [0, dicom_spacing[1], 0]
    affine[:3, 2] = [dicom_spacing[2], 0, 0]
    affine[:3, 3] = [-100.0, -120.0, 40.0]
    return phantom(shape, modality), affine


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    from dicomnode.inference.golden import dice_per_label

    d = dice_per_label(a, b)
    return min(d.values()) if d else 1.0


def _flips(axcodes: str) -> list[str]:
    out = []
    for signs in itertools.product((False, True), repeat=3):
        out.append("".join(AXES_LETTERS[c] if s else c
                           for c, s in zip(axcodes, signs, strict=True)))
    return out[1:]


def import_monai(bundle_dir: Path | str, out_dir: Path | str, *, axes: str | None = None,
                 reference: Path | str | None = None, name: str | None = None,
                 version: str | None = None, codes_file: Path | str | None = None,
                 generic_codes: bool = False, min_dice: float = 0.95) -> ImportReport:
    """Import a MONAI bundle as a format 2 package.

    ``axes`` overrides ``Orientationd``'s axis codes (for the bundle's own golden-case run
    too). ``reference``: an ``.npz`` with ``volume`` (k, i, j), ``affine`` (LPS) and
    ``labels`` known to be right; the bundle's own inference must match it.

    Raises
    ------
    ImportRefused
        What cannot be mapped, or a reference case the bundle's own inference misses.
    """
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        # MONAI prints and warns about optional codecs and deprecations: stdout is the report
        warnings.simplefilter("ignore")
        return _import(bundle_dir, out_dir, axes=axes, reference=reference, name=name,
                       version=version, codes_file=codes_file, generic_codes=generic_codes,
                       min_dice=min_dice, t0=t0)


def _import(bundle_dir: Path | str, out_dir: Path | str, *, axes: str | None,
            reference: Path | str | None, name: str | None, version: str | None,
            codes_file: Path | str | None, generic_codes: bool, min_dice: float,
            t0: float) -> ImportReport:
    bundle = read_bundle(bundle_dir)
    modality, channels = _input_meta(bundle)
    inp = _map_input(bundle, axes)
    inp["modality"] = [modality] if modality in ("CT", "MR", "PT") else ["CT", "MR", "PT"]
    inference = _map_inference(bundle)
    outputs, pairs = _map_outputs(bundle)
    mapping = load_mapping(codes_file) if codes_file else None
    labels, generic_names = code_labels(pairs, mapping=mapping, generic=generic_codes)
    outputs["labels"] = labels

    notes = []
    axcodes = inp["axes"]
    if reference is not None:
        with np.load(reference) as z:
            ref_vol, ref_aff = np.asarray(z["volume"], np.float32), np.asarray(z["affine"])
            ref_labels = np.asarray(z["labels"])
        got = bundle_inference(bundle, ref_vol, ref_aff, axcodes)
        dice = _dice(ref_labels, got)
        if dice < min_dice:
            best = max(((_dice(ref_labels, bundle_inference(bundle, ref_vol, ref_aff, c)), c)
                        for c in _flips(axcodes)), default=(0.0, ""))
            hint = (f"; with axis codes {best[1]} it gives {best[0]:.3f}: the declared "
                    f"orientation is wrong for DICOM input (import with --axes {best[1]})"
                    if best[0] >= min_dice else "")
            raise ImportRefused(f"the bundle's own inference misses the reference case with "
                                f"axis codes {axcodes}: Dice {dice:.3f}{hint}")
        notes.append(f"reference case: Dice {dice:.3f} with axis codes {axcodes}")
    else:
        notes.append("no reference case: the declared orientation is not verified against "
                     "known anatomy")

    # the network as ONNX, static [batch, 1, *patch]
    import torch

    shape = (inference["batch"], channels, *inference["patch"])
    onnx, diff = export_checked(bundle.network, shape)
    with torch.no_grad():
        n_out = int(bundle.network(torch.zeros(1, channels, *inference["patch"])).shape[1])
    if n_out != len(labels) + 1:
        raise ImportRefused(f"the network gives {n_out} channels, metadata names "
                            f"{len(labels) + 1}")

    # golden case: the bundle's own inference on a DICOM-derived phantom
    if reference is not None:
        g_vol, g_aff = ref_vol, ref_aff
    else:
        g_vol, g_aff = _golden_volume(inp, inference["patch"], modality)
    g_labels = bundle_inference(bundle, g_vol, g_aff, axcodes)
    meta = bundle.metadata
    document = {
        "name": package_name(name or str(meta.get("name", Path(bundle_dir).name))),
        "version": package_name(version or str(meta.get("version", "1.0.0"))),
        "task": "segmentation",
        "description": str(meta.get("description", ""))[:200],
        "input": inp, "inference": inference, "outputs": outputs,
        "validation": {"cases": [{"file": "golden/case0.npz", "min_dice": min_dice}]},
        "provenance": {"source": "MONAI bundle", "bundle": Path(bundle_dir).name,
                       "network": bundle.network_source,
                       "declared_axcodes": _declared(bundle) or "",
                       "axcodes": axcodes, "reference_case": reference is not None,
                       "generic_codes": ",".join(generic_names),
                       "monai": _version("monai"), "torch": torch.__version__},
    }
    from dicomnode.inference.golden import run_golden_cases
    from dicomnode.modelpkg.write import write_format2_package

    out_dir = Path(out_dir)
    write_format2_package(out_dir, {"model.onnx": onnx}, document,
                          extra_files={"golden/case0.npz": golden_npz(g_vol, g_aff, g_labels)})
    golden = run_golden_cases(out_dir)
    failed = [g for g in golden if not g["passed"]]
    if failed:
        raise ImportRefused(f"the node does not reproduce the bundle's own inference on the "
                            f"golden case: Dice {failed[0]['dice']} (package left in {out_dir})")
    if generic_names:
        notes.append("generic codes for: " + ", ".join(generic_names))
    return ImportReport(package=out_dir, members=["model.onnx"], max_abs_diff=[diff],
                        golden=golden, notes=notes, seconds=time.perf_counter() - t0)


def _declared(bundle: Bundle) -> str | None:
    return next((str(t.ornt_transform.axcodes) for n, t in bundle.pre if n == "Orientationd"),
                None)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)

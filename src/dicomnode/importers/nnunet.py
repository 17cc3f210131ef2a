"""nnU-Net v2 results folder → format 2 package (``dicomnode models import-nnunet``).

Reads what ``nnUNetPredictor.initialize_from_trained_model_folder`` reads (dataset.json,
plans.json, each fold's checkpoint with its trainer name and mirroring axes) plus
``postprocessing.json`` when present, rebuilds each fold's network with nnU-Net's own
trainer class (deep supervision off), exports it with the static input
``[batch, 1, *patch]`` and checks ONNX Runtime against PyTorch. The package maps:

========================  ==========================================================
plans / dataset / ckpt    format 2
========================  ==========================================================
``transpose_forward``     ``input.axes`` = training-image axes, transposed
configuration spacing     ``input.spacing_mm`` (already in transposed order)
``CTNormalization``       clip to p0.5/p99.5, z-score with the foreground statistics
``ZScoreNormalization``   per-volume z-score (``nonzero_filled`` with use_mask_for_norm)
resampling kwargs         ``resample`` (center grid, order, order_z, ANISO_THRESHOLD)
predictor defaults        nnunet tiling step 0.5, nnunet Gaussian, pad 0 normalised,
                          float16 accumulators, logits resampled back (order 1 / 0)
checkpoint mirroring      ``inference.mirror_axes``
labels / regions          softmax labels, or sigmoid regions painted in
                          ``regions_class_order``
postprocessing.json       keep_largest_component, labels together, full connectivity
========================  ==========================================================

nnU-Net never reorients: a network learns the axes its training images had as nnU-Net's
reader returned them (SimpleITK: the reversed NIfTI/ITK index order). Those axis codes
are an explicit input (``axes``), or read from one training image's header. Common
cases: SimpleITK conversion of axial DICOM keeps the DICOM row order → ``SPL``; dcm2niix
flips the rows → ``SAL``; images resampled to RAS (TotalSegmentator) → ``SAR``.

The golden case is nnU-Net's own predictor (same folds, mirroring, step) on a phantom of
the input modality, post-processed with nnU-Net's own functions; the node must reproduce
it (run here before the import is reported as done, and again at activation).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import ImportRefused
from dicomnode.importers.codes import code_labels, load_mapping
from dicomnode.importers.common import (
    ImportReport,
    affine_for_axes,
    export_checked,
    golden_npz,
    package_name,
    phantom,
)
from dicomnode.modelpkg.format2 import AXES_LETTERS

__all__ = ["axes_from_image", "import_nnunet", "locate_model_folder"]

_KNOWN_NORMALISATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImportRefused(f"{path.name} is missing from {path.parent}") from None
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{path.name}: cannot be read ({exc})") from None


def locate_model_folder(results_dir: Path, configuration: str) -> Path:
    """The ``<Trainer>__<Plans>__<configuration>`` folder: ``results_dir`` itself when it holds
    plans.json, else its one subfolder for ``configuration``.

    Raises
    ------
    ImportRefused
        None or several candidate folders.
    """
    results_dir = Path(results_dir)
    if (results_dir / "plans.json").is_file():
        return results_dir
    found = sorted(p for p in results_dir.glob(f"*__*__{configuration}")
                   if (p / "plans.json").is_file())
    if not found:
        raise ImportRefused(f"no nnU-Net model folder for configuration {configuration!r} in "
                            f"{results_dir} (expected <Trainer>__<Plans>__{configuration}/)")
    if len(found) > 1:
        raise ImportRefused("several model folders for this configuration: "
                            + ", ".join(p.name for p in found) + "; give one of them")
    return found[0]


def axes_from_image(path: Path | str) -> str:
    """The axis codes, in nnU-Net's array order, of a training image (NIfTI, or any format
    SimpleITK reads): for each array axis the patient direction it runs toward.

    SimpleITK returns the array in reversed index order with an LPS direction matrix; the
    dominant component of each direction column names the axis.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImportRefused(f"{Path(path).name}: not an image SimpleITK reads ({exc})") from None
    if reader.GetDimension() != 3:
        raise ImportRefused(f"{Path(path).name}: expected a 3D image")
    direction = np.asarray(reader.GetDirection(), float).reshape(3, 3)  # columns: index axes
    codes = []
    for i in range(3):
        col = direction[:, i]
        k = int(np.argmax(np.abs(col)))
        codes.append("LPS"[k] if col[k] > 0 else "RAI"[k])
    return "".join(reversed(codes))  # array axis 0 is the last index axis


def _check_axes(axes: str) -> str:
    axes = axes.upper()
    if (len(axes) != 3 or any(c not in AXES_LETTERS for c in axes)
            or len({AXES_LETTERS[c] if c in "RAS" else c for c in axes}) != 3):
        raise ImportRefused(f"axes {axes!r}: expected three patient directions, one per body "
                            "axis, e.g. SPL")
    return axes


def _normalisation(scheme: str, use_mask: bool, props: dict[str, Any]) -> list[dict[str, Any]]:
    if scheme == "CTNormalization":
        return [{"kind": "clip", "lower": float(props["percentile_00_5"]),
                 "upper": float(props["percentile_99_5"])},
                {"kind": "zscore", "mean": float(props["mean"]), "std": float(props["std"])}]
    if scheme == "ZScoreNormalization":
        return [{"kind": "zscore", "mask": "nonzero_filled" if use_mask else "all"}]
    if scheme == "NoNormalization":
        return [{"kind": "none"}]
    raise ImportRefused(f"normalisation scheme {scheme!r} has no format 2 equivalent (known: "
                        + ", ".join(_KNOWN_NORMALISATIONS) + ")")


def _resample_orders(cfg: Any, which: str) -> tuple[int, int]:
    fn = cfg.configuration[f"resampling_fn_{which}"]
    kwargs = cfg.configuration[f"resampling_fn_{which}_kwargs"]
    if fn != "resample_data_or_seg_to_shape":
        raise ImportRefused(f"resampling function {fn!r} ({which}) is not nnU-Net's default")
    force = kwargs.get("force_separate_z")
    if force is True:
        raise ImportRefused(f"force_separate_z = true ({which}) has no format 2 equivalent")
    order, order_z = int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0))
    return order, (-1 if force is False else order_z)


def _postprocess_ops(folder: Path) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """format 2 ops, and nnU-Net's own functions and kwargs for the golden case."""
    candidates = [folder / "postprocessing.json",
                  *sorted(folder.glob("crossval_results_folds_*/postprocessing.json"))]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return [], [], []
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    doc = _load_json(path)
    ops, fns, kwargs = [], [], []
    for name, kw in zip(doc.get("postprocessing_fns", []),
                        doc.get("postprocessing_kwargs", []), strict=True):
        if name != "remove_all_but_largest_component_from_segmentation":
            raise ImportRefused(f"postprocessing function {name!r} has no format 2 equivalent")
        lor = kw["labels_or_regions"]
        items = lor if isinstance(lor, list) else [lor]
        numbers = sorted({int(v) for item in items
                          for v in (item if isinstance(item, list | tuple) else [item])})
        ops.append({"op": "keep_largest_component", "labels": numbers, "together": True,
                    "connectivity": "full"})
        fns.append(remove_all_but_largest_component_from_segmentation)
        kwargs.append({"labels_or_regions": [tuple(i) if isinstance(i, list) else i
                                             for i in items]})
    return ops, fns, kwargs


def import_nnunet(results_dir: Path | str, out_dir: Path | str, *,
                  configuration: str = "3d_fullres", folds: list[int | str] | None = None,
                  checkpoint: str = "final", axes: str | None = None,
                  training_image: Path | str | None = None, name: str | None = None,
                  version: str = "1.0.0", codes_file: Path | str | None = None,
                  generic_codes: bool = False, batch: int = 2, step: float = 0.5,
                  min_dice: float = 0.95) -> ImportReport:
    """Import one configuration of an nnU-Net v2 model folder as a format 2 package.

    ``folds``: fold numbers or ``"all"``; None = every ``fold_*`` with the checkpoint.
    ``checkpoint``: ``final`` or ``best``. ``axes``: the training images' axis codes in
    nnU-Net's array order (or ``training_image`` to read them from a header).

    Raises
    ------
    ImportRefused
        What cannot be mapped, with the reason; nothing is written then.
    """
    t0 = time.perf_counter()
    os.environ.setdefault("nnUNet_raw", "")  # nnU-Net prints warnings when these are unset
    os.environ.setdefault("nnUNet_preprocessed", "")
    os.environ.setdefault("nnUNet_results", "")
    if checkpoint not in ("final", "best"):
        raise ImportRefused(f"checkpoint {checkpoint!r}: expected final or best")
    if axes is None and training_image is None:
        raise ImportRefused(
            "nnU-Net does not reorient: give the training images' axis codes in nnU-Net's "
            "array order (--axes; SPL for SimpleITK-converted axial DICOM, SAL for dcm2niix, "
            "SAR for images resampled to RAS) or one training image (--training-image)")
    train_axes = _check_axes(axes if axes is not None else axes_from_image(training_image))

    folder = locate_model_folder(Path(results_dir), configuration)
    dataset = _load_json(folder / "dataset.json")
    plans = _load_json(folder / "plans.json")

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    if configuration not in plans.get("configurations", {}):
        raise ImportRefused(f"configuration {configuration!r} is not in plans.json (there: "
                            + ", ".join(plans.get("configurations", {})) + ")")
    cfg = pm.get_configuration(configuration)
    if cfg.previous_stage_name is not None or "cascade" in configuration:
        raise ImportRefused(f"{configuration} is a cascade stage: it takes the one-hot "
                            f"segmentation of {cfg.previous_stage_name!r} as extra input "
                            "channels, which format 2 cannot express")
    if len(cfg.patch_size) != 3:
        raise ImportRefused(f"{configuration} is a 2D configuration; format 2 runs 3D patch "
                            "networks (import 3d_fullres or 3d_lowres)")
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    if len(channels) != 1:
        raise ImportRefused(f"the model takes {len(channels)} input channels "
                            f"({', '.join(map(str, channels.values()))}); the node feeds one "
                            "series per model")
    modality = str(next(iter(channels.values())))
    lm = pm.get_label_manager(dataset)  # an ignore label is never predicted: dropped below

    mapping = load_mapping(codes_file) if codes_file else None
    # labels and regions
    named = {k: v for k, v in dataset["labels"].items() if k != "ignore"}
    if lm.has_regions:
        order = [int(v) for v in dataset["regions_class_order"]]
        region_names = [k for k, v in named.items() if isinstance(v, list | tuple)
                        or int(v) != 0]
        if len(region_names) != len(order):
            raise ImportRefused("regions_class_order does not match the regions in dataset.json")
        pairs = list(zip(order, region_names, strict=True))
        regions = [{"channel": i, "label": n} for i, n in enumerate(order)]
        activation = "sigmoid"
    else:
        pairs = sorted((int(v), k) for k, v in named.items() if int(v) != 0)
        regions, activation = [], "softmax"
    labels, generic_names = code_labels(pairs, mapping=mapping, generic=generic_codes)

    # folds and checkpoints
    ck_name = f"checkpoint_{checkpoint}.pth"
    if folds is None:
        folds = sorted((p.name.removeprefix("fold_") for p in folder.glob("fold_*")
                        if (p / ck_name).is_file()),
                       key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
        folds = [int(f) if f.isdigit() else f for f in folds]
    if not folds:
        raise ImportRefused(f"no fold_*/{ck_name} in {folder.name}")
    import torch

    checkpoints = []
    for f in folds:
        path = folder / f"fold_{f}" / ck_name
        if not path.is_file():
            raise ImportRefused(f"fold_{f}/{ck_name} is missing")
        # weights_only=False: nnU-Net pickles its checkpoints; trusted files, offline only
        checkpoints.append(torch.load(path, map_location="cpu", weights_only=False))
    trainer_name = checkpoints[0]["trainer_name"]
    for f, ck in zip(folds, checkpoints, strict=True):
        if ck["trainer_name"] != trainer_name:
            raise ImportRefused(f"fold_{f} was trained with {ck['trainer_name']}, fold_"
                                f"{folds[0]} with {trainer_name}")
        if ck.get("init_args", {}).get("configuration", configuration) != configuration:
            raise ImportRefused(f"fold_{f}'s checkpoint is of configuration "
                                f"{ck['init_args']['configuration']!r}, not {configuration!r}")
    mirror = checkpoints[0].get("inference_allowed_mirroring_axes")
    mirror = [int(a) for a in mirror] if mirror else []

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    try:
        trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError:
        trainer_class = None
    if trainer_class is None:
        raise ImportRefused(f"custom trainer {trainer_name!r}: its code is not importable in "
                            "this environment (install the package that defines it, or set "
                            "nnUNet_extTrainer), so its network cannot be rebuilt")
    n_in = determine_num_input_channels(pm, cfg, dataset)
    n_out = lm.num_segmentation_heads
    patch = tuple(int(p) for p in cfg.patch_size)
    members: dict[str, bytes] = {}
    diffs = []
    for f, ck in zip(folds, checkpoints, strict=True):
        sig = inspect.signature(trainer_class.build_network_architecture)
        if "plans_manager" in sig.parameters:
            net = trainer_class.build_network_architecture(pm, cfg, n_in, n_out,
                                                           enable_deep_supervision=False)
        else:
            net = trainer_class.build_network_architecture(
                cfg.network_arch_class_name, cfg.network_arch_init_kwargs,
                cfg.network_arch_init_kwargs_req_import, n_in, n_out,
                enable_deep_supervision=False)
        weights = {k.removeprefix("_orig_mod."): v for k, v in ck["network_weights"].items()}
        net.load_state_dict(weights)
        onnx, diff = export_checked(net.eval(), (batch, n_in, *patch))
        members[f"fold_{f}.onnx"] = onnx
        diffs.append(diff)

    # the package document
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    order, order_z = _resample_orders(cfg, "data")
    back, back_z = _resample_orders(cfg, "probabilities")
    if back not in (0, 1) or back_z not in (-1, 0, 1):
        raise ImportRefused(f"logits are resampled back with order {back}/{back_z}; the node "
                            "streams orders 0 and 1 only")
    if order not in (0, 1, 3) or order_z not in (-1, 0, 1, 3):
        raise ImportRefused(f"resampling order {order}/{order_z}: expected 0, 1 or 3")
    from nnunetv2.configuration import ANISO_THRESHOLD

    tf = [int(t) for t in plans["transpose_forward"]]
    pp_ops, pp_fns, pp_kwargs = _postprocess_ops(folder)
    outputs: dict[str, Any] = {
        "name": "logits", "kind": "logits", "activation": activation,
        "resample_back": "logits", "back_order": {"order": back, "anisotropic_order": back_z},
    }
    if regions:
        outputs["regions"] = regions
    if pp_ops:
        outputs["postprocess"] = pp_ops
    outputs["labels"] = labels
    pkg_name = package_name(name or f"{plans.get('dataset_name', 'nnunet')}-{configuration}")
    document: dict[str, Any] = {
        "name": pkg_name, "version": version, "task": "segmentation",
        "description": f"nnU-Net v2 {trainer_name} {configuration}, folds "
                       + ",".join(map(str, folds)),
        "input": {
            "kind": "volume", "name": "input", "modality": [modality.upper()]
            if modality.upper() in ("CT", "MR", "PT") else ["CT", "MR", "PT"],
            "axes": "".join(train_axes[t] for t in tf),
            "spacing_mm": [float(s) for s in cfg.spacing], "allow_oblique": True,
            "resample": {"grid": "center", "order": order, "anisotropic_order": order_z,
                         "anisotropy_ratio": float(ANISO_THRESHOLD)},
            "crop_to_nonzero": True, "normalize_stage": "before_resample",
            "normalization": _normalisation(cfg.normalization_schemes[0],
                                            bool(cfg.use_mask_for_norm[0]), props),
        },
        "inference": {
            "mode": "sliding_window", "patch": list(patch), "batch": batch,
            "tiling": {"flavour": "nnunet", "step": step},
            "blend": {"kind": "gaussian", "flavour": "nnunet", "sigma_scale": 0.125},
            "pad": {"mode": "constant", "value": 0.0, "space": "normalized"},
            "mirror_axes": mirror, "accumulate": "float16",
        },
        "outputs": outputs,
        "validation": {"cases": [{"file": "golden/case0.npz", "min_dice": min_dice}]},
        "provenance": {
            # the absolute model folder: a retrain fine-tunes from its plans and
            # checkpoints (importers.nnunet_finetune); the package carries no .pth
            "source": "nnU-Net v2", "folder": folder.name, "trainer": trainer_name,
            "results_folder": str(folder.resolve()),
            "configuration": configuration, "folds": ",".join(map(str, folds)),
            "checkpoint": ck_name, "training_axes": train_axes,
            "training_axes_from": "option" if axes is not None else "training image header",
            "generic_codes": ",".join(generic_names),
            "nnunetv2": _version("nnunetv2"), "torch": torch.__version__,
        },
    }

    # golden case: nnU-Net's own predictor on a phantom, in the training images' axes
    case = _golden_case(folder, folds, ck_name, cfg, tf, train_axes, modality, step,
                        bool(mirror), pp_fns, pp_kwargs)
    from dicomnode.inference.golden import run_golden_cases
    from dicomnode.modelpkg.write import write_format2_package

    out_dir = Path(out_dir)
    write_format2_package(out_dir, members, document, extra_files={"golden/case0.npz": case})
    golden = run_golden_cases(out_dir)
    notes = []
    if generic_names:
        notes.append("generic codes for: " + ", ".join(generic_names))
    failed = [g for g in golden if not g["passed"]]
    if failed:
        raise ImportRefused(f"the node does not reproduce nnU-Net's prediction on the golden "
                            f"case: Dice {failed[0]['dice']} (package left in {out_dir} for "
                            "inspection; check the training axes)")
    return ImportReport(package=out_dir, members=list(members), max_abs_diff=diffs,
                        golden=golden, notes=notes, seconds=time.perf_counter() - t0)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _golden_case(folder: Path, folds: list[Any], ck_name: str, cfg: Any, tf: list[int],
                 train_axes: str, modality: str, step: float, mirroring: bool,
                 pp_fns: list[Any], pp_kwargs: list[Any]) -> bytes:
    patch, spacing = list(cfg.patch_size), list(cfg.spacing)
    # a quarter of a patch more than one patch in every network axis: several windows
    shape_tr, spacing_tr = [0, 0, 0], [0.0, 0.0, 0.0]
    for i, t in enumerate(tf):
        shape_tr[t] = int(patch[i] + max(2, patch[i] // 4))
        spacing_tr[t] = float(spacing[i])
    volume = phantom(tuple(shape_tr), modality)
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints; stdout is the report
        seg = _predict(folder, folds, ck_name, volume, spacing_tr, step, mirroring)
    if pp_fns:
        from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing

        seg = apply_postprocessing(seg, pp_fns, pp_kwargs)
    return golden_npz(volume, affine_for_axes(train_axes, spacing_tr), seg)


def _predict(folder: Path, folds: list[Any], ck_name: str, volume: np.ndarray,
             spacing: list[float], step: float, mirroring: bool) -> np.ndarray:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=tuple(folds),
                                                   checkpoint_name=ck_name)
    return np.asarray(predictor.predict_single_npy_array(volume[None], {"spacing": spacing},
                                                         None, None, False))

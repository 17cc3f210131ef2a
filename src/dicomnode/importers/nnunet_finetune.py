"""Retraining an imported nnU-Net v2 model with nnU-Net's own trainer.

A package made by :func:`~dicomnode.importers.nnunet.import_nnunet` records, in its
provenance, the absolute nnU-Net model folder it came from (``results_folder``: plans.json,
dataset.json, ``fold_*/checkpoint_*.pth``), the configuration, folds, checkpoint and
training axes. The package itself carries only ONNX graphs, so that folder must stay where
it was (the retrain refuses with that reason when it is gone); each fine-tuned candidate's
own folder lives under the node's data dir and its package points there, so a promoted
candidate is fine-tuned from in turn.

:func:`finetune_nnunet` runs nnU-Net's pipeline in-process on a raw dataset written by
:func:`~dicomnode.importers.datasets.write_nnunet_raw`:

1. *plan* with the source model's plans: its plans.json is copied (dataset name changed) as
   the new dataset's plans, so patch size, spacing, network and the CT normalisation's
   foreground statistics stay the source's (``nnUNetv2_plan_and_preprocess`` would derive
   new ones from the new data, which breaks the checkpoint's meaning);
2. *fingerprint* (nnU-Net's per-case analysis; the trainer copies it next to the results) and
   *preprocess* each case with the plans' preprocessor (``run_case_save``);
3. *train* each source fold with :class:`NodeFinetuneTrainer` (a subclass of the source's
   trainer class with a short, configurable schedule and a lower learning rate), its
   network initialised from that fold's serving checkpoint: nnU-Net's
   ``load_pretrained_weights`` for the body, then the segmentation heads as well (nnU-Net
   skips them because pretraining usually changes the labels; here the labels are the
   source's). The splits are the raw dataset's ``splits_final.json`` (by patient).

:func:`retrain_imported` is the learning loop's path for such models: hold out test patients
(the node's split, same seed as the PyTorch path), fine-tune on the rest, re-import the
result as a candidate version (golden case against nnU-Net's predictor included), score
candidate and serving model on the held-out patients with the node's own sliding-window
runtime, register the candidate with its metrics and apply the same promotion gate.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import ImportRefused
from dicomnode.importers.datasets import LabelledVolume, write_nnunet_raw
from dicomnode.importers.nnunet import import_nnunet, locate_model_folder

__all__ = ["FinetuneSettings", "finetune_nnunet", "is_nnunet_import", "retrain_imported"]

SOURCE = "nnU-Net v2"
"""``provenance.source`` of a package made by :func:`import_nnunet`."""


@dataclass(frozen=True)
class FinetuneSettings:
    """nnU-Net's schedule for a fine-tune (its defaults, 1000 x 250 iterations, are for
    training from scratch on a GPU)."""

    epochs: int = 1
    iterations_per_epoch: int = 2
    val_iterations_per_epoch: int = 1
    initial_lr: float = 1e-3
    """Lower than nnU-Net's 1e-2: the start is a trained model, not random weights."""
    device: str | None = None
    """``cpu`` or ``cuda``; None = cuda when available."""
    dataset_id: int = 990
    """nnU-Net dataset id of the work datasets (private to the node's work dir)."""


def is_nnunet_import(provenance: Mapping[str, Any]) -> bool:
    """Whether a package's provenance says :func:`import_nnunet` made it."""
    return provenance.get("source") == SOURCE and bool(provenance.get("results_folder"))


@contextlib.contextmanager
def _nnunet_env(work: Path) -> Iterator[dict[str, Path]]:
    """nnU-Net reads its three folders from the environment on every use (nnunetv2.paths);
    point them into ``work`` for the run, no data-augmentation worker processes (the
    node's train worker is already one process per job), no torch.compile on CPU."""
    paths = {k: work / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    values = {**{k: str(v) for k, v in paths.items()}, "nnUNet_n_proc_DA": "0",
              "nnUNet_compile": "false"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield paths
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _trainer_class(source_trainer: str, settings: FinetuneSettings) -> type:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        base = recursive_find_trainer_class_by_name(source_trainer)
    except RuntimeError:
        base = None
    if base is None:
        raise ImportRefused(f"trainer {source_trainer!r} is not importable here: its model "
                            "cannot be fine-tuned")

    class NodeFinetuneTrainer(base):  # type: ignore[misc,valid-type]
        """The source's trainer with the fine-tune schedule (network, loss, augmentation
        and sampling unchanged)."""

        # nnU-Net records its __init__ arguments by name (locals()), so no *args here
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: Any = None) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = settings.epochs
            self.num_iterations_per_epoch = settings.iterations_per_epoch
            self.num_val_iterations_per_epoch = settings.val_iterations_per_epoch
            self.initial_lr = settings.initial_lr
            self.save_every = max(1, settings.epochs)

    # nnU-Net names the results folder and the checkpoint's trainer_name after the class:
    # the network and its inference are the source trainer's, so the result is stored
    # under that name and nnU-Net's predictor (and the importer) rebuild it from there
    NodeFinetuneTrainer.__name__ = NodeFinetuneTrainer.__qualname__ = source_trainer
    return NodeFinetuneTrainer


def _load_serving_weights(network: Any, checkpoint: Path) -> None:
    import torch
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    with contextlib.redirect_stdout(sys.stderr):
        load_pretrained_weights(network, str(checkpoint), verbose=False)
    # nnU-Net leaves the segmentation heads random (pretraining for other labels); the
    # labels here are the serving model's own, so its heads are where to start from
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    mod = getattr(network, "_orig_mod", network)
    own = mod.state_dict()
    heads = {k: v for k, v in weights.items() if ".seg_layers." in k and k in own}
    own.update(heads)
    mod.load_state_dict(own)


def _fingerprint(raw_root: Path, dataset: dict[str, Any], out: Path) -> None:
    """nnU-Net's dataset fingerprint (its ``analyze_case`` per case, aggregated as
    ``DatasetFingerprintExtractor.run`` does) computed in this process: ``run`` starts a
    spawn pool, which re-imports the caller's main module (a node worker, a script). Kept
    for the record beside the results; planning does not use it (the plans are the
    source's)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    cases = get_filenames_of_train_images_and_targets(str(raw_root), dataset)
    reader = determine_reader_writer_from_dataset_json(
        dataset, next(iter(cases.values()))["images"][0])
    per_case = int(10e7 // len(cases))  # the extractor's num_foreground_voxels_for_intensitystats
    results = [DatasetFingerprintExtractor.analyze_case(c["images"], c["label"], reader, per_case)
               for c in cases.values()]
    stats = {}
    for i in range(len(results[0][2])):
        values = np.concatenate([r[2][i] for r in results])
        p005, median, p995 = np.percentile(values, (0.5, 50.0, 99.5))
        stats[str(i)] = {"mean": float(values.mean()), "median": float(median),
                         "std": float(values.std()), "min": float(values.min()),
                         "max": float(values.max()), "percentile_99_5": float(p995),
                         "percentile_00_5": float(p005)}
    out.write_text(json.dumps({
        "spacings": [[float(x) for x in r[1]] for r in results],
        "shapes_after_crop": [[int(x) for x in r[0]] for r in results],
        "foreground_intensity_properties_per_channel": stats,
        "median_relative_size_after_cropping": float(np.median([r[4] for r in results])),
    }, indent=2))


def finetune_nnunet(source: Path | str, raw_dataset: Path | str, work_dir: Path | str, *,
                    configuration: str = "3d_fullres", folds: Sequence[int | str] = (0,),
                    checkpoint: str = "checkpoint_final.pth",
                    settings: FinetuneSettings | None = None) -> Path:
    """Fine-tune the source model's ``folds`` on ``raw_dataset``; returns the new model folder
    (``work_dir/nnUNet_results/<dataset>/<SourceTrainer>__<plans>__<configuration>``, what
    :func:`import_nnunet` reads: plans.json, dataset.json, postprocessing.json when the
    source had one, ``fold_*/checkpoint_final.pth``).

    Raises
    ------
    ImportRefused
        The source folder, a checkpoint or the raw dataset is missing or does not fit.
    """
    settings = settings or FinetuneSettings()
    source_folder = locate_model_folder(Path(source), configuration)
    raw = Path(raw_dataset)
    if not (raw / "dataset.json").is_file() or not (raw / "splits_final.json").is_file():
        raise ImportRefused(f"{raw.name}: not a raw dataset from write_nnunet_raw")
    plans = json.loads((source_folder / "plans.json").read_text(encoding="utf-8"))
    dataset = json.loads((source_folder / "dataset.json").read_text(encoding="utf-8"))
    raw_json = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    work = Path(work_dir)
    name = raw.name
    ckpts = {f: source_folder / f"fold_{f}" / checkpoint for f in folds}
    for f, path in ckpts.items():
        if not path.is_file():
            raise ImportRefused(f"fold_{f}/{checkpoint} is missing from {source_folder}")
    import torch

    first = torch.load(next(iter(ckpts.values())), map_location="cpu", weights_only=False)
    source_trainer = str(first["trainer_name"])

    with _nnunet_env(work) as paths, contextlib.redirect_stdout(sys.stderr):
        raw_root = paths["nnUNet_raw"] / name
        if raw_root.exists():
            shutil.rmtree(raw_root)
        shutil.copytree(raw, raw_root)
        # the source's labels and channel; the raw dataset's case count and file ending
        dataset = {**dataset, "numTraining": raw_json["numTraining"],
                   "file_ending": raw_json["file_ending"]}
        dataset.pop("dataset", None)  # an explicit file list would name the source's files
        (raw_root / "dataset.json").write_text(json.dumps(dataset, indent=2))
        pre = paths["nnUNet_preprocessed"] / name
        if pre.exists():
            shutil.rmtree(pre)
        pre.mkdir(parents=True)
        plans = {**plans, "dataset_name": name}
        plans_name = plans.get("plans_name", "nnUNetPlans")
        (pre / f"{plans_name}.json").write_text(json.dumps(plans, indent=2))
        (pre / "dataset.json").write_text(json.dumps(dataset, indent=2))
        shutil.copyfile(raw / "splits_final.json", pre / "splits_final.json")

        dataset_id = int(name.removeprefix("Dataset").split("_", 1)[0])
        _fingerprint(raw_root, dataset, pre / "dataset_fingerprint.json")

        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        from nnunetv2.utilities.find_objects import recursive_find_python_class
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        assert maybe_convert_to_dataset_name(dataset_id) == name
        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        import nnunetv2

        pp_class = recursive_find_python_class(
            os.path.join(nnunetv2.__path__[0], "preprocessing"), cm.preprocessor_name,
            "nnunetv2.preprocessing")
        if pp_class is None:
            raise ImportRefused(f"preprocessor {cm.preprocessor_name!r} is not importable")
        preprocessor = pp_class(verbose=False)
        out = pre / cm.data_identifier
        out.mkdir()
        for case, files in get_filenames_of_train_images_and_targets(str(raw_root),
                                                                     dataset).items():
            preprocessor.run_case_save(str(out / case), files["images"], files["label"],
                                       pm, cm, dataset)

        device = torch.device(settings.device or ("cuda" if torch.cuda.is_available()
                                                  else "cpu"))
        trainer_class = _trainer_class(source_trainer, settings)
        target = (paths["nnUNet_results"] / name
                  / f"{source_trainer}__{plans_name}__{configuration}")
        for f, ck in ckpts.items():
            # nnU-Net's run_training entry point adds continue_training; __init__ pops it
            trainer = trainer_class(plans={**plans, "continue_training": False},
                                    configuration=configuration,
                                    fold=f if f == "all" else int(f), dataset_json=dataset,
                                    device=device)
            if Path(trainer.output_folder_base) != target:
                raise ImportRefused(f"nnU-Net put the results in {trainer.output_folder_base}, "
                                    f"expected {target}")
            trainer.initialize()
            _load_serving_weights(trainer.network, ck)
            trainer.run_training()
            final = target / f"fold_{f}" / "checkpoint_final.pth"
            saved = torch.load(final, map_location="cpu", weights_only=False)
            saved["fine_tuned_from"] = str(ck)
            torch.save(saved, final)
    for extra in ("postprocessing.json",):
        if (source_folder / extra).is_file():
            shutil.copyfile(source_folder / extra, target / extra)
    return target


@dataclass
class ImportedRetrainResult:
    """What :func:`retrain_imported` did (the learning loop records it as a training run)."""

    status: str
    """``skipped``, ``promoted`` or ``rejected``."""
    reason: str
    version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    card: Any = None
    package_dir: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _label_codes(package: Any, path: Path) -> None:
    """The serving package's codes, as an import mapping, so the candidate's labels are
    coded the same."""
    path.write_text(json.dumps({lb.name: {
        "category": {"scheme": lb.category.scheme, "value": lb.category.value,
                     "meaning": lb.category.meaning},
        "type": {"scheme": lb.type.scheme, "value": lb.type.value, "meaning": lb.type.meaning},
        "color": list(lb.color)} for lb in package.labels}, indent=2))


def _evaluate(package_dir: Path, cases: Sequence[LabelledVolume], labels: list[int],
              seed: int) -> Any:
    from dicomnode.inference.sliding import SlidingWindowModel
    from dicomnode.modelpkg import read_model_package
    from dicomnode.training.data import Case
    from dicomnode.training.evaluate import evaluate

    model = SlidingWindowModel.load(read_model_package(package_dir))
    # evaluate() hands the predictor (volume, spacing); a format 2 package needs the
    # volume's affine, looked up by the array it was given
    affines = {id(c.volume): c.affine for c in cases}

    def predict(volume: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        return np.asarray(model.run(volume, affines[id(volume)]).labels)

    return evaluate([Case(volume=c.volume, mask=c.mask, spacing=_spacing(c.affine),
                          case_id=c.study_key) for c in cases], predict, labels, seed=seed)


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    s = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return float(s[0]), float(s[1]), float(s[2])


def retrain_imported(studies: Sequence[Any],
                     load: Callable[[Any], tuple[np.ndarray, np.ndarray, np.ndarray]],
                     registry_ops: Any, *, name: str, active_dir: Path, active_version: str,
                     work_dir: Path, gate: Any, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                     split_seed: int = 0, new_labels: int = 0,
                     settings: FinetuneSettings | None = None) -> ImportedRetrainResult:
    """Fine-tune the serving nnU-Net import ``active_dir`` on the labelled ``studies``
    (:class:`~dicomnode.training.dataset.StudyInfo`; ``load`` gives each one's volume, mask
    and LPS affine), register the re-import as a candidate with its metrics and promote or
    reject it by ``gate`` (:class:`~dicomnode.training.gate.GatePolicy`).

    ``registry_ops``: ``next_version``, ``register_candidate``, ``promote``, ``reject`` as
    :class:`~dicomnode.pipeline.learning.NodeRegistryOps` has them.

    Raises
    ------
    ImportRefused
        The serving package was not imported from nnU-Net, its model folder is gone, or the
        fine-tuned model cannot be imported (e.g. its golden case fails).
    """
    from dicomnode.modelpkg import read_model_package
    from dicomnode.training.dataset import SPLITS, build_dataset_card, split_by_patient
    from dicomnode.training.gate import decide_evaluations

    t0 = time.perf_counter()
    pkg = read_model_package(active_dir)
    prov = dict(pkg.provenance)
    if not is_nnunet_import(prov):
        raise ImportRefused(f"{name} {active_version} was not imported from nnU-Net")
    source = Path(str(prov["results_folder"]))
    if not (source / "plans.json").is_file():
        raise ImportRefused(f"{name} {active_version}: its nnU-Net model folder {source} is "
                            "gone; the package carries no checkpoint to fine-tune from")
    if getattr(pkg.outputs, "regions", None):
        raise ImportRefused("region-based nnU-Net models: node labels are not regions; "
                            "fine-tuning them is not supported")
    folds = [f if f == "all" else int(f) for f in str(prov.get("folds", "0")).split(",")]
    n_folds = max(2, *[f + 1 for f in folds if f != "all"]) if any(
        f != "all" for f in folds) else 2
    usable = list(studies)
    n_patients = len({s.patient_pseudonym for s in usable})
    if n_patients < len(SPLITS):
        return ImportedRetrainResult("skipped", f"{len(usable)} labelled studies from "
                                     f"{n_patients} patient(s); at least {len(SPLITS)} needed")
    parts = split_by_patient(usable, fractions, split_seed)
    train_infos = parts["train"] + parts["val"]  # nnU-Net validates on its own fold split
    if len({s.patient_pseudonym for s in train_infos}) < n_folds:
        return ImportedRetrainResult("skipped", f"{len(train_infos)} training studies cannot "
                                     f"fill the model's {n_folds} nnU-Net folds by patient")
    card = build_dataset_card(parts, name=name, seed=split_seed, fractions=fractions,
                              notes=(f"{new_labels} new label(s) since the previous run.",
                                     "Fine-tuned with nnU-Net's trainer from "
                                     f"{active_version}; train and val both go to nnU-Net."))
    version = registry_ops.next_version(name)
    run_dir = Path(work_dir) / name / version
    if run_dir.exists():
        shutil.rmtree(run_dir)
    ta = time.perf_counter()
    labels = {"background": 0, **{lb.name: lb.number for lb in pkg.labels}}

    def labelled(study: Any) -> LabelledVolume:
        volume, mask, affine = load(study)
        return LabelledVolume(np.asarray(volume, np.float32), np.asarray(mask, np.uint8),
                              np.asarray(affine, float), study.study_key,
                              study.patient_pseudonym)

    raw = write_nnunet_raw((labelled(s) for s in train_infos), run_dir / "raw",
                           dataset_id=(settings or FinetuneSettings()).dataset_id,
                           name="NodeFinetune", labels=labels, channel=pkg.input.modality[0],
                           folds=n_folds, seed=split_seed)
    test = [labelled(s) for s in parts["test"]]
    t_load = time.perf_counter() - ta
    tb = time.perf_counter()
    folder = finetune_nnunet(source, raw, run_dir / "nnunet",
                             configuration=str(prov.get("configuration", "3d_fullres")),
                             folds=folds, checkpoint=str(prov.get("checkpoint",
                                                                  "checkpoint_final.pth")),
                             settings=settings)
    t_train = time.perf_counter() - tb
    codes = run_dir / "codes.json"
    _label_codes(pkg, codes)
    package_dir = run_dir / "package"
    report = import_nnunet(folder, package_dir, configuration=str(prov["configuration"]),
                           folds=folds, checkpoint="final", axes=str(prov["training_axes"]),
                           name=pkg.name, version=version, codes_file=codes,
                           batch=int(pkg.inference.batch), step=float(pkg.inference.tiling.step))
    got = [(lb.number, lb.type.value) for lb in read_model_package(package_dir).labels]
    if got != [(lb.number, lb.type.value) for lb in pkg.labels]:
        raise ImportRefused(f"the fine-tuned model's labels {got} differ from the serving ones")
    (package_dir / "dataset-card.json").write_text(card.to_json(), encoding="utf-8")

    tc = time.perf_counter()
    numbers = [lb.number for lb in pkg.labels]
    cand = _evaluate(package_dir, test, numbers, gate.seed)
    act = _evaluate(Path(active_dir), test, numbers, gate.seed)
    decision = decide_evaluations(cand, act, gate)
    t_eval = time.perf_counter() - tc

    def ev(e: Any) -> dict[str, Any]:
        return {"mean": {str(k): v for k, v in e.mean.items()},
                "per_case": {c.case_id: {str(k): v for k, v in c.dice.items()}
                             for c in e.per_case}}

    metrics: dict[str, Any] = {
        "test": {"candidate": ev(cand), "active": ev(act), "active_version": active_version},
        "gate": decision.as_dict(),
        "train": {"trainer": "nnU-Net", "folds": [str(f) for f in folds],
                  "fine_tuned_from": active_version, "seconds": round(t_train, 2),
                  "golden": report.golden},
        "split": {"seed": split_seed, "studies": dict(card.studies),
                  "patients": dict(card.patients)},
        "new_labels": new_labels,
    }
    registered = registry_ops.register_candidate(package_dir, metrics, card)
    if decision.promote:
        registry_ops.promote(name, registered, decision.reason)
        status = "promoted"
    else:
        registry_ops.reject(name, registered, decision.reason)
        status = "rejected"
    return ImportedRetrainResult(status, decision.reason, registered, metrics, card,
                                 package_dir, {"load": t_load, "train": t_train,
                                               "evaluate": t_eval,
                                               "total": time.perf_counter() - t0})

"""Train segmentation models on labelled volumes, gate them, watch them drift.

The training loop imports torch (the ``[train]`` extra); the serving side never imports
this package for inference. The package format is shared through
:mod:`dicomnode.modelpkg.format1`.

::

    pkg, result = train_package(train_cases, val_cases, out_dir, name="lesion", version="2",
                                contract=contract, labels=labels)
    from dicomnode.training.retrain import retrain
    outcome = retrain(source, registry_ops, settings)   # split, train, gate, promote/reject

Names are loaded on first use (PEP 562), so the torch-free modules stay torch-free
when imported on their own: :mod:`~dicomnode.training.labels` (annotator agreement,
consensus), :mod:`~dicomnode.training.dataset` (patient split, dataset card) and
:mod:`~dicomnode.training.drift` (production Dice against arriving labels) are needed
by a node that receives labels but may not have the training extra installed.
:mod:`~dicomnode.training.gate` uses the bootstrap of
:mod:`~dicomnode.training.evaluate`, which imports torch through ``data``.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomnode.training.data import Case, phantom_cases
    from dicomnode.training.dataset import (
        DatasetCard,
        StudyInfo,
        assign_split,
        build_dataset_card,
        split_by_patient,
    )
    from dicomnode.training.drift import (
        DriftRecord,
        DriftSummary,
        format_drift_table,
        measure_drift,
        summarize_drift,
    )
    from dicomnode.training.evaluate import (
        Evaluation,
        bootstrap_ci,
        dice,
        evaluate,
        paired_bootstrap_ci,
    )
    from dicomnode.training.gate import GateDecision, GatePolicy, decide, decide_evaluations
    from dicomnode.training.labels import (
        AnnotationAssessment,
        ConsensusMethodValues,
        LabelAgreement,
        StapleResult,
        assess_annotations,
        majority_vote,
        pairwise_agreement,
        staple,
        staple_binary,
    )
    from dicomnode.training.retrain import (
        ActiveModel,
        LabeledStudySource,
        RegistryOps,
        RetrainOutcome,
        RetrainSettings,
        RetrainStatusValues,
    )
    from dicomnode.training.train import TrainConfig, TrainResult, train, train_package
    from dicomnode.training.unet import UNet2d

_WHERE = {
    "data": ("Case", "phantom_cases"),
    "dataset": ("DatasetCard", "StudyInfo", "assign_split", "build_dataset_card",
                "split_by_patient"),
    "drift": ("DriftRecord", "DriftSummary", "format_drift_table", "measure_drift",
              "summarize_drift"),
    "evaluate": ("Evaluation", "bootstrap_ci", "dice", "evaluate", "paired_bootstrap_ci"),
    "gate": ("GateDecision", "GatePolicy", "decide", "decide_evaluations"),
    "labels": ("AnnotationAssessment", "ConsensusMethodValues", "LabelAgreement",
               "StapleResult", "assess_annotations", "majority_vote", "pairwise_agreement",
               "staple", "staple_binary"),
    "retrain": ("ActiveModel", "LabeledStudySource", "RegistryOps", "RetrainOutcome",
                "RetrainSettings", "RetrainStatusValues"),
    "train": ("TrainConfig", "TrainResult", "train", "train_package"),
    "unet": ("UNet2d",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [
    "ActiveModel",
    "AnnotationAssessment",
    "Case",
    "ConsensusMethodValues",
    "DatasetCard",
    "DriftRecord",
    "DriftSummary",
    "Evaluation",
    "GateDecision",
    "GatePolicy",
    "LabelAgreement",
    "LabeledStudySource",
    "RegistryOps",
    "RetrainOutcome",
    "RetrainSettings",
    "RetrainStatusValues",
    "StapleResult",
    "StudyInfo",
    "TrainConfig",
    "TrainResult",
    "UNet2d",
    "assess_annotations",
    "assign_split",
    "bootstrap_ci",
    "build_dataset_card",
    "decide",
    "decide_evaluations",
    "dice",
    "evaluate",
    "format_drift_table",
    "majority_vote",
    "measure_drift",
    "paired_bootstrap_ci",
    "pairwise_agreement",
    "phantom_cases",
    "split_by_patient",
    "staple",
    "staple_binary",
    "summarize_drift",
    "train",
    "train_package",
]



def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# Two functions share their module's name (train.train, evaluate.evaluate). Importing
# a submodule binds it on this package, which would hide the function from
# `from dicomnode.training import train` if the submodule was imported first. The
# eager imports this file used to make bound the functions; keep that: a submodule
# bound under such a name is replaced by its function. (So `import
# dicomnode.training.train as m` gives the function, as it always did; use
# importlib.import_module for the module.) `retrain` is deliberately not exported
# here, so `dicomnode.training.retrain` is always the module: call
# `dicomnode.training.retrain.retrain`.
_SHADOWED = frozenset(n for n, m in _MODULE_OF.items() if n == m)


class _Package(ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""Retraining benchmark: one ``retrain()`` on 100 labelled phantom studies, CPU only.

    .venv/bin/python bench/train.py [--studies 100] [--slices 64] [--size 128]
                                    [--threads 2] [--steps 1500] [--val-every 50]
                                    [--patience 4] [--work DIR [--reuse-v1]]
                                    [--json out.jsonl]

The learning-loop story of ``tests/learning/test_retrain.py`` at full size:

1. *Before* (not timed as part of the retrain): the active model, version 1, is trained
   at a site whose phantoms have no vessel distractors (demo architecture, 600 steps on
   16 studies), so it also segments the vessels of the new site.
2. *Retrain* (timed, in a child process so that ``ru_maxrss`` is the retrain's own peak):
   ``retrain(source, registry_ops, settings)`` on ``--studies`` labelled studies of the
   new site (six vessel distractors per study as bright as the lesions), ``--slices``
   slices of ``--size`` x ``--size`` at 1.5 mm. The source builds each study's DICOM
   instances and assembles the volume when ``retrain`` loads it (standing in for reading
   the spool). Training uses the demo model's settings (``DEMO_CONFIG``: up to 1,500
   steps, validation every 50 steps, patience 4) unless ``--val-every`` / ``--patience``
   say otherwise: on 2 cores validating 15 % of 100 studies every 50 steps costs more
   than the optimiser steps. Candidate and active model are run by the serving runtime
   (``OnnxModel``, 2 intra-op threads) on the test split; the gate decides.
3. *After*: both versions on 16 fresh held-out phantoms of the new site.

Prints a JSON summary (and appends it to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dicomnode.dicom.phantom import make_ct_study  # noqa: E402
from dicomnode.dicom.volume import assemble_volume  # noqa: E402
from dicomnode.inference import OnnxModel, RuntimeOptions  # noqa: E402
from dicomnode.modelpkg.format1 import load_model_package  # noqa: E402
from dicomnode.training.data import Case, phantom_cases  # noqa: E402
from dicomnode.training.dataset import DatasetCard, StudyInfo  # noqa: E402
from dicomnode.training.demo import DEMO_CONFIG, DEMO_CONTRACT, DEMO_LABEL  # noqa: E402
from dicomnode.training.evaluate import Predictor, evaluate  # noqa: E402
from dicomnode.training.gate import GatePolicy  # noqa: E402
from dicomnode.training.retrain import ActiveModel, RetrainSettings, retrain  # noqa: E402
from dicomnode.training.train import train_package  # noqa: E402

NAME = "lesion"
STUDY_SEED0, HELD_SEED0 = 5000, 6000


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _proc_status_mib(key: str) -> float | None:
    """VmHWM / VmRSS of this process from /proc (Linux), MiB; None elsewhere.

    ru_maxrss survives fork + exec: a child started by a parent holding 600 MiB starts
    with ru_maxrss >= 600 MiB. VmHWM belongs to the address space exec created, so it is
    this program's own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _study(seed: int, patient: str, slices: int, size: int, n_vessels: int = 6) -> Case:
    rng = np.random.default_rng(seed)
    st = make_ct_study(seed=seed, patient_id=patient, n_slices=slices, rows=size, columns=size,
                       n_lesions=int(rng.integers(1, 4)), n_vessels=n_vessels,
                       noise_hu=float(rng.uniform(18, 32)))
    vol = assemble_volume(st.datasets)
    return Case(np.array(vol.array), st.mask, vol.spacing, f"STUDY-{seed}")


class Source:
    """``--studies`` studies of ~0.8 x as many patients (every fifth patient has two)."""

    def __init__(self, n: int, slices: int, size: int) -> None:
        self.slices, self.size = slices, size
        self.infos: list[StudyInfo] = []
        p = 0
        while len(self.infos) < n:
            for _ in range(2 if p % 5 == 0 else 1):
                if len(self.infos) < n:
                    seed = STUDY_SEED0 + len(self.infos)
                    self.infos.append(StudyInfo(
                        f"STUDY-{seed}", f"PSN-{p:04d}", "CT", "dicomnode phantom",
                        f"INST-{'ABC'[p % 3]}", ("Lesion",)))
            p += 1

    def new_label_count(self) -> int:
        return len(self.infos)

    def studies(self) -> Iterable[StudyInfo]:
        return self.infos

    def load(self, study: StudyInfo) -> Case:
        seed = int(study.study_key.split("-")[1])
        return _study(seed, study.patient_pseudonym, self.slices, self.size)


class Registry:
    """Versions in a dict, packages under ``root``, run by the serving runtime."""

    def __init__(self, root: Path, threads: int) -> None:
        self.root, self.options = root, RuntimeOptions(providers=("CPUExecutionProvider",),
                                                       intra_op_threads=threads,
                                                       inter_op_threads=1)
        self.status: dict[str, str] = {}
        self.reasons: dict[str, str] = {}

    def add(self, package_dir: Path, status: str) -> str:
        version = load_model_package(package_dir).version
        shutil.copytree(package_dir, self.root / version)
        self.status[version] = status
        return version

    def active_predictor(self, name: str) -> ActiveModel | None:
        for v, s in self.status.items():
            if s == "active":
                return ActiveModel(v, self.predictor(self.root / v))
        return None

    def predictor(self, package_dir: Path) -> Predictor:
        return OnnxModel.load(package_dir, self.options).predict_mask

    def next_version(self, name: str) -> str:
        return str(len(self.status) + 1)

    def register_candidate(self, package_dir: Path, metrics: Mapping[str, Any],
                           card: DatasetCard) -> str:
        return self.add(package_dir, "candidate")

    def promote(self, name: str, version: str, reason: str) -> None:
        for v in self.status:
            if self.status[v] == "active":
                self.status[v] = "retired"
        self.status[version], self.reasons[version] = "active", reason

    def reject(self, name: str, version: str, reason: str) -> None:
        self.status[version], self.reasons[version] = "rejected", reason


def child(args: argparse.Namespace) -> None:
    """Run one retrain; write the figures as JSON to ``args.child``."""
    rss0, hwm0 = _maxrss_mib(), _proc_status_mib("VmHWM")
    work = Path(args.work)
    reg = Registry(work / "registry", args.threads)
    reg.status["1"] = "active"  # copied there by the parent
    settings = RetrainSettings(
        name=NAME, contract=DEMO_CONTRACT, labels=(DEMO_LABEL,), work_dir=work / "runs",
        train_config=replace(DEMO_CONFIG, steps=args.steps, threads=args.threads,
                             val_every=args.val_every, patience=args.patience,
                             progress=False),
        gate=GatePolicy(margin=0.02, floor=0.5), min_new_labels=1,
        min_component_mm3=100.0,
    )
    t0 = time.perf_counter()
    out = retrain(Source(args.studies, args.slices, args.size), reg, settings)
    wall = time.perf_counter() - t0
    d = out.decision
    assert d is not None and out.card is not None
    result = {
        "status": str(out.status), "reason": out.reason, "version": out.version,
        "wall_s": round(wall, 1), "seconds": {k: round(v, 1) for k, v in out.seconds.items()},
        "maxrss_mib_before": round(rss0), "maxrss_mib": round(_maxrss_mib()),
        "vmhwm_mib_before": hwm0, "vmhwm_mib": _proc_status_mib("VmHWM"),
        "studies": out.card.studies, "patients": out.card.patients,
        "train": out.metrics["train"],
        "test_active_mean": d.active_mean, "test_candidate_mean": d.candidate_mean,
        "test_difference": d.difference, "test_difference_ci": d.difference_ci,
    }
    Path(args.child).write_text(json.dumps(result), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=DEMO_CONFIG.steps,
                        help="retrain step limit (early stopping may end sooner)")
    parser.add_argument("--val-every", type=int, default=DEMO_CONFIG.val_every)
    parser.add_argument("--patience", type=int, default=DEMO_CONFIG.patience)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None, help="kept; default a temp dir")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--reuse-v1", action="store_true",
                        help="keep the version 1 package already under --work/build/v1")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch  # only to report the version and pin threads here

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)

    # 1. The active model of the old site (no distractors).
    t0 = time.perf_counter()
    spec = {"n_slices": 32, "rows": args.size, "columns": args.size, "n_vessels": 0}
    v1 = work / "build" / "v1"
    if not (args.reuse_v1 and (v1 / "model.onnx").is_file()):
        train_package(
            phantom_cases(range(1000, 1016), **spec), phantom_cases(range(2000, 2004), **spec),
            v1, name=NAME, version="1", contract=DEMO_CONTRACT, labels=[DEMO_LABEL],
            config=replace(DEMO_CONFIG, steps=min(600, args.steps), threads=args.threads,
                           progress=False),
            min_component_mm3=100.0,
        )
    t_v1 = time.perf_counter() - t0
    if (work / "registry").exists():
        shutil.rmtree(work / "registry")  # versions of an earlier run
    if (work / "runs").exists():
        shutil.rmtree(work / "runs")
    (work / "registry").mkdir()
    shutil.copytree(v1, work / "registry" / "1")

    # 2. The retrain, in a child process (its own peak memory).
    out_json = work / "retrain.json"
    cmd = [sys.executable, __file__, "--child", str(out_json), "--work", str(work),
           "--studies", str(args.studies), "--slices", str(args.slices),
           "--size", str(args.size), "--threads", str(args.threads), "--steps", str(args.steps),
           "--val-every", str(args.val_every), "--patience", str(args.patience)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    t_child = time.perf_counter() - t0
    load_retrain = os.getloadavg()
    result = json.loads(out_json.read_text(encoding="utf-8"))

    # 3. Held-out phantoms of the new site, before (v1) and after (the new version).
    held = [_study(HELD_SEED0 + i, f"HELD-{i}", args.slices, args.size)
            for i in range(args.held_out)]
    opts = RuntimeOptions(providers=("CPUExecutionProvider",), intra_op_threads=args.threads,
                          inter_op_threads=1)
    before = evaluate(held, OnnxModel.load(work / "registry" / "1", opts).predict_mask)
    after = evaluate(held, OnnxModel.load(work / "registry" / result["version"],
                                          opts).predict_mask)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k != "child"},
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_after_retrain": [round(x, 2) for x in load_retrain],
        "v1_train_s": round(t_v1, 1),
        "retrain_process_s": round(t_child, 1),
        "retrain": result,
        "held_out": {
            "n": args.held_out,
            "before_mean": before.mean[1], "before_ci": before.ci[1],
            "after_mean": after.mean[1], "after_ci": after.ci[1],
        },
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a", encoding="utf-8") as f:
            f.write(json.dumps(summary) + "\n")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

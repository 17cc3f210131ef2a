"""De-identification benchmark: pydicom read+write vs read+de-identify+write, one core.

    .venv/bin/python bench/deid.py [--reps 7] [--slices 300] [--json out.jsonl]

Generates the 300-instance 512x512 CT phantom (0.7 mm pixels, 1 mm slices), writes it
to a temporary directory and reads the files' bytes back into memory, so that both
variants start from the same bytes and neither times the disk:

(a) plain:  ``dcmread(bytes)`` then ``dcmwrite`` to a BytesIO (File Meta enforced);
(b) deid:   ``dcmread(bytes)``, ``Deidentifier.deidentify`` (default options), then
            ``dcmwrite`` of the result to a BytesIO: what the node does per instance.

One process, one thread: instances/s *per core*. Each repetition runs the whole study
through (a) and (b), taking turns (the order alternates between repetitions) so that
background load on the shared cores hits both alike. Prints the median (min-max) of
each and the throughput ratio (b)/(a), which the issue wants >= 0.7.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.filewriter import dcmwrite  # noqa: E402

from dicomnode.dicom.deid import Deidentifier  # noqa: E402
from dicomnode.dicom.phantom import make_ct_study  # noqa: E402
from dicomnode.dicom.pseudonym import Pseudonymizer  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"pydicom {pydicom.__version__}, numpy {np.__version__}"
    )


def study_bytes(n_slices: int, directory: Path) -> list[bytes]:
    study = make_ct_study(
        n_slices=n_slices, rows=512, columns=512, pixel_spacing_mm=0.7, slice_thickness_mm=1.0
    )
    paths = []
    for i, ds in enumerate(study.datasets):
        path = directory / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    del study
    return [p.read_bytes() for p in paths]


def plain(data: bytes) -> bytes:
    ds = dcmread(BytesIO(data))
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def make_deid() -> Callable[[bytes], bytes]:
    engine = Deidentifier(Pseudonymizer(b"benchmark-secret-0123456789abcdef"))

    def deid(data: bytes) -> bytes:
        result = engine.deidentify(dcmread(BytesIO(data)))
        buf = BytesIO()
        dcmwrite(buf, result.dataset, enforce_file_format=True)
        return buf.getvalue()

    return deid


def run_once(fn: Callable[[bytes], bytes], blobs: list[bytes]) -> float:
    gc.collect()
    start = time.perf_counter()
    for data in blobs:
        fn(data)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--json", type=Path, help="append the raw results to this JSONL file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-deid-") as tmp:
        t0 = time.perf_counter()
        blobs = study_bytes(args.slices, Path(tmp))
        print(f"generated and wrote {len(blobs)} instances in {time.perf_counter() - t0:.1f} s")

    fns = {"plain": plain, "deid": make_deid()}
    for fn in fns.values():  # warm-up: caches, compiled table, imports
        for data in blobs[:20]:
            fn(data)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(args.reps):
        order = list(fns) if rep % 2 == 0 else list(reversed(fns))
        for name in order:
            times[name].append(run_once(fns[name], blobs))

    n = len(blobs)
    rows = {}
    print(f"\nmachine: {machine()}")
    print(f"{n} instances x {args.reps} repetitions, one core\n")
    print("| variant | s/study median (min-max) | ms/instance | instances/s per core |")
    print("|---|---|---|---|")
    for name, label in (
        ("plain", "pydicom dcmread + dcmwrite"),
        ("deid", "dcmread + deidentify + dcmwrite"),
    ):
        t = times[name]
        med = statistics.median(t)
        rows[name] = n / med
        print(
            f"| {label} | {med:.3f} ({min(t):.3f}-{max(t):.3f}) | {1e3 * med / n:.3f} "
            f"| {n / med:.0f} |"
        )
    ratio = rows["deid"] / rows["plain"]
    per_rep = [p / d for p, d in zip(times["plain"], times["deid"], strict=True)]
    print(
        f"\nthroughput ratio deid/plain: {ratio:.2f} (per repetition "
        f"{min(per_rep):.2f}-{max(per_rep):.2f}); target >= 0.70"
    )
    if args.json:
        with args.json.open("a") as f:
            f.write(
                json.dumps(
                    {
                        "bench": "deid",
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "machine": machine(),
                        "instances": n,
                        "reps": args.reps,
                        "seconds": times,
                        "ratio": ratio,
                    }
                )
                + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

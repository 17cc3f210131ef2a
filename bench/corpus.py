"""Real-world corpus through the node: what became of each input class, and how long it took.

    .venv/bin/python bench/corpus.py [--vendored] [--json out.json]

Sends the public real-world collection in ``../shared/realworld`` (or, with
``--vendored`` or when that is absent, the subset in ``tests/data/realworld``) through
fresh nodes, one per send group, exactly as the test ``tests/realdata`` does, and prints
the table of docs/benchmarks.md ("Real-world data"): per input class the files, how many
were stored, de-identified, quarantined, routed to a model, turned into SEG + SR, or
refused with a reason; then the wall time from the first C-STORE to the last study in a
final outcome, per send group and in all.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "realdata"))

from corpus import (  # noqa: E402
    VENDORED,
    by_class,
    extract_shared,
    load_manifest,
    markdown,
    run_batch,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vendored", action="store_true", help="the subset in tests/data")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = None if args.vendored else extract_shared(work / "corpus")
        name = "../shared/realworld" if root is not None else "tests/data/realworld"
        root = root or VENDORED
        files = load_manifest(root)
        batches: dict[str, list] = {}
        for f in files:
            batches.setdefault(f.batch, []).append(f)
        t0 = time.monotonic()
        runs = [run_batch(work, b, fs) for b, fs in sorted(batches.items())]
        total = time.monotonic() - t0
        table = by_class(runs)
    print(f"corpus: {name}, {len(files)} files in {len(runs)} send group(s)\n")
    print(markdown(table))
    print()
    for run in runs:
        print(f"send group {run.batch}: {len(run.files)} files, first C-STORE to last study "
              f"final {run.seconds:.1f} s ({len(run.studies)} studies)")
    print(f"all groups, node start-ups included: {total:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "corpus": name, "table": table, "total_s": total,
            "groups": [{"batch": r.batch, "files": len(r.files), "seconds": r.seconds,
                        "studies": len(r.studies)} for r in runs],
        }, indent=2))


if __name__ == "__main__":
    main()

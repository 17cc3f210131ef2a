"""FileStore: atomic writes from ready-made spare files, and nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from nodeutil import wait_for

from dicomnode.errors import StorageError
from dicomnode.storage.spool import FileStore


def part_files(store: FileStore) -> list[Path]:
    return sorted(store.tmp.glob("*.part")) if store.tmp.exists() else []


@pytest.mark.parametrize("spares", [0, 3])
def test_writes_are_whole_and_spares_are_cleaned_up(tmp_path: Path, spares: int) -> None:
    store = FileStore(tmp_path, spares=spares)
    assert part_files(store) == []  # no thread, no spare file until the first write
    payloads = {f"spool/s{i % 3}/o{i}.dcm": os.urandom(1000 + i) for i in range(40)}
    for rel, data in payloads.items():
        assert store.write(rel, [data[:10], data[10:]]) == len(data)
    for rel, data in payloads.items():
        assert (tmp_path / rel).read_bytes() == data
    if spares:
        # the spare thread tops up to `spares` empty, open files
        ready = wait_for(lambda: len(part_files(store)) == spares and part_files(store), 5)
        assert all(f.stat().st_size == 0 for f in ready)
    else:
        assert part_files(store) == []
    store.close()
    assert not store.tmp.exists()  # spares removed, the process's tmp dir with them
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 40


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path, spares=2)
    store.write("spool/a/x.dcm", b"first")
    (tmp_path / "spool" / "blocked").write_bytes(b"a file where a directory must go")
    with pytest.raises(StorageError, match="cannot write spool/blocked/y.dcm"):
        store.write("spool/blocked/y.dcm", b"second")
    store.close()
    assert not store.tmp.exists()
    assert (tmp_path / "spool" / "a" / "x.dcm").read_bytes() == b"first"

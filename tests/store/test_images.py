"""The image store: temp links expire, and pruning deletes only what will never be served."""

from __future__ import annotations

import os
import time

import numpy as np

from service.store.images import ImageStore, output_names

HOUR = 3600.0
PIXELS = np.zeros((8, 8, 3), dtype=np.uint8)


def age(path, seconds: float) -> None:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_temp_links_expire_after_a_day_and_are_then_pruned(tmp_path):
    store = ImageStore(str(tmp_path))
    [kept] = output_names("a" * 32, 1, as_base64=False, temp=False)
    [temp] = output_names("b" * 32, 1, as_base64=False, temp=True)
    for name in (kept, temp):
        store.write(name, PIXELS)
    assert store.read(temp) is not None
    age(tmp_path / temp, 25 * HOUR)
    age(tmp_path / kept, 400 * 24 * HOUR)
    assert store.read(temp) is None  # expired: never served again
    assert store.prune() == 1  # so it goes; without a retention, other images stay
    assert not (tmp_path / temp).exists() and store.read(kept) is not None


def test_retention_and_interrupted_writes(tmp_path):
    store = ImageStore(str(tmp_path))
    names = output_names("c" * 32, 3, as_base64=False, temp=False)
    for name in names:
        store.write(name, PIXELS)
    age(tmp_path / names[0], 3 * 24 * HOUR)  # past a 2-day retention
    age(tmp_path / names[1], 1 * 24 * HOUR)
    [young_temp] = output_names("d" * 32, 1, as_base64=True, temp=True)
    store.write(young_temp, PIXELS)
    age(tmp_path / young_temp, 20 * HOUR)
    stale = tmp_path / ("e" * 32 + "-0.png.partial")
    fresh = tmp_path / ("f" * 32 + "-0.png.partial")
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    age(stale, 2 * HOUR)
    foreign = [tmp_path / "notes.txt", tmp_path / "temp" / "README", tmp_path / "x.png"]
    for path in foreign:
        path.write_text("not an output")
        age(path, 999 * 24 * HOUR)

    assert store.prune(max_age_s=2 * 24 * HOUR) == 2
    assert not (tmp_path / names[0]).exists() and not stale.exists()
    assert all((tmp_path / name).exists() for name in (names[1], names[2], young_temp))
    assert fresh.exists() and all(path.exists() for path in foreign)
    assert store.prune(max_age_s=2 * 24 * HOUR) == 0

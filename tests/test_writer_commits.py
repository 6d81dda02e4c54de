"""The writer's commits on real Zarr stores: whole-chunk appends, batch calls, background commits, kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from featcache.errors import CacheError
from featcache.extract.sources import Item
from featcache.extract.writer import CacheWriter
from featcache.store.append import Batch, Column
from featcache.store.cache import FeatureCache, strings, writer_lock

DIM = 24


def _vector(i: int) -> np.ndarray:
    """The stand-in embedding of content ``i``: known without the writer, so every row can be checked."""
    return np.arange(DIM, dtype=np.float32) + 1000 * i


def _sha(i: int) -> str:
    return f"{i:064x}"


def _writer(root: Path, commit_every: int) -> CacheWriter:
    cache = FeatureCache(root, create=True)
    group = cache.feature_group("standin", {"arch": "stand-in", "dim": DIM}, {"name": "stand-in"}, {"final": DIM})
    return CacheWriter(cache, {"standin": group}, commit_every)


def _append(col: Column, start: int, values) -> None:
    batch = Batch()
    col.append(batch, start, values)
    batch.run()


@pytest.mark.parametrize("kind", ["str", "int64", "rows"])
def test_whole_chunk_appends_keep_every_row_whatever_the_sizes(tmp_path, kind):
    g = zarr.open_group(str(tmp_path / "g"), mode="a", zarr_format=3)
    if kind == "str":
        arr = g.create_array("a", shape=(0,), chunks=(8,), dtype=str, fill_value="")
        make = lambda a, b: strings([f"v{i}" if i % 5 else "" for i in range(a, b)])  # noqa: E731
    elif kind == "int64":
        arr = g.create_array("a", shape=(0,), chunks=(8,), dtype="int64", fill_value=-1)
        make = lambda a, b: np.arange(a, b, dtype=np.int64)  # noqa: E731
    else:
        arr = g.create_array("a", shape=(0, 3), chunks=(5, 3), dtype="float32", fill_value=float("nan"), compressors=None)
        make = lambda a, b: np.arange(3 * a, 3 * b, dtype=np.float32).reshape(-1, 3)  # noqa: E731
    col, end = Column(arr), 0
    for size in (3, 5, 1, 13, 8, 2, 17, 4):
        _append(col, end, make(end, end + size))
        end += size
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "g" / "a"))[:end], make(0, end))
    again = Column(zarr.open_array(str(tmp_path / "g" / "a"), mode="r+"))  # a new writer: the last chunk read back once
    _append(again, end, make(end, end + 6))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "g" / "a"))[: end + 6], make(0, end + 6))


def test_a_row_rewritten_in_place_survives_the_next_append(tmp_path):
    arr = zarr.open_group(str(tmp_path / "g"), mode="a", zarr_format=3).create_array(
        "a", shape=(0,), chunks=(8,), dtype=str, fill_value="")
    col = Column(arr)
    _append(col, 0, strings(["a", "b", "c"]))
    zarr.open_array(str(tmp_path / "g" / "a"), mode="r+").set_coordinate_selection(np.array([1]), strings(["B"]))
    col.forget()
    _append(col, 3, strings(["d"]))
    assert zarr.open_array(str(tmp_path / "g" / "a"))[:4].tolist() == ["a", "B", "c", "d"]


def test_a_column_of_blanks_reads_blank_then_takes_a_value(tmp_path):
    """Chunks of fill values are written once, then left alone while they stay blank."""
    arr = zarr.open_group(str(tmp_path / "g"), mode="a", zarr_format=3).create_array(
        "a", shape=(0,), chunks=(8,), dtype=str, fill_value="")
    col = Column(arr)
    for start in range(0, 6, 2):
        _append(col, start, strings(["", ""]))
    _append(col, 6, strings(["", "x", ""]))
    assert zarr.open_array(str(tmp_path / "g" / "a"))[:9].tolist() == [""] * 7 + ["x", ""]


def _feed(writer: CacheWriter, files: list[tuple[str, int, str]], batch: int | None) -> None:
    """``files``: (key, content, label); content < 0 fails to decode. ``batch`` None: one call per file."""
    items = [Item(Path("/data") / key, key, label) for key, _, label in files]
    shas = [_sha(abs(c)) for _, c, _ in files]
    results = {abs(c): (_result(c)) for _, c, _ in files}
    if batch is None:
        for item, sha in zip(items, shas):
            action, row = writer.register(item, sha)
            if action == "new":
                writer.add(row, results[int(sha, 16)])
    else:
        for i in range(0, len(items), batch):
            got = writer.register_many(items[i : i + batch], shas[i : i + batch])
            new = [(row, results[int(shas[i + j], 16)]) for j, (action, row) in enumerate(got) if action == "new"]
            writer.add_many([r for r, _ in new], [res for _, res in new])
    writer.commit()


def _result(c: int):
    return "cannot decode: truncated" if c < 0 else {"standin": {"final": _vector(c)}}


def _state(root: Path) -> tuple:
    cache = FeatureCache(root)
    f = cache.read(include_failed=True)
    t = cache.images()
    return (f.sha256.tolist(), f.keys.tolist(), f.labels.tolist(), f.status.tolist(), f.errors.tolist(),
            f.conflicts.tolist(), f.vectors.tobytes(), t.sha256.tolist(), t.key.tolist(), t.path.tolist(),
            t.label.tolist(), t.conflict.tolist())


def test_batch_calls_store_what_one_call_per_file_stores(tmp_path):
    """Duplicates, label conflicts, failures, then a second run that moves and relabels files."""
    first = [(f"c{i % 3}/f{i:03d}.jpg", i, f"c{i % 3}") for i in range(60)]
    first += [("dup/a.jpg", 5, "c0"), ("dup/b.jpg", 7, "c2"), ("bad/x.jpg", -100, ""), ("bad/y.jpg", -101, "")]
    second = [(f"moved/f{i:03d}.jpg", i, "m") for i in range(50, 70)] + [("c0/f000.jpg", 200, "c0")]
    summaries = {}
    for batch in (None, 7):
        root = tmp_path / f"b{batch}"
        for n, files in enumerate((first, second)):
            w = _writer(root, commit_every=4)
            _feed(w, files, batch)
            summaries[batch, n] = w.summary()
    assert _state(tmp_path / "bNone") == _state(tmp_path / "b7")
    assert summaries[None, 0] == summaries[7, 0] and summaries[None, 1] == summaries[7, 1]
    s = summaries[7, 0]
    assert (s["duplicate_files"], s["failed"], s["label_conflicts"]) == (2, 2, 2)
    assert summaries[7, 1]["orphaned"] == 1 and summaries[7, 1]["already_cached"] == 10
    f = FeatureCache(tmp_path / "b7").read()
    by_sha = dict(zip(f.sha256.tolist(), zip(f.keys.tolist(), f.labels.tolist())))
    assert [by_sha[_sha(i)] for i in (50, 59, 60, 200)] == [
        ("moved/f050.jpg", "m"), ("moved/f059.jpg", "m"), ("moved/f060.jpg", "m"), ("c0/f000.jpg", "c0")]
    assert _sha(0) not in by_sha, "content 0 lost its key to content 200: an orphan, left out of reads"
    np.testing.assert_array_equal(f.vectors, np.stack([_vector(int(s, 16)) for s in f.sha256]))


def test_a_failed_write_moves_no_ledger(tmp_path):
    """Vectors that cannot be written leave the ledger where it was: readers keep the rows committed before."""
    w = _writer(tmp_path / "c", commit_every=100_000)
    _feed(w, [(f"f{i}.jpg", i, "") for i in range(10)], batch=10)
    chunk = zarr.open_array(str(tmp_path / "c" / "features" / "standin" / "taps" / "final")).chunks[0]
    blocker = tmp_path / "c" / "features" / "standin" / "taps" / "final" / "c" / str(10 // chunk + 1) / "0"
    (blocker / "in-the-way").mkdir(parents=True)  # where the next chunk's file must go: a directory, not empty
    with pytest.raises(OSError):
        _feed(w, [(f"g{i}.jpg", i, "") for i in range(10, 10 + 2 * chunk)], batch=50)
    with pytest.raises(CacheError, match="an earlier commit .* failed"):
        _feed(w, [("h.jpg", 10**6, "")], batch=1)
    f = FeatureCache(tmp_path / "c").read()
    assert len(f) == 10 and f.keys.tolist() == [f"f{i}.jpg" for i in range(10)]
    np.testing.assert_array_equal(f.vectors, np.stack([_vector(i) for i in range(10)]))


KILLED = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_writer_commits import _feed, _writer
    from featcache.store.cache import writer_lock
    with writer_lock(sys.argv[1]):
        w = _writer(Path(sys.argv[1]), commit_every=64)
        for s in range(0, 2_000_000, 5000):
            _feed(w, [(f"f{i:07d}.jpg", i, "") for i in range(s, s + 5000)], 100)
""")


def test_killed_writer_keeps_every_committed_row_and_the_next_run_adds_each_once(tmp_path):
    root = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(root), str(Path(__file__).parent)], env=env,
                            stderr=subprocess.PIPE)
    deadline, committed = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None and committed < 3000:
        time.sleep(0.05)
        try:
            committed = zarr.open_group(str(root / "features" / "standin"), mode="r").attrs["rows"]
        except Exception:  # noqa: BLE001 - not created yet
            committed = 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    f = FeatureCache(root).read()
    assert 3000 <= len(f) < 2_000_000, "the kill landed mid-run"
    ids = [int(s, 16) for s in f.sha256]
    assert ids == list(range(len(f))), "committed rows are the first ones, each once"
    np.testing.assert_array_equal(f.vectors, np.stack([_vector(i) for i in ids]))

    total = len(f) + 500
    with writer_lock(root):
        w = _writer(root, commit_every=64)
        _feed(w, [(f"f{i:07d}.jpg", i, "") for i in range(total)], batch=100)
    assert w.summary()["already_cached"] >= len(f)
    again = FeatureCache(root).read()
    assert [int(s, 16) for s in again.sha256] == list(range(total))
    np.testing.assert_array_equal(again.vectors, np.stack([_vector(i) for i in range(total)]))
    assert again.keys.tolist() == [f"f{i:07d}.jpg" for i in range(total)]

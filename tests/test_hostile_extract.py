"""Hostile and careless input to the extractor (issue 10): each class of failure with cases of its own.

Special files, names that are not UTF-8, files that change while a job runs, content that moves
between keys or sits under two labels, per-run limits meeting stored rows, and caches that cannot
be written. Everything runs on real photos, real weights and real Zarr stores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from featcache.classify.data import load_labelled
from featcache.extract.decode import load_image
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.extract.stages import read_file
from featcache.store.cache import FeatureCache
from featcache.store.names import decode_name, encode_name

from .images import jpeg_bytes, png_bytes, real_photo

CLI = [sys.executable, "-m", "featcache.cli"]


def run(source, cache, emb, **kw) -> dict:
    return Extraction(ExtractConfig(str(source), str(cache), progress=False, **kw), emb).run()


def _photos(root: Path, n: int, start: int = 0) -> list[Path]:
    out = []
    for i in range(n):
        p = root / f"photo{start + i:02d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg_bytes(real_photo((start + i) % 20)))
        out.append(p)
    return out


def test_special_files_in_a_csv_fail_fast_with_reasons(tmp_path, lite0_embedder):
    """FIFOs, devices, sockets and folders listed in a CSV are never opened for reading."""
    good = _photos(tmp_path / "img", 2)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    folder = tmp_path / "dir.jpg"
    folder.mkdir()
    rows = [str(good[0]), str(fifo), "/dev/zero", "/dev/null", str(sock_path), str(folder), "missing.jpg", str(good[1])]
    csv = tmp_path / "list.csv"
    csv.write_text("\n".join(rows) + "\n")
    t = time.perf_counter()
    summary = run(csv, tmp_path / "c", lite0_embedder)
    sock.close()
    assert time.perf_counter() - t < 60, "special files must not stall the job"
    assert summary["extracted"] == 2 and summary["failed"] == 6 and summary["files"] == 8
    errors = {f["key"]: f["error"] for f in summary["failures"]}
    assert errors[str(fifo)] == "not a regular file: a FIFO"
    assert errors["/dev/zero"] == errors["/dev/null"] == "not a regular file: a character device"
    assert errors[str(sock_path)] == "not a regular file: a socket"
    assert errors[str(folder)] == "not a regular file: a folder"
    assert errors["missing.jpg"].startswith("unreadable file:")
    assert summary["failure_reasons"] == {"not a regular file": 5, "unreadable file": 1}


def test_special_files_and_link_loops_in_a_folder_are_counted(tmp_path, lite0_embedder):
    src = tmp_path / "src"
    _photos(src / "a", 2)
    os.mkfifo(src / "a" / "pipe.png")
    (src / "a" / "loop.jpg").symlink_to(src / "a" / "loop.jpg")  # a symlink to itself
    (src / "a" / "dangling.jpg").symlink_to(src / "nowhere.jpg")
    (src / "a" / "back").symlink_to(src)  # a folder loop
    (src / "notes.txt").write_text("not an image")
    summary = run(src, tmp_path / "c", lite0_embedder)
    assert summary["extracted"] == 2
    errors = {f["key"]: f["error"] for f in summary["failures"]}
    assert errors["a/pipe.png"] == "not a regular file: a FIFO"
    assert errors["a/loop.jpg"].startswith("unreadable file:") and "symbolic links" in errors["a/loop.jpg"]
    assert errors["a/dangling.jpg"].startswith("unreadable file:")
    assert errors["a/back"].startswith("symlink loop")
    assert summary["failed"] == 4 and summary["files"] == 6 and summary["skipped_non_image_suffix"] == 1


def test_names_that_are_not_utf8_round_trip(tmp_path, lite0_embedder):
    """Any name Linux allows is a key: stored as valid text, decoded back to the very name."""
    src = tmp_path / "src"
    label_dir = os.path.join(os.fsencode(src), b"caf\xe9")  # a Latin-1 folder name: a label
    os.makedirs(label_dir)
    names = [b"\xff\xfe.jpg", b"ok-\xe9t\xe9.jpg", b"100%.jpg", "ünïcode.jpg".encode()]
    for i, name in enumerate(names):
        with open(os.path.join(label_dir, name), "wb") as f:
            f.write(jpeg_bytes(real_photo(i)))
    summary = run(src, tmp_path / "c", lite0_embedder)
    assert summary["extracted"] == 4 and summary["failed"] == 0
    feats = FeatureCache(tmp_path / "c").read()
    assert len(feats) == 4
    on_disk = {os.fsdecode(os.path.join(b"caf\xe9", n)) for n in names}
    assert {decode_name(k) for k in feats.keys.tolist()} == on_disk
    assert {decode_name(label) for label in feats.labels.tolist()} == {os.fsdecode(b"caf\xe9")}
    for key in feats.keys.tolist():
        assert key.encode("utf-8")  # stored text is valid Unicode
        assert os.path.isfile(src / decode_name(key))
    assert encode_name("plain/name.jpg") == "plain/name.jpg"


def test_bytes_hashed_are_the_bytes_decoded_while_files_change(tmp_path, lite0_embedder):
    """A file swapped between two contents during the job: each row's vector is its own content's."""
    src = tmp_path / "src"
    _photos(src, 12)
    a, b = jpeg_bytes(real_photo(15)), png_bytes(real_photo(16).resize((300, 200)))
    flip = src / "flip.jpg"
    flip.write_bytes(a)
    stop = threading.Event()

    def flipper():
        i = 0
        while not stop.is_set():
            tmp = src / f".tmp{i % 2}"
            tmp.write_bytes(b if i % 2 else a)
            os.replace(tmp, flip)  # atomic: every read sees one whole content
            i += 1

    th = threading.Thread(target=flipper, daemon=True)
    th.start()
    try:
        for k in range(3):  # each run may register the other content
            run(src, tmp_path / "c", lite0_embedder, batch_size=4, commit_every=4)
            if k == 0:
                (src / "more").mkdir(exist_ok=True)
                _photos(src / "more", 3, start=12)
    finally:
        stop.set()
        th.join()
    feats = FeatureCache(tmp_path / "c").read(include_failed=True)
    pre = lite0_embedder.spec.preprocess
    truth = {}
    for data in (a, b):
        truth[hashlib.sha256(data).hexdigest()] = lite0_embedder.embed(load_image(data, pre)[None])["final"][0]
    seen = [s for s in feats.sha256.tolist() if s in truth]
    assert seen, "the flipping file was extracted at least once"
    for s in seen:
        row = feats.sha256.tolist().index(s)
        np.testing.assert_allclose(feats.vectors[row], truth[s], rtol=1e-5, atol=1e-5)
    assert len(set(feats.sha256.tolist())) == len(feats)


def test_one_content_per_key_after_the_file_changes(tmp_path, lite0_embedder):
    src = tmp_path / "src"
    photos = _photos(src / "cls", 4)
    cache = tmp_path / "c"
    run(src, cache, lite0_embedder)
    photos[0].write_bytes(jpeg_bytes(real_photo(10)))  # same name, other bytes
    second = run(src, cache, lite0_embedder)
    assert second["extracted"] == 1 and second["orphaned"] == 1
    table = FeatureCache(cache).images()
    keys = [k for k in table.key.tolist() if k]
    assert len(keys) == len(set(keys)) == 4, "two rows carry the same key"
    feats = FeatureCache(cache).read()
    assert len(feats) == 4 and sorted(feats.keys.tolist()) == sorted(keys)
    info = FeatureCache(cache).info()
    assert info["images"] == 5 and info["orphaned"] == 1
    # swapping two files' contents in one run moves both keys, orphaning nothing
    b0, b1 = photos[1].read_bytes(), photos[2].read_bytes()
    photos[1].write_bytes(b1)
    photos[2].write_bytes(b0)
    third = run(src, cache, lite0_embedder)
    assert third["extracted"] == 0 and third["orphaned"] == 0
    feats = FeatureCache(cache).read()
    row = {k: s for k, s in zip(feats.keys.tolist(), feats.sha256.tolist())}
    assert row["cls/photo01.jpg"] == hashlib.sha256(b1).hexdigest()
    assert row["cls/photo02.jpg"] == hashlib.sha256(b0).hexdigest()


def test_label_conflicts_are_reported_not_resolved_silently(tmp_path, lite0_embedder):
    src = tmp_path / "src"
    same = jpeg_bytes(real_photo(5))
    for label in ("mammal", "fish"):
        (src / label).mkdir(parents=True)
        (src / label / "dolphin.jpg").write_bytes(same)
    _photos(src / "fish", 2)
    _photos(src / "mammal", 2, start=10)
    (src / "fish" / "copy.jpg").write_bytes(jpeg_bytes(real_photo(0)))  # same bytes, same label: no conflict
    summary = run(src, tmp_path / "c", lite0_embedder)
    assert summary["label_conflicts"] == 1 and summary["duplicate_files"] == 2
    (conflict,) = summary["conflicts"]
    assert conflict["labels"] == ["fish", "mammal"]
    assert conflict["keys"] == ["fish/dolphin.jpg", "mammal/dolphin.jpg"]
    feats = FeatureCache(tmp_path / "c").read()
    assert json.loads(feats.conflicts[feats.keys.tolist().index("fish/dolphin.jpg")]) == ["fish", "mammal"]
    assert FeatureCache(tmp_path / "c").info()["label_conflicts"] == 1
    cache = FeatureCache(tmp_path / "c")
    dropped, kept = load_labelled(cache, conflicts="drop"), load_labelled(cache, conflicts="keep")
    assert dropped.conflicts == kept.conflicts == 1 and len(kept) == len(dropped) + 1
    assert "fish/dolphin.jpg" not in dropped.keys.tolist() and "fish/dolphin.jpg" in kept.keys.tolist()
    out = subprocess.run([*CLI, "train", "--cache", str(tmp_path / "c"), "--cv", "2", "--json"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["label_conflicts"] == {"images": 1, "policy": "drop"}
    shutil.rmtree(src / "mammal")  # the user fixes it: the conflict is gone on the next run
    again = run(src, tmp_path / "c", lite0_embedder)
    assert again["label_conflicts"] == 0 and FeatureCache(tmp_path / "c").info()["label_conflicts"] == 0


def test_a_per_run_limit_never_rewrites_stored_rows(tmp_path, lite0_embedder, lite0):
    """A later run with a lower --max-pixels (e.g. finetune's prefix pass) skips work; ok rows stay ok."""
    from featcache.extract.embedder import Embedder

    src = tmp_path / "src"
    _photos(src / "a", 3)
    big = real_photo(7).resize((3000, 2000))
    (src / "a" / "big.png").write_bytes(png_bytes(big))
    cache = tmp_path / "c"
    first = run(src, cache, lite0_embedder, max_pixels=10_000_000)
    assert first["failed"] == 0 and first["extracted"] == 4
    before = FeatureCache(cache).read()
    emb = Embedder(lite0, ["final", "stage3"], "cpu", "fp32")
    added = run(src, cache, emb, max_pixels=1_000_000)
    assert added["tap_rows_missing"] == {"not computed": 1}
    after = FeatureCache(cache).read(tap="final")
    assert sorted(after.keys.tolist()) == sorted(before.keys.tolist()), "an ok row was rewritten"
    np.testing.assert_array_equal(after.status, 0)
    stage3 = FeatureCache(cache).read(tap="stage3")
    assert sorted(stage3.keys.tolist()) == ["a/photo00.jpg", "a/photo01.jpg", "a/photo02.jpg"]


def test_read_only_cache_and_cache_under_a_file_exit_with_a_line(tmp_path, imagenet_dir, imagenet_cache):
    cache = tmp_path / "c"
    shutil.copytree(imagenet_cache, cache)  # what `featcache extract imagenet_dir --cache c` writes
    # read-only: a private mount namespace with the cache bind-mounted read-only (root ignores file modes)
    cmd = " ".join([f"mount --bind -o ro {cache} {cache} &&", "exec", *CLI, "extract", str(imagenet_dir),
                    "--cache", str(cache), "-q"])
    ro = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=600)
    assert ro.returncode == 6, ro.stderr
    assert ro.stderr.strip().count("\n") == 0 and "not writable" in ro.stderr and "Traceback" not in ro.stderr
    afile = tmp_path / "afile"
    afile.write_text("x")
    under = subprocess.run([*CLI, "extract", str(imagenet_dir), "--cache", str(afile / "c"), "--json"],
                           capture_output=True, text=True, timeout=300)
    assert under.returncode == 6 and json.loads(under.stdout)["error"] == "CacheError"
    assert "is a file, not a folder" in under.stderr and "Traceback" not in under.stderr


def test_read_file_refuses_what_it_must_not_read(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 5000)
    assert read_file(big, max_bytes=4096).error.startswith("too large: file is 5,000 bytes")
    r = read_file(big)
    assert r.error == "" and r.data == big.read_bytes() and len(r.sha256) == 64

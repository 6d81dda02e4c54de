"""``--engine ray`` on a real two-node Ray cluster started here: the local engine's guarantees, and faults.

The cluster (a head and a worker node, one CPU each, on loopback) is started once for the module;
each test's extraction connects to it with ``ray_address``, as ``featcache extract --ray-address`` does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from featcache.errors import UsageError
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.store.cache import FeatureCache

from .images import bad_files, jpeg_bytes, real_photo

CLI = [sys.executable, "-m", "featcache.cli"]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0")
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 200 * MB}
    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **node})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def run(source, cache, emb, **kw) -> dict:
    return Extraction(ExtractConfig(str(source), str(cache), progress=False, **kw), emb).run()


def _photos(root: Path, n: int, start: int = 0) -> None:
    """n distinct real JPEGs (the 20 ImageNet photos, mirrored and turned for more than 20)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        img = real_photo(i % 20).rotate(90 * (i // 20 % 4))
        (root / f"p{i:03d}.jpg").write_bytes(jpeg_bytes(img if i < 80 else img.transpose(0)))


def _by_sha(cache: Path):
    f = FeatureCache(cache).read(include_failed=True)
    order = np.argsort(f.sha256)
    return f.sha256[order], f.vectors[order], f.status[order], f.errors[order]


def _assert_same_rows(a: Path, b: Path) -> None:
    sa, va, ta, ea = _by_sha(a)
    sb, vb, tb, eb = _by_sha(b)
    assert sa.tolist() == sb.tolist() and len(set(sa.tolist())) == len(sa), "row sets differ or repeat"
    np.testing.assert_array_equal(ta, tb)
    assert ea.tolist() == eb.tolist()
    ok = ta == 0
    cos = (va[ok] * vb[ok]).sum(1) / np.linalg.norm(va[ok], axis=1) / np.linalg.norm(vb[ok], axis=1)
    assert cos.min() >= 0.99999, cos.min()


def test_ray_equals_local_on_real_photos_and_hostile_files(ray_cluster, imagenet_dir, tmp_path, lite0_embedder):
    src = tmp_path / "src"
    shutil.copytree(imagenet_dir, src / "photos")
    for name, data in bad_files().items():
        (src / name).write_bytes(data)
    shutil.copy(next((src / "photos").rglob("*.jpg")), src / "dup.jpg")
    os.mkfifo(src / "fifo.jpg")
    csv = tmp_path / "list.csv"
    csv.write_text("".join(f"{p}\n" for p in sorted(src.rglob("*"), key=str) if not p.is_dir()) + "/dev/zero\n")
    local = run(csv, tmp_path / "local", lite0_embedder)
    ray_ = run(csv, tmp_path / "ray", lite0_embedder, engine="ray", ray_address=ray_cluster.address)
    assert ray_["fingerprint"] == local["fingerprint"] and ray_["engine"] == "ray"
    for k in ("files", "unique_images", "duplicate_files", "extracted", "failed", "failure_reasons"):
        assert ray_[k] == local[k], k
    assert {f["key"]: f["error"] for f in ray_["failures"]} == {f["key"]: f["error"] for f in local["failures"]}
    assert local["failed"] == len(bad_files()) + 2  # the FIFO and /dev/zero are never opened
    _assert_same_rows(tmp_path / "local", tmp_path / "ray")
    assert {"hash", "decode", "model", "write", "ray_connect"} <= set(ray_["timings"])


def test_a_backbone_new_to_the_cache_is_built_by_the_actors_not_the_driver(ray_cluster, imagenet_dir, tmp_path,
                                                                          lite0_embedder):
    """No embedder given, an empty cache: the actors build Lite0 as a first local run would (auto
    runtime and precision), the driver loads no model and takes the fingerprint they report."""
    local = run(imagenet_dir, tmp_path / "local", lite0_embedder)
    ray_ = Extraction(ExtractConfig(str(imagenet_dir), str(tmp_path / "ray"), progress=False, engine="ray",
                                    ray_address=ray_cluster.address, batch_size=4)).run()
    assert ray_["fingerprint"] == local["fingerprint"] and ray_["extracted"] == local["extracted"] == 20
    assert ray_["model_loaded"] is False, "the driver built a model"
    _assert_same_rows(tmp_path / "local", tmp_path / "ray")


def test_a_precision_the_actors_cannot_run_fails_before_they_start(ray_cluster, imagenet_dir, tmp_path):
    cfg = ExtractConfig(str(imagenet_dir), str(tmp_path / "c"), progress=False, engine="ray",
                        ray_address=ray_cluster.address, precision="fp16")  # a CPU-only cluster
    before = set(_ray_actor_pids(ray_cluster))  # a finished job's actors may still be exiting
    with pytest.raises(UsageError, match=r"^--precision fp16 needs a CUDA device"):
        Extraction(cfg).run()
    assert set(_ray_actor_pids(ray_cluster)) <= before, "actors were started for a job that cannot run"


def test_ray_grown_collection_extracts_only_new_files(ray_cluster, tmp_path, lite0_embedder, local60):
    """A cache the local engine built, grown with the Ray engine: only the new files reach the model, and a
    re-run does no model work. One actor: what is checked here is which files reach the model, not how work
    spreads over the nodes (the equality test does that, and the killed driver's re-run filters known content
    on both nodes)."""
    src, cache = tmp_path / "src", tmp_path / "c"
    _photos(src, 60)
    shutil.copytree(local60, cache)
    _photos(src / "new", 5, start=60)
    kw = {"engine": "ray", "ray_address": ray_cluster.address, "actors": 1}
    grown = run(src, cache, lite0_embedder, **kw)
    assert grown["extracted"] == 5 and grown["already_cached"] == 60
    again = run(src, cache, lite0_embedder, **kw)
    assert again["extracted"] == 0 and again["timings"].get("model", 0) == 0, "a re-run must do no model work"
    assert len(FeatureCache(cache).read()) == 65


@pytest.fixture(scope="module")
def local60(tmp_path_factory, lite0_embedder) -> Path:
    """The local engine's cache of ``_photos(src, 60)``, the reference both kill tests compare by content and the
    grown collection starts from. Read-only (copied by the tests that write)."""
    root = tmp_path_factory.mktemp("local60")
    _photos(root / "src", 60)
    run(root / "src", root / "cache", lite0_embedder)
    return root / "cache"


def _ray_actor_pids(cluster) -> list[int]:
    """The embedding actors' processes on this cluster's nodes (workers are children of their node's raylet;
    another Ray cluster on the machine, e.g. another test run, is left alone)."""
    raylets = {node.all_processes["raylet"][0].process.pid for node in cluster.list_all_nodes()}
    out = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::MapWorker") and p.info["ppid"] in raylets:
            out.append(p.info["pid"])
    return out


def _ledger(cache: Path) -> int:
    try:
        return sum(f["rows"] for f in FeatureCache(cache).info()["fingerprints"])
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def test_killed_actor_loses_and_duplicates_nothing(ray_cluster, tmp_path, lite0_embedder, local60):
    src = tmp_path / "src"
    _photos(src, 60)
    cache = tmp_path / "ray"
    killed: list[int] = []
    earlier = set(_ray_actor_pids(ray_cluster))  # an actor of an earlier job that is still exiting is not this job's

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            pids = [p for p in _ray_actor_pids(ray_cluster) if p not in earlier]
            if pids and _ledger(cache) >= 8:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.2)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    summary = run(src, cache, lite0_embedder, engine="ray", ray_address=ray_cluster.address, batch_size=4,
                  commit_every=8)
    th.join()
    assert killed, "no actor was killed mid-job"
    assert summary["extracted"] == 60 and summary["failed"] == 0
    _assert_same_rows(local60, cache)


def test_killed_driver_then_the_same_command_stores_each_image_once(ray_cluster, tmp_path, local60):
    src = tmp_path / "src"
    _photos(src, 60)
    cache = tmp_path / "ray"
    cmd = [*CLI, "extract", str(src), "--cache", str(cache), "--engine", "ray", "--ray-address", ray_cluster.address,
           "--batch-size", "4", "--commit-every", "8", "-q", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _ledger(cache) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the driver finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _ledger(cache)
    assert 8 <= partial < 60
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    _assert_same_rows(local60, cache)


def test_engine_ray_without_ray_says_what_to_install(tmp_path, imagenet_dir):
    code = ("import sys; sys.modules['ray'] = None; from featcache.cli import main; "
            f"sys.exit(main(['extract', {str(imagenet_dir)!r}, '--cache', {str(tmp_path / 'c')!r}, '--engine', 'ray']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == "featcache: error: --engine ray needs Ray: pip install 'featcache[ray]' (or pip install 'ray[data]')"

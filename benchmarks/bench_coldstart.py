"""Cold start: what a user waits for when there is (almost) nothing to compute, in one run.

On the JPEGs of ``bench_extract.make_jpegs`` (1,000 by default), each a fresh ``python -m featcache.cli``
process, as a user runs it:

  first run   ``featcache extract SRC --cache C`` into an empty cache (model loaded, every image embedded)
  no-op       the same command again: nothing new, so no model and no torch (issue 13: <= 1.5 s for 1,000)
  backbones   ``featcache backbones`` (<= 1 s)
  predict     ``featcache predict --head H IMG`` of one image the cache holds, with a logreg head trained on
              the cache first (``featcache train``) (<= 2 s); ``--other-heads`` times the same with heads
              of other kinds (``predict_other_heads``: what kNN and MLP heads, which load scikit-learn, cost)

Each quick command is timed ``--repeat`` times (the median is the figure) and run once more under a probe
that lists which heavy modules (torch, torchvision, timm, openvino, sklearn) the process imported.

    python benchmarks/bench_coldstart.py [--images 1000] [--repeat 5] [--other-heads linear-svm knn mlp]
                                         [--out benchmarks/results/coldstart.json]

``auto`` runtime/precision is whatever this machine recorded (``featcache backbones --check``), as for a user;
FEATCACHE_RUNTIME / FEATCACHE_PRECISION pin it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_extract import make_jpegs
from record import RESULTS, save

from featcache.extract.runtimes import cpu_flags, cpu_model
from featcache.runtime import available_cpus

REPO = Path(__file__).resolve().parent.parent
WATCH = ("torch", "torchvision", "timm", "openvino", "sklearn")
PROBE = ("import atexit, runpy, sys\n"
         f"atexit.register(lambda: print('IMPORTED', [m for m in {WATCH!r} if m in sys.modules], file=sys.stderr))\n"
         "sys.argv = ['featcache', *sys.argv[1:]]\n"
         "runpy.run_module('featcache.cli', run_name='__main__')\n")


def child_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def featcache(*args: str, probe: bool = False) -> tuple[float, dict | None, list[str] | None]:
    """(wall seconds, the --json result, the watched modules imported when ``probe``) of one CLI process."""
    cmd = [sys.executable, "-c", PROBE, *args] if probe else [sys.executable, "-m", "featcache.cli", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"featcache {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    # the JSON document starts at a line of its own: a library may have printed notes before it (first run)
    result = json.loads(done.stdout[re.search(r"^\{$", done.stdout, re.M).start():]) if "--json" in args else None
    imported = None
    if probe:
        line = next(ln for ln in done.stderr.splitlines() if ln.startswith("IMPORTED"))
        imported = json.loads(line.split(" ", 1)[1].replace("'", '"'))
    return wall, result, imported


def timed(args: list[str], repeat: int) -> dict:
    """Median and every wall time of ``repeat`` runs, the last run's result and what a probe run imported."""
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        cpu = child_cpu()
        wall, result, _ = featcache(*args)
        walls.append(round(wall, 3))
        cpus.append(round(child_cpu() - cpu, 3))  # user + system: what a shared machine's load does not inflate
    _, _, imported = featcache(*args, probe=True)
    return {"wall_s": round(statistics.median(walls), 3), "walls_s": walls, "cpu_s": round(statistics.median(cpus), 3),
            "imports": imported, "result": result}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5, help="runs of each quick command (the median is reported)")
    p.add_argument("--other-heads", nargs="*", default=[], metavar="KIND",
                   help="also time predict with heads of these kinds (logreg is always timed)")
    p.add_argument("--out", type=Path, default=RESULTS / "coldstart.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="coldstart-") as tmp:
        src, cache, head = Path(tmp) / "src", Path(tmp) / "cache", Path(tmp) / "head"
        paths = make_jpegs(src, a.images)
        extract = ["extract", str(src), "--cache", str(cache), "--json", "-q"]
        first_wall, first, _ = featcache(*extract)
        print(f"first run   {first_wall:7.2f} s  ({first['extracted']} images, {first['precision']}, "
              f"{first['images_per_second']} img/s)", flush=True)
        noop = timed(extract, a.repeat)
        r = noop.pop("result")
        if r["extracted"] or r.get("model_loaded"):
            raise SystemExit(f"the re-run was not a no-op: {r['extracted']} extracted, model loaded {r.get('model_loaded')}")
        noop["already_cached"] = r["already_cached"]
        print(f"no-op       {noop['wall_s']:7.2f} s  ({pct(noop['wall_s'] / first_wall)} of the first run; "
              f"imports {noop['imports']})", flush=True)
        backbones = timed(["backbones", "--json"], a.repeat)
        backbones.pop("result")
        print(f"backbones   {backbones['wall_s']:7.2f} s  (imports {backbones['imports']})", flush=True)
        train_wall, predict = predict_cached(cache, head, paths[0], "logreg", a.repeat)
        others = {kind: predict_cached(cache, Path(tmp) / f"head-{kind}", paths[0], kind, a.repeat)[1]
                  for kind in a.other_heads}
    doc = {
        "images": a.images, "repeat": a.repeat,
        "command": f"python benchmarks/bench_coldstart.py --images {a.images} --repeat {a.repeat}"
                   + (f" --other-heads {' '.join(a.other_heads)}" if a.other_heads else ""),
        "first_run": {"wall_s": round(first_wall, 3), "extracted": first["extracted"], "precision": first["precision"],
                      "device": first["device"], "images_per_second": first["images_per_second"]},
        "noop": noop, "noop_fraction_of_first": round(noop["wall_s"] / first_wall, 4),
        "backbones": backbones, "train_wall_s": round(train_wall, 3), "predict_cached": predict,
        **({"predict_other_heads": others} if others else {}),
        "machine": {"cpu": cpu_model(), "flags": cpu_flags(), "cpus": available_cpus(),
                    "python": platform.python_version()},
    }
    print(f"saved {save(doc, a.out)}")
    return 0


def predict_cached(cache: Path, head: Path, image: Path, kind: str, repeat: int) -> tuple[float, dict]:
    """(seconds to train a ``kind`` head on ``cache``, the timed ``featcache predict`` of ``image``, which it holds)."""
    train_wall, _, _ = featcache("train", "--cache", str(cache), "--head", kind, "--out", str(head), "--json")
    predict = timed(["predict", "--head", str(head), "--cache", str(cache), str(image), "--json"], repeat)
    sources = [x.get("source") for x in predict.pop("result")["results"]]
    if sources != ["cache"]:
        raise SystemExit(f"predict did not read the cached vector: {sources}")
    print(f"predict     {predict['wall_s']:7.2f} s  (one cached image, {kind} head; imports {predict['imports']})",
          flush=True)
    return train_wall, predict


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


if __name__ == "__main__":
    sys.exit(main())

"""Result files: every benchmark writes its figures through ``save``; ``render.py`` turns them into BENCHMARKS.md.

Results are committed, so they hold no absolute paths: a path inside the repository is written
relative to it, one under a known root as that root's name (``$DATA``: the benchmark data,
FEATCACHE_BENCH_DATA or /work/data; ``$FASHION_MNIST``, ``$TUXPAINT``: the system datasets;
``$TMP``; ``~``), and any other as ``.../`` and its last component. Paths inside text (a
recorded command line) are rewritten the same way. CI writes to ``CI_RESULTS``, which git ignores.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from featcache.datasets import FASHION_DIR, TUXPAINT_DIR

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CI_RESULTS = RESULTS / "ci"
ABSOLUTE = re.compile(r"(?:(?<![\w.:/~$-])|(?<==))/[^\s'\"`,;:()\[\]{}]+")  # "/x", " /x", "--out=/x", not "a/x"


def _roots(repos: tuple[str, ...]) -> list[tuple[str, str]]:
    roots = [(str(REPO), ""), *((r, "") for r in repos),
             (os.environ.get("FEATCACHE_BENCH_DATA", "/work/data"), "$DATA"),
             (str(FASHION_DIR), "$FASHION_MNIST"), (str(TUXPAINT_DIR), "$TUXPAINT"),
             (tempfile.gettempdir(), "$TMP"), (str(Path.home()), "~")]
    return sorted(((os.path.normpath(p), n) for p, n in roots), key=lambda r: -len(r[0]))


def portable_path(path: str, repos: tuple[str, ...] = ()) -> str:
    """One absolute path as a committed result may hold it (see the module docstring)."""
    norm = os.path.normpath(path)
    for root, name in _roots(repos):
        if norm == root or norm.startswith(root.rstrip("/") + "/"):
            rest = norm[len(root):].lstrip("/")
            return "/".join(x for x in (name, rest) if x) or "."
    return ".../" + os.path.basename(norm)


def portable(value, repos: tuple[str, ...] = ()):
    """``value`` (JSON-like) with every absolute path in its strings made portable. ``repos``: other
    checkouts of this repository whose paths count as inside it (results made there)."""
    if isinstance(value, str):
        return ABSOLUTE.sub(lambda m: portable_path(m.group(0), repos), value)
    if isinstance(value, dict):
        return {k: portable(v, repos) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v, repos) for v in value]
    return value


def save(doc, path: str | os.PathLike, default=float) -> Path:
    """Write ``doc`` as portable JSON to ``path`` (folders made as needed); ``default`` as for json.dumps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(portable(json.loads(json.dumps(doc, default=default))), indent=2) + "\n")
    return path


def rewrite(path: str | os.PathLike) -> Path:
    """Make a JSON file that another writer produced (a training report) portable in place."""
    return save(json.loads(Path(path).read_text()), path)

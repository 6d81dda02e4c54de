"""Benchmarks regenerate: BENCHMARKS.md is what the result files render to, verdicts follow the figures,
committed results hold no absolute paths, and CI's outputs land where git ignores them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402
import render  # noqa: E402
import targets  # noqa: E402


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_benchmarks_md_is_rendered_from_the_results():
    assert (REPO / "BENCHMARKS.md").read_text() == render.render(), "run: python benchmarks/render.py"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_committed_results_hold_no_absolute_paths():
    files = sorted(record.RESULTS.glob("*.json"))
    assert len(files) > 10
    for f in files:
        found = [m.group(0) for s in _strings(json.loads(f.read_text())) for m in record.ABSOLUTE.finditer(s)]
        assert not found, f"{f.name}: {found[:3]}"
    for report in record.RESULTS.glob("*.html"):  # HTML reports are written beside their JSON, never committed
        assert subprocess.run(["git", "check-ignore", "-q", str(report)], cwd=REPO).returncode == 0, report.name


@pytest.mark.parametrize("text, portable", [
    ("python benchmarks/x.py --cache /work/data/fmnist-cache --out=/tmp/o", "python benchmarks/x.py --cache $DATA/fmnist-cache --out=$TMP/o"),
    (str(REPO / "benchmarks" / "results" / "r.html"), "benchmarks/results/r.html"),
    ("/usr/share/tuxpaint/stamps/animals/birds/owl.png", "$TUXPAINT/animals/birds/owl.png"),
    ("/opt/elsewhere/model.pth", ".../model.pth"),
    ("1/(1/M+1/D), p50 / p90, img/s, http://127.0.0.1:8000/v1/search, bench-data/x", None),
])
def test_paths_are_made_portable_and_nothing_else_changes(text, portable, monkeypatch):
    monkeypatch.setenv("FEATCACHE_BENCH_DATA", "/work/data")
    monkeypatch.setattr(record.tempfile, "gettempdir", lambda: "/tmp")
    assert record.portable({"a": [text]}) == {"a": [portable or text]}


def _render_with(tmp_path: Path, name: str, change) -> str:
    folder = tmp_path / "results"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(record.RESULTS, folder, ignore=shutil.ignore_patterns("ci", "*.html"))
    doc = json.loads((folder / f"{name}.json").read_text())
    change(doc)
    (folder / f"{name}.json").write_text(json.dumps(doc))
    return render.render(folder)


def test_verdicts_are_computed_from_the_targets(tmp_path):
    """Move one figure across its target and the verdict, and only that one, changes."""
    before = render.render()
    assert "search-by-key through the service p50 ≤ 5 ms: **met**" in before

    def slow_service(doc):
        doc["service"]["client_ms"]["p50"] = targets.SERVICE_SEARCH_P50_MS + 0.1

    after = _render_with(tmp_path, "search", slow_service)
    assert "search-by-key through the service p50 ≤ 5 ms: **NOT met**" in after
    assert after.count("**NOT met**") == before.count("**NOT met**") + 1

    def batching_pays(doc):
        doc["ratio_on_off_by_workers"]["1"] = targets.BATCHING_RATIO

    assert f"(target ≥ {targets.BATCHING_RATIO:g}x: **met**)" in _render_with(tmp_path, "service_load", batching_pays)

    def fast_lite0(doc):
        doc["results"][0]["speedup_vs_tutorial"] = targets.EXTRACT_SPEEDUP["efficientnet_lite0"]

    assert "efficientnet_lite0 3.50x against 3.5x **met**" in _render_with(tmp_path, "extract-cpu", fast_lite0)


def test_a_missing_result_leaves_its_section_out(tmp_path):
    def drop_tux(doc):
        del doc["tuxpaint"]

    text = _render_with(tmp_path, "accuracy_heads", drop_tux)
    assert "## Heads (issue 3)" in text and "Tux Paint, 7 classes" not in text
    (tmp_path / "results" / "search.json").unlink()
    assert "## Search and service" not in render.render(tmp_path / "results")


def test_ci_writes_where_git_ignores_it():
    for path in (record.CI_RESULTS / "accuracy_heads_reduced.json", record.RESULTS / "fmnist_report.html"):
        rel = path.relative_to(REPO)
        assert subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=REPO).returncode == 0, rel
    assert subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/search.json"], cwd=REPO).returncode == 1
    ci = (REPO / ".ci" / "run").read_text()
    assert "benchmarks/accuracy_heads.py --reduced --out benchmarks/results/ci" in ci

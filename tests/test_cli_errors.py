"""Output paths that cannot be written: the CLI, run as a subprocess, prints one line and a documented
exit code (8 for the file system, 3 for a missing file), never a traceback, and writes nothing.

Tests run as root here, and permission bits do not stop root: the read-only directory is made
immutable (``chattr +i``) as root, or mode 0555 for another user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "featcache.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def assert_one_line_error(run: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert run.returncode == code, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("featcache: error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file, where commands will be asked to make a directory."""
    path = tmp_path / "a-file"
    path.write_text("not a directory\n")
    return path


@pytest.fixture
def read_only(tmp_path):
    """A directory nobody can create files in, root included."""
    path = tmp_path / "read-only"
    path.mkdir()
    root = os.geteuid() == 0
    if root:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    else:
        path.chmod(0o555)
    try:
        (path / "probe").touch()
    except OSError:
        pass
    else:
        (path / "probe").unlink()
        pytest.skip("cannot make a read-only directory here (root, and chattr +i is not supported on this file system)")
    yield path
    if root:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o755)


def test_index_out_under_a_file_or_read_only(imagenet_cache, blocker, read_only, tmp_path):
    run = run_cli("index", "--cache", str(imagenet_cache), "--out", str(blocker / "idx"), cwd=tmp_path)
    assert_one_line_error(run, 8, "Not a directory", str(blocker / "idx"))
    run = run_cli("index", "--cache", str(imagenet_cache), "--out", str(read_only / "idx"), cwd=tmp_path)
    assert_one_line_error(run, 8, str(read_only / "idx"))
    run = run_cli("index", "--cache", str(imagenet_cache), "--out", str(read_only), "--json", cwd=tmp_path)
    assert_one_line_error(run, 8, "directory is not writable")
    assert json.loads(run.stdout) == {"error": "PermissionError", "message": f"directory is not writable: {read_only}"}
    assert not list(read_only.iterdir())


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_export_out_under_a_file_or_read_only(imagenet_cache, blocker, read_only, tmp_path, fmt):
    name = "x" if fmt == "npy" else "x.parquet"
    run = run_cli("export", "--cache", str(imagenet_cache), "--format", fmt, "--out", str(blocker / name), cwd=tmp_path)
    assert_one_line_error(run, 8, str(blocker))
    run = run_cli("export", "--cache", str(imagenet_cache), "--format", fmt, "--out", str(read_only / name),
                  "--json", cwd=tmp_path)
    line = assert_one_line_error(run, 8, str(read_only))
    assert json.loads(run.stdout)["message"] == line.removeprefix("featcache: error: ")
    assert not list(read_only.iterdir())


def test_train_out_and_report_under_a_file(imagenet_cache, blocker, tmp_path):
    """The last resort in ``main``: an OSError from any command is one line and exit code 8."""
    run = run_cli("train", "--cache", str(imagenet_cache), "--out", str(blocker / "head"), cwd=tmp_path)
    assert_one_line_error(run, 8, "Not a directory", str(blocker / "head"))
    run = run_cli("train", "--cache", str(imagenet_cache), "--report", str(blocker / "report.html"), cwd=tmp_path)
    assert_one_line_error(run, 8, "Not a directory", str(blocker))


def test_missing_input_file_is_not_found(imagenet_cache, tmp_path):
    run = run_cli("serve", "--cache", str(imagenet_cache), "--api-key-file", str(tmp_path / "no-key.txt"), "--json",
                  cwd=tmp_path)
    assert_one_line_error(run, 3, "No such file or directory", str(tmp_path / "no-key.txt"))
    assert json.loads(run.stdout)["error"] == "FileNotFoundError"

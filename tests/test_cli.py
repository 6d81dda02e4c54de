"""The command line as a user meets it: help with defaults, --version, one spelling per concept (old ones
still accepted), exit codes where nothing useful happened, no torch for the quick commands, and what
the progress output looks like in a log and on a terminal.

Exit codes are checked on real subprocesses of ``python -m featcache.cli``; only the extract test loads
a model in one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from featcache.classify.train import TrainConfig, train
from featcache.cli import ORDER, build_parser, main, version
from featcache.datasets import imagenet20
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.progress import Progress, loading, show_status

from .test_cli_errors import ROOT, assert_one_line_error, run_cli

HEAVY = ("torch", "torchvision", "timm", "sklearn", "faiss", "fastapi")


def subparsers(parser) -> dict:
    return next(a for a in parser._actions if a.dest == "command").choices


@pytest.fixture(scope="module")
def three_class_cache(tmp_path_factory, lite0_embedder) -> Path:
    """The 20 ImageNet photos under 3 labels (class index mod 3): enough classes for `train` to evaluate."""
    root = tmp_path_factory.mktemp("three")
    for path, label in imagenet20():
        (root / "photos" / str(label % 3)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "photos" / str(label % 3) / path.name)
    Extraction(ExtractConfig(str(root / "photos"), str(root / "cache"), progress=False), lite0_embedder).run()
    return root / "cache"


@pytest.fixture(scope="module")
def head_dir(three_class_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("head") / "head"
    train(TrainConfig(str(three_class_cache), str(out)))
    return out


# -- help and version ----------------------------------------------------------------------------
def test_version_prints_the_package_version(tmp_path):
    run = run_cli("--version", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"featcache {version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version())


def test_top_level_help_is_for_users(tmp_path):
    run = run_cli("--help", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "Zarr" in out and "example:" in out and "featcache extract photos/" in out
    assert ":param" not in out and "argparse" not in out
    listed = [m.group(1) for m in re.finditer(r"^    (\w+)\s", out, re.M)]
    assert listed == list(ORDER), listed  # a typical session first: extract, info, train, predict, ...
    assert set(listed) == set(subparsers(build_parser()))
    bare = run_cli(cwd=tmp_path)  # `featcache` alone: the same help, as a usage error
    assert bare.returncode == 2 and bare.stderr == out and bare.stdout == ""


def test_every_subcommand_says_what_it_does_and_shows_defaults_never_none():
    for name, sp in subparsers(build_parser()).items():
        text = sp.format_help()
        assert sp.description and len(sp.description) > 20, name
        assert "(default: None)" not in text and "(default: False)" not in text, (name, text)
        assert not [a.option_strings for a in sp._actions if a.option_strings and not a.help], name
    extract = subparsers(build_parser())["extract"].format_help()
    for default in ("featcache-cache", "efficientnet_lite0", "final", "64000000", "512", "folder"):
        assert f"(default: {default})" in " ".join(extract.split()), default
    assert "(default: 10)" in subparsers(build_parser())["search"].format_help()
    assert "(default: 3)" in subparsers(build_parser())["predict"].format_help()


# -- one spelling per concept ----------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["extract", "photos", "--taps", "final", "stage3"], {"taps": ["final", "stage3"]}),
    (["extract", "photos", "--tap", "stage3"], {"taps": ["stage3"]}),  # old spelling, hidden
    (["export", "--format", "npy", "--out", "x", "--tap", "final"], {"taps": ["final"]}),
    (["train", "--taps", "final", "stage4", "--head-type", "knn", "logreg"],
     {"taps": ["final", "stage4"], "head_types": ["knn", "logreg"]}),
    (["train", "--tap", "stage4", "--head", "knn"], {"taps": ["stage4"], "head_types": ["knn"]}),  # old spellings
    (["train"], {"taps": ["final"], "head_types": ["logreg"], "out": None}),
    (["search", "--index", "i", "--key", "k", "-k", "4"], {"top": 4}),
    (["search", "--index", "i", "--key", "k", "--top", "4"], {"top": 4}),
    (["predict", "--head", "h", "a.jpg", "-k", "2"], {"top": 2, "head": "h"}),
    (["predict", "--head", "h", "a.jpg", "--top", "2"], {"top": 2}),
    (["backbones", "--backbone", "a", "b", "--backbone", "c"], {"backbone": ["a", "b", "c"]}),
    (["info", "-q", "-v", "--json"], {"quiet": True, "verbose": True, "json": True}),
    (["-v", "info"], {"verbose": True, "quiet": False}),
])
def test_spellings_and_aliases_are_accepted(argv, expected):
    args = vars(build_parser().parse_args(argv))
    assert {k: args[k] for k in expected} == expected


SEVERAL_FPS = ("train", "advise")  # --fingerprint there: several backbones (an ensemble; the ones compared)


def test_quick_options_are_the_same_everywhere():
    """--json, --quiet, --verbose on every command; one default for --cache; --fingerprint, --device one help each;
    -k/--top on both commands that count results."""
    helps: dict[str, set] = {}
    for name, sp in subparsers(build_parser()).items():
        strings = {s for a in sp._actions for s in a.option_strings}
        assert {"--json", "-q", "--quiet", "-v", "--verbose"} <= strings, name
        for a in sp._actions:
            if a.dest in ("fingerprint", "device", "top") and not (a.dest == "fingerprint" and name in SEVERAL_FPS):
                helps.setdefault(a.dest, set()).add((tuple(a.option_strings), a.help))
            if a.dest == "cache" and name != "predict":  # predict's default: the cache named in the head
                helps.setdefault(a.dest, set()).add((tuple(a.option_strings), a.default))
    assert {d: len(h) for d, h in helps.items()} == {"cache": 1, "fingerprint": 1, "device": 1, "top": 2}
    assert {opts for opts, _ in helps["top"]} == {("-k", "--top")}


def test_serve_refuses_two_heads_of_one_name_before_loading(tmp_path):
    run = run_cli("serve", "--cache", str(tmp_path), "--head", "a/head", "--head", "b/head/", cwd=tmp_path)
    assert_one_line_error(run, 2, "two heads are named 'head'")


# -- exits where nothing useful happened -------------------------------------------------------------
def test_extract_of_a_folder_without_images_exits_3_and_writes_nothing(tmp_path):
    (tmp_path / "src" / "docs").mkdir(parents=True)
    (tmp_path / "src" / "notes.txt").write_text("no photos here\n")
    (tmp_path / "src" / "docs" / "scan.pdf").write_bytes(b"%PDF-1.4\n")
    (tmp_path / "src" / ".hidden.jpg").write_bytes(b"")
    run = run_cli("extract", str(tmp_path / "src"), "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    line = assert_one_line_error(run, 3, f"no image files in {tmp_path / 'src'}", ".jpg", ".png",
                                 "skipped 2 file(s) with other suffixes", "hidden entries skipped")
    assert run.stderr.strip() == line  # no loading line: nothing was loaded
    assert not (tmp_path / "cache").exists()
    (tmp_path / "list.csv").write_text("path,label\n")
    run = run_cli("extract", str(tmp_path / "list.csv"), "--json", cwd=tmp_path)
    assert_one_line_error(run, 3, "lists no images")
    assert json.loads(run.stdout)["error"] == "NotFoundError"


def test_predict_where_every_image_failed_exits_7_and_still_prints_each_error(head_dir, tmp_path):
    (tmp_path / "a-folder.jpg").mkdir()
    images = [str(tmp_path / "missing.jpg"), str(tmp_path / "a-folder.jpg")]
    run = run_cli("predict", "--head", str(head_dir), *images, cwd=tmp_path)
    assert_one_line_error(run, 7, "no image could be predicted: all 2 failed")
    assert f"{images[0]}: ERROR unreadable file" in run.stdout and f"{images[1]}: ERROR" in run.stdout
    run = run_cli("predict", "--head", str(head_dir), *images, "--json", cwd=tmp_path)
    assert_one_line_error(run, 7)
    result = json.loads(run.stdout)  # one JSON document: the results, each with its error
    assert result["predicted"] == 0 and [bool(r.get("error")) for r in result["results"]] == [True, True]


def test_predict_with_one_image_predicted_exits_0(head_dir, tmp_path):
    photo = str(imagenet20()[0][0])  # cached: its vector comes from the cache, no model loads
    run = run_cli("predict", "--head", str(head_dir), photo, str(tmp_path / "missing.jpg"), "-k", "2", "--json",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["predicted"] == 1 and result["results"][0]["source"] == "cache"
    assert len(result["results"][0]["top"]) == 2


def test_train_without_out_reports_and_says_nothing_was_saved(three_class_cache, tmp_path):
    run = run_cli("train", "--cache", str(three_class_cache), "--head-type", "knn", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "accuracy" in run.stdout and "saved" not in run.stdout
    notes = [ln for ln in run.stderr.splitlines() if ln.startswith("featcache: note: ")]
    assert len(notes) == 1 and "not saved" in notes[0] and "--out DIR" in notes[0], run.stderr
    assert list(tmp_path.iterdir()) == []


# -- cold start: the quick commands import no torch ---------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["backbones"], ["backbones", "--json"], ["info"], ["extract", "--help"]])
def test_quick_commands_import_no_torch(argv, imagenet_cache, tmp_path):
    if argv == ["info"]:
        argv += ["--cache", str(imagenet_cache)]
    code = (f"import sys\nfrom featcache.cli import main\ntry:\n    rc = main({argv!r})\nexcept SystemExit as e:\n"
            f"    rc = e.code\nprint('RESULT', rc, sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    result = run.stderr.strip().splitlines()[-1]
    assert result in ("RESULT 0 []", "RESULT None []"), (argv, run.stderr[-2000:])


# -- progress ---------------------------------------------------------------------------------------
def test_progress_in_a_log_is_plain_periodic_lines(capsys):
    p = Progress(40, "extract lite0", enabled=True, every=0.0)
    for _ in range(4):
        p.update(10)
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("extract lite0: 0/40 (0%)")
    assert lines[-1].startswith("extract lite0: 40/40 (100%)")
    assert len(lines) == 5  # the start, 3 periodic (every=0), the end; no carriage returns in a log
    assert all(re.search(r"\d+\.\d img/s  elapsed \d+:\d\d  ETA (\d+:\d\d|\?)$", ln) for ln in lines), lines
    Progress(40, "quiet", enabled=False).close()
    with loading("a model"):  # library calls are silent unless the CLI turned status lines on
        pass
    show_status(True)
    try:
        with loading("a model"):
            pass
    finally:
        show_status(False)
    assert re.fullmatch(r"loading a model \.\.\. \d+\.\ds\n", capsys.readouterr().err)


def test_progress_on_a_terminal_is_a_live_loading_line_then_a_tqdm_bar(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    code = ("import time\nfrom featcache.progress import Progress, loading\n"
            "try:\n    with loading('broken', True):\n        raise OSError\nexcept OSError:\n    pass\n"
            "with loading('lite0', True):\n    time.sleep(0.2)\n"
            "p = Progress(10, 'extract x')\ntime.sleep(1.5)\n"
            "for _ in range(10):\n    p.update(1)\n    time.sleep(0.02)\np.close()\n")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, out
    assert out.decode().startswith("loading broken ...\r\x1b[Kloading lite0 ... 0.2s\r\n")  # a failed load is wiped
    frames = out.decode().split("\r")
    assert any(re.search(r"extract x:\s+0%\|.*\| 0/10 \[00:01<\?", f) for f in frames), frames  # time moves at 0
    assert re.search(r"extract x: 100%\|█+\| 10/10 \[00:0\d<00:00, +\d+\.\d+img/s\]", out.decode()), frames[-3:]


def test_extract_in_a_log_shows_the_model_loading_then_progress(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path, _ in imagenet20()[:3]:
        shutil.copy(path, photos / path.name)
    run = run_cli("extract", str(photos), "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    assert re.fullmatch(r"loading efficientnet_lite0 \.\.\. \d+\.\ds", lines[0]), lines
    assert lines[1].startswith("extract efficientnet_lite0: 0/3 (0%)"), lines
    assert lines[-1].startswith("extract efficientnet_lite0: 3/3 (100%)"), lines
    assert "3 extracted now" in run.stdout


def test_quiet_and_json_show_no_progress(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(imagenet20()[0][0], photos / "a.jpg")
    assert main(["extract", str(photos), "--cache", str(tmp_path / "cache"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["extract", str(photos), "--cache", str(tmp_path / "cache"), "--json"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and json.loads(out.out)["already_cached"] == 1

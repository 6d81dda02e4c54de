"""``featcache advise`` on real caches: measured candidates, intervals, the budget, reproducible commands."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from featcache.classify import advise as advise_module
from featcache.classify import finetune_probe
from featcache.classify.advise import BASELINE, FIRST_FT_SHARE, FT_SHARE, Candidate, _recommend, _row, prepare
from featcache.classify.finetune_probe import MIN_EPOCHS, TEST_MIN, Cut, measure_in_full, measure_within_budget, plan
from featcache.classify.measure import Outcome, SharedSplit, paired_difference, wilson
from featcache.cli import main
from featcache.extract.pipeline import ExtractConfig, Extraction


def _run_command(command: str, out: Path, capsys) -> dict:
    """Run a ``featcache train`` command advise printed (its --out pointed at ``out``) and return its JSON."""
    argv = shlex.split(command)
    assert argv[:2] == ["featcache", "train"]
    argv[argv.index("--out") + 1] = str(out)
    assert main([*argv[1:], "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _check_row(row: dict) -> None:
    lo, hi = row["interval"]
    assert 0 <= lo <= row["accuracy"] <= hi <= 1
    dlo, dhi = row["vs_frozen"]["interval"]
    assert dlo <= row["vs_frozen"]["difference"] <= dhi
    assert row["clearly_better"] == (dlo > 0)


def test_advise_json_measures_every_candidate_and_its_command_reproduces_the_figure(tux_cache, tmp_path, capsys):
    assert main(["advise", "--cache", str(tux_cache), "--json", "--budget", "900", "--no-finetune"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["data"]["labelled"] == 240 and r["evaluation"]["mode"] == "cv" and r["evaluation"]["test_rows"] == 240
    names = [c["name"] for c in r["candidates"]]
    assert names == [BASELINE, "mlp@final"]  # the fixture caches the final tap of one backbone only
    for row in r["candidates"]:
        assert row["status"] == "measured" and row["test_rows"] == 240
        _check_row(row)
    rec = r["recommendation"]
    chosen = next(c for c in r["candidates"] if c["name"] == rec["name"])
    assert rec["name"] == BASELINE or (chosen["clearly_better"] and not chosen["measured_worse"])
    assert chosen["vs_frozen"]["difference"] >= 0  # never a strategy that measured worse than the frozen head
    assert rec["accuracy"] > 0.75 and r["why"]
    trained = _run_command(rec["command"], tmp_path / "head", capsys)
    assert trained["metrics"]["accuracy"] == pytest.approx(rec["accuracy"], abs=1e-12)
    points = r["learning_curve"]["points"]
    assert [p["fraction"] for p in points] == [0.125, 0.25, 0.5, 1.0]
    assert points[-1]["accuracy"] == r["baseline"]["accuracy"]
    assert [p["train_rows"] for p in points] == sorted(p["train_rows"] for p in points)
    sim = r["imagenet_similarity"]
    assert len(sim["per_backbone"]) == 1 and sim["top1_agreement"] is None and "per backbone" in sim["note"]
    assert 0 < sim["per_backbone"][0]["normalised_entropy"] < 1


def test_budget_skips_what_does_not_fit_and_says_why(tux_cache, capsys):
    assert main(["advise", "--cache", str(tux_cache), "--budget", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    skipped = {line.split()[0] for line in lines if "skipped: needs about" in line}
    assert skipped == {"mlp@final", "finetune@last-block", "new-top@last-stage"}  # everything after the baseline
    assert any(line.startswith("recommendation: logistic head on frozen final features") for line in lines)
    assert any(line.startswith("command: featcache train --cache") for line in lines)
    assert "skipped: finetune@last-block, new-top@last-stage, mlp@final" in lines[-1]  # the MLP waited for them
    assert main(["advise", "--cache", str(tux_cache), "--budget", "0"]) == 2


def _per_class_split(tux_cache, n_train: int):
    """advise's context on the tux cache with a small split: ``n_train`` training images and 1 test image per class."""
    ctx, _, _ = prepare(str(tux_cache), budget=600)
    y = ctx.base.y
    rng = np.random.default_rng(0)
    picks = [rng.permutation(np.flatnonzero(y == c))[: n_train + 1] for c in np.unique(y)]
    train = np.sort(np.concatenate([p[:n_train] for p in picks]))
    test = np.sort(np.concatenate([p[n_train:] for p in picks]))
    ctx.split = SharedSplit([(train, test)], "test-split", "")
    return ctx


def test_short_finetune_within_budget_equals_the_full_run_when_everything_fits(tux_cache, monkeypatch):
    """On a small split both paths train on the same rows: the same figure, per row."""
    monkeypatch.setattr("featcache.classify.finetune.available_cpus", lambda: 1)  # the same threads: the same sums
    ctx = _per_class_split(tux_cache, 3)
    cut = Cut(new_top=False, epochs=2)
    quick = measure_within_budget(ctx, cut)
    full = measure_in_full(ctx, cut)
    assert quick.train_rows == full.train_rows == 21 and len(quick.rows) == 7
    assert np.array_equal(quick.rows, full.rows) and np.array_equal(quick.correct, full.correct)
    assert quick.details["unfreeze_from"] == "block16" and quick.details["cut"] == "raw:block15"
    assert quick.details["prefix_source"] == "images" and "--unfreeze-from block16 --epochs 2" in quick.details["command"]
    assert "subset" not in quick.details  # every row fitted: nothing to qualify
    m = quick.details["measured_with"]
    assert (m["epochs"], m["full_epochs"], m["train_images"], m["test_images"]) == (2, 2, 21, 7)
    assert not m["batchnorm_recalibrated"]  # the full run: featcache finetune's own loop, unchanged


def test_a_finetune_short_of_time_is_sized_down_not_skipped_and_says_what_it_ran(tux_cache, monkeypatch):
    """Fewer epochs and images than the command: reported with the figure, compared on equal data."""
    ctx = _per_class_split(tux_cache, 4)
    seen = {}

    def small(left, per_prefix, per_step, per_test, n_tr, n_te, floor, epochs):
        seen.update(left=left, n_tr=n_tr, epochs=epochs)
        return 14, n_te, 1  # 2 of the 4 training images per class, 1 epoch of 2
    monkeypatch.setattr(finetune_probe, "plan", small)
    out = measure_within_budget(ctx, Cut(new_top=False, epochs=2))
    assert seen["n_tr"] == 28 and seen["epochs"] == 2 and 0 < seen["left"] < 600
    m = out.details["measured_with"]
    assert (m["epochs"], m["full_epochs"], m["train_images"], m["of_train_images"]) == (1, 2, 14, 28)
    assert m["batchnorm_recalibrated"] and out.train_rows == 14 and len(out.rows) == 7
    assert out.frozen is not None and len(out.frozen) == 7  # the frozen head trained on the same 14 images
    assert "--epochs 2" in out.details["command"]  # the command is the full fine-tune, not the short one
    assert "trained 1 epoch at most (the command: 2) on 14 of 28 training images" in out.details["subset"]


def test_plan_gives_up_epochs_then_training_images_then_test_images():
    # 1s per epoch and training image, no prefix or test cost (1.1x: the validation passes)
    assert plan(1000, 0.0, 1.0, 0.0, 500, 400, 100, 10) == (303, 400, MIN_EPOCHS)  # images first, fewest epochs
    assert plan(1000, 0.0, 1.0, 0.0, 120, 400, 100, 10) == (120, 400, 7)  # all images fit: then the most epochs
    assert plan(1000, 0.0, 1.0, 0.0, 50, 400, 50, 10) == (50, 400, 10)  # all of a small fold at full length
    assert plan(340, 0.0, 1.0, 0.0, 500, 400, 100, 10) == (103, 400, MIN_EPOCHS)
    assert plan(300, 0.0, 1.0, 0.0, 500, 400, 100, 10) is None  # 100 images x 3 epochs x 1.1 do not fit
    # test images cost time too: about 30 % of it, at least TEST_MIN; the fewest when only that fits
    assert plan(500, 0.0, 1.0, 1.0, 500, 400, 100, 10) == (106, 150, MIN_EPOCHS)
    assert plan(400, 0.0, 1.0, 1.0, 500, 400, 100, 10) == (106, TEST_MIN, MIN_EPOCHS)


def _measured(name: str, accuracy: float, clearly_better: bool = False) -> dict:
    return {"name": name, "status": "measured", "accuracy": accuracy, "clearly_better": clearly_better}


def test_the_fine_tune_the_probes_point_to_goes_first():
    tunes = finetune_probe.finetune_candidates(None, "late", "new top")
    base = _measured(BASELINE, 0.83)
    order, why = advise_module.finetune_order(tunes, [_measured("logreg@stage4", 0.90, True)], base)
    assert [c.name for c in order] == ["new-top@last-stage", "finetune@last-block"] and "stage4" in why["why"]
    for slightly in (_measured("logreg@stage4", 0.80), _measured("logreg@stage2", 0.84)):  # above, within noise
        order, why = advise_module.finetune_order(tunes, [slightly], base)
        assert [c.name for c in order] == ["finetune@last-block", "new-top@last-stage"]
    order, _ = advise_module.finetune_order(tunes, [], base)
    assert order[0].name == "finetune@last-block"


def test_optional_heads_leave_the_fine_tunes_their_share(tux_cache, monkeypatch):
    """The MLP (and concat) heads are skipped before they eat into the time kept for the fine-tunes."""
    calls = []

    def fake(name: str, cut: Cut | None, estimate: float, optional: bool = False) -> Candidate:
        def measure(c):
            calls.append((name, c.share))
            return Outcome(c.split.test_rows, np.ones(len(c.split.test_rows), bool), 0.0, 1)
        return Candidate(name, name, "", "featcache ...", lambda c: estimate, measure, config=cut, optional=optional)

    def candidates(ctx, finetune=True):
        return [fake("logreg@stage4", None, 1.0), fake("mlp@final", None, 0.6 * 300, optional=True),
                fake("logreg@final+stage4", None, 999.0, optional=True),
                fake("finetune@last-block", Cut(False), 1.0), fake("new-top@last-stage", Cut(True), 1.0)]
    monkeypatch.setattr(advise_module, "candidates", candidates)
    r = advise_module.advise(str(tux_cache), budget=300)
    rows = {c["name"]: c for c in r["candidates"]}
    concat = rows["logreg@final+stage4"]
    assert concat["status"] == "skipped" and f"deferred to keep {FT_SHARE * 300:.0f}s for the fine-tunes" in concat["why"]
    assert r["budget"]["kept_for_finetunes"] == FT_SHARE * 300
    # logreg@stage4 measured 1.0, above the baseline: new top layers first, with the larger share; the MLP waited
    # for the fine-tunes (it would have eaten into their time) and ran after them, in the time they left
    assert calls == [("logreg@stage4", 1.0), ("new-top@last-stage", FIRST_FT_SHARE), ("finetune@last-block", 1.0),
                     ("mlp@final", 1.0)]
    assert r["finetune_order"]["order"] == ["new-top@last-stage", "finetune@last-block"]


def test_test_source_split_and_a_second_backbone(tmp_path, tux_csv, lite0_embedder, mnv2_embedder, capsys):
    """Drawn from a test folder; a second cached backbone is a candidate and ImageNet-likeness is compared."""
    rows = [line.split(",") for line in tux_csv.read_text().splitlines()[1:]]
    by_class: dict[str, list[str]] = {}
    for path, label in rows:
        by_class.setdefault(label, []).append(path)
    src, test = tmp_path / "src", tmp_path / "test"
    for label, paths in by_class.items():
        for i, p in enumerate(paths[:8]):
            dest = (test if i >= 6 else src) / label / Path(p).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
    cache = tmp_path / "cache"
    for emb in (lite0_embedder, mnv2_embedder):
        for folder in (src, test):
            Extraction(ExtractConfig(str(folder), str(cache), progress=False), emb).run()
    fp = next(f["fingerprint"] for f in main_info(cache, capsys) if f["backbone"] == "efficientnet_lite0")
    assert main(["advise", "--cache", str(cache), "--fingerprint", fp, "--test-source", str(test), "--no-finetune",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["evaluation"]["mode"] == "test-source" and r["evaluation"]["test_rows"] == 14
    names = {c["name"] for c in r["candidates"]}
    assert "logreg@final[mobilenet_v2]" in names
    for row in r["candidates"]:
        _check_row(row)
    sim = r["imagenet_similarity"]
    assert {b["backbone"] for b in sim["per_backbone"]} == {"efficientnet_lite0", "mobilenet_v2"}
    assert 0 <= sim["top1_agreement"] <= 1 and sim["sampled"] == 56
    rec = r["recommendation"]
    assert "--test-source" in rec["command"] and f"--fingerprint {fp[:12]}" in rec["command"]
    trained = _run_command(rec["command"], tmp_path / "head", capsys)
    assert trained["metrics"]["accuracy"] == pytest.approx(rec["accuracy"], abs=1e-12)


def main_info(cache: Path, capsys) -> list[dict]:
    assert main(["info", "--cache", str(cache), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["fingerprints"]


def test_intervals():
    assert wilson(0, 10)[0] == 0 and wilson(10, 10)[1] == pytest.approx(1)
    lo, hi = wilson(90, 100)
    assert lo < 0.9 < hi and hi - lo < 0.13
    a = np.r_[np.ones(90, bool), np.zeros(10, bool)]
    same = paired_difference(a, a)
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0]
    better = paired_difference(np.ones(100, bool), a)
    assert better["difference"] == pytest.approx(0.1) and better["interval"][0] > 0


def _outcome(rows: np.ndarray, right: int, frozen_right: int | None = None) -> Outcome:
    """An outcome on ``rows`` with the first ``right`` of them correct (and a same-subset frozen head's)."""
    frozen = None if frozen_right is None else np.arange(len(rows)) < frozen_right
    return Outcome(rows, np.arange(len(rows)) < right, 1.0, 40 if frozen is not None else 400, frozen=frozen)


def test_a_subset_finetune_is_judged_on_equal_data_and_never_recommended_below_the_frozen_head():
    """Clearly better than the frozen head on the same 40 images is not enough if the frozen head on all the
    training images scored higher on those test rows: advise never recommends a strategy that measured worse."""
    base = _outcome(np.arange(100), 90)
    base_cand = Candidate(BASELINE, "baseline", "", "featcache train ...", lambda c: 0.0, lambda c: base)
    base_row = _row(base_cand, base, base, 0)
    test = np.arange(0, 100, 2)  # 50 of the test rows, 45 of them right for the baseline (its first 90 rows)
    counts = np.asarray([50, 50])
    for ft_right, expect in ((40, BASELINE), (50, "finetune@last-block")):  # frozen head on the subset: 30 of 50
        ft = _outcome(test, ft_right, frozen_right=30)
        ft.details["subset"] = "trained on 40 of 400 training images"
        row = _row(Candidate("finetune@last-block", "fine-tune", "", None, lambda c: 0.0, lambda c, ft=ft: ft), ft, base, 0)
        assert row["clearly_better"] and row["vs_frozen"]["difference"] > 0.15
        rec, why = _recommend([row], base_row, {}, counts)
        assert rec["name"] == expect
        if expect == BASELINE:
            assert row["measured_worse"] and row["vs_baseline"]["difference"] == pytest.approx(40 / 50 - 45 / 50)
            assert any("not recommended on this budget" in w for w in why)
        else:
            assert not row["measured_worse"] and any("both trained on the same 40 images" in w for w in why)

"""featcache runs a pretrained image network once over your photos and keeps the embeddings in a
cache (Zarr), so classifiers train in seconds, similar images are found instantly and re-runs embed
only what is new. Bad files are recorded with a reason, never a crash; a killed run resumes.

A typical session, in order: extract, info, train, predict, index, search, serve.

example:
  featcache extract photos/ --cache cache/        # first-level folders are the labels
  featcache train --cache cache/ --out head/
  featcache predict --head head/ new.jpg
  featcache index --cache cache/ --out index/ && featcache search --index index/ new.jpg

`featcache COMMAND --help` shows each command's options and defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from .errors import FeatcacheError, ImageError, NotFoundError, UsageError
from .progress import loading, show_status

COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {}


def command(name: str):
    def wrap(fn):
        COMMANDS[name] = fn
        return fn
    return wrap


class Reported(Exception):
    """A failure whose result was already printed: ``main`` adds the stderr line and the exit code, no JSON."""

    def __init__(self, error: FeatcacheError):
        super().__init__(str(error))
        self.error = error


def _print(result: dict, as_json: bool, human: Callable[[dict], str]) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(human(result))


# -- backbones ---------------------------------------------------------------------
@command("backbones")
def cmd_backbones(args: argparse.Namespace) -> dict:
    from .extract.registry import BUILTIN, DEFAULT_BACKBONE, weights_present
    from .extract.runtimes.choice import read_records, record_path

    if args.check:
        from .extract.backbone import Backbone
        from .extract.registry import resolve
        from .extract.runtimes.choice import measure

        names = args.backbone or [DEFAULT_BACKBONE]
        gates = [measure(Backbone.load(resolve(name))) for name in names]
        result = {"record": str(record_path()), "gates": gates}
        _print(result, args.json, lambda r: "\n\n".join(_gate_table(g) for g in r["gates"]))
        return result
    chosen = {e["backbone"]: e["choice"] for e in read_records().values()}
    rows = [{**s.describe(), "default": n == DEFAULT_BACKBONE, "weights_present": weights_present(s),
             "auto": chosen.get(n)} for n, s in BUILTIN.items()]
    result = {"backbones": rows, "also": "timm:ARCH or torchvision:ARCH with --weights PATH|download|random",
              "record": str(record_path())}

    def human(r):
        lines = [f"{'name':20} {'weights':8} {'input':6} {'auto here':16} description"]
        for b in r["backbones"]:
            mark = "*" if b["default"] else " "
            auto = f"{b['auto']['runtime']} {b['auto']['precision']}" if b["auto"] else "not measured"
            lines.append(f"{b['name'] + mark:20} {'present' if b['weights_present'] else 'MISSING':8} "
                         f"{b['preprocess']['crop']:<6} {auto:16} {b['description']}")
        lines.append("(* default)  Also: " + r["also"])
        lines.append("auto here: the fastest runtime/precision that passed the accuracy gate on this CPU "
                     "(featcache backbones --check measures it)")
        return "\n".join(lines)

    _print(result, args.json, human)
    return result


def _gate_table(g: dict) -> str:
    gate = g["gate"]
    lines = [f"{g['backbone']} on {g['cpu']} ({g['cpus']} cores, batch {g['batch']}): gate = min cosine to torch fp32 "
             f">= {gate['min_cosine']} and ImageNet top-1 >= fp32's ({gate['fp32_top1']}/{gate['photos']}) on "
             f"{gate['photos']} real photos",
             f"{'runtime':9} {'precision':9} {'min cos':>8} {'top-1':>6} {'img/s':>8} {'vs fp32':>8}  gate"]
    for r in g["rows"]:
        if not r.get("available"):
            lines.append(f"{r['runtime']:9} {r['precision']:9} {'':>8} {'':>6} {'':>8} {'':>8}  n/a: {r['note']}")
            continue
        top1 = "-" if r["top1"] is None else str(r["top1"])
        lines.append(f"{r['runtime']:9} {r['precision']:9} {r['min_cosine']:8.4f} {top1:>6} "
                     f"{r['images_per_second']:8.1f} {r.get('speedup_vs_torch_fp32', 0):7.2f}x  "
                     f"{'pass' if r['passes'] else 'FAIL'}")
    c = g["choice"]
    lines.append(f"auto: {c['runtime']} {c['precision']}" if c else "auto: nothing passed; torch fp32")
    return "\n".join(lines)


# -- extract -----------------------------------------------------------------------
@command("extract")
def cmd_extract(args: argparse.Namespace) -> dict:
    from .extract.registry import resolve
    from .extract.sources import list_source

    for name in dict.fromkeys(args.backbone):  # a wrong name first (built-ins and folders: no torch needed)
        if ":" not in name:
            resolve(name, args.weights)
    listing = list_source(args.source, args.labels)  # before the model loads: an empty SOURCE fails at once
    if not listing.items:
        raise NotFoundError(_no_images(args.source, listing))
    models = " + ".join(dict.fromkeys(args.backbone))
    with loading(models) if args.engine == "local" else nullcontext():  # Ray: the actors load the models
        from .extract.pipeline import ExtractConfig, Extraction

        cfg = ExtractConfig(
            source=args.source, cache=args.cache, backbone=args.backbone, weights=args.weights,
            taps=args.taps, precision=args.precision, runtime=args.runtime, device=args.device,
            batch_size=args.batch_size, workers=args.workers, labels=args.labels, max_pixels=args.max_pixels,
            progress=not (args.quiet or args.json), commit_every=args.commit_every,
            max_file_bytes=args.max_file_mb * 1024 * 1024, engine=args.engine, ray_address=args.ray_address,
            actors=args.actors, gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
        )
        extraction = Extraction(cfg)
    result = extraction.run(listing)

    def human(r):
        t = r["timings"]
        lines = [
            f"cache        {r['cache']}",
            *(f"backbone     {b['backbone']}  fingerprint {b['fingerprint']}  ({b['device']}, {b['precision']})"
              for b in r["backbones"]),
            f"taps         {', '.join(r['taps'])}",
            f"files        {r['files']}  unique images {r['unique_images']}  duplicates {r['duplicate_files']}",
            f"cached       {r['already_cached']} already, {r['extracted']} extracted now, {r['failed']} failed",
            f"speed        {r['images_per_second']} img/s  (decode {t.get('decode', 0)}s, model {t.get('model', 0)}s, "
            f"write {t.get('write', 0)}s, hash {t.get('hash', 0)}s; total {r['seconds']}s)",
        ]
        if r["failure_reasons"]:
            lines.append("failures     " + ", ".join(f"{k} {v}" for k, v in sorted(r["failure_reasons"].items())))
        for f in r["failures"][:20]:
            lines.append(f"  FAILED {f['key']}: {f['error']}")
        if r["failed"] > 20:
            lines.append(f"  ... and {r['failed'] - 20} more (see --json)")
        if r["label_conflicts"]:
            lines.append(f"conflicts    {r['label_conflicts']} images found under different labels "
                         "(`featcache train` leaves them out unless --label-conflicts keep):")
            for c in r["conflicts"][:10]:
                lines.append(f"  {', '.join(c['keys'])}: {' / '.join(c['labels'])}")
        return "\n".join(lines)

    _print(result, args.json, human)
    return result


def _no_images(source: str, listing) -> str:
    """One line: what was looked for in SOURCE and what was passed over instead."""
    from .extract.sources import IMAGE_SUFFIXES

    if Path(source).is_dir():
        found = [f"skipped {listing.skipped} file(s) with other suffixes"] if listing.skipped else ["no files"]
        found += [f"{len(listing.failed)} unreadable folder(s) ({listing.failed[0]['key'] or '.'}: "
                  f"{listing.failed[0]['error']})"] if listing.failed else []
        return (f"no image files in {source} (looked recursively for {' '.join(sorted(IMAGE_SUFFIXES))}, "
                f"hidden entries skipped; {', '.join(found)})")
    return f"{source} lists no images (expected rows of path[,label], an optional path,label header)"


# -- info / export -----------------------------------------------------------------
@command("info")
def cmd_info(args: argparse.Namespace) -> dict:
    from .store.cache import FeatureCache

    result = FeatureCache(args.cache).info()

    def human(r):
        lines = [f"cache {r['cache']}: {r['images']} images"]
        if r["label_conflicts"]:
            lines.append(f"  {r['label_conflicts']} images were found under several labels (train leaves them out)")
        if r["orphaned"]:
            lines.append(f"  {r['orphaned']} images no file holds any more (their names now hold other bytes)")
        for f in r["fingerprints"]:
            taps = ", ".join(f"{k}({v})" for k, v in f["taps"].items())
            lines.append(f"  {f['fingerprint']}  {f['backbone']}  {f['precision']}  rows {f['rows']} "
                         f"(ok {f['ok']}, failed {f['failed']})  taps {taps}")
        return "\n".join(lines)

    _print(result, args.json, human)
    return result


@command("export")
def cmd_export(args: argparse.Namespace) -> dict:
    from .store.export import export

    result = export(args.cache, args.out, args.format, args.fingerprint, args.taps, args.include_failed)
    _print(result, args.json, lambda r: f"wrote {r['rows']} rows of {', '.join(r['taps'])} to {r['out']}")
    return result


# -- search and service (issue 4) --------------------------------------------------
@command("index")
def cmd_index(args: argparse.Namespace) -> dict:
    from .store.index import IndexParams, build_from_cache

    params = IndexParams(kind=args.kind, target_recall=args.target_recall)
    result = build_from_cache(args.cache, args.out, args.fingerprint, args.tap, params)

    def human(r):
        rec = r.get("recall_at_10")
        return (f"{r['action']} {r['kind']} index {r['index']}: {r['count']} vectors (dim {r['dim']}, tap {r['tap']}), "
                f"params {r['params']}, recall@10 {rec}, {r['memory_bytes'] / 1e6:.1f} MB, {r['seconds']}s")

    _print(result, args.json, human)
    return result


@command("search")
def cmd_search(args: argparse.Namespace) -> dict:
    from .store.index import VectorIndex

    if (args.image is None) == (args.key is None):
        raise UsageError("give exactly one of IMAGE or --key KEY")
    index = VectorIndex.load(args.index)
    if args.key is not None:
        hits = index.search_key(args.key, args.top)
        query = {"key": args.key}
    else:
        from .extract.decode import load_image
        from .extract.embedder import embedder_for

        m = index.manifest
        emb = embedder_for(m["backbone"], m["fingerprint_description"], [m["tap"]], "cpu")
        index.check(emb.fingerprint, m["tap"])
        x = load_image(Path(args.image).read_bytes(), emb.spec.preprocess)
        hits = index.search(emb.embed(x[None])[m["tap"]], args.top)[0]
        query = {"image": args.image}
    result = {"query": query, "index": args.index, "k": args.top,
              "hits": [{"key": h.key, "sha256": h.sha256, "score": round(h.score, 6)} for h in hits]}
    _print(result, args.json, lambda r: "\n".join(f"{h['score']:.4f}  {h['key']}" for h in r["hits"]))
    return result


@command("dedupe")
def cmd_dedupe(args: argparse.Namespace) -> dict:
    from .store.index import dedupe

    result = dedupe(args.cache, args.fingerprint, args.tap, args.threshold)

    def human(r):
        lines = [f"{len(r['groups'])} groups of near-duplicates (cosine >= {r['threshold']}) among {r['images']} images"]
        for g in r["groups"][:50]:
            lines.append(f"  [{g['size']}, min cos {g['min_cosine']}] " + ", ".join(g["keys"][:8])
                         + (" ..." if g["size"] > 8 else ""))
        return "\n".join(lines)

    _print(result, args.json, human)
    return result


@command("serve")
def cmd_serve(args: argparse.Namespace) -> dict:

    heads = {}  # checked before the service's imports (torch, FastAPI): a wrong flag fails at once
    for spec in args.head or []:
        name, sep, path = spec.partition("=")
        if not sep:  # a bare HEAD_DIR, as predict takes it: named after its folder
            name, path = Path(spec).name, spec
        if not name or not path:
            raise UsageError(f"--head takes HEAD_DIR or NAME=HEAD_DIR, got {spec!r}")
        if name in heads:
            raise UsageError(f"two heads are named {name!r}: name them with NAME=HEAD_DIR")
        heads[name] = path
    api_key = None
    if args.api_key_file:
        api_key = Path(args.api_key_file).read_text().strip()
        if not api_key:
            raise UsageError(f"API key file {args.api_key_file} is empty")
    from .service.app import serve
    from .service.config import ServiceConfig

    cfg = ServiceConfig(cache=args.cache, heads=heads, index=args.index, fingerprint=args.fingerprint, api_key=api_key,
                        device=args.device, runtime=args.runtime, precision=args.precision,
                        batching={"auto": None, "on": True, "off": False}[args.batching],
                        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, model_workers=args.model_workers,
                        max_upload_bytes=args.max_upload_mb * 1024 * 1024, max_pixels=args.max_pixels)
    serve(cfg, args.host, args.port, log_level=args.log_level, access_log=args.access_log)
    return {}


# -- heads (issue 3) ---------------------------------------------------------------
def _head_params(items: list[str] | None) -> dict:
    """``--param logreg.C=0.1 mlp.hidden=256`` -> {"logreg": {"C": 0.1}, "mlp": {"hidden": 256}}."""
    out: dict = {}
    for item in items or []:
        name, _, value = item.partition("=")
        kind, _, param = name.partition(".")
        if not value or not param:
            raise UsageError(f"--param expects HEAD.NAME=VALUE (e.g. logreg.C=0.1), got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(kind, {})[param] = parsed
    return out


@command("train")
def cmd_train(args: argparse.Namespace) -> dict:
    from .classify.train import TrainConfig, train

    cfg = TrainConfig(cache=args.cache, out=args.out, fingerprint=args.fingerprint, taps=args.taps, heads=args.head_types,
                      cv=args.cv, test_split=args.test_split, test_source=args.test_source, seed=args.seed,
                      params=_head_params(args.param), label_conflicts=args.label_conflicts)
    if args.report:
        from .store.outputs import writable_dir

        writable_dir(Path(args.report).parent)  # before the training time is spent
    result, evals = train(cfg)
    if args.report:
        from .classify.report import write_report
        from .store.cache import FeatureCache

        write_report(args.report, result, evals, FeatureCache(args.cache))
        result["report"] = {"html": args.report, "json": str(Path(args.report).with_suffix(".json"))}

    def human(r):
        m, ev = r["metrics"], r["evaluation"]
        lines = [f"{r['labelled_rows']} labelled images, {r['classes']} classes, backbone {r['backbone']} "
                 f"({r['fingerprint']}); evaluation: {ev['mode']}"]
        lc = r["label_conflicts"]
        if lc["images"]:
            lines.append(f"{lc['images']} images found under several labels were "
                         f"{'left out' if lc['policy'] == 'drop' else 'kept under their stored label'} "
                         "(--label-conflicts drop|keep)")
        for x in r.get("members", []):
            if x["dropped_rows"]:
                lines.append(f"{x['dropped_rows']} labelled images of {x['backbone']} left out (not in every backbone)")
        width = max(len(x["name"]) for x in r["results"])
        lines.append(f"{'tap / head' + (' / backbone' if 'members' in r else ''):{width}} {'accuracy':>9} "
                     f"{'macro-F1':>9} {'ECE':>6} {'train s':>8}")
        for x in r["results"]:
            mark = " *" if x["name"] == r["best"]["name"] else ""
            lines.append(f"{x['name']:{width}} {x['accuracy']:9.4f} {x['macro_f1']:9.4f} {x['ece']:6.3f} "
                         f"{x['train_seconds']:8.2f}{mark}")
            if "weights" in x:
                lines.append("  weights " + ", ".join(f"{b} {w:.2f}" for b, w in x["weights"].items())
                             + f"; best single {x['best_single']['backbone']} {x['best_single']['accuracy']:.4f}")
        worst = sorted(m["per_class"].items(), key=lambda kv: kv[1]["f1"])[:3]
        lines.append("weakest classes: " + ", ".join(f"{c} (P {v['precision']:.2f} R {v['recall']:.2f})" for c, v in worst))
        if r.get("out"):
            lines.append(f"saved {r['best']['name']} to {r['out']}")
        if r.get("report"):
            lines.append(f"report {r['report']['html']} (+ {r['report']['json']})")
        return "\n".join(lines)

    _print({k: v for k, v in result.items() if k != "metrics"} | {"metrics": {
        k: v for k, v in result["metrics"].items() if k != "reliability"}}, args.json, human)
    if not args.out:  # the evaluation is the result asked for; the head itself is gone with this process
        print(f"featcache: note: the head was not saved; add --out DIR to write the best one "
              f"({result['best']['head']} on {result['best']['tap']}) as a bundle for predict and serve",
              file=sys.stderr)
    return result


@command("predict")
def cmd_predict(args: argparse.Namespace) -> dict:
    from .classify.predict import predict

    result = predict(args.head, args.images, cache=args.cache, device=args.device, top_k=args.top,
                     runtime=args.runtime, precision=args.precision)

    def human(r):
        lines = []
        for x in r["results"]:
            if "error" in x:
                lines.append(f"{x['image']}: ERROR {x['error']}")
            else:
                alts = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in x["top"][1:])
                lines.append(f"{x['image']}: {x['label']} {x['probability']:.3f}" + (f"  ({alts})" if alts else ""))
        lines.append(f"{r['predicted']} predicted, {r['failed']} failed")
        return "\n".join(lines)

    _print(result, args.json, human)
    if not result["predicted"]:
        raise Reported(ImageError(f"no image could be predicted: all {result['failed']} failed to read or decode "
                                  "(each image's error is in the output)"))
    return result


@command("probe")
def cmd_probe(args: argparse.Namespace) -> dict:
    from .classify.probe import probe

    result = probe(args.cache, args.fingerprint, max_rows=args.max_rows)

    def human(r):
        lines = [f"linear probe by depth ({r['rows']} images, {r['classes']} classes, {r['evaluation']}, "
                 f"chance {r['chance']:.3f}):"]
        for t in r["taps"]:
            bar = "#" * int(round(40 * t["accuracy"]))
            mark = "  <- best" if t["tap"] == r["best_tap"] else ""
            lines.append(f"  {t['tap']:7} dim {t['dim']:5}  {t['accuracy']:.4f}  {bar}{mark}")
        return "\n".join(lines)

    _print(result, args.json, human)
    return result


@command("advise")
def cmd_advise(args: argparse.Namespace) -> dict:
    from .classify.advise import advise

    result = advise(args.cache, args.fingerprint, budget=args.budget, seed=args.seed, test_source=args.test_source,
                    max_rows=args.max_rows, finetune=not args.no_finetune)

    def interval(lo_hi) -> str:
        return f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"

    def human(r):
        d, ev = r["data"], r["evaluation"]
        how = {"cv": f"{ev.get('folds')}-fold CV", "test-split": f"{ev.get('fraction')} stratified hold-out",
               "test-source": "the --test-source images"}[ev["mode"]]
        lines = [f"{d['labelled']} labelled images, {d['classes']} classes (median {d['median_per_class']:.0f} per "
                 f"class, smallest {d['min_per_class']}); every strategy scored on the same {ev['test_rows']} test rows "
                 f"({how}, {ev['flags']})",
                 f"{'strategy':34} {'accuracy':>8} {'95% interval':>16} {'vs frozen head, paired (95%)':>34}"]
        for c in r["candidates"]:
            if c["status"] == "skipped":
                lines.append(f"{c['name']:34} skipped: {c['why']}")
                continue
            vs = c["vs_frozen"]
            cmp = "baseline" if c["name"] == r["baseline"]["name"] else \
                f"{vs['difference']:+.3f} [{vs['interval'][0]:+.3f}, {vs['interval'][1]:+.3f}]"
            mark = " clearly better" if c["clearly_better"] else (" worse" if vs["interval"][1] < 0 else "")
            m = c.get("measured_with")
            epochs = f", {m['epochs']} of {m['full_epochs']} epochs" if m and m["epochs"] < m["full_epochs"] else ""
            rows = f" ({c['test_rows']} test rows, {c['train_rows']} trained on{epochs})" if c.get("subset") or \
                c["test_rows"] != ev["test_rows"] else ""
            lines.append(f"{c['name']:34} {c['accuracy']:8.3f} {interval(c['interval']):>16} {cmp:>25}{mark}{rows}")
        if r["finetune_order"]["order"]:
            lines.append(f"fine-tunes in this order: {', '.join(r['finetune_order']['order'])} "
                         f"({r['finetune_order']['why']})")
        lc = r["learning_curve"]
        lines.append("learning curve (frozen logistic head): " + ", ".join(
            f"{p['train_rows']} -> {p['accuracy']:.3f}" for p in lc["points"]))
        sim = r["imagenet_similarity"]
        if sim:
            per = ", ".join(f"{b['backbone']} entropy {b['normalised_entropy']:.2f}" for b in sim["per_backbone"]
                            if "error" not in b)
            agree = "" if sim["top1_agreement"] is None else f"; top-1 agreement {sim['top1_agreement']:.2f}"
            lines.append(f"ImageNet-likeness ({sim['note']}): {per}{agree}")
        rec = r["recommendation"]
        lines.append(f"recommendation: {rec['strategy']}  [{rec['cell']}]  {rec['accuracy']:.3f} "
                     f"{interval(rec['interval'])}" + ("; and collect more data" if rec["collect_more_data"] else ""))
        lines += [f"  - {w}" for w in r["why"]]
        lines.append(f"command: {rec['command']}")
        b = r["budget"]
        lines.append(f"{b['used']:.0f}s of the {b['seconds']:.0f}s budget" +
                     (f"; skipped: {', '.join(b['skipped'])}" if b["skipped"] else ""))
        return "\n".join(lines)

    _print(result, args.json, human)
    return result


# -- partial unfreeze (issue 5) ----------------------------------------------------
@command("finetune")
def cmd_finetune(args: argparse.Namespace) -> dict:
    from .classify.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        cache=args.cache, out=args.out, unfreeze_from=args.unfreeze_from, backbone=args.backbone,
        weights=args.weights, epochs=args.epochs, warmup_epochs=args.warmup_epochs, lr=args.lr,
        backbone_lr_mult=args.backbone_lr_mult,
        augment=args.augment, mixup=args.mixup, label_smoothing=args.label_smoothing, new_top=args.new_top, bn=args.bn,
        batch_size=args.batch_size, test_source=args.test_source, seed=args.seed, patience=args.patience,
        progress=not (args.quiet or args.json),
        max_pixels=args.max_pixels,
    )
    result = finetune(cfg)

    def human(r):
        test = "n/a" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
        return (f"backbone written to {r['backbone_dir']}\n"
                f"best val accuracy {r['best_val_accuracy']:.4f}, test accuracy {test}; "
                f"{len(r['history'])} epochs in {r['train_seconds']}s (prefix {r['prefix_tap']} cached in "
                f"{r['prefix_seconds']}s)\nuse it: featcache extract SOURCE --backbone {r['backbone_dir']}")

    _print(result, args.json, human)
    return result


DEFAULT_CACHE = "featcache-cache"
# the subcommands as `featcache --help` lists them: a typical session first, then the rest
ORDER = ("extract", "info", "train", "predict", "index", "search", "serve",
         "backbones", "export", "dedupe", "probe", "advise", "finetune")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default, except where there is none to show (None, a flag) or it says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (not action.option_strings or default is None or default is False or default == argparse.SUPPRESS
                or "default" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def version() -> str:
    """The installed distribution's version; the package's own where it is not installed (a source checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("featcache")
    except PackageNotFoundError:
        from . import __version__

        return __version__


class _Version(argparse.Action):
    """``--version``, read only when asked (importlib.metadata is not free)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"featcache {version()}")
        parser.exit()


def _alias(sp: argparse.ArgumentParser, old: str, dest: str, **kw) -> None:
    """An older spelling, still accepted, not shown in --help."""
    sp.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def _cache_arg(sp: argparse.ArgumentParser, help: str = "cache directory") -> None:
    sp.add_argument("--cache", default=DEFAULT_CACHE, metavar="DIR", help=help)


def _fingerprint_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--fingerprint", metavar="FP",
                    help="fingerprint or a unique prefix of it; needed only when the cache holds several")


def _device_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")


def _top_arg(sp: argparse.ArgumentParser, default: int, help: str) -> None:
    sp.add_argument("-k", "--top", type=int, default=default, metavar="K", help=help)


def _runtime_args(sp: argparse.ArgumentParser, auto: str) -> None:
    sp.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"],
                    help="what runs the forward pass (openvino: pip install 'featcache[openvino]'); " + auto)
    sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                    help="fp16: GPU only; int8: OpenVINO on the CPU")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featcache", description=__doc__, formatter_class=_Help)
    p.add_argument("--version", action=_Version, help="print featcache's version and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO lines on stderr)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def add(name, help):
        sp = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=_Help)
        common = sp.add_argument_group("output (every command)")
        common.add_argument("--json", action="store_true", help="print the result (or the error) as JSON on stdout")
        common.add_argument("-q", "--quiet", action="store_true", help="no progress bar or status lines on stderr")
        common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="log what happens (INFO lines on stderr)")
        return sp

    sp = add("backbones", "list the backbones, whether their weights are present and what auto runs on this CPU")
    sp.add_argument("--check", action="store_true",
                    help="measure every runtime x precision on this CPU against the accuracy gate and record auto's choice")
    sp.add_argument("--backbone", nargs="+", action="extend", metavar="NAME",
                    help="backbone(s) to --check (default: the default backbone)")

    sp = add("extract", "embed a folder or CSV of images into the cache; re-runs embed only new images")
    sp.add_argument("source", metavar="SOURCE", help="folder (first-level subfolders are labels) or CSV of path[,label]")
    _cache_arg(sp, "cache directory (created if missing)")
    sp.add_argument("--backbone", nargs="+", default=["efficientnet_lite0"], metavar="NAME",
                    help="built-in name (see `featcache backbones`), timm:ARCH, torchvision:ARCH or a backbone dir; "
                         "several: each image is decoded once and embedded by each (one fingerprint each)")
    sp.add_argument("--weights", help="weights file, 'download' (online) or 'random' (default: the built-in's own)")
    sp.add_argument("--taps", nargs="+", default=["final"], metavar="TAP",
                    help="taps to store: final, stage1..N, raw:stageN")
    _alias(sp, "--tap", "taps", nargs="+")
    _runtime_args(sp, "auto: the fastest that passes the accuracy gate on this CPU (measured once); a cache keeps "
                      "what it was built with. int8 is calibrated on the collection itself")
    _device_arg(sp)
    sp.add_argument("--batch-size", type=int, help="images per forward pass (default: 8 on CPU, 64 on GPU)")
    sp.add_argument("--workers", type=int, help="decode threads (default: the available CPUs)")
    sp.add_argument("--labels", default="folder", choices=["folder", "none"], help="labels from first-level folders, or none")
    sp.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images (decompression bombs)")
    sp.add_argument("--commit-every", type=int, default=512, help="images per durable commit (resume granularity; more while the writer is saturated)")
    sp.add_argument("--max-file-mb", type=int, default=256, help="refuse files larger than this (MiB)")
    sp.add_argument("--engine", default="local", choices=["local", "ray"],
                    help="local: this process; ray: a Ray cluster (pip install 'featcache[ray]')")
    sp.add_argument("--ray-address", help="Ray cluster to join: auto or HOST:PORT (default: start one on this machine)")
    sp.add_argument("--actors", type=int, help="embedding actors (ray; default: one per GPU, else one per node)")
    sp.add_argument("--gpus-per-actor", type=float, help="GPUs per embedding actor (ray; default: 1 where GPUs exist)")
    sp.add_argument("--cpus-per-actor", type=float, help="CPUs per embedding actor (ray; default: 1 with GPUs, else the smallest node's CPUs)")

    sp = add("info", "show images, fingerprints, taps and failures in a cache")
    _cache_arg(sp)

    from .store.formats import names as export_formats  # one module per format, listed without importing them

    sp = add("export", "export features with key, label, sha256, path, status and error columns")
    _cache_arg(sp)
    sp.add_argument("--format", required=True, choices=export_formats(), help="%(choices)s")
    sp.add_argument("--out", required=True, help="output folder or file, as the format writes")
    _fingerprint_arg(sp)
    sp.add_argument("--taps", nargs="+", metavar="TAP", help="taps to export (default: all)")
    _alias(sp, "--tap", "taps", nargs="+")
    sp.add_argument("--include-failed", action="store_true",
                    help="also rows that failed to decode (status 1, NaN vectors) and images no file holds any more")
    # -- search and service (issue 4) --
    sp = add("index", "build (or update in place) a cosine faiss index over a cache, for search and serve")
    _cache_arg(sp)
    _fingerprint_arg(sp)
    sp.add_argument("--tap", default="final", help="the tap to index")
    sp.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf"],
                    help="auto: exact below 20,000 vectors, HNSW above")
    sp.add_argument("--target-recall", type=float, default=0.99, help="recall@10 the search knob is tuned to")
    sp.add_argument("--out", required=True, metavar="DIR", help="index directory (updated in place if it exists)")

    sp = add("search", "the nearest cached images to an image file or to an indexed key")
    sp.add_argument("--index", required=True, metavar="DIR", help="an index directory from `featcache index`")
    sp.add_argument("image", nargs="?", metavar="IMAGE", help="an image file")
    sp.add_argument("--key", help="an indexed key instead of an image")
    _top_arg(sp, 10, "neighbours shown")

    sp = add("dedupe", "list groups of near-duplicate images in a cache")
    _cache_arg(sp)
    _fingerprint_arg(sp)
    sp.add_argument("--tap", default="final", help="the tap compared")
    sp.add_argument("--threshold", type=float, default=0.97, help="cosine at or above which two images are duplicates")

    sp = add("serve", "HTTP service and web page (/ui/): embed, classify, search, browse (binds 127.0.0.1 by default)")
    _cache_arg(sp)
    _fingerprint_arg(sp)
    sp.add_argument("--head", action="append", metavar="[NAME=]HEAD_DIR",
                    help="a head bundle from `featcache train --out` to serve (repeatable; NAME: its folder's name)")
    sp.add_argument("--index", metavar="DIR", help="an index directory from `featcache index`")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sp.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    sp.add_argument("--api-key-file", help="file holding the API key clients must send as X-API-Key (default: no key)")
    _device_arg(sp)
    _runtime_args(sp, "auto: the cache's own precision, on the fastest runtime that reproduces it")
    sp.add_argument("--batching", choices=("auto", "on", "off"), default="auto",
                    help="gather concurrent requests into one forward pass (auto: on with a GPU, off on CPU)")
    sp.add_argument("--max-batch", type=int, default=8, help="most images per forward pass (8 measured best on 2 CPU cores)")
    sp.add_argument("--max-wait-ms", type=float, default=10.0, help="longest wait to fill a batch")
    sp.add_argument("--model-workers", type=int,
                    help="forward passes run at once, each on CPUs/N torch threads (default: one per core on CPU, 1 on GPU)")
    sp.add_argument("--max-upload-mb", type=int, default=16, help="largest upload accepted (MiB)")
    sp.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse larger images (decompression bombs)")
    sp.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="warning",
                    help="uvicorn's and featcache's log level (the start-up summary prints at any level)")
    sp.add_argument("--access-log", action="store_true", help="log one line per request (method, path, status)")

    # -- heads (issue 3) --
    sp = add("train", "train classifier heads on cached features, evaluate, save the best as a bundle (--out)")
    _cache_arg(sp)
    sp.add_argument("--fingerprint", nargs="+", metavar="FP",
                    help="fingerprint (or a unique prefix); needed when the cache holds several; several: an ensemble "
                         "over those backbones (each alone is trained for comparison)")
    sp.add_argument("--taps", nargs="+", default=["final"], metavar="TAP",
                    help="tap(s) to train on (several: compared, best kept)")
    _alias(sp, "--tap", "taps", nargs="+")
    from .classify.heads import HEAD_KINDS  # the head registry, read only when --head-type is parsed or shown

    sp.add_argument("--head-type", dest="head_types", nargs="+", default=["logreg"], choices=HEAD_KINDS,
                    metavar="TYPE", help="head type(s): %(choices)s (several: compared, best kept)")
    _alias(sp, "--head", "head_types", nargs="+", choices=HEAD_KINDS, metavar="TYPE")
    sp.add_argument("--out", metavar="HEAD_DIR",
                    help="head bundle directory to write (default: evaluate only, save nothing)")
    ev = sp.add_mutually_exclusive_group()
    ev.add_argument("--cv", type=int, metavar="K", help="stratified K-fold cross-validation (bundle refit on all rows)")
    ev.add_argument("--test-split", type=float, metavar="F", help="hold out a stratified fraction F (default: 0.2)")
    ev.add_argument("--test-source", metavar="SOURCE", help="folder/CSV whose images (by sha256 or key) are the test set")
    sp.add_argument("--report", metavar="PATH", help="write a self-contained HTML report (and PATH.json)")
    sp.add_argument("--param", nargs="+", metavar="HEAD.NAME=VALUE", help="head parameters, e.g. logreg.C=0.1 mlp.hidden=256")
    sp.add_argument("--seed", type=int, default=0, help="random seed (splits, folds, head initialisation)")
    sp.add_argument("--label-conflicts", choices=["drop", "keep"], default="drop",
                    help="images whose bytes were found under several labels: leave them out, or keep the label "
                         "extract stored (the first name's)")

    sp = add("predict", "label images with a head bundle (embeds them with the head's backbone(s))")
    sp.add_argument("--head", required=True, metavar="HEAD_DIR", help="head bundle directory (`featcache train --out`)")
    sp.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    sp.add_argument("--cache", metavar="DIR", help="reuse cached vectors from this cache (default: the cache named in the head)")
    _device_arg(sp)
    _runtime_args(sp, "auto: the head's own precision, on the fastest runtime that reproduces it")
    _top_arg(sp, 3, "labels shown per image")

    sp = add("probe", "linear probes on every cached tap: which depth transfers best")
    _cache_arg(sp)
    _fingerprint_arg(sp)
    sp.add_argument("--max-rows", type=int, default=20000, help="stratified subsample for speed")

    sp = add("advise", "which transfer-learning strategy suits the data, measured on it (probes, learning curve, "
                       "short fine-tunes)")
    _cache_arg(sp)
    sp.add_argument("--fingerprint", metavar="FP",
                    help="the backbone to advise on (default: the only one); others are compared")
    sp.add_argument("--budget", type=float, default=120.0, metavar="SECONDS",
                    help="time for all measurements (the baseline always runs; what does not fit is skipped)")
    sp.add_argument("--test-source", metavar="SOURCE", help="folder/CSV whose images are the test rows (else CV or "
                                                             "a 20%% hold-out)")
    sp.add_argument("--no-finetune", action="store_true", help="measure frozen heads only")
    sp.add_argument("--seed", type=int, default=0, help="seed of the split and the fine-tunes")
    sp.add_argument("--max-rows", type=int, default=20000, help="stratified subsample of larger caches")

    # -- partial unfreeze (issue 5) --
    sp = add("finetune", "fine-tune the deeper stages on cached frozen-prefix activations; writes a backbone dir")
    _cache_arg(sp)
    sp.add_argument("--backbone", default="efficientnet_lite0", metavar="NAME", help="the backbone to fine-tune")
    sp.add_argument("--weights", help="weights file, 'download' (online) or 'random' (default: the built-in's own)")
    sp.add_argument("--unfreeze-from", required=True,
                    help="first trainable stage (stage5) or block (block16); everything before stays frozen")
    sp.add_argument("--epochs", type=int, default=10, help="most epochs (early stopping may end sooner)")
    sp.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length (then cosine decay)")
    sp.add_argument("--lr", type=float, default=3e-3, help="learning rate of the new head")
    sp.add_argument("--backbone-lr-mult", type=float, default=0.1, help="pretrained layers get lr * this")
    sp.add_argument("--augment", action="store_true", help="recompute the prefix on flipped/shifted images each epoch")
    sp.add_argument("--mixup", type=float, default=0.0,
                    help="mix pairs of activations at the cut and their labels, weight ~ Beta(a, a) (0: off; try 0.2)")
    sp.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (try 0.1)")
    sp.add_argument("--new-top", action="store_true", help="re-initialise the stages after the cut (new top layers)")
    sp.add_argument("--bn", default="train", choices=["train", "frozen"], help="BatchNorm policy in unfrozen layers")
    sp.add_argument("--batch-size", type=int, default=64, help="images per training step")
    sp.add_argument("--patience", type=int, default=3, help="early stopping: epochs without val improvement")
    sp.add_argument("--test-source", metavar="SOURCE", help="folder/CSV whose images form the test set")
    sp.add_argument("--seed", type=int, default=0, help="random seed (splits, initialisation, augmentation)")
    sp.add_argument("--max-pixels", type=int, default=64_000_000,
                    help="images above this many pixels are not used (stored rows are never changed)")
    sp.add_argument("--out", required=True, metavar="DIR", help="backbone directory to write")
    sub._choices_actions.sort(key=lambda a: ORDER.index(a.dest) if a.dest in ORDER else len(ORDER))
    return p


FILE_SYSTEM_EXIT = 8  # an OSError the library did not turn into a FeatcacheError: permission, not a directory, disk full


def os_error_message(e: OSError) -> str:
    """One line naming what the system refused and the path(s): ``Permission denied: /srv/index``."""
    if isinstance(e, FileExistsError) and e.filename is not None and os.path.isfile(e.filename):
        return f"Not a directory (a file is in the way): {e.filename}"  # mkdir where a regular file is
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    line = f"{e.strerror or e}: {' -> '.join(paths)}" if paths else str(e.strerror or e)
    return " ".join(line.split())


def _fail(args: argparse.Namespace, error: str, message: str, code: int) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": error, "message": message}))
    print(f"featcache: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends as one line on stderr and a documented exit code, never a traceback."""
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare `featcache`: what it does and which commands
        parser.print_help(sys.stderr)
        return UsageError.exit_code
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    show_status(not (args.quiet or args.json))
    try:
        COMMANDS[args.command](args)
    except Reported as r:  # the result is printed (JSON included): only the error line and the code remain
        print(f"featcache: error: {r}", file=sys.stderr)
        return r.error.exit_code
    except FeatcacheError as e:
        return _fail(args, type(e).__name__, str(e), e.exit_code)
    except BrokenPipeError:  # the reader of our output went away (`featcache ... | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush stays quiet
        return 141
    except OSError as e:  # last resort: a path the library met without a check of its own
        code = NotFoundError.exit_code if isinstance(e, FileNotFoundError) else FILE_SYSTEM_EXIT
        return _fail(args, type(e).__name__, os_error_message(e), code)
    except KeyboardInterrupt:
        print("featcache: interrupted; committed work is kept, run the same command to resume", file=sys.stderr)
        return 130
    finally:
        show_status(False)  # main() called in-process (tests, scripts) leaves the library quiet again
    return 0


if __name__ == "__main__":
    sys.exit(main())

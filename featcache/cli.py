"""Command line: parses arguments, calls the library, prints (``--json`` for machines)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from .errors import FeatcacheError

COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {}


def command(name: str):
    def wrap(fn):
        COMMANDS[name] = fn
        return fn
    return wrap


def _print(result: dict, as_json: bool, human: Callable[[dict], str]) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(human(result))


# -- backbones ---------------------------------------------------------------------
@command("backbones")
def cmd_backbones(args: argparse.Namespace) -> dict:
    from .extract.backbone import weights_present
    from .extract.registry import BUILTIN, DEFAULT_BACKBONE

    rows = [{**s.describe(), "default": n == DEFAULT_BACKBONE, "weights_present": weights_present(s)}
            for n, s in BUILTIN.items()]
    result = {"backbones": rows, "also": "timm:ARCH or torchvision:ARCH with --weights PATH|download|random"}

    def human(r):
        lines = [f"{'name':20} {'weights':8} {'input':6} description"]
        for b in r["backbones"]:
            mark = "*" if b["default"] else " "
            lines.append(f"{b['name'] + mark:20} {'present' if b['weights_present'] else 'MISSING':8} "
                         f"{b['preprocess']['crop']:<6} {b['description']}")
        lines.append("(* default)  Also: " + r["also"])
        return "\n".join(lines)

    _print(result, args.json, human)
    return result


# -- extract -----------------------------------------------------------------------
@command("extract")
def cmd_extract(args: argparse.Namespace) -> dict:
    from .extract.pipeline import ExtractConfig, extract

    cfg = ExtractConfig(
        source=args.source, cache=args.cache, backbone=args.backbone, weights=args.weights,
        taps=args.taps, precision=args.precision, device=args.device, batch_size=args.batch_size,
        workers=args.workers, labels=args.labels, max_pixels=args.max_pixels, progress=not args.quiet,
    )
    result = extract(cfg)

    def human(r):
        t = r["timings"]
        lines = [
            f"cache        {r['cache']}",
            f"backbone     {r['backbone']}  fingerprint {r['fingerprint']}  ({r['device']}, {r['precision']})",
            f"taps         {', '.join(r['taps'])}",
            f"files        {r['files']}  unique images {r['unique_images']}  duplicates {r['duplicate_files']}",
            f"cached       {r['already_cached']} already, {r['extracted']} extracted now, {r['failed']} failed",
            f"speed        {r['images_per_second']} img/s  (decode {t.get('decode', 0)}s, model {t.get('model', 0)}s, "
            f"write {t.get('write', 0)}s, hash {t.get('hash', 0)}s; total {r['seconds']}s)",
        ]
        for f in r["failures"][:20]:
            lines.append(f"  FAILED {f['key']}: {f['error']}")
        if r["failed"] > 20:
            lines.append(f"  ... and {r['failed'] - 20} more (see --json)")
        return "\n".join(lines)

    _print(result, args.json, human)
    return result


# -- info / export -----------------------------------------------------------------
@command("info")
def cmd_info(args: argparse.Namespace) -> dict:
    from .store.cache import FeatureCache

    result = FeatureCache(args.cache).info()

    def human(r):
        lines = [f"cache {r['cache']}: {r['images']} images"]
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

    result = export(args.cache, args.out, args.format, args.fingerprint, args.taps)
    _print(result, args.json, lambda r: f"wrote {r['rows']} rows of {', '.join(r['taps'])} to {r['out']}")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featcache", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--json", action="store_true", help="print machine-readable JSON")
        return sp

    add("backbones", "list backbones and whether their weights are present")

    sp = add("extract", "embed a folder or CSV of images into the cache (resumable)")
    sp.add_argument("source", help="folder (first-level subfolders are labels) or CSV of path[,label]")
    sp.add_argument("--cache", default="featcache-cache", help="cache directory (default: ./featcache-cache)")
    sp.add_argument("--backbone", default="efficientnet_lite0", help="built-in name, timm:ARCH, torchvision:ARCH or a backbone dir")
    sp.add_argument("--weights", help="weights file, 'download' (online) or 'random'")
    sp.add_argument("--taps", nargs="+", default=["final"], help="taps to store (final, stage1..N)")
    sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sp.add_argument("--batch-size", type=int, help="images per forward pass (default 8 on CPU, 64 on GPU)")
    sp.add_argument("--workers", type=int, help="decode threads (default: available CPUs)")
    sp.add_argument("--labels", default="folder", choices=["folder", "none"], help="labels from first-level folders, or none")
    sp.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images (decompression bombs)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    sp = add("info", "show images, fingerprints, taps and failures in a cache")
    sp.add_argument("--cache", default="featcache-cache")

    sp = add("export", "export features to npy files or a parquet table")
    sp.add_argument("--cache", default="featcache-cache")
    sp.add_argument("--format", required=True, choices=["npy", "parquet"])
    sp.add_argument("--out", required=True)
    sp.add_argument("--fingerprint", help="fingerprint (prefix); needed when the cache holds several")
    sp.add_argument("--taps", nargs="+", help="taps to export (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        COMMANDS[args.command](args)
    except FeatcacheError as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        print(f"featcache: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("featcache: interrupted; committed work is kept, run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

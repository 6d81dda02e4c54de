"""Self-contained evaluation report: one HTML file (figures inlined as base64 PNG) plus JSON.

Figures are drawn with Pillow alone: confusion matrix, reliability diagram, a thumbnail
sheet of misclassified images (read through the cache's image table), and a comparison
chart when several heads or taps were trained.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..store.cache import FeatureCache, rows_of
from .train import Evaluation

_BLUE = (31, 119, 180)


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def confusion_image(confusion: list[list[int]], labels: list[str], cell: int = 44) -> Image.Image:
    """Row-normalised confusion matrix heat map, counts in the cells (rows: true, columns: predicted)."""
    cm = np.asarray(confusion, dtype=float)
    k = len(labels)
    font, small = _font(12), _font(10)
    margin = 12 + max(int(font.getlength(s)) for s in labels)
    w, h = margin + k * cell + 20, margin + k * cell + 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for i in range(k):
        for j in range(k):
            v = norm[i, j]
            color = tuple(int(255 - v * (255 - c)) for c in _BLUE)
            x, y = margin + j * cell, 30 + i * cell
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color, outline=(220, 220, 220))
            text = str(int(cm[i, j]))
            d.text((x + cell / 2, y + cell / 2), text, fill="white" if v > 0.5 else "black", font=small, anchor="mm")
        d.text((margin - 6, 30 + i * cell + cell / 2), labels[i], fill="black", font=font, anchor="rm")
    # column labels: a text block rotated under the matrix
    block = Image.new("RGB", (margin, k * cell), "white")
    bd = ImageDraw.Draw(block)
    for j in range(k):
        bd.text((margin - 6, j * cell + cell / 2), labels[j], fill="black", font=font, anchor="rm")
    block = block.rotate(90, expand=True)
    out = Image.new("RGB", (w, 30 + k * cell + margin + 24), "white")
    out.paste(img.crop((0, 0, w, 30 + k * cell)), (0, 0))
    out.paste(block, (margin, 30 + k * cell + 4))
    od = ImageDraw.Draw(out)
    od.text((margin, 8), "columns: predicted, rows: true label; colour: row-normalised", fill="black", font=font)
    return out


def reliability_image(bins: list[dict], size: int = 320) -> Image.Image:
    """Reliability diagram: accuracy per confidence bin against the diagonal, bin counts below."""
    pad = 40
    img = Image.new("RGB", (size + 2 * pad, size + 2 * pad + 10), "white")
    d = ImageDraw.Draw(img)
    font = _font(11)
    x0, y0, x1, y1 = pad, pad, pad + size, pad + size
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.line([x0, y1, x1, y0], fill=(150, 150, 150), width=1)
    total = max(sum(b["count"] for b in bins), 1)
    for b in bins:
        if not b["count"]:
            continue
        bx0, bx1 = x0 + b["lo"] * size, x0 + b["hi"] * size
        top = y1 - b["accuracy"] * size
        d.rectangle([bx0 + 1, top, bx1 - 1, y1], fill=_BLUE, outline="white")
        conf_y = y1 - b["confidence"] * size
        d.line([bx0 + 1, conf_y, bx1 - 1, conf_y], fill=(214, 39, 40), width=2)
        share = b["count"] / total
        d.rectangle([bx0 + 1, y1 + 4, bx0 + 1 + max(1, share * (bx1 - bx0 - 2)), y1 + 10], fill=(120, 120, 120))
    for t in (0, 0.5, 1):
        d.text((x0 + t * size, y1 + 14), f"{t:g}", fill="black", font=font, anchor="ma")
        d.text((x0 - 4, y1 - t * size), f"{t:g}", fill="black", font=font, anchor="rm")
    d.text((x0 + size / 2, y1 + 28), "confidence (red: mean in bin; grey: share of images)", fill="black", font=font, anchor="ma")
    d.text((x0, y0 - 16), "accuracy per confidence bin (diagonal = calibrated)", fill="black", font=font)
    return img


def _thumb(path: str, size: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.seek(0)
            im = im.convert("RGBA")
            bg = Image.new("RGB", im.size, "white")
            bg.paste(im, mask=im.getchannel("A"))
            scale = size / max(bg.size)
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            return bg.resize((max(1, round(bg.width * scale)), max(1, round(bg.height * scale))), resample)
    except Exception:  # noqa: BLE001 - a moved or broken file just shows as a grey box
        return Image.new("RGB", (size, size), (200, 200, 200))


def misclassified_image(items: list[dict], size: int = 96, cols: int = 8) -> Image.Image | None:
    """Thumbnail sheet: image, ``true -> predicted p`` under each."""
    if not items:
        return None
    font = _font(10)
    cw, ch = size + 24, size + 30
    rows = -(-len(items) // cols)
    sheet = Image.new("RGB", (cols * cw, rows * ch), "white")
    d = ImageDraw.Draw(sheet)
    for i, it in enumerate(items):
        x, y = (i % cols) * cw, (i // cols) * ch
        th = _thumb(it["path"], size)
        sheet.paste(th, (x + (cw - th.width) // 2, y + 2 + (size - th.height) // 2))
        d.text((x + cw / 2, y + size + 6), f"{it['true'][:12]} ->", fill="black", font=font, anchor="ma")
        d.text((x + cw / 2, y + size + 17), f"{it['predicted'][:12]} {it['probability']:.2f}", fill=(180, 0, 0),
               font=font, anchor="ma")
    return sheet


def comparison_image(results: list[dict], width: int = 520) -> Image.Image:
    """Horizontal bars: accuracy of every trained (tap, head, backbone)."""
    font = _font(11)
    names = [r["name"] for r in results]
    margin = 12 + max(int(font.getlength(n)) for n in names)
    bar_h = 20
    img = Image.new("RGB", (margin + width + 60, 20 + bar_h * len(results) + 10), "white")
    d = ImageDraw.Draw(img)
    for i, (n, r) in enumerate(zip(names, results)):
        y = 10 + i * bar_h
        d.text((margin - 6, y + bar_h / 2), n, fill="black", font=font, anchor="rm")
        d.rectangle([margin, y + 3, margin + r["accuracy"] * width, y + bar_h - 3], fill=_BLUE)
        d.text((margin + r["accuracy"] * width + 4, y + bar_h / 2), f"{r['accuracy']:.3f}", fill="black",
               font=font, anchor="lm")
    return img


def misclassified(ev: Evaluation, cache: FeatureCache, limit: int = 48) -> list[dict]:
    """The most confident mistakes, with their image paths from the cache's image table."""
    pred = ev.proba.argmax(1)
    conf = ev.proba[np.arange(len(pred)), pred]
    wrong = np.flatnonzero(ev.classes[pred] != ev.y_true)
    wrong = wrong[np.argsort(-conf[wrong])][:limit]
    table = cache.images()
    rows = rows_of(table.sha256, ev.sha256[wrong])
    return [{"key": str(ev.keys[i]), "path": str(table.path[r]) if r >= 0 else "", "true": str(ev.y_true[i]),
             "predicted": str(ev.classes[pred[i]]), "probability": float(conf[i])} for i, r in zip(wrong, rows)]


def _ensembles_html(summary: dict) -> str:
    """Each ensemble against the single backbones on the same split: weights, validation choice, rows left out."""
    rows = [r for r in summary["results"] if "weights" in r]
    if not rows:
        return ""
    esc = html.escape
    members = "".join(f"<tr><td>{esc(m['backbone'])}</td><td><code>{esc(m['fingerprint'])}</code></td><td>{m['dim']}</td>"
                      f"<td>{m['dropped_rows']}</td></tr>" for m in summary.get("members", []))
    parts = ["<h2>Ensembles</h2><table><tr><th>backbone</th><th>fingerprint</th><th>dim</th>"
             f"<th>images left out (not in every backbone)</th></tr>{members}</table>"]
    for r in rows:
        cells = "".join(f"<tr><td>{esc(b)}</td><td>{r['singles'][b]:.4f}</td><td>{w:.3f}</td></tr>"
                        for b, w in r["weights"].items())
        parts.append(f"<h3>{esc(r['name'])}: {r['accuracy']:.4f} (best single {esc(r['best_single']['backbone'])} "
                     f"{r['best_single']['accuracy']:.4f}; validation chose {esc(r['choice'])})</h3>"
                     f"<table><tr><th>backbone</th><th>alone</th><th>weight</th></tr>{cells}</table>")
    return "\n".join(parts)


def write_report(path: str | Path, summary: dict, evals: list[Evaluation], cache: FeatureCache) -> dict:
    """Write PATH (HTML) and PATH with suffix .json; returns the JSON document."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    best = next(e for e in evals if e.name == summary["best"]["name"])
    m = best.metrics
    wrong = misclassified(best, cache)
    doc = {**summary, "misclassified": wrong, "report_html": str(path)}
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=2, default=str))

    figs = {"confusion": confusion_image(m["confusion"], m["labels"]), "reliability": reliability_image(m["reliability"])}
    sheet = misclassified_image(wrong)
    if len(summary["results"]) > 1:
        figs["comparison"] = comparison_image(summary["results"])
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(c)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td><td>{v['f1']:.3f}</td>"
        f"<td>{v['support']}</td></tr>" for c, v in m["per_class"].items())
    comp = "".join(
        f"<tr><td>{esc(r['name'])}</td><td>{r['accuracy']:.4f}</td><td>{r['macro_f1']:.4f}</td>"
        f"<td>{r['ece']:.3f}</td><td>{r['train_seconds']:.2f}</td></tr>" for r in summary["results"])
    ev_info = ", ".join(f"{k}={v}" for k, v in summary["evaluation"].items())
    img = lambda name: f'<img alt="{name}" src="data:image/png;base64,{_png(figs[name])}">'  # noqa: E731
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>featcache head report</title>",
        "<style>body{font-family:sans-serif;margin:24px;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}</style></head><body>",
        f"<h1>Head report: {esc(summary['best']['name'])}</h1>",
        f"<p>cache <code>{esc(summary['cache'])}</code>, backbone {esc(str(summary['backbone']))}, fingerprint "
        f"<code>{esc(summary['fingerprint'])}</code>; {summary['labelled_rows']} labelled images, "
        f"{summary['classes']} classes; evaluation: {esc(ev_info)}.</p>",
        f"<h2>Summary</h2><table><tr><th>accuracy</th><th>macro-F1</th><th>log-loss</th><th>ECE</th>"
        f"<th>train seconds</th><th>test images</th></tr><tr><td>{m['accuracy']:.4f}</td><td>{m['macro_f1']:.4f}</td>"
        f"<td>{m['log_loss'] if m['log_loss'] is None else round(m['log_loss'], 4)}</td><td>{m['ece']:.4f}</td>"
        f"<td>{summary['train_seconds']:.2f}</td><td>{m['n']}</td></tr></table>",
        "<h2>Heads and taps compared</h2><table><tr><th>tap / head / backbone</th><th>accuracy</th><th>macro-F1</th>"
        f"<th>ECE</th><th>train s</th></tr>{comp}</table>",
        _ensembles_html(summary),
        img("comparison") if "comparison" in figs else "",
        f"<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{rows}</table>",
        "<h2>Confusion matrix</h2>", img("confusion"),
        "<h2>Calibration</h2>", img("reliability"),
        f"<h2>Most confident mistakes ({len(wrong)} shown)</h2>",
        f'<img alt="misclassified" src="data:image/png;base64,{_png(sheet)}">' if sheet else "<p>none</p>",
        "</body></html>",
    ]
    path.write_text("\n".join(parts))
    return doc

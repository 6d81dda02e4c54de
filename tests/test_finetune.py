"""Partial unfreeze on real images and real weights (Tux Paint, EfficientNet-Lite0)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from featcache.classify.finetune import FinetuneConfig, Finetuner, finetune
from featcache.extract.backbone import Backbone
from featcache.extract.decode import load_image
from featcache.extract.embedder import Embedder
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.extract.registry import resolve
from featcache.store.cache import FeatureCache

from .tux import per_class_csv


@pytest.fixture(scope="module")
def ft_cache(tux_csv, lite0_embedder, tmp_path_factory):
    """8 Tux Paint stamps per class (56) through Lite0, with the stage4 activations (the stage5 cut) cached once.

    The fine-tunes here train on 32 images (``max_train``) and the prefix checks compare 6; each prefix
    pass (one per cut) costs a forward pass per cached image, so the 240 of ``tux_cache`` would only add time.
    """
    root = tmp_path_factory.mktemp("ft")
    cache = root / "cache"
    per_class_csv(tux_csv, root / "stamps.csv", 8)
    Extraction(ExtractConfig(str(root / "stamps.csv"), str(cache), progress=False), lite0_embedder).run()
    ft = Finetuner(FinetuneConfig(cache=str(cache), out="unused", unfreeze_from="stage5", progress=False))
    ft.cached_prefix(ft.prefix_embedder())
    return cache


@pytest.fixture(scope="module")
def tuned(ft_cache, tmp_path_factory):
    """One short fine-tune with --augment (the prefix really runs, so its BN could drift)."""
    cfg = FinetuneConfig(cache=str(ft_cache), out=str(tmp_path_factory.mktemp("ftout") / "backbone"),
                         unfreeze_from="stage5", epochs=1, batch_size=16, max_train=32, augment=True, progress=False)
    return cfg, finetune(cfg)


def test_frozen_layers_and_their_batchnorm_stats_are_unchanged(tuned, lite0):
    cfg, result = tuned
    tuned_state = load_file(f"{result['backbone_dir']}/weights.safetensors")
    base = lite0.network.state_dict()
    net, prefix, _ = Finetuner(cfg).build(len(result["classes"]))
    ids = {id(t) for t in [*prefix.parameters(), *prefix.buffers()]}
    frozen = {k for k, t in [*net.named_parameters(), *net.named_buffers()] if id(t) in ids}
    assert "conv_stem.weight" in frozen and "blocks.4.2.bn1.running_mean" in frozen and "blocks.5.0.conv_pw.weight" not in frozen
    for k in frozen:
        assert torch.equal(tuned_state[k], base[k]), f"frozen tensor {k} changed"
    trained = [k for k in base if k.startswith("blocks.6.") and k.endswith("weight")]
    assert any(not torch.equal(tuned_state[k], base[k]) for k in trained), "unfrozen layers did not train"


@pytest.mark.parametrize("cut, tap, shape", [("stage5", "raw:stage4", (112, 14, 14)),
                                             ("block16", "raw:block15", (192, 7, 7))])
def test_cached_prefix_equals_recomputed_prefix(ft_cache, tmp_path, cut, tap, shape):
    ft = Finetuner(FinetuneConfig(cache=str(ft_cache), out=str(tmp_path / "o"), unfreeze_from=cut, progress=False))
    assert (ft.raw_tap, ft.raw_shape) == (tap, shape)
    data, paths = ft.cached_prefix(ft.prefix_embedder())
    acts = data.X
    net, prefix, suffix = ft.build(len(set(data.y.tolist())))
    idx = np.arange(6)
    cached = ft._inputs(prefix, acts, paths, idx, train=False)
    ft.cfg.recompute_prefix = True
    recomputed = ft._inputs(prefix, acts, paths, idx, train=False)
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=2e-4)
    suffix.eval()
    with torch.no_grad():
        torch.testing.assert_close(suffix(cached), suffix(recomputed), rtol=0, atol=2e-4)


def test_bn_policy_frozen_keeps_unfrozen_running_stats(ft_cache, tmp_path, lite0):
    result = finetune(FinetuneConfig(cache=str(ft_cache), out=str(tmp_path / "b"), unfreeze_from="stage5", epochs=1,
                                     batch_size=16, max_train=32, bn="frozen", progress=False))
    state = load_file(f"{result['backbone_dir']}/weights.safetensors")
    base = lite0.network.state_dict()
    stats = [k for k in base if k.startswith("blocks.6.") and "running_" in k]
    assert stats and all(torch.equal(state[k], base[k]) for k in stats)


def test_finetuned_backbone_round_trips_through_extract(tuned, imagenet_dir, tmp_path):
    _, result = tuned
    spec = resolve(result["backbone_dir"])
    backbone = Backbone.load(spec)
    assert backbone.classifier.out_features == len(result["classes"])
    emb = Embedder(backbone, ["final"], "cpu")
    src = tmp_path / "src"
    for p in sorted(imagenet_dir.rglob("*.jpg"))[:6]:
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, src / p.parent.name / p.name)
    summary = Extraction(ExtractConfig(str(src), str(tmp_path / "c"), progress=False), emb).run()
    assert summary["extracted"] == 6 and summary["failed"] == 0
    feats = FeatureCache(tmp_path / "c").read()
    assert feats.fingerprint == emb.fingerprint != Embedder(Backbone.load(resolve("efficientnet_lite0")), ["final"], "cpu").fingerprint
    # the service and heads rebuild the backbone from the stored description: same fingerprint
    from featcache.extract.embedder import embedder_for

    attrs = FeatureCache(tmp_path / "c").group_attrs(feats.fingerprint)
    again = embedder_for(attrs["backbone"], attrs["fingerprint"], device="cpu")
    x = load_image(next(imagenet_dir.rglob("*.jpg")).read_bytes(), spec.preprocess)[None]
    np.testing.assert_allclose(again.embed(x)["final"], emb.embed(x)["final"], atol=1e-5)


@pytest.mark.parametrize("cut, message", [("stage1", "nothing would stay frozen"), ("block99", "stage5=block12..16"),
                                          ("stage9", "no stage or block")])
def test_bad_cut_is_a_clear_error(cut, message):
    from featcache.errors import UsageError

    with pytest.raises(UsageError, match=message):
        Finetuner(FinetuneConfig(cache="unused", out="unused", unfreeze_from=cut, progress=False))


def test_mixup_and_label_smoothing_train_on_cached_activations(ft_cache, tmp_path, lite0):
    result = finetune(FinetuneConfig(cache=str(ft_cache), out=str(tmp_path / "b"), unfreeze_from="stage5", epochs=1,
                                     batch_size=16, max_train=32, mixup=0.4, label_smoothing=0.1, progress=False))
    assert np.isfinite(result["history"][0]["loss"])
    state = load_file(f"{result['backbone_dir']}/weights.safetensors")
    key = "blocks.6.0.conv_pw.weight"  # an unfrozen layer: it learned
    assert not torch.equal(state[key], lite0.network.state_dict()[key])
    from featcache.errors import UsageError

    with pytest.raises(UsageError, match="--mixup must be >= 0"):
        Finetuner(FinetuneConfig(cache="unused", out="unused", unfreeze_from="stage5", mixup=-1, progress=False))


def test_finetuned_backbone_goes_through_extract_train_and_serve(tuned, tux_csv, tmp_path):
    """The tuned backbone directory, used by `featcache extract`, `featcache train` and `featcache serve`
    (on 6 stamps per class: enough for 2-fold cross-validation)."""
    import httpx

    from featcache.cli import main
    from featcache.service.app import create_app
    from featcache.service.config import ServiceConfig

    from .live import LiveServer

    _, result = tuned
    cache, head, stamps = tmp_path / "c", tmp_path / "head", tmp_path / "stamps.csv"
    per_class_csv(tux_csv, stamps, 6)
    assert main(["extract", str(stamps), "--cache", str(cache), "--backbone", result["backbone_dir"], "-q"]) == 0
    assert main(["train", "--cache", str(cache), "--out", str(head), "--cv", "2", "--json"]) == 0
    fp = FeatureCache(cache).resolve_fingerprint()
    image = Path(stamps.read_text().splitlines()[1].split(",")[0]).read_bytes()
    with LiveServer(create_app(ServiceConfig(cache=str(cache), heads={"tux": str(head)}, device="cpu"))) as srv:
        r = httpx.post(srv.url + "/v1/classify", files={"image": ("stamp.png", image, "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["fingerprint"] == fp and r.json()["head"] == "tux"

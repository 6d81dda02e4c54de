"""Service settings (one object, filled by the CLI or by tests)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServiceConfig:
    """What to serve and the limits to serve it under."""

    cache: str
    heads: dict[str, str] = field(default_factory=dict)  # name -> head bundle dir
    index: str | None = None
    fingerprint: str | None = None  # prefix; needed when the cache holds several
    api_key: str | None = None
    device: str = "auto"
    runtime: str = "auto"  # auto | torch | openvino; the precision is the cache's own (auto) or must equal it
    precision: str = "auto"
    max_upload_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_header_bytes: int = 16 * 1024  # all request header names and values together (431 above)
    batching: bool | None = None  # micro-batching (None: on with a GPU, off on CPU)
    max_batch: int = 8
    max_wait_ms: float = 10.0
    model_workers: int | None = None  # forward passes at once (None: one per CPU core on CPU, 1 on a GPU)
    thumbnail_cache_bytes: int = 64 * 1024 * 1024  # encoded thumbnails kept in memory (LRU)

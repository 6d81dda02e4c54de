"""Prometheus metrics: per-stage timings (decode, model, head, search), requests, batch sizes."""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """One registry per app, so several apps (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage = Histogram("featcache_stage_seconds", "Time per request stage", ["stage"],
                               buckets=_BUCKETS, registry=self.registry)
        self.requests = Counter("featcache_requests_total", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("featcache_request_seconds", "HTTP request latency", ["route"],
                                 buckets=_BUCKETS, registry=self.registry)
        self.batch = Histogram("featcache_batch_size", "Images per forward pass",
                               buckets=(1, 2, 4, 8, 12, 16, 24, 32, 64), registry=self.registry)
        self.reloads = Counter("featcache_head_reloads_total", "Head reloads", ["head", "result"], registry=self.registry)

    @contextmanager
    def time(self, stage: str, timings: dict[str, float]):
        """Observe a stage in the histogram and record it (ms) in the response's timings."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.stage.labels(stage).observe(dt)
            timings[stage] = round(dt * 1000, 3)

"""Pure ASGI middleware: request-body size limit (413) and per-route request metrics."""

from __future__ import annotations

import json
import time

from .metrics import Metrics


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413: by Content-Length, or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = {"error": "TooLarge", "message": f"request body is larger than the limit of {self.max_bytes:,} bytes"}
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await _send_json(send, 413, err)
        seen = 0
        over = False
        replaced = False

        async def limited_receive():
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise ValueError("request body over the size limit")
            return msg

        async def guarded_send(msg):
            nonlocal replaced
            if over:  # whatever the app answers to the broken body, the client gets 413
                if msg["type"] == "http.response.start" and not replaced:
                    replaced = True
                    await _send_json(send, 413, err)
                return
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not replaced:
            await _send_json(send, 413, err)


class RequestMetrics:
    """Count requests by route and status; time them."""

    def __init__(self, app, metrics: Metrics, routes: tuple[str, ...]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route(self, path: str) -> str:
        if path in self.routes:
            return path
        if path.startswith("/v1/heads/"):
            return "/v1/heads/{name}/reload"
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()
        route = self._route(scope.get("path", ""))  # before the app: routing may rewrite scope["path"]

        async def recording_send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

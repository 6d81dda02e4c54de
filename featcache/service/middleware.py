"""Pure ASGI middleware: request size limits (431 headers, 413 body) and per-route request metrics."""

from __future__ import annotations

import json
import time

from .metrics import Metrics


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class RequestLimits:
    """Refuse oversized requests before the app sees them: headers over ``max_header_bytes`` (431),
    bodies over ``max_body_bytes`` (413, by Content-Length or while streaming).

    uvicorn's httptools parser accepts headers of any size, so the header limit is enforced here,
    over the parsed headers in the scope (names and values together).
    """

    def __init__(self, app, max_body_bytes: int, max_header_bytes: int):
        self.app = app
        self.max_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        header_bytes = sum(len(name) + len(value) for name, value in headers)
        if header_bytes > self.max_header_bytes:
            return await _send_json(send, 431, {
                "error": "HeadersTooLarge",
                "message": f"request headers total {header_bytes:,} bytes, over the limit of {self.max_header_bytes:,}"})
        err = {"error": "TooLarge", "message": f"request body is larger than the limit of {self.max_bytes:,} bytes"}
        for name, value in headers:
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
    """Count requests by route and status, and time them.

    The route label is the template of the route the app's router picked (``/v1/heads/{name}/reload``),
    read from the scope after routing, so a new endpoint gets its own label with nothing to list.
    A request no route took (no such path, or refused by ``RequestLimits`` before routing) is "other":
    raw paths never become labels.
    """

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()

        async def recording_send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

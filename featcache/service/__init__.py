"""The HTTP service: FastAPI app (``create_app``), micro-batching, auth and limits.

Endpoints (OpenAPI at ``/docs``): ``POST /v1/embed``, ``POST /v1/classify`` (a named head; an upload
or a cached image's sha256), ``POST /v1/search`` (an uploaded image or an indexed key), ``GET /v1/info``,
``POST /v1/heads/{name}/reload``, for the page ``GET /v1/labels``, ``GET /v1/images``,
``GET /v1/images/{sha256}/thumbnail``, ``GET /v1/heads/{name}/review``, ``GET /v1/duplicates``;
``GET /healthz``, ``GET /readyz``, ``GET /metrics``; the web page at ``/ui/``.
Uploads are multipart/form-data (field ``image``); clients never pass file-system paths.
With an API key configured, ``/v1/*`` and ``/metrics`` need the ``X-API-Key`` header (401 otherwise);
probes, the OpenAPI documentation and the page's own files stay open. Every error body is ``{"error", "message"}``.

Heads are bundles from ``featcache.classify.bundle`` (``load_bundle`` / ``HeadBundle.predict_proba``);
``service.heads`` wraps them for live reload. Layout: ``app`` (factory, lifespan, error
mapping), ``routers/`` (one module per concern), ``deps`` (state, auth, form and upload
checks), ``models`` (pydantic bodies), ``batching`` (micro-batcher), ``middleware`` (body
and header limits, request metrics), ``metrics`` (Prometheus), ``state`` (preflight over manifests,
then what ``lifespan`` loads), ``catalogue`` (the served images by hash and label), ``thumbnails``
(render and LRU), ``review`` (out-of-fold mistakes, near-duplicates), ``ui/`` (the page's files).
"""

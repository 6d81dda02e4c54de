"""The HTTP service: FastAPI app (``create_app``), micro-batching, auth and limits.

Endpoints (OpenAPI at ``/docs``): ``POST /v1/embed``, ``POST /v1/classify`` (a named head),
``POST /v1/search`` (an uploaded image or an indexed key), ``GET /v1/info``,
``POST /v1/heads/{name}/reload``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.
Uploads are multipart/form-data (field ``image``); clients never pass file-system paths.
With an API key configured, ``/v1/*`` and ``/metrics`` need the ``X-API-Key`` header (401 otherwise);
probes and the OpenAPI documentation stay open. Every error body is ``{"error", "message"}``.

Heads are bundles from ``featcache.classify.bundle`` (``load_bundle`` / ``HeadBundle.predict_proba``);
``service.heads`` wraps them for live reload. Layout: ``app`` (factory, lifespan, error
mapping), ``routers/`` (one module per concern), ``deps`` (state, auth, form and upload
checks), ``models`` (pydantic bodies), ``batching`` (micro-batcher), ``middleware`` (body
and header limits, request metrics), ``metrics`` (Prometheus), ``state`` (preflight over manifests,
then what ``lifespan`` loads).
"""

"""The HTTP service: FastAPI app (``create_app``), micro-batching, auth and limits."""

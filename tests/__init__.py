"""featcache's tests. Under pytest-xdist (``make test``: one worker per CPU) each worker keeps to a CPU of its own,
set here, before conftest imports torch and OpenMP reads the affinity: featcache sizes its thread pools by affinity
(``runtime.available_cpus``), so the workers share the cores instead of oversubscribing them."""

import os

_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cpus[int(_worker[2:]) % len(_cpus)]})

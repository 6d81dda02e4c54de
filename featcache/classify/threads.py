"""How many threads a head may use: the CPUs really available, and one for small problems."""

from __future__ import annotations

from ..runtime import available_cpus

SMALL_WORK = 4_000_000  # rows x dims below which one thread beats several (per-op sync costs)


def thread_count(threads: int | None = None, work: int | None = None) -> int:
    """The CPUs really available (affinity/cgroup), never more; one thread for small problems.

    On a small matrix every op is a few microseconds, and synchronising threads (worse:
    waiting for a descheduled one on a busy machine) costs more than it saves.
    """
    return threads or (1 if work is not None and work < SMALL_WORK else available_cpus())


def set_threads(threads: int | None = None, work: int | None = None) -> int:
    """Set torch's thread count to ``thread_count(threads, work)``."""
    import torch

    n = thread_count(threads, work)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n

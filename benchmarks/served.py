"""Run ``featcache serve`` on a free loopback port for a benchmark, and stop it afterwards."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def serving(*args: str, start_timeout: float = 300) -> Iterator[tuple[str, float, int]]:
    """Yield (base URL, seconds to ready, server pid) of ``featcache serve ARGS`` on 127.0.0.1."""
    port = free_port()
    cmd = [sys.executable, "-m", "featcache.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() - t0 > start_timeout:
                raise RuntimeError("server failed to start: " + proc.stderr.read().decode()[-2000:])
            time.sleep(0.5)
        yield url, time.time() - t0, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)

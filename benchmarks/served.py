"""Run ``featcache serve`` on a free loopback port for a benchmark, and stop it afterwards."""

from __future__ import annotations

import asyncio
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


def metric(text: str, name: str, label: str = "") -> float | None:
    """The value of sample ``name`` in Prometheus text (the first one whose labels contain ``label``)."""
    for ln in text.splitlines():
        if ln.startswith(name) and ln[len(name):len(name) + 1] in (" ", "{") and label in ln:
            return float(ln.split()[-1])
    return None


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


def http_post(port: int, path: str, body: bytes, content_type: str) -> bytes:
    """A complete HTTP/1.1 POST to 127.0.0.1:PORT, encoded up front."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def send(port: int, requests: list[bytes], clients: int, total: int, time_limit: float
               ) -> list[tuple[float, int, bytes]]:
    """``clients`` keep-alive connections send ``requests`` in turn until ``total`` are sent or time is up.

    Returns (seconds, status, body) per request. A lean asyncio client: the load generator shares
    the two cores with the server, so it should cost as little CPU per request as possible (httpx
    costs ~2-4 ms per request here, this ~0.2 ms).
    """
    deadline = time.perf_counter() + time_limit
    sent, replies = 0, []

    async def client(i: int) -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        j = i
        try:
            while sent < total and time.perf_counter() < deadline:
                sent += 1
                t = time.perf_counter()
                writer.write(requests[j % len(requests)])
                j += clients
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                replies.append((time.perf_counter() - t, status, body))
        finally:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return replies

"""Reachability probes from inside a network namespace, run as a tiny child interpreter.

A child enters the namespace (setns) and connects; the lab's own threads never change namespace.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

_PROBE = (
    "import ctypes, os, socket, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0: sys.exit(3)\n"
    "s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=float(sys.argv[4]))\n"
    "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.settimeout(float(sys.argv[4]))\n"
    "data = s.recv(64)\n"
    "sys.exit(0 if data else 4)\n"
)


def tcp_probe(netns_path: str, ip: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP connection from ``netns_path`` to ip:port is accepted and answers."""
    try:
        rc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _PROBE, netns_path, ip, str(port), str(timeout)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout + 5,
        ).returncode
    except subprocess.TimeoutExpired:
        return False
    return rc == 0


def probe_matrix(
    sources: dict[str, str], targets: dict[str, str], port: int, timeout: float = 1.0, workers: int = 16
) -> dict[tuple[str, str], bool]:
    """{(src, dst): reachable} for every src netns path and dst ip (self pairs skipped)."""
    pairs = [(s, d) for s in sources for d in targets if s != d]
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda p: tcp_probe(sources[p[0]], targets[p[1]], port, timeout), pairs)
        return dict(zip(pairs, results, strict=True))

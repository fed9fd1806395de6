"""Drive a ``NftablesBackend`` inside another network namespace.

libnftables acts in the netns of the calling thread, and switching a thread of a busy process
(pytest, the lab) between namespaces is fragile. ``NetnsBackend`` instead starts a fresh
interpreter (multiprocessing ``spawn``: no inherited threads or locks), which setns(2)s into the
named netns once and then serves backend calls over a pipe. It implements the same ``Backend``
interface, so the proxier, the data-plane tests and the benchmark use it unchanged; ``run``
executes other module-level functions there too (``kproxy.conntrack.delete_flows``).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from kproxy import conntrack
from kproxy.conntrack import FlowFilter
from kproxy.nft import Contents
from kproxy.render import RenderConfig

CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """setns(2) the calling thread into ``/run/netns/<name>`` (which must exist; never created)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _serve(conn: Connection, netns: str) -> None:
    from kproxy.nft import NftablesBackend

    try:
        enter_netns(netns)
        backend = NftablesBackend()
    except Exception as e:
        conn.send((False, e))
        return
    conn.send((True, None))  # ready: callers never time our start-up as their first call
    while True:
        msg = conn.recv()
        if msg is None:
            return
        target, args = msg
        try:
            fn = getattr(backend, target) if isinstance(target, str) else target
            conn.send((True, fn(*args)))
        except Exception as e:
            conn.send((False, e))


class NetnsBackend:
    def __init__(self, netns: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, netns), daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()  # one request/reply at a time on the pipe (sync vs conntrack vs verify)
        ok, value = self._conn.recv()
        if not ok:
            self.close()
            raise value

    def _call(self, target: str | Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            self._conn.send((target, args))
            ok, value = self._conn.recv()
        if not ok:
            raise value
        return value

    def apply(self, script: str) -> None:
        # as bytes: a memcpy through pickle and the pipe, and no re-encoding by the binding there
        self._call("apply", script.encode())

    def verify(self, cfg: RenderConfig, expected: Contents | None = None) -> str | None:
        result: str | None = self._call("verify", cfg, expected)
        return result

    def remove(self, cfg: RenderConfig) -> None:
        self._call("remove", cfg)

    def delete_flows(self, filters: Sequence[FlowFilter]) -> int:
        """``kproxy.conntrack.delete_flows`` in the namespace: a ``Proxier`` conntrack cleaner."""
        deleted: int = self._call(conntrack.delete_flows, list(filters))
        return deleted

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a module-level function inside the namespace (e.g. to time work there)."""
        return self._call(fn, *args)

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self._conn.close()

    def __enter__(self) -> NetnsBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

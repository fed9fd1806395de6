"""A stdlib-only OVSDB probe for STATUS: is the Open_vSwitch DB answering, and does the bridge exist?

STATUS is called by runtimes to decide whether to send ADDs at all, possibly often; it must be
cheap, so it does not import ovsdbapp/the `ovs` library: one JSON-RPC `transact` with a `select`
on the Bridge table over a plain socket (RFC 7047 §4.1.3), with a hard deadline.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

PROBE_TIMEOUT_S = 3.0


class ProbeError(Exception):
    """OVSDB did not answer as expected; the message says what is missing."""


def _connect(remote: str, timeout: float) -> socket.socket:
    if remote.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = remote[5:]
    elif remote.startswith("tcp:"):
        host, _, port = remote[4:].rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET, socket.SOCK_STREAM)
        target = (host.strip("[]"), int(port))
    else:
        raise ProbeError(f"OVSDB remote {remote!r} is neither unix: nor tcp:")
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except (OSError, ValueError) as e:
        sock.close()
        raise ProbeError(f"OVSDB {remote} does not accept connections ({e}); is ovsdb-server running?") from None
    return sock


def _call(sock: socket.socket, remote: str, request: dict[str, Any], deadline: float) -> Any:
    sock.sendall(json.dumps(request).encode())
    buf, decoder = "", json.JSONDecoder()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProbeError(f"OVSDB {remote} did not answer within {PROBE_TIMEOUT_S:g}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except OSError as e:
            raise ProbeError(f"OVSDB {remote}: {e}") from None
        if not chunk:
            raise ProbeError(f"OVSDB {remote} closed the connection without answering")
        buf += chunk.decode("utf-8", "replace")
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break  # incomplete: read more
            buf = buf.lstrip()[end:]
            if isinstance(msg, dict) and msg.get("id") == request["id"]:
                return msg


def bridge_exists(remote: str, bridge: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if OVSDB at `remote` answers and has `bridge`; False if it answers without it.

    Raises ProbeError if OVSDB cannot be reached or answers nonsense.
    """
    deadline = time.monotonic() + timeout
    sock = _connect(remote, timeout)
    try:
        reply = _call(sock, remote, {
            "method": "transact", "id": "netctl-status",
            "params": ["Open_vSwitch", {"op": "select", "table": "Bridge", "where": [["name", "==", bridge]],
                                        "columns": ["name"]}],
        }, deadline)
    finally:
        sock.close()
    if reply.get("error") is not None:
        raise ProbeError(f"OVSDB {remote} refused the query: {reply['error']}")
    result = reply.get("result")
    if not (isinstance(result, list) and result and isinstance(result[0], dict)):
        raise ProbeError(f"OVSDB {remote} answered an unexpected reply")
    if "error" in result[0]:
        raise ProbeError(f"OVSDB {remote}: {result[0].get('error')}: {result[0].get('details', '')}")
    rows = result[0].get("rows")
    return isinstance(rows, list) and len(rows) > 0

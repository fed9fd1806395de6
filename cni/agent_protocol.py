"""The wire protocol between the thin `netctl-cni` executable and the node agent (stdlib only).

One request per connection on the agent's unix socket: the executable writes one JSON object
and shuts down its sending side; the agent answers one JSON object and closes.

    request  {"protocol": 1, "env": {"CNI_COMMAND": ..., CNI_* ...}, "stdin": "<the netconf text>"}
    response {"protocol": 1, "rc": <exit code>, "stdout": "<exactly what the plugin prints>"}

Only CNI_* variables travel: the agent takes its node name, credentials and everything else
from its own configuration, never from the caller. stdin is passed as text decoded with
`surrogateescape`, so arbitrary bytes survive the trip and the agent rejects them exactly as the
in-process plugin would.

This module is what the executable imports on the hot path (DESIGN §5): os, socket, json, time
and nothing else; no pyroute2, ovsdbapp, yaml, dataclasses or the plugin's own modules.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms on the hot path
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import IO

PROTOCOL = 1
# The CNI versions the plugin speaks (cni.spec.SUPPORTED_VERSIONS; a unit test keeps them equal).
VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
FORWARDED = ("ADD", "DEL", "CHECK", "STATUS", "GC")  # VERSION is answered by the executable itself
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
DEFAULT_ANNOTATION_TIMEOUT_S = 20.0  # cni.netconf.DEFAULT_ANNOTATION_TIMEOUT_S
GRACE_S = 5.0  # how much longer than the agent's own deadline the executable waits for its answer
CONNECT_TIMEOUT_S = 2.0
MAX_MESSAGE = 4 << 20


class ProtocolError(Exception):
    """A message that is not a well-formed request/response; the message says what is wrong."""


def _send_all_then_eof(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)


def read_to_eof(sock: socket.socket, deadline: float, limit: int = MAX_MESSAGE) -> bytes:
    """Everything the peer sends until it closes; TimeoutError past `deadline`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"message larger than {limit} bytes")
        chunks.append(chunk)


def encode_request(env: Mapping[str, str], stdin: bytes) -> bytes:
    cni_env = {k: v for k, v in env.items() if k.startswith("CNI_")}
    return json.dumps({"protocol": PROTOCOL, "env": cni_env,
                       "stdin": stdin.decode("utf-8", "surrogateescape")}).encode("utf-8", "surrogateescape")


def decode_request(data: bytes) -> tuple[dict[str, str], bytes]:
    """(CNI_* environment, stdin bytes) of a request; ProtocolError if malformed."""
    try:
        msg = json.loads(data.decode("utf-8", "surrogateescape"))
    except ValueError as e:
        raise ProtocolError(f"request is not JSON: {e}") from None
    if not isinstance(msg, dict) or msg.get("protocol") != PROTOCOL:
        raise ProtocolError(f"request is not a protocol {PROTOCOL} object")
    env, stdin = msg.get("env"), msg.get("stdin")
    if not isinstance(env, dict) or not all(isinstance(k, str) and k.startswith("CNI_") and isinstance(v, str)
                                            for k, v in env.items()):
        raise ProtocolError("request env must map CNI_* names to strings")
    if not isinstance(stdin, str):
        raise ProtocolError("request stdin must be a string")
    return env, stdin.encode("utf-8", "surrogateescape")


def encode_response(rc: int, stdout: str) -> bytes:
    return json.dumps({"protocol": PROTOCOL, "rc": rc, "stdout": stdout}).encode("utf-8", "surrogateescape")


def decode_response(data: bytes) -> tuple[int, str]:
    try:
        msg = json.loads(data.decode("utf-8", "surrogateescape"))
    except ValueError:
        raise ProtocolError("the answer is not JSON (did the agent die mid-request?)") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("rc"), int) or not isinstance(msg.get("stdout"), str):
        raise ProtocolError("the answer is not a protocol response")
    return msg["rc"], msg["stdout"]


# ---- the executable's side --------------------------------------------------------------------------


def agent_target(data: bytes) -> tuple[str, str, float] | None:
    """(socket path, cniVersion, seconds to wait for the answer) if this config goes to an agent.

    None sends the invocation down the in-process path, which also produces every error about a
    malformed config (not JSON, unsupported version, bad agentSocket) with the proper code.
    """
    try:
        conf = json.loads(data)
    except ValueError:
        return None
    if not isinstance(conf, dict):
        return None
    path, version = conf.get("agentSocket"), conf.get("cniVersion")
    if not (isinstance(path, str) and path.startswith("/") and version in VERSIONS):
        return None
    timeout = conf.get("annotationTimeoutSeconds", DEFAULT_ANNOTATION_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
        timeout = DEFAULT_ANNOTATION_TIMEOUT_S  # the agent rejects it with code 7
    return path, str(version), float(timeout) + GRACE_S


def _error(version: str, code: int, msg: str, details: str) -> str:
    return json.dumps({"cniVersion": version, "code": code, "msg": msg, "details": details})


def forward(path: str, version: str, timeout: float, env: Mapping[str, str], stdin: bytes,
            out: IO[str]) -> int:
    """Hand one invocation to the agent at `path` and print its answer; never waits past `timeout`.

    An agent that is not there (no socket, nobody listening, no answer in time, an answer cut
    short) is code 11 "try again later" naming the socket; for STATUS it is code 50 (not ready).
    """
    command = env.get("CNI_COMMAND", "")
    code = PLUGIN_NOT_AVAILABLE if command == "STATUS" else TRY_AGAIN_LATER
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.settimeout(min(CONNECT_TIMEOUT_S, timeout))
            sock.connect(path)
        except OSError as e:
            why = e.strerror or type(e).__name__
            return _fail(out, version, code, f"the netctl-cni node agent is not running at {path}",
                         f"connect: {why}; start it with `python -m cni.agent --config <file>`", env)
        try:
            _send_all_then_eof(sock, encode_request(env, stdin))
            rc, stdout = decode_response(read_to_eof(sock, deadline))
        except TimeoutError:
            return _fail(out, version, code, f"the netctl-cni node agent at {path} did not answer {command} "
                         f"within {timeout:g}s", "the runtime should retry", env)
        except (OSError, ProtocolError) as e:
            return _fail(out, version, code, f"the netctl-cni node agent at {path} failed to answer {command}",
                         str(e) or type(e).__name__, env)
    finally:
        sock.close()
    out.write(stdout)
    return rc


def _fail(out: IO[str], version: str, code: int, msg: str, details: str, env: Mapping[str, str]) -> int:
    out.write(_error(version, code, msg, details))
    with contextlib.suppress(OSError):  # the runtime logs our stderr: the agent's absence gets recorded
        os.write(2, f"netctl-cni {env.get('CNI_COMMAND', '')}: [{code}] {msg}: {details}\n".encode())
    return 1


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process on the other end of a unix socket (SO_PEERCRED)."""
    import struct

    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)

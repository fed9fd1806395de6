"""The wire protocol between the thin `netctl-cni` executable and the node agent (stdlib only).

One request per connection on the agent's unix socket: the executable writes one JSON object
and shuts down its sending side; the agent answers one JSON object and closes.

    request  {"protocol": 1, "env": {"CNI_COMMAND": ..., CNI_* ...}, "stdin": "<the netconf text>"}
    response {"protocol": 1, "rc": <exit code>, "stdout": "<exactly what the plugin prints>"}

Only CNI_* variables travel: the agent takes its node name, credentials and everything else
from its own configuration, never from the caller. stdin is passed as text decoded with
`surrogateescape`, so arbitrary bytes survive the trip and the agent rejects them exactly as the
in-process plugin would.

This module is what the executable imports on the hot path (DESIGN §5): only modules built into
the interpreter (posix, time, and the C halves `_socket` and `_json` of socket and json). The
pure-Python `socket` and `json` pull in re, enum, selectors and collections, which cost ~15 ms of
an ~10 ms interpreter start on this machine; the JSON the executable reads (its config, the
agent's answer) is decoded with the C scanner `json` itself uses, and what it writes (a request,
an error object) is assembled with the C string encoder, byte-for-byte what `json.dumps` writes.
The agent's side (decode_request, encode_response, peer_uid) imports whatever it likes.
"""

from __future__ import annotations

import _json
import _socket
import posix
import time

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms on the hot path
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import IO, Any

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


class _Strict:
    """The settings json.loads() hands the C scanner by default (NaN/Infinity read as floats)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float
    memo: dict[Any, Any] = {}


_scan = _json.make_scanner(_Strict())  # type: ignore[arg-type]  # any object with these attributes will do
_BLANK = " \t\n\r"


def loads(text: str) -> Any:
    """json.loads(text) without importing json; ValueError for anything that is not one JSON document."""
    start = len(text) - len(text.lstrip(_BLANK))
    try:
        value, end = _scan(text, start)
    except StopIteration:
        raise ValueError("not JSON") from None
    except RecursionError:  # nested deeper than the interpreter recurses: no config of ours
        raise ValueError("JSON nested too deeply") from None
    except SystemError:  # the C scanner raises its errors from json.decoder, which is not imported here
        import json

        return json.loads(text)  # the error path: raises the proper JSONDecodeError (a ValueError)
    if text[end:].strip(_BLANK):
        raise ValueError("extra data after the JSON document")
    return value


def _quote(text: str) -> str:
    return _json.encode_basestring_ascii(text)


def _send_all_then_eof(sock: _socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    sock.shutdown(_socket.SHUT_WR)


def read_to_eof(sock: _socket.socket, deadline: float, limit: int = MAX_MESSAGE) -> bytes:
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
    """The request as json.dumps would write it (ASCII: arbitrary bytes travel as escaped surrogates)."""
    cni_env = ", ".join(f"{_quote(k)}: {_quote(v)}" for k, v in env.items() if k.startswith("CNI_"))
    text = _quote(stdin.decode("utf-8", "surrogateescape"))
    return f'{{"protocol": {PROTOCOL}, "env": {{{cni_env}}}, "stdin": {text}}}'.encode("ascii")


def decode_request(data: bytes) -> tuple[dict[str, str], bytes]:
    """(CNI_* environment, stdin bytes) of a request; ProtocolError if malformed."""
    import json

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
    import json

    return json.dumps({"protocol": PROTOCOL, "rc": rc, "stdout": stdout}).encode("utf-8", "surrogateescape")


def decode_response(data: bytes) -> tuple[int, str]:
    try:
        msg = loads(data.decode("utf-8", "surrogateescape"))
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
        conf = loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included: the in-process path reports it
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


def version_answer(data: bytes) -> str:
    """VERSION, answered by the executable itself: what cni.spec.version_result says (the asked
    cniVersion if we speak it, else the latest; whatever stdin holds), as cni.spec.dumps writes it."""
    try:
        conf = loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        conf = None
    asked = conf.get("cniVersion") if isinstance(conf, dict) else None
    version = asked if isinstance(asked, str) and asked in VERSIONS else VERSIONS[-1]
    return (f'{{"cniVersion":{_quote(version)},"supportedVersions":['
            f'{",".join(_quote(v) for v in VERSIONS)}]}}')


def _error(version: str, code: int, msg: str, details: str) -> str:
    """The spec's error object, as json.dumps writes it."""
    return (f'{{"cniVersion": {_quote(version)}, "code": {int(code)}, "msg": {_quote(msg)}, '
            f'"details": {_quote(details)}}}')


def forward(path: str, version: str, timeout: float, env: Mapping[str, str], stdin: bytes,
            out: IO[str]) -> int:
    """Hand one invocation to the agent at `path` and print its answer; never waits past `timeout`.

    An agent that is not there (no socket, nobody listening, no answer in time, an answer cut
    short) is code 11 "try again later" naming the socket; for STATUS it is code 50 (not ready).
    """
    command = env.get("CNI_COMMAND", "")
    code = PLUGIN_NOT_AVAILABLE if command == "STATUS" else TRY_AGAIN_LATER
    deadline = time.monotonic() + timeout
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
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
    try:  # noqa: SIM105 (contextlib is not imported on the hot path) -- the runtime logs our stderr
        posix.write(2, f"netctl-cni {env.get('CNI_COMMAND', '')}: [{code}] {msg}: {details}\n".encode())
    except OSError:
        pass
    return 1


def peer_uid(sock: _socket.socket) -> int:
    """The uid of the process on the other end of a unix socket (SO_PEERCRED)."""
    import struct

    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)

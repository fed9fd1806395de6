"""The executable <-> node agent protocol (cni/agent_protocol.py) and the thin entry point, without daemons."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cni import agent_protocol as proto
from cni import main as cni_main
from cni.netconf import DEFAULT_ANNOTATION_TIMEOUT_S
from cni.spec import SUPPORTED_VERSIONS

BINARY = Path(sys.executable).parent / "netctl-cni"


def test_constants_match_the_plugin() -> None:
    assert proto.VERSIONS == SUPPORTED_VERSIONS
    assert proto.DEFAULT_ANNOTATION_TIMEOUT_S == DEFAULT_ANNOTATION_TIMEOUT_S


def test_request_round_trip_keeps_arbitrary_bytes_and_only_cni_env() -> None:
    stdin = b'{"cniVersion": "1.0.0"}\xff\xfe\x00'
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": "a=b", "PATH": "/bin", "NODE_NAME": "spoofed"}
    got_env, got_stdin = proto.decode_request(proto.encode_request(env, stdin))
    assert got_stdin == stdin
    assert got_env == {"CNI_COMMAND": "ADD", "CNI_ARGS": "a=b"}
    assert proto.decode_response(proto.encode_response(7, '{"x": 1}')) == (7, '{"x": 1}')


@pytest.mark.parametrize("data", [b"", b"[]", b"not json", b'{"protocol": 2, "env": {}, "stdin": ""}',
                                  b'{"protocol": 1, "env": {"PATH": "/bin"}, "stdin": ""}',
                                  b'{"protocol": 1, "env": {}, "stdin": 3}'])
def test_malformed_requests_are_refused(data: bytes) -> None:
    with pytest.raises(proto.ProtocolError):
        proto.decode_request(data)


def test_agent_target() -> None:
    conf = {"cniVersion": "1.1.0", "agentSocket": "/run/a.sock"}
    assert proto.agent_target(json.dumps(conf).encode()) == ("/run/a.sock", "1.1.0", 20.0 + proto.GRACE_S)
    conf["annotationTimeoutSeconds"] = 3
    assert proto.agent_target(json.dumps(conf).encode()) == ("/run/a.sock", "1.1.0", 3.0 + proto.GRACE_S)
    # everything the fast path cannot vouch for goes to the in-process path (which reports it properly)
    for bad in ({"cniVersion": "9.9.9", "agentSocket": "/a"}, {"cniVersion": "1.0.0", "agentSocket": "rel"},
                {"cniVersion": "1.0.0", "agentSocket": 5}, {"cniVersion": "1.0.0"}):
        assert proto.agent_target(json.dumps(bad).encode()) is None
    assert proto.agent_target(b"\xff") is None
    assert proto.agent_target(b"[1]") is None


def run(env: dict[str, str], conf: dict[str, object]) -> tuple[int, dict[str, object]]:
    out = io.StringIO()
    rc = cni_main.run(env, json.dumps(conf).encode(), out)
    return rc, json.loads(out.getvalue())


@pytest.mark.parametrize(("command", "code"), [("ADD", 11), ("DEL", 11), ("CHECK", 11), ("GC", 11), ("STATUS", 50)])
def test_no_agent_is_a_clear_error_naming_the_socket(tmp_path: Path, command: str, code: int) -> None:
    path = str(tmp_path / "nobody.sock")
    t0 = time.monotonic()
    rc, out = run({"CNI_COMMAND": command}, {"cniVersion": "1.0.0", "name": "n", "type": "netctl-cni",
                                             "agentSocket": path})
    assert time.monotonic() - t0 < 1
    assert rc == 1 and out["code"] == code and out["cniVersion"] == "1.0.0"
    assert f"the netctl-cni node agent is not running at {path}" in str(out["msg"])


def test_a_silent_agent_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)
        out = io.StringIO()
        t0 = time.monotonic()
        rc = proto.forward(path, "1.1.0", 0.5, {"CNI_COMMAND": "DEL"}, b"{}", out)
        assert 0.5 <= time.monotonic() - t0 < 2
    doc = json.loads(out.getvalue())
    assert rc == 1 and doc["code"] == 11 and "did not answer DEL within 0.5s" in doc["msg"]


def test_an_answer_cut_short_is_try_again_later(tmp_path: Path) -> None:
    """An agent that dies mid-answer (e.g. restarted): code 11, so the runtime retries."""
    path = str(tmp_path / "dying.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)

        def die_mid_answer() -> None:
            conn, _ = srv.accept()
            with conn:
                proto.read_to_eof(conn, time.monotonic() + 5)
                conn.sendall(b'{"protocol": 1, "rc"')

        t = threading.Thread(target=die_mid_answer)
        t.start()
        out = io.StringIO()
        rc = proto.forward(path, "1.0.0", 5, {"CNI_COMMAND": "ADD"}, b"{}", out)
        t.join()
    doc = json.loads(out.getvalue())
    assert rc == 1 and doc["code"] == 11 and f"the netctl-cni node agent at {path} failed to answer ADD" in doc["msg"]


def test_relative_agent_socket_is_invalid_config() -> None:
    rc, out = run({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "abc", "CNI_IFNAME": "eth0"},
                  {"cniVersion": "1.0.0", "name": "n", "type": "netctl-cni", "agentSocket": "agent.sock"})
    assert rc == 1 and out["code"] == 7 and "agentSocket" in str(out["msg"])


def test_the_binary_forwards_with_the_standard_library_only(tmp_path: Path) -> None:
    """The installed executable, agent absent: the answer comes without importing the plugin's stack."""
    path = str(tmp_path / "nobody.sock")
    code = ("import io, json, os, sys\nfrom cni import main\nout = io.StringIO()\n"
            "rc = main.run(os.environ, sys.stdin.buffer.read(), out)\n"
            "heavy = [m for m in ('pyroute2', 'ovsdbapp', 'ovs', 'yaml', 'cni.plugin', 'cni.spec', 'cni.netconf',"
            " 'cni.kubeapi', 'netctl.annotations') if m in sys.modules]\n"
            "print(json.dumps({'rc': rc, 'out': json.loads(out.getvalue()), 'heavy': heavy}))")
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "netctl-cni", "agentSocket": path}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(conf).encode(), capture_output=True,
                          timeout=60, env={**os.environ, "CNI_COMMAND": "ADD"})
    doc = json.loads(proc.stdout)
    assert doc["heavy"] == [] and doc["rc"] == 1 and doc["out"]["code"] == 11
    binary = subprocess.run([str(BINARY)], input=json.dumps(conf).encode(), capture_output=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "CNI_COMMAND": "DEL"})
    assert binary.returncode == 1 and json.loads(binary.stdout)["code"] == 11
    assert path in binary.stderr.decode() and "Traceback" not in binary.stderr.decode()


@pytest.mark.parametrize("stdin", [b"", b'{"cniVersion": "1.0.0", "name": "n\\u00e9"}', "é€😀".encode(),
                                   b"\xff\xfe\x00\x1f\"\\", b"\n\t {}"])
def test_the_hot_path_writes_what_json_dumps_writes(stdin: bytes) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": 'K8S_POD_NAME=a"b\\c', "CNI_NETNS": "/run/netns/\udcff", "HOME": "/"}
    want = {"protocol": proto.PROTOCOL, "env": {k: v for k, v in env.items() if k != "HOME"},
            "stdin": stdin.decode("utf-8", "surrogateescape")}
    assert proto.encode_request(env, stdin) == json.dumps(want).encode("utf-8", "surrogateescape")
    assert proto._error("1.1.0", 11, 'no "agent" é', "x\ny") == json.dumps(
        {"cniVersion": "1.1.0", "code": 11, "msg": 'no "agent" é', "details": "x\ny"})


@pytest.mark.parametrize("text", ['{"a": [1, -2.5e3, "x\\u00e9", null, true, false, {}]}', " \n[1]\t", "3", '"s"',
                                  '{"a": NaN, "b": -Infinity}', '{"a": 1, "a": 2}'])
def test_the_hot_path_reads_what_json_loads_reads(text: str) -> None:
    assert repr(proto.loads(text)) == repr(json.loads(text))


BAD_JSON = ["", " ", "{", '{"a": }', "[1] [2]", "{} x", "nul", '"\x01"', "'a'", '{"a": 1', "[1,]", '"\\x"']


@pytest.mark.parametrize("text", BAD_JSON)
def test_the_hot_path_refuses_what_json_loads_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        proto.loads(text)


def test_the_hot_path_refuses_bad_json_before_json_is_imported() -> None:
    """The C scanner reports errors through json.decoder: without it imported they must still be ValueErrors."""
    root = str(Path(cni_main.__file__).resolve().parents[1])
    code = (f"import sys\nsys.path.insert(0, {root!r})\nfrom cni import agent_protocol as p\nbad = 0\n"
            f"for text in {BAD_JSON!r}:\n"
            "    try:\n        p.loads(text)\n    except ValueError:\n        bad += 1\n"
            "print(bad)")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(len(BAD_JSON))


def test_the_forwarding_modules_import_no_pure_python_socket_or_json() -> None:
    """What an `-I -S` launcher loads to forward a verb: json/socket would pull in re, enum, selectors (~15 ms),
    os collections.abc, posixpath and stat (~1.3 ms)."""
    root = str(Path(cni_main.__file__).resolve().parents[1])
    code = (f"import sys\nsys.path.insert(0, {root!r})\nimport cni.main, cni.agent_protocol\n"
            "print(' '.join(m for m in ('json', 'socket', 're', 'enum', 'selectors', 'contextlib', 'typing', 'os')"
            " if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


DEEP = b"[" * 100_000  # deeper than the interpreter recurses


def test_json_nested_too_deeply_is_a_spec_error_not_a_traceback() -> None:
    with pytest.raises(ValueError):
        proto.loads(DEEP.decode())
    assert proto.agent_target(DEEP) is None  # the in-process path reports it (code 6)
    for command in ("ADD", "VERSION"):
        proc = subprocess.run([str(BINARY)], input=DEEP, capture_output=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": "abc",
                                   "CNI_NETNS": "/run/netns/nothing", "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"})
        assert b"Traceback" not in proc.stderr, proc.stderr
        out = json.loads(proc.stdout)
        if command == "ADD":
            assert proc.returncode == 1 and out["code"] == 6, out
        else:  # VERSION answers whatever stdin holds
            assert proc.returncode == 0 and out["cniVersion"] == SUPPORTED_VERSIONS[-1], out


@pytest.mark.parametrize("stdin", [b"", b"{}", b"garbage", b"\xff", b"[]", b'{"cniVersion": 1}', DEEP,
                                   b'{"cniVersion": "0.3.1"}', b'{"cniVersion": "0.4.0"}', b'{"cniVersion": "1.0.0"}',
                                   b'{"cniVersion": "1.1.0", "name": "n", "type": "netctl-cni"}'])
def test_version_is_answered_on_the_fast_path_exactly_as_in_process(stdin: bytes) -> None:
    from cni import plugin

    out = io.StringIO()
    assert plugin.run({"CNI_COMMAND": "VERSION"}, stdin, out) == 0
    fast = io.StringIO()
    assert cni_main.run({"CNI_COMMAND": "VERSION"}, stdin, fast) == 0
    assert fast.getvalue() == proto.version_answer(stdin) == out.getvalue()


def test_version_through_the_binary_imports_nothing_heavy() -> None:
    code = ("import io, json, os, sys\nfrom cni import main\nout = io.StringIO()\n"
            "rc = main.run(os.environ, sys.stdin.buffer.read(), out)\n"
            "heavy = [m for m in ('cni.plugin', 'cni.spec', 'cni.netconf') if m in sys.modules]\n"
            "print(json.dumps({'rc': rc, 'out': json.loads(out.getvalue()), 'heavy': heavy}))")
    proc = subprocess.run([sys.executable, "-c", code], input=b'{"cniVersion": "0.4.0"}', capture_output=True,
                          timeout=60, env={**os.environ, "CNI_COMMAND": "VERSION"})
    doc = json.loads(proc.stdout)
    assert doc["rc"] == 0 and doc["out"] == {"cniVersion": "0.4.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    assert doc["heavy"] == []

"""`netctl-cni`: the CNI executable's entry point (console script `netctl-cni = cni.main:main`).

The runtime execs us once per verb with CNI_* in the environment and the network configuration
on stdin; stdout carries exactly one JSON document and nothing else.

Two ways to run a verb:
- the config has `agentSocket` (the normal case on a node): ADD/DEL/CHECK/STATUS/GC are handed to
  the node agent (`python -m cni.agent`, see cni/agent.py) over that unix socket and its answer is
  printed. This path imports only built-in modules (cni.agent_protocol: os, _socket, _json) —
  start-up time is pod start time (DESIGN §5). An agent that is not there is code 11 (STATUS: 50)
  naming the socket, within the timeout, never a hang.
- VERSION is answered here, from built-ins too (its answer depends only on the asked cniVersion).
- no `agentSocket`, or a config the fast path cannot read: the verb runs in this process
  (cni.plugin), which also produces every config error with its proper code.

The forwarding path needs neither site-packages nor the editable-install finder, so the
executable may be a launcher running the interpreter with `-I -S` (see bench/cni_add.py
--launcher); site-packages are then added only when a verb runs in-process. It does not import
`os` either (~1.3 ms here: collections.abc, posixpath, stat), reading the environment from the
built-in `posix`, and once the answer is printed it ends the process with `_exit`: there is
nothing to finish (no threads, no open files), and the interpreter's teardown costs ~2 ms.
"""

from __future__ import annotations

import posix
import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms on the hot path
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import IO


def main() -> None:
    """Console-script entry point."""
    # in-process ADD/DEL overlap an OVSDB commit (ovsdbapp threads) with netlink work: hand the GIL
    # over promptly (cni.agent does the same; the default 5 ms interval costs ~15 ms per ADD)
    sys.setswitchinterval(0.0005)
    env = environ()
    rc, data = forwarded(env, sys.stdin.buffer, sys.stdout)
    if rc is not None:
        posix._exit(rc)  # the answer is out (forwarded() flushed it); skip the interpreter's teardown
    sys.exit(in_process(env, data, sys.stdout))


def environ() -> dict[str, str]:
    """What os.environ holds (same decoding), without importing os."""
    enc, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    return {k.decode(enc, errors): v.decode(enc, errors) for k, v in posix.environ.items()}


def run(env: Mapping[str, str], stdin: IO[bytes] | bytes, out: IO[str]) -> int:
    """One invocation: returns the exit code, writes exactly one JSON document to `out`."""
    rc, data = forwarded(env, stdin, out)
    return rc if rc is not None else in_process(env, data, out)


def forwarded(env: Mapping[str, str], stdin: IO[bytes] | bytes, out: IO[str]) -> tuple[int | None, IO[bytes] | bytes]:
    """(exit code, stdin) if the node agent took the verb (its answer is written and flushed), else
    (None, what is left of stdin: the bytes read, or the stream if reading failed)."""
    from cni import agent_protocol

    data: IO[bytes] | bytes = stdin
    if env.get("CNI_COMMAND") == "VERSION":  # a probe with a fixed answer: no agent, no site-packages
        try:
            data = data if isinstance(data, bytes) else data.read()
        except OSError:
            data = b""  # VERSION answers whatever stdin holds, even nothing
        out.write(agent_protocol.version_answer(data))
        out.flush()
        return 0, data
    if env.get("CNI_COMMAND") in agent_protocol.FORWARDED:
        if not isinstance(data, bytes):
            try:
                data = data.read()
            except OSError:
                data = stdin  # the in-process path reports the read error (code 5)
        target = agent_protocol.agent_target(data) if isinstance(data, bytes) else None
        if target is not None:
            path, version, timeout = target
            assert isinstance(data, bytes)
            rc = agent_protocol.forward(path, version, timeout, env, data, out)
            out.flush()
            return rc, data
    return None, data


def in_process(env: Mapping[str, str], data: IO[bytes] | bytes, out: IO[str]) -> int:
    """Run the verb in this process (cni.plugin)."""
    if sys.flags.no_site:  # started by an `-I -S` launcher: the in-process path needs site-packages
        import site

        site.main()
    from cni import plugin

    return plugin.run(env, data, out)


if __name__ == "__main__":
    main()

"""Start, watch and stop the lab's daemons (etcd, kube-*, containerd, kubelet) the same way.

Every daemon gets its own log file and pidfile under the caller's run dir, so a failure always
names the file to read, and a later ``stop()`` (even from another process, through the pidfile)
finds exactly the process it started. A pid is trusted only while ``/proc/<pid>/cmdline`` still
matches the command we ran: pids are reused, and killing a stranger is worse than leaking.

A daemon that belongs to a simulated node runs inside that node's network namespace through
``nsenter --net`` (only the network namespace: containerd's netns mounts must stay visible to
the host, which a private mount namespace such as ``ip netns exec`` creates would hide).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class DaemonError(RuntimeError):
    """A daemon did not start, did not become ready, or died; the message names its log."""


def tail(path: Path, lines: int = 20) -> str:
    """Last ``lines`` lines of a log, for error messages (empty if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the kernel picks it, so runs never collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def proc_cmdline(pid: int) -> list[str] | None:
    """argv of a live (non-zombie) process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # state is the field after the parenthesised comm (which may itself contain spaces)
        if stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X"):
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (OSError, ValueError):
        return None
    if not raw:
        return None
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def iter_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every live process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = proc_cmdline(int(entry))
            if argv is not None:
                yield int(entry), argv


def kill_pid(pid: int, timeout: float = 10.0, check: Callable[[int], bool] | None = None) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; ``check(pid)`` says it is still ours."""

    def alive() -> bool:
        return proc_cmdline(pid) is not None and (check is None or check(pid))

    if not alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not alive():
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        _reap(pid)
        if proc_cmdline(pid) is None:
            return
        time.sleep(0.05)
    raise DaemonError(f"pid {pid} survived SIGKILL")


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


class Daemon:
    """One long-running process with a log file, a pidfile and an optional network namespace."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        pid_path: Path,
        *,
        netns: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.pid_path = Path(pid_path)
        self.netns = netns
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def _is_ours(self, pid: int) -> bool:
        # A script started through its shebang shows its interpreter first: [python, script, args...].
        cmd = proc_cmdline(pid)
        return cmd is not None and (cmd == self.argv or cmd[1:] == self.argv)

    @property
    def pid(self) -> int | None:
        """pid of the running daemon (from this object or its pidfile), None if not running."""
        if self._popen is not None and self._popen.poll() is None:
            return self._popen.pid
        try:
            pid = int(self.pid_path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if self._is_ours(pid) else None

    def running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Spawn the daemon (no-op if already running); stdout and stderr go to its log."""
        if self.running():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        argv = list(self.argv)
        if self.netns is not None:
            if not (NETNS_DIR / self.netns).exists():
                raise DaemonError(f"{self.name}: network namespace {self.netns} does not exist")
            argv = ["nsenter", f"--net={NETNS_DIR / self.netns}", "--", *argv]
        env = dict(os.environ) if self.env is None else {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%F %T')} starting: {' '.join(argv)}\n".encode())
            log.flush()
            # A new session: a Ctrl-C meant for the test runner must not reach the daemons
            # before their orderly stop.
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )
        self.pid_path.write_text(f"{self._popen.pid}\n")

    def exit_code(self) -> int | None:
        """The exit status if we started it and it has exited."""
        return None if self._popen is None else self._popen.poll()

    def wait_ready(self, check: Callable[[], bool], timeout: float, what: str = "ready") -> float:
        """Poll ``check`` until true; fail fast if the daemon dies. Returns seconds waited."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            ok = False
            with contextlib.suppress(Exception):  # probes fail in many ways while a daemon starts
                ok = bool(check())
            if ok:
                return time.monotonic() - start
            if not self.running():
                code = self.exit_code()
                raise DaemonError(
                    f"{self.name} exited (status {code}) before it was {what}; see {self.log_path}:\n"
                    f"{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"{self.name} not {what} after {timeout:.0f} s; see {self.log_path}:\n"
                    f"{tail(self.log_path)}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; removes the pidfile."""
        pid = self.pid
        if pid is not None:
            # Our own child is ours even before it has exec'd (its cmdline is still ours then).
            own_child = self._popen is not None and self._popen.pid == pid
            kill_pid(pid, timeout, check=None if own_child else self._is_ours)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=1)
            self._popen = None
        self.pid_path.unlink(missing_ok=True)


def run(argv: Sequence[str | Path], *, timeout: float = 60.0, input: bytes | None = None) -> str:
    """Run a short helper command (openssl, ctr); raise with its output when it fails."""
    proc = subprocess.run(
        [str(a) for a in argv], input=input, capture_output=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise DaemonError(
            f"{' '.join(str(a) for a in argv)} failed ({proc.returncode}): "
            f"{proc.stderr.decode(errors='replace').strip() or proc.stdout.decode(errors='replace').strip()}"
        )
    return proc.stdout.decode(errors="replace")

"""Real OVS and OVN daemons for the lab and the data-plane tests.

Everything a stack creates lives under its own run directory (databases, sockets, pidfiles,
logs) and is found again through its pidfiles, so a stack started by `netctl lab up` can be
stopped by another process, and two stacks (a running lab and a test run) never share anything.
Nothing is written to the system paths (/var/run/openvswitch, /etc/openvswitch).

There is no openvswitch kernel module here (DESIGN §5): bridges use the userspace `netdev`
datapath. OVS runs inside a chosen network namespace (a dedicated "hypervisor" netns in the lab
and in tests), so its bridges and tap devices never appear in the host namespace.

Daemons are entered into the namespace by a tiny trampoline (`python -I -S -c ...` that calls
setns(2) and execs the daemon) rather than a `preexec_fn`: the calling process runs ovsdbapp
threads, and Python code between fork and exec in a threaded process can deadlock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ovs.unixctl.client import UnixctlClient
from ovsdbapp.backend.ovs_idl import command as ovsdb_command
from ovsdbapp.backend.ovs_idl import connection as ovsdb_connection
from ovsdbapp.backend.ovs_idl import transaction as ovsdb_transaction
from ovsdbapp.schema.open_vswitch import impl_idl as ovs_impl_idl
from pyroute2 import NetNS
from pyroute2 import netns as pyroute2_netns

from netctl.ovsdb import per_instance_connection

OVS_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
OVN_NB_SCHEMA = Path("/usr/share/ovn/ovn-nb.ovsschema")
OVN_SB_SCHEMA = Path("/usr/share/ovn/ovn-sb.ovsschema")
NETNS_DIR = Path("/run/netns")
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1
_NETNS_MARKER = "netns.created"

# setns(2) + exec, run as a separate interpreter so nothing Python runs between fork and exec.
_NSEXEC = (
    "import ctypes, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)\n"
    "if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:\n"
    "    raise SystemExit('setns %s: %s' % (sys.argv[1], os.strerror(ctypes.get_errno())))\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class DaemonError(RuntimeError):
    """A daemon failed to start or to become ready; the message names it and its log file."""


@dataclass(frozen=True)
class Daemon:
    """One daemon of a stack: its name, pidfile, log file and unixctl socket."""

    name: str
    pidfile: Path
    log: Path
    ctl: Path | None  # None: the daemon has no --unixctl option and uses <rundir>/<name>.<pid>.ctl
    ctl_dirs: tuple[Path, ...] = ()

    def control_socket(self) -> Path | None:
        """Path of the daemon's unixctl socket, if it exists."""
        if self.ctl is not None:
            return self.ctl if self.ctl.exists() else None
        pid = self.pid()
        for d in self.ctl_dirs:
            if pid is not None and (d / f"{self.name}.{pid}.ctl").exists():
                return d / f"{self.name}.{pid}.ctl"
        return None

    def pid(self) -> int | None:
        """The daemon's pid if its pidfile names a live process that is really this daemon."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, ValueError):
            return None
        # The pid may have been recycled: it is ours only if it was started with our pidfile.
        if f"--pidfile={self.pidfile}".encode() not in cmdline.split(b"\0"):
            return None
        if "\nState:\tZ" in status:
            return None
        return pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the daemon (SIGKILL after `timeout`) and wait until it is gone."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _poll(lambda: self.pid() is None, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _poll(lambda: self.pid() is None, 5.0)


def _poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def _sock(path: Path) -> Path:
    if len(str(path)) > _SUN_PATH_MAX:
        raise ValueError(f"unix socket path too long ({len(str(path))} > {_SUN_PATH_MAX}): {path}")
    return path


def _unixctl(d: Daemon, command: str, *args: str) -> str | None:
    """Run one unixctl command against a daemon's control socket; None if unreachable."""
    ctl = d.control_socket()
    if ctl is None:
        return None
    err, client = UnixctlClient.create(str(ctl))
    if err or client is None:
        return None
    try:
        err, error, result = client.transact(command, list(args))
    finally:
        client.close()
    if err or error is not None:
        return None
    return str(result).strip()


def _socket_accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def ensure_netns(name: str) -> bool:
    """Create netns `name` with `lo` up unless it exists; True if it was created here."""
    created = False
    if name not in pyroute2_netns.listnetns():
        pyroute2_netns.create(name)
        created = True
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    return created


def remove_netns(name: str) -> None:
    """Delete netns `name` if it exists (its veth ends go with it)."""
    if name in pyroute2_netns.listnetns():
        pyroute2_netns.remove(name)


class _Stack:
    """Shared lifecycle: spawn detached daemons, wait for readiness, stop by pidfile.
    The run dir belongs to the stack: stop() deletes it."""

    def __init__(self, run_dir: str | Path, timeout: float) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.timeout = timeout

    def _daemon(self, name: str, *ctl_dirs: Path) -> Daemon:
        return Daemon(
            name=name,
            pidfile=self.run_dir / f"{name}.pid",
            log=self.run_dir / f"{name}.log",
            ctl=None if ctl_dirs else _sock(self.run_dir / f"{name}.ctl"),
            ctl_dirs=ctl_dirs,
        )

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _spawn(self, d: Daemon, argv: list[str], netns: str | None) -> None:
        """Start `argv` detached (`--detach` returns once the daemon is initialised)."""
        full = [
            *argv,
            f"--pidfile={d.pidfile}",
            f"--log-file={d.log}",
            "--detach",
            "--no-chdir",
            *([f"--unixctl={d.ctl}"] if d.ctl is not None else []),
        ]
        if netns is not None:
            full = [sys.executable, "-I", "-S", "-c", _NSEXEC, str(NETNS_DIR / netns), *full]
        stderr = self.run_dir / f"{d.name}.stderr"
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                full, env=self._env(), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True,
            )
        try:
            rc = proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise DaemonError(
                f"{d.name} did not finish starting within {self.timeout:.0f}s; log {d.log}:\n"
                f"{_log_tail(d.log)}"
            ) from None
        if rc != 0:
            raise DaemonError(
                f"{d.name} failed to start (exit {rc}); log {d.log}:\n{_log_tail(d.log)}\n"
                f"stderr {stderr}:\n{_log_tail(stderr)}"
            )

    def _wait_ready(self, d: Daemon, ready: Callable[[], bool], what: str) -> None:
        if not _poll(ready, self.timeout, 0.1):
            alive = "running" if d.pid() else "not running"
            raise DaemonError(
                f"{d.name} ({alive}) not ready within {self.timeout:.0f}s: {what}; log {d.log}:\n"
                f"{_log_tail(d.log)}"
            )

    def _ovsdb_tool_create(self, db: Path, schema: Path) -> None:
        """Create the database file unless it exists (a restarted stack keeps its state)."""
        if db.exists():
            return
        res = subprocess.run(["ovsdb-tool", "create", str(db), str(schema)], capture_output=True, text=True)
        if res.returncode != 0:
            raise DaemonError(f"ovsdb-tool create {db} from {schema} failed: {res.stderr.strip()}")

    def _known_daemons(self) -> list[Daemon]:
        raise NotImplementedError

    def is_running(self) -> bool:
        """True if every daemon of this stack is alive (checked through its pidfile)."""
        return all(d.pid() is not None for d in self._known_daemons())

    def _stop_daemons(self) -> None:
        for d in reversed(self._known_daemons()):
            d.stop()


_OvsApi = per_instance_connection(ovs_impl_idl.OvsdbIdl)


class OvsStack(_Stack):
    """ovsdb-server + ovs-vswitchd (userspace datapath) under `run_dir`, inside `netns` if given.

    Use as a context manager, or `start()` / `stop()`. `stop()` also works from another process
    that constructs an `OvsStack` on the same run_dir (pidfiles are the record).
    """

    def __init__(self, run_dir: str | Path, netns: str | None = None, *, timeout: float = 30.0) -> None:
        super().__init__(run_dir, timeout)
        self.netns = netns
        self.db_path = self.run_dir / "conf.db"
        self.db_sock = _sock(self.run_dir / "db.sock")
        self.db_connection = f"unix:{self.db_sock}"
        self.ovsdb = self._daemon("ovsdb-server")
        self.vswitchd = self._daemon("ovs-vswitchd")
        self._api: Any = None

    def _known_daemons(self) -> list[Daemon]:
        return [self.ovsdb, self.vswitchd]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in ("OVS_RUNDIR", "OVS_DBDIR", "OVS_LOGDIR", "OVS_SYSCONFDIR"):
            env[var] = str(self.run_dir)
        env["OVS_PKGDATADIR"] = str(OVS_SCHEMA.parent)
        return env

    def start(self) -> OvsStack:
        """Create the db and start both daemons; on any failure clean up and raise DaemonError."""
        if self.is_running():
            raise DaemonError(f"an OVS stack is already running in {self.run_dir}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.netns is not None and ensure_netns(self.netns):
                (self.run_dir / _NETNS_MARKER).write_text(self.netns)
            self._ovsdb_tool_create(self.db_path, OVS_SCHEMA)
            self._spawn(self.ovsdb, ["ovsdb-server", str(self.db_path),
                                     f"--remote=punix:{self.db_sock}"], self.netns)
            self._wait_ready(self.ovsdb, lambda: _socket_accepts(self.db_sock), f"{self.db_sock} accepts")
            self._init_root_row()
            self._spawn(self.vswitchd, ["ovs-vswitchd", self.db_connection], self.netns)
            self._wait_ready(self.vswitchd, lambda: _unixctl(self.vswitchd, "version") is not None,
                             "unixctl 'version' answers")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def api(self) -> Any:
        """ovsdbapp Open_vSwitch API bound to this stack's db (created on first use)."""
        if self._api is None:
            idl = ovsdb_connection.OvsdbIdl.from_server(self.db_connection, "Open_vSwitch")
            self._api = _OvsApi(ovsdb_connection.Connection(idl, self.timeout))
        return self._api

    def _init_root_row(self) -> None:
        """`ovs-vsctl init`: the Open_vSwitch table must hold its single row before vswitchd runs."""
        api = self.api
        if api.tables["Open_vSwitch"].rows:
            return
        txn = ovsdb_transaction.Transaction(api, api.ovsdb_connection, self.timeout, check_error=True)
        txn.add(ovsdb_command.DbCreateCommand(api, "Open_vSwitch"))
        txn.commit()

    def set_external_ids(self, ids: Mapping[str, str]) -> None:
        """Merge `ids` into Open_vSwitch external_ids (ovn-controller reads its config there)."""
        self.api.db_set("Open_vSwitch", ".", ("external_ids", dict(ids))).execute(check_error=True)

    def add_bridge(self, name: str, *, fail_mode: str = "secure") -> None:
        """Add bridge `name` with the userspace datapath (idempotent).

        fail_mode=secure: without its controller the bridge drops instead of flooding like a
        learning switch, which would join tenants' ports.
        """
        with self.api.transaction(check_error=True) as txn:
            txn.add(self.api.add_br(name, may_exist=True, datapath_type="netdev"))
            txn.add(self.api.db_set("Bridge", name, ("fail_mode", fail_mode)))

    def del_bridge(self, name: str) -> None:
        self.api.del_br(name, if_exists=True).execute(check_error=True)

    def add_port(self, bridge: str, port: str, external_ids: Mapping[str, str] | None = None) -> int:
        """Attach existing device `port` (in the OVS netns) to `bridge`; return its OpenFlow port.

        Raises DaemonError if vswitchd could not open the device.
        """
        ids = dict(external_ids or {})
        self.api.add_port(bridge, port, may_exist=True, external_ids=ids).execute(check_error=True)
        if ids:  # the port may have existed already: make its external_ids current
            self.api.db_set("Interface", port, ("external_ids", ids)).execute(check_error=True)
        ofport = self.api.db_get("Interface", port, "ofport").execute(check_error=True)
        ofport = ofport[0] if isinstance(ofport, list) and ofport else ofport
        if not isinstance(ofport, int) or ofport < 0:
            error = self.api.db_get("Interface", port, "error").execute(check_error=True)
            self.del_port(port)  # do not leave a dead port behind
            raise DaemonError(f"ovs-vswitchd could not add {port} to {bridge}: {error}; "
                              f"log {self.vswitchd.log}")
        return ofport

    def del_port(self, port: str) -> None:
        self.api.del_port(port, if_exists=True).execute(check_error=True)

    def _close_api(self) -> None:
        if self._api is not None:
            self._api.ovsdb_connection.stop(timeout=5)
            self._api = None

    def stop(self) -> None:
        """Stop the daemons this stack started (found by pidfile), delete the netns if this
        stack created it, and remove the run dir. Idempotent."""
        self._close_api()
        self._stop_daemons()
        marker = self.run_dir / _NETNS_MARKER
        with contextlib.suppress(OSError):
            remove_netns(marker.read_text().strip())
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> OvsStack:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class OvnStack(_Stack):
    """OVN NB + SB ovsdb-servers, ovn-northd and ovn-controller for one chassis.

    NB/SB/northd only use unix sockets, so they run where the caller runs; ovn-controller runs in
    the OVS stack's netns and finds vswitchd's OpenFlow socket through OVS_RUNDIR.
    """

    def __init__(self, run_dir: str | Path, ovs: OvsStack, bridge: str = "br-int",
                 system_id: str = "chassis-1", *, timeout: float = 30.0) -> None:
        super().__init__(run_dir, timeout)
        if self.run_dir == ovs.run_dir:
            raise ValueError("OvnStack needs its own run_dir (stop() removes it)")
        self.ovs = ovs
        self.bridge = bridge
        self.system_id = system_id
        self.nb_sock = _sock(self.run_dir / "nb.sock")
        self.sb_sock = _sock(self.run_dir / "sb.sock")
        self.nb_connection = f"unix:{self.nb_sock}"
        self.sb_connection = f"unix:{self.sb_sock}"
        self.nb = self._daemon("ovsdb-nb")
        self.sb = self._daemon("ovsdb-sb")
        self.northd = self._daemon("ovn-northd")
        # ovn-controller 23.03 has no --unixctl; it puts <name>.<pid>.ctl in its rundir.
        self.controller = self._daemon("ovn-controller", self.run_dir, ovs.run_dir)

    def _known_daemons(self) -> list[Daemon]:
        return [self.nb, self.sb, self.northd, self.controller]

    def _env(self) -> dict[str, str]:
        env = self.ovs._env()  # ovn-controller looks for <OVS_RUNDIR>/<bridge>.mgmt
        for var in ("OVN_RUNDIR", "OVN_DBDIR", "OVN_LOGDIR", "OVN_SYSCONFDIR"):
            env[var] = str(self.run_dir)
        env["OVN_PKGDATADIR"] = str(OVN_NB_SCHEMA.parent)
        return env

    def start(self) -> OvnStack:
        """Start all four daemons and wait until northd is active and ovn-controller is connected."""
        if not self.ovs.is_running():
            raise DaemonError(f"OVS stack in {self.ovs.run_dir} is not running")
        if self.is_running():
            raise DaemonError(f"an OVN stack is already running in {self.run_dir}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for d, sock, schema in ((self.nb, self.nb_sock, OVN_NB_SCHEMA),
                                    (self.sb, self.sb_sock, OVN_SB_SCHEMA)):
                db = self.run_dir / f"{d.name}.db"
                self._ovsdb_tool_create(db, schema)
                self._spawn(d, ["ovsdb-server", str(db), f"--remote=punix:{sock}"], None)
                self._wait_ready(d, lambda s=sock: _socket_accepts(s), f"{sock} accepts")  # type: ignore[misc]
            self._spawn(self.northd, ["ovn-northd", f"--ovnnb-db={self.nb_connection}",
                                      f"--ovnsb-db={self.sb_connection}"], None)
            self._wait_ready(self.northd, lambda: "active" in (_unixctl(self.northd, "status") or ""),
                             "unixctl 'status' says active")
            self.ovs.add_bridge(self.bridge)
            self.ovs.set_external_ids({
                "system-id": self.system_id,
                "hostname": self.system_id,
                "ovn-remote": self.sb_connection,
                "ovn-encap-type": "geneve",
                "ovn-encap-ip": "127.0.0.1",
                "ovn-bridge": self.bridge,
                "ovn-bridge-datapath-type": "netdev",
            })
            self._spawn(self.controller, ["ovn-controller", self.ovs.db_connection], self.ovs.netns)
            self._wait_ready(
                self.controller,
                lambda: _unixctl(self.controller, "connection-status") == "connected",
                f"unixctl 'connection-status' is connected to {self.sb_connection}",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the daemons this stack started (found by pidfile) and remove the run dir."""
        self._stop_daemons()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> OvnStack:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


__all__ = ["DaemonError", "OvnStack", "OvsStack", "ensure_netns", "remove_netns"]

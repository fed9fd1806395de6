"""Remove a lab, from the live objects when we have them, else from what `lab.json` recorded.

Order matters: pods and runtimes first (they hold netns mounts and OVS ports), then the
controller and the control plane, then the networks, then OVS/OVN, then files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute, netns

from netctl.lab.procs import kill_pid, proc_cmdline

if TYPE_CHECKING:
    from netctl.lab.lab import Lab, LabState

log = logging.getLogger(__name__)


def kill_pidfiles(root: Path, timeout: float = 10.0) -> None:
    """Stop every process named by a pidfile under ``root`` whose command line mentions ``root``.

    The command-line check keeps a stale pidfile from ever killing an unrelated process.
    """

    def ours(pid: int) -> bool:
        argv = proc_cmdline(pid)
        return argv is not None and any(str(root) in a or root.name in a for a in argv)

    for pidfile in root.rglob("*.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().split()[0])
            if ours(pid):
                kill_pid(pid, timeout, check=ours)


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def kill_referencing(root: Path, timeout: float = 10.0) -> None:
    """Stop every process whose command line names ``root`` (a daemon whose pidfile is gone, e.g.
    one a crashed test started), except this process and its ancestors (`netctl lab down
    --run-dir <root>` and the shell that ran it)."""
    mine = _ancestors()

    def ours(pid: int) -> bool:
        argv = proc_cmdline(pid)
        return argv is not None and any(str(root) in a for a in argv)

    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in mine and ours(int(entry.name)):
            with contextlib.suppress(OSError):
                kill_pid(int(entry.name), timeout, check=ours)


def _step(what: str, func: Any, *args: Any) -> None:
    try:
        func(*args)
    except Exception:  # teardown goes on: one stuck piece must not leave the rest behind
        log.warning("lab down: %s failed", what, exc_info=True)


def remove_lab(run_dir: Path, state: LabState | None, live: Lab | None = None) -> None:
    from netctl.lab.lab import LabState
    from netctl.lab.ovs import OvnStack, OvsStack

    state = state or LabState.load(run_dir)
    if state is None and not run_dir.exists():
        return
    prefix = state.prefix if state else (live.prefix if live else "")

    # 1. node runtimes (pods, sandboxes, kubelet, containerd, mounts, cgroups, sysctls)
    runtimes: dict[str, Any] = dict(live.runtimes) if live else {}
    if state is not None:
        from netctl.lab.runtime import NodeRuntime

        for node, info in state.nodes.items():
            if node not in runtimes:
                with contextlib.suppress(Exception):
                    runtimes[node] = NodeRuntime.attach(
                        node, info["netns"], run_dir / "nodes" / node / "runtime", prefix=prefix
                    )
    for name, rt in runtimes.items():
        _step(f"stopping node {name}", rt.stop)

    # 2. the controller and the control plane (and anything else with a pidfile in the run dir)
    if live is not None and live.controller is not None:
        _step("stopping the controller", live.controller.stop)
    if live is not None and live.cp is not None:
        _step("stopping the control plane", live.cp.stop)
    if run_dir.exists():
        _step("stopping remaining lab processes", kill_pidfiles, run_dir)
        _step("stopping processes that name the lab but left no pidfile", kill_referencing, run_dir)

    # 3. management bridge and node namespaces
    if prefix:
        _step("removing the mgmt bridge", _del_link, f"{prefix}mg")
    if live is not None and live.iaas is not None:
        _step("closing the IaaS connection", getattr(live.iaas, "close", lambda: None))

    # 4. OVN and OVS (pidfile based, works from any process)
    ovs = OvsStack(run_dir / "ovs", netns=f"{prefix}hv" if prefix else None)
    _step("stopping OVN", OvnStack(run_dir / "ovn", ovs).stop)
    _step("stopping OVS", ovs.stop)
    for ns in (state.netns if state else []):
        _step(f"removing netns {ns}", _del_netns, ns)

    # 5. files (and the parent, when the lab was all it held, e.g. /var/lib/netctl)
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()


def _del_link(name: str) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if idx:
            ipr.link("del", index=idx[0])


def _del_netns(name: str) -> None:
    if name in netns.listnetns():
        netns.remove(name)

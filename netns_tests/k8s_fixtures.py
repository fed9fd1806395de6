"""A real Kubernetes for tests: control plane on a per-run management bridge, kubelet+containerd nodes.

Use from a test module with ``pytest_plugins = ("netns_tests.k8s_fixtures",)`` (conftest.py is not ours).
``k8s_lab`` is session scoped: one control plane and one node ``n1`` (tenant ``alpha``) whose
CNI config is the reference ``bridge`` + ``host-local`` chain on a private bridge, so the runtime
path is tested without our own CNI. ``bridge_lab()`` builds the same thing as a context manager
for tests that need their own (e.g. to check that teardown leaves nothing behind). Every name
carries a per-run prefix; teardown runs also when start-up fails half way.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from netctl.lab import runtime as lab_runtime
from netctl.lab.hosts import MgmtNetwork, pick_free_cidr
from netctl.lab.k8s import K8S_BINARIES, ControlPlane, k8s_bin_dirs
from netctl.lab.procs import iter_processes
from netctl.lab.runtime import NodeRuntime

TENANT_LABEL = "netctl.io/tenant"
TOOLS_IMAGE = "netctl.io/lab/busybox:1"
POD_PORT = 8080
CLONE_NEWNET = 0x40000000


def new_prefix() -> str:
    """Short per-run prefix (interface names are limited to 15 characters)."""
    return "nk" + secrets.token_hex(2)


def require_k8s_binaries() -> None:
    """Skip (with the reason; --require-netns turns it into a failure) without the built binaries."""
    for b in K8S_BINARIES[:4]:
        if not any(os.access(d / b, os.X_OK) for d in k8s_bin_dirs()):
            pytest.skip(f"{b} not built: run tools/build-k8s.sh")


def bridge_conflist(prefix: str, ipam_dir: Path, subnet: str) -> dict[str, Any]:
    """Reference bridge + host-local on bridge ``<prefix>cb0`` inside the node netns."""
    return {
        "cniVersion": "0.4.0",
        "name": f"{prefix}-bridge",
        "plugins": [{
            "type": "bridge", "bridge": f"{prefix}cb0", "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": str(ipam_dir)},
        }],
    }  # fmt: skip


@dataclass
class BridgeLab:
    prefix: str
    run_dir: Path
    mgmt: MgmtNetwork
    cp: ControlPlane
    nodes: dict[str, NodeRuntime] = field(default_factory=dict)
    node_netns: dict[str, str] = field(default_factory=dict)
    tenant: str = "alpha"

    def core(self) -> Any:
        from kubernetes import client as k8s

        return k8s.CoreV1Api(self.cp.api_client())


@contextlib.contextmanager
def bridge_lab(
    prefix: str | None = None, nodes: tuple[str, ...] = ("n1",), tenant: str = "alpha"
) -> Iterator[BridgeLab]:
    """Management network, control plane and kubelet nodes on the reference bridge CNI; torn down on exit."""
    prefix = prefix or new_prefix()
    run_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    mgmt = MgmtNetwork(prefix, pick_free_cidr())
    cp = ControlPlane(run_dir / "k8s", mgmt.address, prefix, nodes=nodes)
    lab = BridgeLab(prefix, run_dir, mgmt, cp, tenant=tenant)
    try:
        mgmt.create()
        cp.start()
        bin_dir = run_dir / "cni-bin"
        bin_dir.mkdir()
        for plugin in ("bridge", "host-local"):
            (bin_dir / plugin).symlink_to(lab_runtime.REFERENCE_CNI_DIR / plugin)
        for i, name in enumerate(nodes):
            ns = f"{prefix}-{name}"
            lab.node_netns[name] = ns
            ip = mgmt.add_host(ns)
            conf_dir = run_dir / f"cni-conf-{name}"
            conf_dir.mkdir()
            conflist = bridge_conflist(prefix, run_dir / f"ipam-{name}", f"10.{200 + i}.0.0/24")
            (conf_dir / "10-bridge.conflist").write_text(json.dumps(conflist))
            rt = NodeRuntime(name, ns, ip, run_dir / name, cp, bin_dir, conf_dir,
                             labels={TENANT_LABEL: tenant}, prefix=prefix)  # fmt: skip
            lab.nodes[name] = rt
            rt.start()
        yield lab
    finally:
        _teardown(lab)


def _teardown(lab: BridgeLab) -> None:
    """Reverse order, every step attempted; the first error is raised at the end."""
    errors: list[BaseException] = []
    steps = [rt.stop for rt in lab.nodes.values()] + [lab.cp.stop, lab.mgmt.remove]
    steps.append(lambda: shutil.rmtree(lab.run_dir, ignore_errors=True))
    for step in steps:
        try:
            step()
        except Exception as e:  # keep tearing down: one stuck piece must not leave the rest
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def k8s_lab() -> Iterator[BridgeLab]:
    require_k8s_binaries()
    with bridge_lab() as lab:
        yield lab


# ---- helpers -------------------------------------------------------------------------------------


def pod_manifest(name: str, namespace: str, node: str, text: str) -> dict[str, Any]:
    """A busybox pod pinned to ``node`` serving ``text`` over HTTP on POD_PORT."""
    script = f"echo serving; echo {text} > /tmp/index.html; exec httpd -f -p {POD_PORT} -h /tmp"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "web", "image": TOOLS_IMAGE, "imagePullPolicy": "Never",
                            "command": ["/bin/sh", "-c", script]}],
        },
    }  # fmt: skip


def wait_pod_running(core: Any, namespace: str, name: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        pod = core.read_namespaced_pod(name, namespace)
        if pod.status.phase == "Running" and pod.status.pod_ip:
            return pod
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {namespace}/{name} not Running after {timeout:.0f} s: {pod.status}")
        time.sleep(0.1)


def http_get_in_netns(netns_path: str, ip: str, port: int, timeout: float = 5.0) -> str:
    """Body of ``GET /`` sent from inside a network namespace (a helper thread enters it)."""
    result: dict[str, Any] = {}

    def worker() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns_path}")
            finally:
                os.close(fd)
            with socket.create_connection((ip, port), timeout=timeout) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                chunks = []
                while chunk := s.recv(4096):
                    chunks.append(chunk)
            result["body"] = b"".join(chunks).decode(errors="replace").split("\r\n\r\n", 1)[-1]
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=worker)  # setns changes only this thread's namespace
    t.start()
    t.join(timeout + 5)
    if "error" in result:
        raise result["error"]
    return str(result.get("body", ""))


def read_sysctls() -> dict[str, str]:
    return {k: Path("/proc/sys", k).read_text().strip() for k in lab_runtime.KUBELET_SYSCTLS}


def host_leftovers(prefix: str, run_dir: Path) -> dict[str, list[str]]:
    """Everything on the host that carries this run's prefix or lives under its run dir."""
    with IPRoute() as ipr:
        links = [str(link.get("IFLA_IFNAME")) for link in ipr.get_links()]
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp.startswith(str(run_dir)) or os.path.basename(mp).startswith(prefix):
                mounts.append(mp)
    cni_results = lab_runtime.CNI_RESULT_CACHE
    return {
        "netns": [n for n in netns.listnetns() if n.startswith(prefix)],
        "links": [n for n in links if n.startswith(prefix)],
        "processes": [
            f"{pid} {' '.join(argv[:4])}"
            for pid, argv in iter_processes()
            if any(str(run_dir) in a or f"/run/netns/{prefix}" in a for a in argv)
        ],
        "mounts": mounts,
        "cgroups": [
            str(h / d)
            for h in lab_runtime.cgroup_hierarchies()
            if h.is_dir()
            for d in os.listdir(h)
            if d.startswith(prefix + "-")
        ],
        "run_dir": [str(run_dir)] if run_dir.exists() else [],
        "cni_results": [  # libcni's cache of ADD results, named <network>-<sandbox>-<ifname>
            f.name for f in cni_results.iterdir() if f.name.startswith(prefix)
        ] if cni_results.is_dir() else [],
    }  # fmt: skip


def other_kubelet_holders() -> list[str]:
    """HostState holders of other live processes (their kubelets legitimately keep the sysctls)."""
    try:
        state = json.loads(lab_runtime.HOST_STATE.read_text())
    except (OSError, ValueError):
        return []
    return [h for h in state.get("holders", []) if int(h.split(":", 1)[0]) != os.getpid()]

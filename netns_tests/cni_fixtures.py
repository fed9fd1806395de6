"""Shared fixtures for CNI tests: a per-run control plane holding pods, and a libcni-like runner.

`LibCni` drives a conflist the way libcni (the library containerd/CRI-O use) does, so chains with
the reference plugins are exercised as a runtime would exercise them:
- the list's cniVersion is chosen from `cniVersions` (highest one the runtime speaks), else `cniVersion`;
- each plugin gets its own config plus the list's `name` and `cniVersion`, `runtimeConfig` for the
  capabilities it declares and the runtime has values for, and `prevResult` (ADD: the previous
  plugin's result, if any; DEL/CHECK: the cached result of the whole ADD);
- ADD runs the plugins in order, DEL and CHECK as libcni orders them (DEL in reverse);
- GC gets `cni.dev/valid-attachments`, STATUS the plain config;
- every plugin is exec'd with the same CNI_* environment and the config on stdin, from inside the
  node netns given (the netns where a node's runtime would run them).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netctl.annotations import PORT_ANNOTATION, TENANT_LABEL, PortAnnotation
from netctl.lab.k8s import CNI, ControlPlane

pytest.register_assert_rewrite("netns_tests.k8s_fixtures")
from netns_tests.k8s_fixtures import require_k8s_binaries  # noqa: E402

OUR_BIN_DIR = str(Path(sys.executable).parent)  # netctl-cni is installed next to the interpreter
REF_BIN_DIR = "/usr/lib/cni"
LIBCNI_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")  # what this "runtime" speaks
TENANT = "alpha"
CLONE_NEWNET = 0x40000000


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def pick_version(conflist: Mapping[str, Any]) -> str:
    """libcni 1.2: the highest entry of `cniVersions` the runtime supports, else `cniVersion`."""
    versions = conflist.get("cniVersions")
    if isinstance(versions, list):
        usable = sorted((v for v in versions if v in LIBCNI_VERSIONS), key=_vkey, reverse=True)
        if usable:
            return usable[0]
    return str(conflist.get("cniVersion", "0.1.0"))


@dataclass
class Invocation:
    """What a runtime knows about one attachment (libcni's RuntimeConf)."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    args: str = ""
    capability_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Exec:
    plugin: str
    command: str
    rc: int
    out: Any
    stderr: str


class ChainError(AssertionError):
    def __init__(self, e: Exec) -> None:
        super().__init__(f"{e.plugin} {e.command} failed (rc {e.rc}): {e.out} {e.stderr[-2000:]}")
        self.exec = e


def _setns_into(fd: int) -> Any:
    libc = ctypes.CDLL(None, use_errno=True)

    def enter() -> None:  # runs in the child between fork and exec
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    return enter


@dataclass
class LibCni:
    """Runs conflists like libcni, with every plugin exec'd inside the netns `node_netns` (a path)."""

    node_netns: str
    path: Sequence[str] = (OUR_BIN_DIR, REF_BIN_DIR)
    log: list[Exec] = field(default_factory=list)

    def find(self, plugin_type: str) -> str:
        for d in self.path:
            candidate = os.path.join(d, plugin_type)
            if os.access(candidate, os.X_OK):
                return candidate
        raise AssertionError(f"plugin {plugin_type} not in {self.path}")

    def exec_plugin(self, command: str, conf: Mapping[str, Any], inv: Invocation | None) -> Exec:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_PATH": ":".join(self.path)}
        if inv is not None:
            env.update({"CNI_CONTAINERID": inv.container_id, "CNI_NETNS": inv.netns, "CNI_IFNAME": inv.ifname,
                        "CNI_ARGS": inv.args})
        fd = os.open(self.node_netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            proc = subprocess.run([self.find(str(conf["type"]))], input=json.dumps(conf).encode(),
                                  capture_output=True, timeout=120, env=env, preexec_fn=_setns_into(fd))
        finally:
            os.close(fd)
        text = proc.stdout.decode()
        e = Exec(str(conf["type"]), command, proc.returncode, json.loads(text) if text.strip() else None,
                 proc.stderr.decode())
        self.log.append(e)
        assert "Traceback" not in text and "Traceback" not in e.stderr, e
        return e

    @staticmethod
    def plugin_conf(conflist: Mapping[str, Any], plugin: Mapping[str, Any], inv: Invocation | None,
                    prev: Any) -> dict[str, Any]:
        conf = {**plugin, "name": conflist["name"], "cniVersion": pick_version(conflist)}
        caps = plugin.get("capabilities")
        if inv is not None and isinstance(caps, dict):
            rc = {k: inv.capability_args[k] for k, on in caps.items() if on and k in inv.capability_args}
            if rc:
                conf["runtimeConfig"] = rc
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def add(self, conflist: Mapping[str, Any], inv: Invocation) -> Any:
        prev = None
        for plugin in conflist["plugins"]:
            e = self.exec_plugin("ADD", self.plugin_conf(conflist, plugin, inv, prev), inv)
            if e.rc != 0:
                raise ChainError(e)
            prev = e.out
        return prev

    def check(self, conflist: Mapping[str, Any], inv: Invocation, cached: Any,
              tolerate: Mapping[str, str] | None = None) -> list[Exec]:
        """CHECK every plugin; a failure whose message contains tolerate[plugin type] (a known bug of
        that plugin) is returned instead of raised, and the chain goes on."""
        tolerated = []
        for plugin in conflist["plugins"]:
            e = self.exec_plugin("CHECK", self.plugin_conf(conflist, plugin, inv, cached), inv)
            if e.rc != 0:
                known = (tolerate or {}).get(e.plugin)
                if not (known and isinstance(e.out, dict) and known in str(e.out.get("msg"))):
                    raise ChainError(e)
                tolerated.append(e)
        return tolerated

    def delete(self, conflist: Mapping[str, Any], inv: Invocation, cached: Any) -> None:
        for plugin in reversed(conflist["plugins"]):
            e = self.exec_plugin("DEL", self.plugin_conf(conflist, plugin, inv, cached), inv)
            if e.rc != 0:
                raise ChainError(e)

    def gc(self, conflist: Mapping[str, Any], valid: Sequence[tuple[str, str]]) -> list[Exec]:
        attachments = [{"containerID": c, "ifname": i} for c, i in valid]
        return [self.exec_plugin("GC", {**self.plugin_conf(conflist, p, None, None),
                                        "cni.dev/valid-attachments": attachments}, None)
                for p in conflist["plugins"]]

    def status(self, conflist: Mapping[str, Any]) -> list[Exec]:
        return [self.exec_plugin("STATUS", self.plugin_conf(conflist, p, None, None), None)
                for p in conflist["plugins"]]


@dataclass
class PodApi:
    """A per-run control plane with one tenant node and namespace; pods are created pre-annotated."""

    cp: ControlPlane
    prefix: str
    node: str
    namespace: str
    dir: Path

    def apply(self, *docs: dict[str, Any]) -> None:
        path = self.dir / f"apply-{secrets.token_hex(4)}.json"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}))
        self.cp.kubectl("apply", "-f", str(path))

    def pod_doc(self, name: str, annotation: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "namespace": self.namespace}
        if annotation is not None:
            meta["annotations"] = {PORT_ANNOTATION: annotation}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
            "nodeName": self.node, "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "netctl.io/never-pulled:1"}]}}

    def pod(self, name: str, annotation: str | None) -> None:
        self.apply(self.pod_doc(name, annotation))

    def cni_args(self, pod: str, container_id: str) -> str:
        return (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={pod};"
                f"K8S_POD_INFRA_CONTAINER_ID={container_id}")

    def kubeconfig(self) -> str:
        return str(self.cp.kubeconfig(CNI))

    @property
    def port(self) -> int:
        return int(self.cp.server.rsplit(":", 1)[1])


class ApiRelay:
    """Makes the API server (127.0.0.1:port in this process's netns) reachable at the same address
    inside another netns, as it is from a real node's root netns: a TCP relay whose listening
    socket is created in `netns` (by a thread that setns'd there) and whose upstream connections
    are made from here. Nothing is added to any interface."""

    def __init__(self, netns: str, port: int) -> None:
        self.port = port
        self.listener: socket.socket | None = None
        self.error: BaseException | None = None
        self.closed = False
        t = threading.Thread(target=self._listen_in, args=(netns,), daemon=True)
        t.start()
        t.join()
        if self.listener is None:
            raise AssertionError(f"cannot listen on 127.0.0.1:{port} in {netns}: {self.error}")
        threading.Thread(target=self._accept, daemon=True).start()

    def _listen_in(self, netns: str) -> None:
        from pyroute2 import netns as pyroute2_netns

        try:
            pyroute2_netns.setns(netns)  # this thread only; it ends right after
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
            self.listener = sock
        except BaseException as e:
            self.error = e

    def _accept(self) -> None:
        assert self.listener is not None
        while not self.closed:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                src.close()

    def close(self) -> None:
        self.closed = True
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()


@contextlib.contextmanager
def pod_api(base: Path, prefix: str) -> Iterator[PodApi]:
    """Start a control plane under `base` with node `<prefix>-n1` and namespace `<prefix>-ns`
    (both of tenant alpha); stopped when the block exits, also after a failure."""
    with ControlPlane(base / "k8s", "127.0.0.1", prefix) as cp:
        api = PodApi(cp, prefix, f"{prefix}-n1", f"{prefix}-ns", base)
        api.apply(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": api.node, "labels": {TENANT_LABEL: TENANT}}},
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": api.namespace, "labels": {TENANT_LABEL: TENANT}}},
        )
        cp.wait_service_account(api.namespace)
        yield api


@pytest.fixture(scope="module")
def cni_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodApi]:
    require_k8s_binaries()
    prefix = "cc" + secrets.token_hex(2)
    with pod_api(tmp_path_factory.mktemp(prefix), prefix) as api:
        yield api


def port_annotation(index: int, net: str = "10.83", mtu: int = 1400) -> PortAnnotation:
    """A well-formed port for pod `index` in `<net>.0.0/16` (gateway .0.1)."""
    hi, lo = divmod(index + 10, 250)
    return PortAnnotation(f"pod-{secrets.token_hex(8)}", f"0a:58:0a:53:{hi:02x}:{lo:02x}",
                          f"{net}.{hi}.{lo}/16", f"{net}.0.1", mtu, TENANT, f"netctl-{TENANT}")


def netns_add(name: str) -> str:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    return f"/run/netns/{name}"


def netns_del(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)


class AgentProc:
    """A `python -m cni.agent` process with its own config, socket and log (all under `base`).

    Runs in this process's netns (where the control plane's 127.0.0.1 is reachable); `start()`
    returns once the socket accepts connections, `stop()` is SIGTERM then SIGKILL.
    """

    def __init__(self, base: Path, node: str, kubeconfig: str, ovsdb: str, ovs_netns: str) -> None:
        self.base = base
        self.socket = str(base / "agent.sock")
        self.config = base / "agent.json"
        self.log = base / "agent.log"
        self.config.write_text(json.dumps({"socket": self.socket, "nodeName": node, "kubeconfig": kubeconfig,
                                           "ovsdb": ovsdb, "ovsNetns": ovs_netns}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "cni.agent", "--config", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.socket)
                return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"agent did not start (rc {self.proc.poll()}): {self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

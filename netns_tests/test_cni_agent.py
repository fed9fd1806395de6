"""`netctl-cni` through the node agent, invoked exactly as a runtime invokes it.

A per-run control plane holds the node, namespaces and pods; a real OVS (own netns) takes the
ports; one `python -m cni.agent` process (per-run socket, config and log) serves the module. The
test plays the runtime (netns per sandbox, exec of the installed binary with CNI_* and the config,
now carrying `agentSocket`) and, where needed, the controller (it writes the annotation).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cni import ovs_binding as ob
from netctl.annotations import PORT_ANNOTATION, TENANT_LABEL

pytest.register_assert_rewrite("netns_tests.cni_fixtures", "netns_tests.ovn_fixtures")
from netns_tests.cni_fixtures import TENANT, AgentProc, PodApi, netns_add, netns_del, port_annotation  # noqa: E402
from netns_tests.ovn_fixtures import OvnEnv, run  # noqa: E402
from netns_tests.waiting import wait_for  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
pytest_plugins = ("netns_tests.ovn_fixtures", "netns_tests.cni_fixtures")

BINARY = Path(sys.executable).parent / "netctl-cni"
HEAVY = ("pyroute2", "ovsdbapp", "ovs", "yaml", "cni.plugin", "cni.ovs_binding", "cni.kubeapi", "netctl.annotations")


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """A per-run dir other users may traverse, so the socket's own mode is what keeps them out."""
    d = Path(tempfile.mkdtemp(prefix=f"ca{secrets.token_hex(2)}-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def agent(ovn_env: OvnEnv, cni_api: PodApi, base: Path) -> Iterator[AgentProc]:
    a = AgentProc(base, cni_api.node, cni_api.kubeconfig(), ovn_env.ovs.db_connection,
                  f"/run/netns/{ovn_env.hv_netns}")
    a.start()
    try:
        yield a
    finally:
        a.stop()
        print(f"--- {a.log} ---\n{a.log.read_text()[-6000:]}")


@dataclass
class Runtime:
    """Plays the container runtime: a netns per sandbox, execs the binary, DELs what it ADDed."""

    env: OvnEnv
    api: PodApi
    agent: AgentProc
    log: Path
    added: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)

    def conf(self, **overrides: Any) -> dict[str, Any]:
        c = {"cniVersion": "1.1.0", "name": "netctl", "type": "netctl-cni", "nodeName": self.api.node,
             "ovsdb": self.env.ovs.db_connection, "bridge": self.env.bridge,
             "ovsNetns": f"/run/netns/{self.env.hv_netns}", "logFile": str(self.log),
             "annotationTimeoutSeconds": 10, "agentSocket": self.agent.socket}
        c.update(overrides)
        return {k: v for k, v in c.items() if v is not None}

    def sandbox(self, pod: str, uid: str | None = None) -> dict[str, str]:
        cid = secrets.token_hex(32)
        name = f"{self.api.prefix}-a{secrets.token_hex(3)}"
        path = netns_add(name)
        self.netns.append(name)
        args = self.api.cni_args(pod, cid) + (f";K8S_POD_UID={uid}" if uid else "")
        return {"CNI_CONTAINERID": cid, "CNI_NETNS": path, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
                "CNI_ARGS": args}

    def popen(self, command: str, sandbox: dict[str, str], conf: dict[str, Any]) -> subprocess.Popen[bytes]:
        if command == "ADD":
            self.added.append((sandbox, conf))  # DEL it at the end whatever happens
        proc = subprocess.Popen([str(BINARY)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, **sandbox})
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(conf).encode())
        proc.stdin.close()
        proc.stdin = None
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, Any]:
        out, err = proc.communicate(timeout=timeout)
        text = out.decode()
        assert "Traceback" not in text and "Traceback" not in err.decode(), err
        return proc.returncode, json.loads(text) if text.strip() else None

    def exec(self, command: str, sandbox: dict[str, str], conf: dict[str, Any]) -> tuple[int, Any]:
        return self.finish(self.popen(command, sandbox, conf))

    def cleanup(self) -> None:
        for sandbox, conf in self.added:
            if self.agent.proc is not None:
                self.exec("DEL", sandbox, conf)
        for name in self.netns:
            netns_del(name)


@pytest.fixture
def rt(ovn_env: OvnEnv, cni_api: PodApi, agent: AgentProc, tmp_path: Path) -> Iterator[Runtime]:
    r = Runtime(ovn_env, cni_api, agent, tmp_path / "cni.log")
    try:
        yield r
    finally:
        r.cleanup()
        if r.log.exists():
            print(f"--- {r.log} ---\n{r.log.read_text()[-6000:]}")


def uid_of(api: PodApi, pod: str) -> str:
    return str(json.loads(api.cp.kubectl("get", "pod", "-n", api.namespace, pod, "-o", "json"))["metadata"]["uid"])


def ifaces_of(env: OvnEnv, container_id: str) -> list[str]:
    return env.vsctl("--bare", "--columns=name", "find", "Interface",
                     f"external_ids:netctl\\:container-id={container_id}").split()


def assert_error(rc: int, out: Any, code: int) -> str:
    assert rc != 0 and isinstance(out, dict) and out["code"] == code, out
    return f"{out['msg']} {out.get('details', '')}"


def eth0_addrs(sandbox: dict[str, str]) -> list[str]:
    ns = sandbox["CNI_NETNS"].rsplit("/", 1)[1]
    eth0 = json.loads(run("ip", "-n", ns, "-j", "addr", "show", "eth0").stdout)[0]
    return [f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"]]


def test_add_check_del_through_the_agent(ovn_env: OvnEnv, cni_api: PodApi, rt: Runtime) -> None:
    port = port_annotation(1)
    cni_api.pod("ag-1", port.to_json())
    sandbox = rt.sandbox("ag-1", uid_of(cni_api, "ag-1"))
    t0 = time.monotonic()
    rc, result = rt.exec("ADD", sandbox, rt.conf())
    print(f"ADD through the agent took {time.monotonic() - t0:.3f}s")
    assert rc == 0, result
    host = ob.host_ifname(sandbox["CNI_CONTAINERID"], "eth0")
    assert result["interfaces"] == [{"name": host, "mac": result["interfaces"][0]["mac"]},
                                    {"name": "eth0", "mac": port.mac, "sandbox": sandbox["CNI_NETNS"], "mtu": 1400}]
    assert result["ips"] == [{"address": port.ip, "gateway": port.gateway, "interface": 1}]
    assert port.ip in eth0_addrs(sandbox)
    assert ifaces_of(ovn_env, sandbox["CNI_CONTAINERID"]) == [host]
    assert f"agent pod={cni_api.namespace}/ag-1 " in rt.log.read_text()  # the agent did it, not the executable
    assert rt.exec("CHECK", sandbox, rt.conf(prevResult=result)) == (0, None)
    assert rt.exec("STATUS", {}, rt.conf()) == (0, None)
    assert rt.exec("DEL", sandbox, rt.conf(prevResult=result)) == (0, None)
    assert ifaces_of(ovn_env, sandbox["CNI_CONTAINERID"]) == []
    assert run("ip", "-n", ovn_env.hv_netns, "link", "show", host, check=False).returncode != 0
    assert rt.exec("DEL", {**sandbox, "CNI_NETNS": ""}, rt.conf()) == (0, None)  # containerd's second DEL
    rc, out = rt.exec("CHECK", sandbox, rt.conf(prevResult=result))
    assert "is not as ADD left it" in assert_error(rc, out, 106)


def test_the_forwarding_path_imports_only_the_standard_library(cni_api: PodApi, rt: Runtime) -> None:
    """cni.main.run with agentSocket, in a fresh interpreter: nothing heavy ends up in sys.modules."""
    port = port_annotation(2)
    cni_api.pod("ag-2", port.to_json())
    sandbox = rt.sandbox("ag-2")
    conf = rt.conf()
    rt.added.append((sandbox, conf))
    code = ("import io, json, os, sys\nfrom cni import main\nout = io.StringIO()\n"
            "rc = main.run(os.environ, sys.stdin.buffer.read(), out)\n"
            f"print(json.dumps({{'rc': rc, 'out': out.getvalue(), 'heavy': sorted(m for m in {HEAVY!r} "
            "if m in sys.modules)}))")
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(conf).encode(), capture_output=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "CNI_COMMAND": "ADD", **sandbox})
    doc = json.loads(proc.stdout)
    assert doc["rc"] == 0, (doc, proc.stderr.decode())
    assert json.loads(doc["out"])["ips"][0]["address"] == port.ip
    assert doc["heavy"] == []


def test_add_returns_as_soon_as_the_watch_delivers_the_annotation(cni_api: PodApi, rt: Runtime,
                                                                   agent: AgentProc) -> None:
    port = port_annotation(3)
    cni_api.pod("ag-late", None)
    sandbox = rt.sandbox("ag-late", uid_of(cni_api, "ag-late"))
    proc = rt.popen("ADD", sandbox, rt.conf())
    time.sleep(1.5)
    assert proc.poll() is None, "ADD returned before the pod had its port"
    cni_api.cp.kubectl("annotate", "--overwrite", "pod", "-n", cni_api.namespace, "ag-late",
                       f"{PORT_ANNOTATION}={port.to_json()}")
    annotated = time.monotonic()
    rc, result = rt.finish(proc)
    after = time.monotonic() - annotated
    print(f"ADD returned {after * 1000:.0f} ms after `kubectl annotate` returned")
    assert rc == 0, result
    assert result["ips"][0]["address"] == port.ip
    assert after < 0.5
    assert "annotation arrived by the pod watch after" in rt.log.read_text()


@pytest.mark.parametrize("case", ["no-annotation", "uid-mismatch", "no-pod", "other-node", "other-tenant",
                                  "node-mismatch", "bad-annotation"])
def test_the_agent_refuses_as_the_executable_does(ovn_env: OvnEnv, cni_api: PodApi, rt: Runtime,
                                                  case: str) -> None:
    name = f"ag-r-{case}"
    conf = rt.conf(annotationTimeoutSeconds=1)
    good = port_annotation(4).to_json()
    uid: str | None = None
    if case == "no-annotation":
        cni_api.pod(name, None)
        code, needle = 11, "has no netctl.io/port annotation after 1s"
    elif case == "uid-mismatch":
        cni_api.pod(name, good)
        uid, code, needle = "00000000-0000-0000-0000-000000000000", 104, "the runtime asked for uid"
    elif case == "no-pod":
        code, needle = 104, "does not exist"
    elif case == "other-node":
        doc = cni_api.pod_doc(name, good)
        doc["spec"]["nodeName"] = f"{cni_api.prefix}-elsewhere"
        cni_api.apply(doc)
        code, needle = 100, f'not to this node "{cni_api.node}"'
    elif case == "other-tenant":
        cni_api.pod(name, port_annotation(5).to_json().replace('"alpha"', '"beta"'))
        code, needle = 100, "refusing to plug another tenant's port"
    elif case == "node-mismatch":  # the agent serves its own node, whatever the caller claims
        cni_api.pod(name, good)
        conf["nodeName"] = f"{cni_api.prefix}-elsewhere"
        code, needle = 7, f"serves node '{cni_api.node}'"
    else:
        cni_api.pod(name, '{"portId": "x", "mac": "nope"}')
        code, needle = 101, f"pod {cni_api.namespace}/{name} has an invalid netctl.io/port annotation"
    sandbox = rt.sandbox(name, uid)
    t0 = time.monotonic()
    rc, out = rt.exec("ADD", sandbox, conf)
    assert needle in assert_error(rc, out, code)
    assert time.monotonic() - t0 < 5
    assert ifaces_of(ovn_env, sandbox["CNI_CONTAINERID"]) == []


def test_a_relabelled_namespace_is_honoured_through_the_agents_watch(ovn_env: OvnEnv, cni_api: PodApi,
                                                                     rt: Runtime) -> None:
    """The agent takes node and namespace tenancy from its watches, not a GET per ADD: moving the
    namespace to another tenant refuses the next ADDs (code 100) once the watch delivers it, and
    moving it back lets them through again."""
    ns = f"{cni_api.prefix}-relabel"
    cni_api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {TENANT_LABEL: TENANT}}})
    cni_api.cp.wait_service_account(ns)
    doc = cni_api.pod_doc("ag-relabel", port_annotation(30).to_json())
    doc["metadata"]["namespace"] = ns
    cni_api.apply(doc)

    def add() -> tuple[int, Any]:
        sandbox = rt.sandbox("ag-relabel")
        sandbox["CNI_ARGS"] = sandbox["CNI_ARGS"].replace(f"K8S_POD_NAMESPACE={cni_api.namespace};",
                                                          f"K8S_POD_NAMESPACE={ns};")
        rc, out = rt.exec("ADD", sandbox, rt.conf())
        if rc == 0:
            assert rt.exec("DEL", sandbox, rt.conf()) == (0, None)
        else:
            assert ifaces_of(ovn_env, sandbox["CNI_CONTAINERID"]) == []
        return rc, out

    rc, out = add()
    assert rc == 0, out
    cni_api.cp.kubectl("label", "--overwrite", "namespace", ns, f"{TENANT_LABEL}=beta")
    rc, out = wait_for(lambda: (got := add())[0] != 0 and got, "ADD refused once the namespace is tenant beta's",
                       timeout=10)
    assert f'belongs to tenant "beta" but node "{cni_api.node}" belongs to tenant "{TENANT}"' in \
        assert_error(rc, out, 100)
    cni_api.cp.kubectl("label", "--overwrite", "namespace", ns, f"{TENANT_LABEL}={TENANT}")
    wait_for(lambda: add()[0] == 0, "ADD accepted again once the namespace is back with its tenant", timeout=10)


def test_parallel_adds_share_the_warm_handles(ovn_env: OvnEnv, cni_api: PodApi, rt: Runtime) -> None:
    ports = [port_annotation(10 + i) for i in range(8)]
    cni_api.apply(*(cni_api.pod_doc(f"ag-p{i}", p.to_json()) for i, p in enumerate(ports)))
    sandboxes = [rt.sandbox(f"ag-p{i}") for i in range(8)]
    procs = [rt.popen("ADD", sb, rt.conf()) for sb in sandboxes]
    results = [rt.finish(p) for p in procs]
    for (rc, result), port, sb in zip(results, ports, sandboxes, strict=True):
        assert rc == 0, result
        assert result["ips"][0]["address"] == port.ip
        assert port.ip in eth0_addrs(sb)


def test_agent_down_is_code_11_fast_and_status_50(cni_api: PodApi, rt: Runtime, base: Path) -> None:
    missing = str(base / "no-agent.sock")
    sandbox = rt.sandbox("ag-nobody")
    for command, code in (("ADD", 11), ("DEL", 11), ("CHECK", 11), ("STATUS", 50)):
        t0 = time.monotonic()
        rc, out = rt.exec(command, sandbox, rt.conf(agentSocket=missing, prevResult=None))
        took = time.monotonic() - t0
        msg = assert_error(rc, out, code)
        assert f"the netctl-cni node agent is not running at {missing}" in msg
        assert took < 2, f"{command} took {took:.2f}s with the agent down"
    rt.added.clear()  # nothing was added; the agent fixture must not see these DELs


def test_a_hung_agent_times_out_with_code_11(rt: Runtime, base: Path) -> None:
    """Something listens but never answers: the executable gives up after annotationTimeout + grace."""
    path = str(base / "hung.sock")
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(path)
    hung.listen(8)
    try:
        sandbox = rt.sandbox("ag-hung")
        t0 = time.monotonic()
        rc, out = rt.exec("DEL", sandbox, rt.conf(agentSocket=path, annotationTimeoutSeconds=1))
        took = time.monotonic() - t0
        assert f"the netctl-cni node agent at {path} did not answer DEL" in assert_error(rc, out, 11)
        assert 5 <= took < 10, took
    finally:
        hung.close()
        os.unlink(path)
    rt.added.clear()


def test_the_socket_is_root_only(agent: AgentProc) -> None:
    st = os.stat(agent.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('denied')\nelse:\n    print('in')")
    argv = ["/usr/bin/python3", "-I", "-S", "-c", probe, agent.socket]
    as_root = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert as_root.stdout.strip() == "in", as_root.stderr  # the probe can tell
    as_nobody = subprocess.run(argv, capture_output=True, text=True, timeout=30, preexec_fn=lambda: os.setuid(65534))
    assert as_nobody.stdout.strip() == "denied", as_nobody.stderr


def test_restarting_the_agent_keeps_running_pods(ovn_env: OvnEnv, cni_api: PodApi, rt: Runtime,
                                                 agent: AgentProc) -> None:
    port = port_annotation(30)
    cni_api.pod("ag-keep", port.to_json())
    sandbox = rt.sandbox("ag-keep")
    rc, result = rt.exec("ADD", sandbox, rt.conf())
    assert rc == 0, result
    agent.stop()
    rc, out = rt.exec("CHECK", sandbox, rt.conf(prevResult=result))  # nobody there: try again later
    assert assert_error(rc, out, 11)
    assert port.ip in eth0_addrs(sandbox)  # the pod keeps its network while the agent is away
    agent.start()
    assert rt.exec("CHECK", sandbox, rt.conf(prevResult=result)) == (0, None)
    # and a new pod still works with the restarted agent's fresh watch and warm handles
    port2 = port_annotation(31)
    cni_api.pod("ag-after", port2.to_json())
    sb2 = rt.sandbox("ag-after")
    rc, result2 = rt.exec("ADD", sb2, rt.conf())
    assert rc == 0, result2
    assert rt.exec("DEL", sandbox, rt.conf(prevResult=result)) == (0, None)
    assert ifaces_of(ovn_env, sandbox["CNI_CONTAINERID"]) == []

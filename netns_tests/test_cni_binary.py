"""`netctl-cni` invoked exactly as a runtime invokes it, against a real kube-apiserver and OVS/OVN.

A per-run control plane (netctl.lab.k8s.ControlPlane: etcd, kube-apiserver with Node,RBAC,
controller-manager, scheduler) holds the namespaces, the Node and the pods; the test plays the
netctl controller (it writes the `netctl.io/port` annotation from a real OVN port) and the runtime
(it creates the netns and execs the binary with CNI_* and the config on stdin). The plugin reads
the API with the read-only `netctl-cni` identity of deploy/rbac/cni.yaml.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cni import ovs_binding as ob
from netctl.annotations import PORT_ANNOTATION, TENANT_LABEL, PortAnnotation
from netctl.iaas.base import Network, NetworkSpec, Port, PortOwner
from netctl.iaas.ovn import OvnIaaS
from netctl.lab.k8s import CNI, ControlPlane

pytest.register_assert_rewrite("netns_tests.ovn_fixtures", "netns_tests.k8s_fixtures")
from netns_tests.k8s_fixtures import require_k8s_binaries  # noqa: E402
from netns_tests.ovn_fixtures import OvnEnv, PodNs, run, tcp_exchange, tcp_server  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
pytest_plugins = ("netns_tests.ovn_fixtures",)

BINARY = Path(sys.executable).parent / "netctl-cni"
ALPHA, BETA = "alpha", "beta"


@dataclass
class Api:
    cp: ControlPlane
    prefix: str
    node: str
    namespaces: dict[str, str]  # tenant -> namespace
    dir: Path

    def apply(self, *docs: dict[str, Any]) -> None:
        path = self.dir / f"apply-{secrets.token_hex(4)}.json"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}))
        self.cp.kubectl("apply", "-f", str(path))

    def pod(self, tenant: str, name: str, node: str | None = None, annotation: str | None = None) -> str:
        """Create a pod bound to `node` (no scheduler, no kubelet needed); return its uid."""
        meta: dict[str, Any] = {"name": name, "namespace": self.namespaces[tenant]}
        if annotation is not None:
            meta["annotations"] = {PORT_ANNOTATION: annotation}
        self.apply({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
            "nodeName": node or self.node, "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "netctl.io/never-pulled:1"}]}})
        out = self.cp.kubectl("get", "pod", "-n", self.namespaces[tenant], name, "-o", "json")
        return str(json.loads(out)["metadata"]["uid"])

    def annotate(self, tenant: str, name: str, value: str) -> None:
        self.cp.kubectl("annotate", "--overwrite", "pod", "-n", self.namespaces[tenant], name,
                        f"{PORT_ANNOTATION}={value}")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    require_k8s_binaries()
    prefix = "cb" + secrets.token_hex(2)
    base = tmp_path_factory.mktemp(prefix)
    with ControlPlane(base / "k8s", "127.0.0.1", prefix) as cp:
        a = Api(cp, prefix, f"{prefix}-n1", {ALPHA: f"{prefix}-alpha", BETA: f"{prefix}-beta"}, base)
        a.apply(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": a.node, "labels": {TENANT_LABEL: ALPHA}}},
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"{prefix}-bare"}},
            *({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {TENANT_LABEL: t}}}
              for t, ns in a.namespaces.items()),
        )
        for ns in a.namespaces.values():
            cp.wait_service_account(ns)
        yield a


@dataclass
class Runtime:
    """Plays the container runtime: netns per sandbox, execs the plugin, DELs what it ADDed."""

    env: OvnEnv
    api: Api
    log: Path
    added: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)

    def conf(self, version: str = "1.0.0", **overrides: Any) -> dict[str, Any]:
        c = {"cniVersion": version, "name": "netctl", "type": "netctl-cni",
             "kubeconfig": str(self.api.cp.kubeconfig(CNI)), "nodeName": self.api.node,
             "ovsdb": self.env.ovs.db_connection, "bridge": self.env.bridge,
             "ovsNetns": f"/run/netns/{self.env.hv_netns}", "logFile": str(self.log),
             "annotationTimeoutSeconds": 5}
        c.update(overrides)
        return c

    def sandbox(self, tenant: str, pod: str, uid: str | None) -> dict[str, str]:
        cid = secrets.token_hex(32)
        ns = f"{self.api.prefix}-s{len(self.netns)}"
        run("ip", "netns", "add", ns)
        self.netns.append(ns)
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.api.namespaces[tenant]};K8S_POD_NAME={pod};" \
               f"K8S_POD_INFRA_CONTAINER_ID={cid}" + (f";K8S_POD_UID={uid}" if uid else "")
        return {"CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0",
                "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": args}

    def exec(self, command: str, sandbox: dict[str, str], conf: dict[str, Any]) -> tuple[int, Any]:
        proc = subprocess.run([str(BINARY)], input=json.dumps(conf).encode(), capture_output=True, timeout=120,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, **sandbox})
        out = proc.stdout.decode()
        assert "Traceback" not in out and "Traceback" not in proc.stderr.decode()
        if command == "ADD" and proc.returncode == 0:
            self.added.append((sandbox, conf))
        return proc.returncode, json.loads(out) if out else None

    def cleanup(self) -> None:
        for sandbox, conf in self.added:
            self.exec("DEL", sandbox, conf)
        for ns in self.netns:
            run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def rt(ovn_env: OvnEnv, api: Api, tmp_path: Path) -> Iterator[Runtime]:
    r = Runtime(ovn_env, api, tmp_path / "cni.log")
    try:
        yield r
    finally:
        r.cleanup()
        if r.log.exists():
            print(f"--- {r.log} ---\n{r.log.read_text()}")


@pytest.fixture(scope="module")
def network(ovn_env: OvnEnv) -> Iterator[tuple[OvnIaaS, Network]]:
    iaas = OvnIaaS(ovn_env.ovn.nb_connection, timeout=30, chassis_of=lambda node: ovn_env.chassis)
    tenant = f"{ovn_env.prefix}-cb"
    try:
        yield iaas, iaas.ensure_network(NetworkSpec(tenant, "10.81.0.0/24", "10.81.0.1", mtu=1400))
    finally:
        iaas.delete_network(tenant)
        iaas.close()


def annotation_for(port: Port, net: Network, tenant: str = ALPHA) -> str:
    return PortAnnotation(port.id, port.mac, port.cidr, net.gateway, net.mtu, tenant, net.id).to_json()


def new_port(network: tuple[OvnIaaS, Network], name: str) -> Port:
    iaas, net = network
    return iaas.create_port(net, PortOwner("pod", name, "ns", f"u-{name}", net.tenant), f"pod-{name}")


def ifaces_of(env: OvnEnv, container_id: str) -> list[str]:
    return env.vsctl("--bare", "--columns=name", "find", "Interface",
                     f"external_ids:netctl\\:container-id={container_id}").split()


def assert_error(rc: int, out: Any, code: int) -> str:
    assert rc != 0 and isinstance(out, dict) and out["code"] == code, out
    return f"{out['msg']} {out.get('details', '')}"


def test_add_check_del_and_tcp_between_two_pods(ovn_env: OvnEnv, api: Api, rt: Runtime,
                                                network: tuple[OvnIaaS, Network]) -> None:
    env, (_, net) = ovn_env, network
    pods = []
    for i, version in enumerate(("1.1.0", "0.4.0")):
        name = f"web{i}"
        port = new_port(network, f"{api.prefix}-{name}")
        uid = api.pod(ALPHA, name, annotation=annotation_for(port, net))
        sandbox = rt.sandbox(ALPHA, name, uid)
        t0 = time.monotonic()
        rc, result = rt.exec("ADD", sandbox, rt.conf(version))
        print(f"ADD ({version}) took {time.monotonic() - t0:.2f}s")
        assert rc == 0, result
        host = ob.host_ifname(sandbox["CNI_CONTAINERID"], "eth0")
        assert result["cniVersion"] == version
        pod_iface: dict[str, Any] = {"name": "eth0", "mac": port.mac, "sandbox": sandbox["CNI_NETNS"]}
        if version == "1.1.0":
            pod_iface["mtu"] = 1400
        assert result["interfaces"][1] == pod_iface and result["interfaces"][0]["name"] == host
        ip = {"address": port.cidr, "gateway": net.gateway, "interface": 1}
        assert result["ips"] == ([ip] if version != "0.4.0" else [{"version": "4", **ip}])
        assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": net.gateway}]
        # checked with the CLIs, not with the code under test
        ns = sandbox["CNI_NETNS"].rsplit("/", 1)[1]
        eth0 = json.loads(run("ip", "-n", ns, "-j", "addr", "show", "eth0").stdout)[0]
        assert eth0["address"] == port.mac and eth0["mtu"] == 1400 and "UP" in eth0["flags"]
        assert f"{port.ip}/{port.prefixlen}" in [f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"]]
        assert "tx-checksumming: off" in run("ip", "netns", "exec", ns, "ethtool", "-k", "eth0").stdout
        assert "tx-checksumming: off" in run("ip", "netns", "exec", env.hv_netns, "ethtool", "-k", host).stdout
        assert ifaces_of(env, sandbox["CNI_CONTAINERID"]) == [host]
        ext = dict(json.loads(env.vsctl("--format=json", "--columns=external_ids", "list", "Interface",
                                        host))["data"][0][0][1])
        assert ext["iface-id"] == port.id and ext["attached-mac"] == port.mac
        assert ext["netctl:pod"] == f"{api.namespaces[ALPHA]}/{name}" and ext["netctl:pod-uid"] == uid
        assert ext["netctl:ifname"] == "eth0"
        # CHECK with what ADD returned: success, no output
        assert rt.exec("CHECK", sandbox, rt.conf(version, prevResult=result)) == (0, None)
        pods.append((PodNs(ns, host, port), sandbox, result, version))

    deadline = time.monotonic() + 15
    while not all(env.sbctl("--bare", "--columns=chassis", "find", "Port_Binding", f"logical_port={p.port.id}")
                  for p, *_ in pods):
        assert time.monotonic() < deadline, "ovn-controller did not bind the plugged ports"
        time.sleep(0.1)
    server = tcp_server(pods[0][0], 5201, lifetime=30)
    try:
        ok, err = tcp_exchange(pods[1][0], pods[0][0].port.ip, 5201, 300_000, timeout=20)
        assert ok, f"TCP between pods plugged by netctl-cni failed: {err}"
    finally:
        server.kill()
        server.wait()

    pod, sandbox, result, version = pods[0]
    # DEL twice, as containerd does (second time without the netns); DEL never needs the API
    dead_api = rt.log.parent / "dead-kubeconfig"
    dead_api.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}}]}))
    assert rt.exec("DEL", sandbox, rt.conf(version, prevResult=result, kubeconfig=str(dead_api))) == (0, None)
    assert ifaces_of(env, sandbox["CNI_CONTAINERID"]) == []
    assert run("ip", "-n", env.hv_netns, "link", "show", pod.host_if, check=False).returncode != 0
    assert run("ip", "-n", pod.name, "link", "show", "eth0", check=False).returncode != 0
    assert rt.exec("DEL", {**sandbox, "CNI_NETNS": ""}, rt.conf(version)) == (0, None)
    rc, out = rt.exec("CHECK", sandbox, rt.conf(version, prevResult=result))
    assert "is not as ADD left it" in assert_error(rc, out, 106)


def test_tenant_mismatch_is_refused_and_nothing_plugged(api: Api, rt: Runtime, ovn_env: OvnEnv,
                                                       network: tuple[OvnIaaS, Network]) -> None:
    _, net = network
    port = new_port(network, f"{api.prefix}-beta0")
    uid = api.pod(BETA, "b0", annotation=annotation_for(port, net, BETA))
    sandbox = rt.sandbox(BETA, "b0", uid)
    rc, out = rt.exec("ADD", sandbox, rt.conf())
    msg = assert_error(rc, out, 100)
    assert (f'pod {api.namespaces[BETA]}/b0 belongs to tenant "beta" but node "{api.node}" belongs to tenant '
            f'"alpha"; tenants never share nodes') in msg
    assert ifaces_of(ovn_env, sandbox["CNI_CONTAINERID"]) == []
    assert run("ip", "-n", sandbox["CNI_NETNS"].rsplit("/", 1)[1], "link", "show", "eth0",
               check=False).returncode != 0


def test_add_waits_for_the_annotation(api: Api, rt: Runtime, network: tuple[OvnIaaS, Network]) -> None:
    _, net = network
    port = new_port(network, f"{api.prefix}-late")
    uid = api.pod(ALPHA, "late")
    sandbox = rt.sandbox(ALPHA, "late", uid)
    conf = rt.conf()
    proc = subprocess.Popen([str(BINARY)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": "/usr/bin:/bin", "CNI_COMMAND": "ADD", **sandbox})
    rt.added.append((sandbox, conf))  # DEL it at the end whatever happens
    t0 = time.monotonic()
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(conf).encode())
    proc.stdin.close()
    proc.stdin = None  # written and closed: communicate() must not flush it again
    time.sleep(1.5)
    api.annotate(ALPHA, "late", annotation_for(port, net))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    assert json.loads(out)["ips"][0]["address"] == port.cidr
    assert time.monotonic() - t0 >= 1.5


@pytest.mark.parametrize("case", ["no-annotation", "bad-annotation", "uid-mismatch", "no-pod", "other-node",
                                  "unlabelled-node", "forbidden"])
def test_add_refusals(api: Api, rt: Runtime, ovn_env: OvnEnv, case: str) -> None:
    name = f"r-{case}"
    conf = rt.conf(annotationTimeoutSeconds=1)
    good = PortAnnotation("pod-x", "0a:58:0a:51:00:63", "10.81.0.99/24", "10.81.0.1", 1400, ALPHA,
                          "netctl-x").to_json()
    uid: str | None = None
    if case == "no-annotation":
        uid, code, needle = api.pod(ALPHA, name), 11, "has no netctl.io/port annotation after 1s"
    elif case == "bad-annotation":
        uid = api.pod(ALPHA, name, annotation='{"portId": "x", "mac": "nope"}')
        code, needle = 101, f"pod {api.namespaces[ALPHA]}/{name} has an invalid netctl.io/port annotation"
    elif case == "uid-mismatch":
        api.pod(ALPHA, name, annotation=good)
        uid, code, needle = "00000000-0000-0000-0000-000000000000", 104, "the runtime asked for uid"
    elif case == "no-pod":
        code, needle = 104, "does not exist"
    elif case == "other-node":
        uid = api.pod(ALPHA, name, node=f"{api.prefix}-elsewhere", annotation=good)
        code, needle = 100, f'not to this node "{api.node}"'
    elif case == "unlabelled-node":
        uid = api.pod(ALPHA, name, node=f"{api.prefix}-bare", annotation=good)
        conf["nodeName"] = f"{api.prefix}-bare"
        code, needle = 100, f'node "{api.prefix}-bare" has no netctl.io/tenant label'
    else:  # a node's credentials (x509 client cert) may not read pods bound elsewhere: Node authorizer
        uid = api.pod(ALPHA, name, annotation=good)
        conf["kubeconfig"] = str(api.cp.add_node(f"{api.prefix}-intruder"))
        code, needle = 105, "refused"
    sandbox = rt.sandbox(ALPHA, name, uid)
    rc, out = rt.exec("ADD", sandbox, conf)
    assert needle in assert_error(rc, out, code)
    assert ifaces_of(ovn_env, sandbox["CNI_CONTAINERID"]) == []

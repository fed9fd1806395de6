"""kproxy against a real kube-apiserver 1.20, scoped to its tenant, programming a real node netns.

One control plane per module on 127.0.0.1 (no kubelets). Tenants ``alpha`` and ``beta`` each have
namespaces (labelled ``netctl.io/tenant``); a Node object labelled ``alpha`` stands for the node
VM, whose network namespace ``<prefix>-node`` holds the kproxy table. No pods run: Services have
no selector and the test writes their EndpointSlices (``discovery.k8s.io/v1beta1``: the server is
1.20, so kproxy's v1 -> v1beta1 fallback is exercised) pointing at server processes in backend
netns. kproxy runs as a subprocess through its real CLI, with a ServiceAccount token minted by the
TokenRequest API and bound by the RBAC of ``deploy/rbac/kproxy.yaml`` + ``deploy/kproxy.yaml``
(rendered for alpha, one RoleBinding per alpha namespace).

    client 10.242.0.100 --+
    a1     10.242.0.11  --+-- br0 in the node netns (10.242.0.1); everyone routes the
    a2     10.242.0.12  --+   Service CIDR 10.96.0.0/16 via the node
    bb     10.242.0.21  --+   (beta's backend: never reachable through this node)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from netctl.kube.client import api_path, new_api_client, request_json
from netctl.lab.k8s import K8S_BINARIES, ControlPlane, k8s_bin_dirs
from netctl.lab.procs import free_port
from netns_tests.waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
TENANT_LABEL = "netctl.io/tenant"
NODE_IP = "10.242.0.1"
CLIENT_IP = "10.242.0.100"
BACKENDS = {"a1": "10.242.0.11", "a2": "10.242.0.12", "bb": "10.242.0.21"}
SERVICE_CIDR = "10.96.0.0/16"
IPS = {"web": "10.96.7.10", "api": "10.96.7.11", "late": "10.96.7.12", "beta": "10.96.8.10",
       "mine": "10.96.7.13", "theirs": "10.96.7.14"}
PROXY_NAME = "netctl-kproxy"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
SA_NAMESPACE = "kube-system"
MERGE_PATCH = "application/merge-patch+json"
SANITY_S = 20.0

SERVER = r"""
import socket, sys
name = sys.argv[1]
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", 8080)); t.listen(128)
print("ready", flush=True)
while True:
    c, _ = t.accept()
    c.sendall(name.encode()); c.close()
"""

CLIENT = r"""
import json, socket, sys
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hits = {}
for _ in range(n):
    try:
        s = socket.create_connection((ip, port), timeout=2)
        who = s.recv(100).decode(); s.close()
    except OSError as e:
        who = type(e).__name__
    hits[who] = hits.get(who, 0) + 1
print(json.dumps(hits))
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@dataclass
class World:
    prefix: str
    cp: ControlPlane
    api: Any  # admin
    node: str  # Node object name
    node_ns: str
    alpha: list[str]  # alpha namespaces at start
    late_ns: str  # joins alpha during the test
    beta_ns: str
    tmp: Path
    kproxy: subprocess.Popen[bytes] | None = None
    kproxy_log: Path | None = None
    healthz: str = ""
    metrics: str = ""
    token: str = ""

    @property
    def table(self) -> str:
        return self.prefix

    def nft_ips(self, missing_ok: bool = False) -> set[str]:
        """Every IPv4 address in any element of our table in the node netns (frontends and endpoints)."""
        out = subprocess.run(["ip", "netns", "exec", self.node_ns, "nft", "-j", "list", "table", "ip", self.table],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            if missing_ok:
                return set()
            raise AssertionError(f"table ip {self.table} not listable in {self.node_ns}: {out.stderr}")
        found: set[str] = set()

        def walk(x: Any) -> None:
            if isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
            elif isinstance(x, str):
                with contextlib.suppress(ValueError):
                    found.add(str(ipaddress.IPv4Address(x)))

        for obj in json.loads(out.stdout)["nftables"]:
            if "map" in obj or "set" in obj:
                walk((obj.get("map") or obj.get("set") or {}).get("elem", []))
        return found

    def traffic(self, ip: str, n: int = 30) -> dict[str, int]:
        out = subprocess.run(["ip", "netns", "exec", f"{self.prefix}-cli", sys.executable, "-c", CLIENT, ip, "80",
                              str(n)], check=True, capture_output=True, text=True, timeout=60)
        return dict(json.loads(out.stdout))

    def kproxy_output(self) -> str:
        return self.kproxy_log.read_text() if self.kproxy_log and self.kproxy_log.exists() else ""


def _require_binaries() -> None:
    for b in K8S_BINARIES[:3]:
        if not any(os.access(d / b, os.X_OK) for d in k8s_bin_dirs()):
            pytest.skip(f"{b} not built: run tools/build-k8s.sh")


def _rendered_tenant_rbac(tenant: str, namespaces: list[str]) -> list[dict[str, Any]]:
    """deploy/kproxy.yaml's RBAC documents for one tenant (the DaemonSet needs kubelets: left out)."""
    text = (REPO / "deploy" / "kproxy.yaml").read_text().replace("${TENANT}", tenant)
    docs = []
    for doc in yaml.safe_load_all(text):
        if not doc or doc["kind"] == "DaemonSet":
            continue
        if doc["kind"] == "RoleBinding":
            for ns in namespaces:
                docs.append(yaml.safe_load(yaml.safe_dump(doc).replace("${NAMESPACE}", ns)))
        else:
            docs.append(doc)
    return docs


def apply_docs(w: World, docs: list[dict[str, Any]], name: str) -> None:
    path = w.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    w.cp.apply(path)


def service(ns: str, name: str, ip: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def endpoint_slice(ns: str, service_name: str, addrs: list[str]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{service_name}-1", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addrs]}


def create(w: World, obj: dict[str, Any], plural: str, group: str = "", version: str = "v1") -> None:
    ns = obj["metadata"].get("namespace")
    request_json(w.api, "POST", api_path(group, version, plural, ns), body=obj)


SLICES = ("discovery.k8s.io", "v1beta1")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    _require_binaries()
    prefix = "kpa" + secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    netns = [f"{prefix}-{n}" for n in ("node", "cli", *BACKENDS)]
    servers: list[subprocess.Popen[bytes]] = []
    cp = ControlPlane(tmp / "k8s", "127.0.0.1", prefix, rbac_dir=None)
    api = None
    w: World | None = None
    try:
        cp.start()
        cp.apply(REPO / "deploy" / "rbac" / "kproxy.yaml")
        api = new_api_client(str(cp.kubeconfig()), pool_maxsize=8)
        w = World(prefix, cp, api, f"{prefix}-n1", f"{prefix}-node", [f"{prefix}-a1"], f"{prefix}-a2",
                  f"{prefix}-b1", tmp)
        # --- the network: node netns with a bridge, client and backends routing the Service CIDR via it
        for n in netns:
            sh("ip", "netns", "add", n)
        node = w.node_ns
        sh("ip", "-n", node, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
        sh("ip", "-n", node, "link", "set", "br0", "up")
        sh("ip", "-n", node, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.conf.all.send_redirects=0")
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.conf.br0.send_redirects=0")
        subprocess.run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"],
                       capture_output=True, timeout=30)
        for i, (short, ip) in enumerate([("cli", CLIENT_IP), *BACKENDS.items()]):
            peer = f"{prefix}-{short}"
            sh("ip", "-n", node, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", peer)
            sh("ip", "-n", node, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", peer, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", peer, "link", "set", "eth0", "up")
            sh("ip", "-n", peer, "link", "set", "lo", "up")
            sh("ip", "-n", peer, "route", "add", SERVICE_CIDR, "via", NODE_IP)
        for short in BACKENDS:
            p = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-{short}", sys.executable, "-c", SERVER, short],
                                 stdout=subprocess.PIPE)
            servers.append(p)
        for p in servers:
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        # --- the tenants' objects, as admin
        create(w, {"metadata": {"name": w.node, "labels": {TENANT_LABEL: "alpha"}}, "spec": {"unschedulable": True}},
               "nodes")
        for name, tenant in ((w.alpha[0], "alpha"), (w.beta_ns, "beta"), (w.late_ns, None)):
            create(w, {"metadata": {"name": name, "labels": {TENANT_LABEL: tenant} if tenant else {}}}, "namespaces")
        create(w, service(w.alpha[0], "web", IPS["web"]), "services")
        create(w, endpoint_slice(w.alpha[0], "web", [BACKENDS["a1"], BACKENDS["a2"]]), "endpointslices", *SLICES)
        create(w, service(w.late_ns, "late", IPS["late"]), "services")
        create(w, endpoint_slice(w.late_ns, "late", [BACKENDS["a2"]]), "endpointslices", *SLICES)
        create(w, service(w.beta_ns, "web", IPS["beta"]), "services")
        create(w, endpoint_slice(w.beta_ns, "web", [BACKENDS["bb"]]), "endpointslices", *SLICES)
        # --- kproxy's credentials: ServiceAccount token (TokenRequest), RBAC from deploy/ for alpha only
        apply_docs(w, _rendered_tenant_rbac("alpha", w.alpha), "rbac-alpha")
        tr = request_json(api, "POST", api_path("", "v1", "serviceaccounts", SA_NAMESPACE, "netctl-kproxy-alpha")
                          + "/token", body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                            "spec": {"expirationSeconds": 3600}})
        w.token = tr["status"]["token"]
        kubeconfig = tmp / "kproxy.kubeconfig"
        fd = os.open(kubeconfig, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "k",
                "clusters": [{"name": "c", "cluster": {"server": cp.server, "certificate-authority": str(cp.ca_path)}}],
                "users": [{"name": "kproxy", "user": {"token": w.token}}],
                "contexts": [{"name": "k", "context": {"cluster": "c", "user": "kproxy"}}],
            }, f)  # fmt: skip
        # --- kproxy itself, through its CLI, programming the node netns
        hz, mp = free_port("127.0.0.1"), free_port("127.0.0.1")
        w.healthz, w.metrics = f"http://127.0.0.1:{hz}/healthz", f"http://127.0.0.1:{mp}/metrics"
        w.kproxy_log = tmp / "kproxy.log"
        with open(w.kproxy_log, "wb") as logf:
            w.kproxy = subprocess.Popen(
                [sys.executable, "-m", "kproxy.main", "--kubeconfig", str(kubeconfig), "--node-name", w.node,
                 "--netns", f"/run/netns/{w.node_ns}", "--table", w.table, "--healthz-port", str(hz),
                 "--metrics-port", str(mp), "--min-sync-period-s", "0.05", "--verify-period-s", "1",
                 "--service-cidr", SERVICE_CIDR, "--proxy-name", PROXY_NAME, "--node-check-period-s", "1",
                 "--verify-elements-period-s", "1"],
                stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        yield w
    finally:
        if w is not None and w.kproxy is not None:
            w.kproxy.terminate()
            try:
                w.kproxy.wait(10)
            except subprocess.TimeoutExpired:
                w.kproxy.kill()
                w.kproxy.wait(5)
        for p in servers:
            p.kill()
            p.wait(5)
        for n in netns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)
        if api is not None:
            api.close()
        try:
            cp.stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def metric(w: World, name: str) -> str:
    with urllib.request.urlopen(w.metrics, timeout=2) as r:
        return "\n".join(line for line in r.read().decode().splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def running(world: World) -> World:
    def ready() -> bool:
        assert world.kproxy is not None
        if world.kproxy.poll() is not None:
            raise AssertionError(f"kproxy exited {world.kproxy.returncode}:\n{world.kproxy_output()[-4000:]}")
        try:
            return "kproxy_initialized 1.0" in metric(world, "kproxy_initialized")
        except OSError:
            return False

    wait_for(ready, "kproxy initialized (every watch listed)")
    wait_for(lambda: IPS["web"] in world.nft_ips(missing_ok=True), "alpha's Service programmed")
    return world


def test_node_holds_only_its_tenants_services(running: World) -> None:
    ips = running.nft_ips()
    assert {IPS["web"], BACKENDS["a1"], BACKENDS["a2"]} <= ips
    assert IPS["beta"] not in ips and BACKENDS["bb"] not in ips  # beta: zero elements
    assert IPS["late"] not in ips  # a2 is not (yet) alpha's
    assert "watching EndpointSlices as discovery.k8s.io/v1beta1" in running.kproxy_output()  # v1 not served by 1.20
    with urllib.request.urlopen(running.healthz, timeout=2) as r:
        assert r.status == 200
    events = metric(running, "kproxy_api_events_total")
    assert 'resource="services",type="add"} 1.0' in events  # alpha's one Service; beta's never arrived
    assert 'resource="namespaces",type="add"} 1.0' in events


def test_clusterip_traffic_reaches_alpha_backends(running: World) -> None:
    hits = running.traffic(IPS["web"], 40)
    assert set(hits) == {"a1", "a2"}, hits
    assert "bb" not in running.traffic(IPS["beta"], 3)  # beta's Service does not exist on this node


def test_changes_in_alpha_are_applied(running: World) -> None:
    w = running
    ns = w.alpha[0]
    request_json(w.api, "PATCH", api_path(*SLICES, "endpointslices", ns, "web-1"), content_type=MERGE_PATCH,
                 body={"endpoints": [{"addresses": [BACKENDS["a2"]], "conditions": {"ready": True}}]})
    wait_for(lambda: BACKENDS["a1"] not in w.nft_ips(), "endpoint a1 removed")
    assert w.traffic(IPS["web"], 10) == {"a2": 10}
    create(w, service(ns, "api", IPS["api"]), "services")
    create(w, endpoint_slice(ns, "api", [BACKENDS["a1"]]), "endpointslices", *SLICES)
    wait_for(lambda: IPS["api"] in w.nft_ips() and BACKENDS["a1"] in w.nft_ips(), "new Service programmed")
    assert w.traffic(IPS["api"], 5) == {"a1": 5}


def test_namespace_joining_and_leaving_the_tenant(running: World) -> None:
    w = running
    # the controller's job (not written yet): the RoleBinding comes with the label
    apply_docs(w, _rendered_tenant_rbac("alpha", [w.late_ns]), "rbac-late")
    request_json(w.api, "PATCH", api_path("", "v1", "namespaces", None, w.late_ns), content_type=MERGE_PATCH,
                 body={"metadata": {"labels": {TENANT_LABEL: "alpha"}}})
    # Its Service and EndpointSlice watches start apart: the Service may be a reject for a sync or two.
    wait_for(lambda: w.traffic(IPS["late"], 5) == {"a2": 5}, "joined namespace's Service proxied")
    request_json(w.api, "PATCH", api_path("", "v1", "namespaces", None, w.late_ns), content_type=MERGE_PATCH,
                 body={"metadata": {"labels": {TENANT_LABEL: "beta"}}})
    wait_for(lambda: IPS["late"] not in w.nft_ips(), "left namespace's Service removed")
    assert IPS["web"] in w.nft_ips()  # the others stay


def test_alpha_credentials_cannot_read_beta(running: World) -> None:
    w = running
    cfg = k8s.Configuration()
    cfg.host, cfg.ssl_ca_cert = w.cp.server, str(w.cp.ca_path)
    cfg.api_key = {"authorization": f"Bearer {w.token}"}
    with k8s.ApiClient(cfg) as sa:
        request_json(sa, "GET", api_path("", "v1", "services", w.alpha[0]))  # allowed: its own namespace
        for path in (api_path("", "v1", "services", w.beta_ns), api_path(*SLICES, "endpointslices", w.beta_ns),
                     api_path("", "v1", "services"), api_path(*SLICES, "endpointslices")):
            with pytest.raises(k8s.ApiException) as exc:
                request_json(sa, "GET", path)
            assert exc.value.status == 403, path
    user = f"system:serviceaccount:{SA_NAMESPACE}:netctl-kproxy-alpha"
    for ns, verb, allowed in ((w.beta_ns, "list", False), (w.beta_ns, "watch", False), (w.alpha[0], "watch", True)):
        review = request_json(w.api, "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body={
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{SA_NAMESPACE}"],
                     "resourceAttributes": {"namespace": ns, "verb": verb, "resource": "services"}}})  # fmt: skip
        assert review["status"].get("allowed", False) is allowed, (ns, verb, review["status"])


def test_kproxy_never_made_a_forbidden_call(running: World) -> None:
    """Scoping is by what kproxy asks for, not by failing: no request of it was ever refused."""
    out = running.kproxy_output()
    assert "orbidden" not in out and "Traceback" not in out and "WARNING" not in out, out[-4000:]


# -- verification through the running program (after the "no WARNING" check above: drift warns) --


def _nft(w: World, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", w.node_ns, "nft", *args], check=True, capture_output=True,
                          text=True, timeout=30).stdout


def _counter(w: World, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metric(w, name).splitlines() if " " in line)


def _endpoint_elements(w: World) -> list[str]:
    """Keys of the endpoints map, in nft syntax (``ip . proto . port . n``)."""
    doc = json.loads(_nft(w, "-j", "list", "map", "ip", w.table, "endpoints"))
    out = []
    for obj in doc["nftables"]:
        for key, _value in (obj.get("map") or {}).get("elem", []):
            out.append(" . ".join(str(x) for x in key["concat"]))
    return out


def test_flushed_ruleset_is_restored_by_the_running_kproxy(running: World) -> None:
    """Another process runs ``nft flush ruleset`` in the node: within the verification interval
    (1 s here) kproxy finds the table gone, rebuilds it with a full sync, and traffic flows again."""
    w = running
    full_syncs = 'kproxy_sync_duration_seconds_count{mode="full"'
    drift, fulls = _counter(w, "kproxy_drift_detected_total"), _counter(w, full_syncs)
    assert IPS["web"] in w.nft_ips()
    subprocess.run(["ip", "netns", "exec", w.node_ns, "nft", "flush", "ruleset"], check=True, timeout=30)
    wait_for(lambda: IPS["web"] in w.nft_ips(missing_ok=True), "table restored after nft flush ruleset")
    hits = w.traffic(IPS["web"], 10)
    assert sum(hits.values()) == 10 and set(hits) <= {"a1", "a2"}, hits
    assert _counter(w, "kproxy_drift_detected_total") >= drift + 1
    assert _counter(w, full_syncs) >= fulls + 1


def test_edited_table_is_detected_and_restored(running: World) -> None:
    """Edits short of a flush: one map element deleted, one rule deleted — each is drift."""
    w = running
    keys = _endpoint_elements(w)
    assert keys, "no endpoint elements to delete"
    drift = _counter(w, "kproxy_drift_detected_total")
    _nft(w, "delete", "element", "ip", w.table, "endpoints", "{", keys[0], "}")
    assert keys[0] not in _endpoint_elements(w)
    wait_for(lambda: keys[0] in _endpoint_elements(w), f"endpoints element {keys[0]} restored")
    assert _counter(w, "kproxy_drift_detected_total") >= drift + 1

    listing = json.loads(_nft(w, "-a", "-j", "list", "chain", "ip", w.table, "nat_postrouting"))
    handles = [o["rule"]["handle"] for o in listing["nftables"] if "rule" in o]
    assert handles
    _nft(w, "delete", "rule", "ip", w.table, "nat_postrouting", "handle", str(handles[0]))
    wait_for(lambda: "masquerade" in _nft(w, "list", "chain", "ip", w.table, "nat_postrouting"),
             "masquerade rule restored")
    hits = w.traffic(IPS["web"], 10)
    assert sum(hits.values()) == 10 and set(hits) <= {"a1", "a2"}, hits
    assert _counter(w, "kproxy_drift_detected_total") >= drift + 2


def test_service_proxy_name_label(running: World) -> None:
    """Labelled with kproxy's own --proxy-name: proxied; with another proxy's name: skipped."""
    w = running
    ns = w.alpha[0]
    for name, proxy in (("theirs", "other-proxy"), ("mine", PROXY_NAME)):  # theirs first: same watch, in order
        obj = service(ns, name, IPS[name])
        obj["metadata"]["labels"] = {PROXY_NAME_LABEL: proxy}
        create(w, obj, "services")
        sl = endpoint_slice(ns, name, [BACKENDS["a1"]])
        sl["metadata"]["labels"][PROXY_NAME_LABEL] = proxy  # the EndpointSlice controller copies Service labels
        create(w, sl, "endpointslices", *SLICES)
    # The Service may be programmed (as a reject: no endpoints yet) a sync before its slice arrives.
    wait_for(lambda: w.traffic(IPS["mine"], 5) == {"a1": 5}, "the Service labelled with our proxy name proxied")
    assert IPS["theirs"] not in w.nft_ips()


def test_node_moving_to_another_tenant_makes_kproxy_remove_its_rules_and_exit(running: World) -> None:
    """Last in the module: it ends the kproxy process. The DaemonSet would restart it for beta."""
    w = running
    assert w.kproxy is not None and w.kproxy.poll() is None
    request_json(w.api, "PATCH", api_path("", "v1", "nodes", None, w.node), content_type=MERGE_PATCH,
                 body={"metadata": {"labels": {TENANT_LABEL: "beta"}}})
    status = w.kproxy.wait(SANITY_S)
    assert status == 3, w.kproxy_output()[-4000:]
    assert f"Node {w.node} moved from tenant alpha to beta" in w.kproxy_output()
    assert w.nft_ips(missing_ok=True) == set()  # alpha's rules went with it
    listed = subprocess.run(["ip", "netns", "exec", w.node_ns, "nft", "list", "table", "ip", w.table],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode != 0, listed.stdout

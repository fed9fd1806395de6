"""Bad input never leaves partial state: property-based runs of the real binary with OVS reachable.

tests/test_cni_spec.py fuzzes every verb with nothing reachable (so nothing can be created). Here
OVS and the API server are real, so a wrong ordering or a missing rollback would show up as a
leftover veth or OVS port: STATUS and GC get arbitrary configs and valid-attachments; ADD gets
pods with good and corrupted annotations combined with configs and sandboxes that fail at each
stage of plugging (before OVS, at the veth, at the address/route, at the OVS port). After every
example nothing of that attachment may remain, and GC must never have touched what it does not own.
Every property runs twice: verbs done in the executable's own process, and verbs forwarded to a
node agent (`agentSocket`, the deployed mode) — the agent must answer bad input the same way.
Few examples (each execs the plugin) so the module stays around a minute.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni import ovs_binding as ob
from cni.spec import Code

pytest.register_assert_rewrite("netns_tests.ovn_fixtures", "netns_tests.cni_fixtures")
from netns_tests.cni_fixtures import AgentProc, PodApi, netns_add, netns_del, port_annotation  # noqa: E402
from netns_tests.ovn_fixtures import OvnEnv, run  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
pytest_plugins = ("netns_tests.ovn_fixtures", "netns_tests.cni_fixtures")

BINARY = str(Path(sys.executable).parent / "netctl-cni")
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}
EXPECTED_CODES = {Code.INCOMPATIBLE_VERSION, Code.INVALID_ENV, Code.DECODE_FAILURE, Code.INVALID_NETCONF,
                  Code.TRY_AGAIN_LATER, Code.PLUGIN_NOT_AVAILABLE, Code.TENANCY, Code.ANNOTATION_INVALID,
                  Code.OVS_FAILURE, Code.LINK_FAILURE, Code.POD_IDENTITY}


@dataclass
class World:
    env: OvnEnv
    api: PodApi
    tmp: Path
    network: str  # the network fuzzed configs use
    pods: dict[str, str]  # pod name -> kind of annotation it carries
    sentinel_cid: str  # an attachment of another network GC must never touch
    nic: str  # a node NIC on the bridge (another owner) GC must never touch
    agent_socket: str | None = None  # set: every verb is forwarded to this node agent

    def conf(self, **overrides: Any) -> dict[str, Any]:
        c = {"cniVersion": "1.1.0", "name": self.network, "type": "netctl-cni",
             "kubeconfig": self.api.kubeconfig(), "nodeName": self.api.node, "ovsdb": self.env.ovs.db_connection,
             "bridge": self.env.bridge, "ovsNetns": f"/run/netns/{self.env.hv_netns}",
             "logFile": str(self.tmp / "cni.log"), "annotationTimeoutSeconds": 1,
             "agentSocket": self.agent_socket}
        c.update(overrides)
        return {k: v for k, v in c.items() if v is not None}


def execute(command: str, env: dict[str, str], conf: Any) -> tuple[int, Any]:
    proc = subprocess.run([BINARY], input=json.dumps(conf).encode(), capture_output=True, timeout=60,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, **env})
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert "Traceback" not in out and "Traceback" not in err
    doc = json.loads(out) if out.strip() else None
    if proc.returncode != 0:
        assert isinstance(doc, dict) and set(doc) <= ERROR_KEYS and doc["code"] in EXPECTED_CODES, doc
        assert isinstance(doc["msg"], str) and doc["msg"]
    return proc.returncode, doc


def ours_in_ovs(env: OvnEnv) -> dict[str, str]:
    """container id -> interface name for every interface carrying a netctl container id."""
    rows = json.loads(env.vsctl("--format=json", "--columns=name,external_ids", "list", "Interface"))["data"]
    out = {}
    for name, (_, pairs) in rows:
        ext = dict(pairs)
        if "netctl:container-id" in ext:
            out.setdefault(ext["netctl:container-id"], name)
    return out


def link_exists(netns: str, name: str) -> bool:
    return run("ip", "-n", netns, "link", "show", name, check=False).returncode == 0


@pytest.fixture(scope="module", params=["in-process", "agent"])
def world(request: pytest.FixtureRequest, ovn_env: OvnEnv, cni_api: PodApi,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    env, api = ovn_env, cni_api
    tmp = tmp_path_factory.mktemp("fuzz")
    agent = None
    if request.param == "agent":
        agent = AgentProc(tmp, api.node, api.kubeconfig(), env.ovs.db_connection, f"/run/netns/{env.hv_netns}")
        agent.start()
    good = port_annotation(100, net="10.87")
    other_tenant = json.loads(port_annotation(101, net="10.87").to_json())
    other_tenant["tenant"] = "beta"
    kinds = {
        "good": good.to_json(),
        "corrupt-json": good.to_json()[:-7],
        "bad-mac": json.dumps({**json.loads(good.to_json()), "mac": "01:00:5e:00:00:01"}),
        "missing-field": json.dumps({k: v for k, v in json.loads(good.to_json()).items() if k != "ip"}),
        "other-tenant": json.dumps(other_tenant),
        "not-json-object": '["pod"]',
    }
    tag = request.param[0]  # "i" or "a": each world has its own pods, sandbox and NIC names
    pods = {f"fz{tag}-{kind}": kind for kind in kinds}
    sentinel_ns = f"{env.prefix}-fzs{tag}"
    nic = f"{env.prefix}fzn{tag}"
    w = World(env, api, tmp, f"{env.prefix}-fuzz", pods, secrets.token_hex(32), nic,
              agent.socket if agent is not None else None)
    api.apply(*(api.pod_doc(name, kinds[kind]) for name, kind in pods.items()))
    api.pod(f"fz{tag}-sentinel", port_annotation(102, net="10.87").to_json())
    sentinel_env = {"CNI_CONTAINERID": w.sentinel_cid, "CNI_NETNS": netns_add(sentinel_ns), "CNI_IFNAME": "eth0",
                    "CNI_ARGS": api.cni_args(f"fz{tag}-sentinel", w.sentinel_cid), "CNI_PATH": "/opt/cni/bin"}
    sentinel_conf = w.conf(name=f"{env.prefix}-keep")
    try:
        assert execute("ADD", sentinel_env, sentinel_conf)[0] == 0
        run("ip", "-n", env.hv_netns, "link", "add", nic, "type", "veth", "peer", "name", f"{nic}p")
        env.vsctl("add-port", env.bridge, nic, "--", "set", "Interface", nic,
                  "external_ids:netctl\\:container-id=node-nic", "external_ids:netctl\\:ifname=eth0",
                  f"external_ids:netctl\\:cni-network={w.network}", "external_ids:netctl\\:owner=node")
        yield w
        if agent is not None:  # the verbs really went through the agent (it logs with its own context)
            assert " agent " in (tmp / "cni.log").read_text(), "no verb was handled by the node agent"
    finally:
        execute("DEL", sentinel_env, sentinel_conf)
        netns_del(sentinel_ns)
        with contextlib.suppress(AssertionError):
            env.vsctl("--if-exists", "del-port", nic)
        run("ip", "-n", env.hv_netns, "link", "del", nic, check=False)
        if agent is not None:
            agent.stop()


def assert_untouched(w: World) -> None:
    owned = ours_in_ovs(w.env)
    assert owned.get(w.sentinel_cid) == ob.host_ifname(w.sentinel_cid, "eth0")
    assert owned.get("node-nic") == w.nic and link_exists(w.env.hv_netns, w.nic)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                       max_leaves=6)
ATTACHMENTS = st.lists(st.fixed_dictionaries({"containerID": st.sampled_from(["a", "b", "node-nic"]),
                                              "ifname": st.sampled_from(["eth0", "net1"])}), max_size=3) | JSONISH


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["STATUS", "GC"]), version=st.sampled_from(["1.0.0", "1.1.0", "1.1.0"]),
       bridge=st.sampled_from(["<ours>", "br-nope", "b" * 16, 7]), attachments=ATTACHMENTS,
       drop=st.sampled_from([None, "name", "type", "ovsdb"]), path=st.booleans())
def test_status_and_gc_fuzz(world: World, command: str, version: str, bridge: Any, attachments: Any,
                            drop: str | None, path: bool) -> None:
    w = world
    conf = w.conf(cniVersion=version, bridge=w.env.bridge if bridge == "<ours>" else bridge,
                  **{"cni.dev/valid-attachments": attachments})
    if drop:
        conf.pop(drop)
    before = ours_in_ovs(w.env)
    rc, out = execute(command, {"CNI_PATH": "/opt/cni/bin"} if path else {}, conf)
    if rc == 0:
        assert out is None  # STATUS and GC succeed silently
    if command == "STATUS" and rc == 0:
        assert bridge == "<ours>" and version == "1.1.0"
    assert_untouched(w)
    assert ours_in_ovs(w.env) == before  # nothing of this network exists, so GC had nothing to remove


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["good", "good", "corrupt-json", "bad-mac", "missing-field", "other-tenant",
                             "not-json-object"]),
       breakage=st.sampled_from(["none", "no-bridge", "ifname-taken", "route-outside-subnet", "no-ovs-netns",
                                 "no-netns", "bad-prev-result", "uid-mismatch"]))
def test_failed_add_leaves_nothing(world: World, kind: str, breakage: str) -> None:
    w, env = world, world.env
    pod = next(name for name, k in w.pods.items() if k == kind)
    ns = f"{env.prefix}-fz{secrets.token_hex(2)}"
    cid = secrets.token_hex(32)
    host = ob.host_ifname(cid, "eth0")
    sandbox = {"CNI_CONTAINERID": cid, "CNI_NETNS": netns_add(ns), "CNI_IFNAME": "eth0",
               "CNI_ARGS": w.api.cni_args(pod, cid), "CNI_PATH": "/opt/cni/bin"}
    conf = w.conf(cniVersion="1.0.0")
    try:
        if breakage == "no-bridge":
            conf["bridge"] = "br-nope"  # fails at the OVS port, after the veth exists
        elif breakage == "ifname-taken":
            run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "theirs0")
        elif breakage == "route-outside-subnet":
            conf.update(serviceCidr="10.96.0.0/16", nodeAddress="192.0.2.1")
        elif breakage == "no-ovs-netns":
            conf["ovsNetns"] = f"/run/netns/{env.prefix}-absent"
        elif breakage == "no-netns":
            sandbox["CNI_NETNS"] = f"/run/netns/{env.prefix}-absent"
        elif breakage == "bad-prev-result":
            conf["prevResult"] = {"interfaces": [{"name": 3}]}
        elif breakage == "uid-mismatch":
            sandbox["CNI_ARGS"] += ";K8S_POD_UID=00000000-0000-0000-0000-000000000000"
        rc, out = execute("ADD", sandbox, conf)
        if rc == 0:
            assert kind == "good" and breakage == "none", out
            assert ours_in_ovs(env).get(cid) == host
            assert execute("DEL", sandbox, conf) == (0, None)
        else:
            assert not (kind == "good" and breakage == "none"), out
        assert cid not in ours_in_ovs(env), f"OVS port left after {out}"
        assert not link_exists(env.hv_netns, host), f"host veth left after {out}"
        if breakage == "ifname-taken":  # someone else's eth0 survives, untouched
            assert link_exists(ns, "eth0") and link_exists(ns, "theirs0")
        elif breakage != "no-netns":
            assert not link_exists(ns, "eth0"), f"pod eth0 left after {out}"
        assert_untouched(w)
    finally:
        netns_del(ns)

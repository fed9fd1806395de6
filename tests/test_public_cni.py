"""The CNI's share of the public NIC that needs no netns: waiting, parsing, routing plan, results, GC."""

from __future__ import annotations

from typing import Any

import pytest

from cni import public_nic
from cni.spec import CniError, Code, Interface, IPConfig, Result, Route
from netctl.annotations import (
    PORT_ANNOTATION,
    PUBLIC_IP_ANNOTATION,
    PUBLIC_PORT_ANNOTATION,
    PortAnnotation,
)

PUB = PortAnnotation("pub-u1", "0a:58:cb:00:71:05", "203.0.113.5/24", "203.0.113.1", 1400, "public", "netctl-public")
TENANT = PortAnnotation("pod-u1", "0a:58:0a:01:00:05", "10.1.0.5/24", "10.1.0.1", 1400, "a", "netctl-a")


def pod(**annotations: str) -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "ns", "uid": "u1", "annotations": annotations}}


def test_routing_plan_sends_replies_from_the_public_address_out_of_its_own_gateway() -> None:
    pr = public_nic.plan(PUB)
    assert (pr.source, pr.subnet, pr.gateway) == ("203.0.113.5", "203.0.113.0/24", "203.0.113.1")
    assert 0 < pr.priority < 32766  # ahead of the main table's rule
    assert pr.table not in (0, 253, 254, 255)  # not unspec/default/main/local


def test_routing_plan_without_gateway_keeps_on_link_peers_only() -> None:
    no_gw = PortAnnotation("pub-u1", PUB.mac, PUB.ip, None, 1400, "public", "netctl-public")
    assert public_nic.plan(no_gw).gateway is None


def test_add_waits_for_the_public_port_only_when_asked() -> None:
    assert public_nic.awaited(pod(), "pod ns/web") == PORT_ANNOTATION
    assert public_nic.awaited(pod(**{PORT_ANNOTATION: TENANT.to_json()}), "pod ns/web") is None
    asking = {PORT_ANNOTATION: TENANT.to_json(), PUBLIC_IP_ANNOTATION: "true"}
    assert public_nic.awaited(pod(**asking), "pod ns/web") == PUBLIC_PORT_ANNOTATION
    assert public_nic.awaited(pod(**asking, **{PUBLIC_PORT_ANNOTATION: PUB.to_json()}), "pod ns/web") is None
    # the tenant port first: a pod asking for both waits for that one before anything
    assert public_nic.awaited(pod(**{PUBLIC_IP_ANNOTATION: "true"}), "pod ns/web") == PORT_ANNOTATION


def test_malformed_request_is_a_clear_error_naming_the_pod() -> None:
    with pytest.raises(CniError) as e:
        public_nic.awaited(pod(**{PORT_ANNOTATION: TENANT.to_json(), PUBLIC_IP_ANNOTATION: "yes"}), "pod ns/web")
    assert e.value.code == Code.ANNOTATION_INVALID
    assert "pod ns/web" in e.value.msg and PUBLIC_IP_ANNOTATION in e.value.msg and "'yes'" in e.value.msg


def test_public_port_is_parsed_and_must_be_the_pods_own() -> None:
    assert public_nic.public_port_of(pod(), "pod ns/web", "u1") is None
    assert public_nic.public_port_of(pod(**{PUBLIC_PORT_ANNOTATION: PUB.to_json()}), "pod ns/web", "u1") == PUB
    with pytest.raises(CniError) as e:  # copied from another pod
        public_nic.public_port_of(pod(**{PUBLIC_PORT_ANNOTATION: PUB.to_json()}), "pod ns/web", "u2")
    assert e.value.code == Code.TENANCY and "pub-u2" in e.value.msg
    with pytest.raises(CniError) as e:  # a tenant port passed off as public
        forged = PortAnnotation("pub-u1", TENANT.mac, TENANT.ip, TENANT.gateway, 1400, "a", "netctl-a")
        public_nic.public_port_of(pod(**{PUBLIC_PORT_ANNOTATION: forged.to_json()}), "pod ns/web", "u1")
    assert e.value.code == Code.TENANCY
    with pytest.raises(CniError) as e:
        public_nic.public_port_of(pod(**{PUBLIC_PORT_ANNOTATION: "{"}), "pod ns/web", "u1")
    assert e.value.code == Code.ANNOTATION_INVALID and PUBLIC_PORT_ANNOTATION in e.value.msg


def test_result_lists_both_interfaces_and_both_addresses() -> None:
    tenant = Result((Interface("nc1", "aa:aa:aa:aa:aa:01"), Interface("eth0", TENANT.mac, "/run/netns/x", 1400)),
                    (IPConfig(TENANT.ip, 1, TENANT.gateway),), (Route("0.0.0.0/0", TENANT.gateway),))
    public = Result((Interface("nc2", "aa:aa:aa:aa:aa:02"), Interface("net1", PUB.mac, "/run/netns/x", 1400)),
                    (IPConfig(PUB.ip, 1, PUB.gateway),))
    both = public_nic.combined(tenant, public)
    assert [i.name for i in both.interfaces] == ["nc1", "eth0", "nc2", "net1"]
    assert both.ips == (IPConfig(TENANT.ip, 1, TENANT.gateway), IPConfig(PUB.ip, 3, PUB.gateway))
    assert both.routes == (Route("0.0.0.0/0", TENANT.gateway),)  # eth0 keeps the default route
    rendered = both.to_dict("1.1.0")
    assert rendered["ips"][1] == {"address": PUB.ip, "gateway": PUB.gateway, "interface": 3}


def test_gc_keeps_the_public_nic_of_every_valid_container() -> None:
    valid = [("c1", "eth0"), ("c2", "eth0")]
    assert public_nic.valid_with_public(valid, "net1") == [*valid, ("c1", "net1"), ("c2", "net1")]
    assert public_nic.valid_with_public([], "net1") == []


# ---- the verbs, with the plumbing stubbed (the netns e2e test runs them for real) -----------------


class StubResources:
    """A node agent's Resources: resolve answers from memory, plumbing runs the (stubbed) binding."""

    in_agent = True

    def __init__(self, public: PortAnnotation | None) -> None:
        self.public = public

    def adopt(self, conf: Any) -> Any:
        return conf

    def plumb(self, conf: Any, fn: Any) -> Any:
        return fn(None, None)

    def resolve(self, conf: Any, ns: str, name: str, uid: str | None, deadline: float, log: Any) -> Any:
        return TENANT, "u1", self.public

    def netlink(self, fn: Any) -> Any:
        return fn()


@pytest.fixture
def binding(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> dict[str, list[Any]]:
    from cni import ovs_binding as ob

    calls: dict[str, list[Any]] = {"plug": [], "unplug": [], "routing": []}

    def plug_port(**kw: Any) -> ob.PlugResult:
        calls["plug"].append(kw)
        return ob.PlugResult(kw["host_ifname"], "aa:bb:cc:dd:ee:0" + str(len(calls["plug"])), kw["ifname"],
                             kw["mac"], kw["target_netns"], kw["mtu"], len(calls["plug"]))

    def unplug_port(**kw: Any) -> list[str]:
        calls["unplug"].append(kw)
        return [kw["host_ifname"]]

    monkeypatch.setattr(ob, "plug_port", plug_port)
    monkeypatch.setattr(ob, "unplug_port", unplug_port)
    monkeypatch.setattr(public_nic, "apply", lambda netns, ifname, pr: calls["routing"].append((ifname, pr)))
    netns = tmp_path / "netns"
    netns.write_text("")
    calls["netns"] = [str(netns)]
    return calls


def add(binding: dict[str, list[Any]], public: PortAnnotation | None) -> tuple[int, dict[str, Any]]:
    import io
    import json

    from cni import plugin

    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": binding["netns"][0], "CNI_IFNAME": "eth0",
           "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web;K8S_POD_UID=u1"}
    conf = {"cniVersion": "1.0.0", "name": "netctl", "type": "netctl-cni", "nodeName": "a-1"}
    out = io.StringIO()
    rc = plugin.run(env, json.dumps(conf).encode(), out, StubResources(public))  # type: ignore[arg-type]
    return rc, json.loads(out.getvalue())


def test_add_plugs_net1_without_a_main_default_route_and_reports_both(binding: dict[str, list[Any]]) -> None:
    rc, result = add(binding, PUB)
    assert rc == 0, result
    eth0, net1 = binding["plug"]
    assert eth0["ifname"] == "eth0" and eth0["gateway"] == TENANT.gateway
    assert net1["ifname"] == "net1" and net1["port_id"] == "pub-u1" and net1["gateway"] is None
    assert net1["host_ifname"] != eth0["host_ifname"] and net1["cidr"] == PUB.ip
    assert binding["routing"] == [("net1", public_nic.plan(PUB))]
    assert [i["name"] for i in result["interfaces"] if i.get("sandbox")] == ["eth0", "net1"]
    assert [(ip["address"], ip["interface"]) for ip in result["ips"]] == [(TENANT.ip, 1), (PUB.ip, 3)]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": TENANT.gateway}]


def test_add_without_public_port_plugs_eth0_only(binding: dict[str, list[Any]]) -> None:
    rc, result = add(binding, None)
    assert rc == 0 and [p["ifname"] for p in binding["plug"]] == ["eth0"] and binding["routing"] == []
    assert len(result["ips"]) == 1


def test_add_rolls_both_nics_back_when_the_policy_routing_fails(binding: dict[str, list[Any]],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(netns: str, ifname: str, pr: Any) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(public_nic, "apply", broken)
    rc, result = add(binding, PUB)
    assert rc == 1 and result["code"] == Code.LINK_FAILURE and "public NIC" in result["msg"]
    removed = {u["host_ifname"] for u in binding["unplug"]}
    assert {p["host_ifname"] for p in binding["plug"]} <= removed  # eth0's and net1's

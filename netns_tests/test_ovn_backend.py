"""The OVN IaaS backend against real OVS/OVN daemons, checked independently with the OVN CLIs,
and the real data path: netns pods on the netdev bridge, bound by ovn-controller, talking TCP."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from netctl import ipam
from netctl.iaas import ovn as ovn_backend
from netctl.iaas.base import (
    IaaSConflict,
    IaaSError,
    IaaSUnavailable,
    NestingUnsupported,
    NetworkSpec,
    Port,
    PortNotFound,
    PortOwner,
    PortRequest,
    SubnetExhausted,
)
from netctl.iaas.ovn import OvnIaaS
from netctl.lab.ovs import DaemonError, OvsStack

pytest.register_assert_rewrite("netns_tests.ovn_fixtures")
from netns_tests.ovn_fixtures import OvnEnv, Pods, tcp_exchange, tcp_server  # noqa: E402

pytestmark = pytest.mark.netns
# the fixtures (ovn_env, iaas, pods) live in ovn_fixtures.py; conftest.py is not ours to extend
pytest_plugins = ("netns_tests.ovn_fixtures",)

SERVICE_CIDR = "10.96.0.0/16"


def tenant_name(env: OvnEnv, what: str) -> str:
    return f"{env.prefix}-{what}"


def pod_owner(tenant: str, name: str, ns: str = "default") -> PortOwner:
    return PortOwner("pod", name, ns, f"uid-{name}", tenant)


def nb_get(env: OvnEnv, port: str, column: str) -> str:
    return env.nbctl("--if-exists", "get", "Logical_Switch_Port", port, column)


def _nb_column(env: OvnEnv, port: str, column: str) -> Any:
    out = json.loads(env.nbctl("--format=json", "--columns=" + column, "list", "Logical_Switch_Port", port))
    return out["data"][0][0]


def nb_set(env: OvnEnv, port: str, column: str) -> list[str]:
    """A set column, exactly (ovn-nbctl's JSON gives a 1-element set as the bare value)."""
    value = _nb_column(env, port, column)
    if isinstance(value, list) and value[0] == "set":
        return sorted(value[1])
    return [value]


def nb_map(env: OvnEnv, port: str, column: str) -> dict[str, str]:
    value = _nb_column(env, port, column)
    assert value[0] == "map"
    return dict(value[1])


def test_stack_is_isolated_and_running(ovn_env: OvnEnv) -> None:
    env = ovn_env
    assert env.ovs.is_running() and env.ovn.is_running()
    assert env.vsctl("get", "Bridge", env.bridge, "datapath_type") == "netdev"
    assert env.vsctl("get", "Bridge", env.bridge, "fail_mode") == "secure"
    # the bridge's tap lives in the hypervisor netns, the sockets under the run dir
    links = subprocess.run(["ip", "-n", env.hv_netns, "-o", "link", "show", env.bridge],
                           capture_output=True, text=True)
    assert links.returncode == 0 and env.bridge in links.stdout
    assert str(env.ovs.db_sock).startswith(str(env.base))
    assert env.ovn.nb_connection == f"unix:{env.base}/ovn/nb.sock"
    chassis = env.sbctl("--columns=name", "--bare", "list", "Chassis")
    assert chassis == env.chassis
    encap = env.sbctl("--columns=type,ip", "--bare", "list", "Encap").split()
    assert encap == ["geneve", "127.0.0.1"]


def _netns_exists(name: str) -> bool:
    return name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


def test_failed_start_names_the_daemon_and_leaves_nothing(ovn_env: OvnEnv) -> None:
    """A broken database: ovsdb-server cannot start; the error names it and its log, and the
    half-started stack (run dir, the netns it created) is gone."""
    run_dir = ovn_env.base / "broken"
    run_dir.mkdir()
    (run_dir / "conf.db").write_text("this is not an OVSDB file\n")
    ns = f"{ovn_env.prefix}-bad"
    stack = OvsStack(run_dir, netns=ns, timeout=20)
    with pytest.raises(DaemonError) as exc:
        stack.start()
    msg = str(exc.value)
    assert "ovsdb-server" in msg and str(run_dir / "ovsdb-server.log") in msg
    assert not stack.is_running()
    assert not run_dir.exists()
    assert not _netns_exists(ns)


def test_stop_from_another_process_by_pidfile(ovn_env: OvnEnv) -> None:
    """`netctl lab down` runs in a new process: a fresh OvsStack on the same run dir stops it."""
    run_dir = ovn_env.base / "other"
    ns = f"{ovn_env.prefix}-oth"
    stack = OvsStack(run_dir, netns=ns, timeout=60).start()
    try:
        stack.add_bridge("br-x")
        pids = [d.pid() for d in (stack.ovsdb, stack.vswitchd)]
        assert all(pids) and _netns_exists(ns)
        code = ("import sys; from netctl.lab.ovs import OvsStack; s = OvsStack(sys.argv[1]); "
                "assert s.is_running(); s.stop(); assert not s.is_running()")
        subprocess.run([sys.executable, "-c", code, str(run_dir)], check=True, timeout=60)
        assert not stack.is_running()
        assert all(not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
                   for pid in pids if pid)
        assert not run_dir.exists() and not _netns_exists(ns)
    finally:
        stack.stop()


def test_add_port_of_a_missing_device_fails_clearly(ovn_env: OvnEnv) -> None:
    with pytest.raises(DaemonError) as exc:
        ovn_env.ovs.add_port(ovn_env.bridge, f"{ovn_env.prefix}nope", {"iface-id": "x"})
    assert f"{ovn_env.prefix}nope" in str(exc.value)
    assert f"{ovn_env.prefix}nope" not in ovn_env.vsctl("list-ports", ovn_env.bridge).split()


def test_ensure_network_idempotent(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    t = tenant_name(ovn_env, "net")
    spec = NetworkSpec(t, "10.50.0.0/24", "10.50.0.1", mtu=1400)
    first = iaas.ensure_network(spec)
    second = iaas.ensure_network(spec)
    assert first == second
    assert first.id == f"netctl-{t}" and first.cidr == "10.50.0.0/24" and first.gateway == "10.50.0.1"
    switches = ovn_env.nbctl("--bare", "--columns=name", "find", "Logical_Switch", f"name=netctl-{t}").split()
    assert switches == [f"netctl-{t}"]
    ids = json.loads(ovn_env.nbctl("--format=json", "--columns=external_ids", "list", "Logical_Switch",
                                   f"netctl-{t}"))["data"][0][0][1]
    assert dict(ids) == {"netctl:tenant": t, "netctl:cidr": "10.50.0.0/24", "netctl:gateway": "10.50.0.1",
                         "netctl:mtu": "1400", "netctl:reserved": ""}
    assert iaas.get_network(t) == first
    assert first in iaas.list_networks()
    # MTU may change in place, the CIDR may not
    assert iaas.ensure_network(NetworkSpec(t, "10.50.0.0/24", "10.50.0.1", mtu=1300)).mtu == 1300
    with pytest.raises(IaaSConflict):
        iaas.ensure_network(NetworkSpec(t, "10.51.0.0/24", "10.51.0.1"))
    iaas.delete_network(t)
    iaas.delete_network(t)  # idempotent
    assert iaas.get_network(t) is None
    assert ovn_env.nbctl("--bare", "--columns=name", "find", "Logical_Switch", f"name=netctl-{t}") == ""


def test_create_port_columns(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    t = tenant_name(ovn_env, "cols")
    net = iaas.ensure_network(NetworkSpec(t, "10.60.0.0/24", "10.60.0.1", reserved=("10.60.0.2/31",)))
    owner = pod_owner(t, "web-0", "shop")
    port = iaas.create_port(net, owner, "pod-uid-web-0", node="node-a")
    # gateway .1 and reserved .2/.3 are skipped
    assert port.ip == "10.60.0.4" and port.prefixlen == 24 and port.mac == ipam.mac_for_ip("10.60.0.4")
    assert nb_set(ovn_env, port.id, "addresses") == [f"{port.mac} 10.60.0.4"]
    assert nb_set(ovn_env, port.id, "port_security") == [f"{port.mac} 10.60.0.4"]
    assert nb_map(ovn_env, port.id, "external_ids") == {
        "netctl:owner": "pod", "netctl:pod": "web-0", "netctl:namespace": "shop",
        "netctl:pod-uid": "uid-web-0", "netctl:tenant": t, "netctl:node": "node-a", "netctl:state": "bound",
    }
    assert nb_map(ovn_env, port.id, "options") == {"requested-chassis": ovn_env.chassis}
    assert ovn_env.nbctl("lsp-get-ls", port.id).endswith(f"(netctl-{t})")
    # the same id again: the existing port, unchanged
    assert iaas.create_port(net, owner, "pod-uid-web-0", node="node-b") == port
    assert iaas.get_port(port.id) == port
    # a node NIC carries the Service CIDR in port security (DESIGN §5) and is bound to its node
    node = iaas.create_port(net, PortOwner("node", "node-a", None, None, t), "node-node-a",
                            extra_allowed_cidrs=[SERVICE_CIDR])
    assert node.node == "node-a" and node.extra_ips == (SERVICE_CIDR,)
    assert nb_set(ovn_env, node.id, "port_security") == [f"{node.mac} {node.ip} {SERVICE_CIDR}"]
    assert iaas.get_port(node.id) == node
    # no cross-tenant ports
    with pytest.raises(IaaSConflict):
        iaas.create_port(net, pod_owner("other-tenant", "x"), "pod-uid-x")
    iaas.delete_network(t)


def test_bind_port(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    t = tenant_name(ovn_env, "bind")
    net = iaas.ensure_network(NetworkSpec(t, "10.61.0.0/24", "10.61.0.1"))
    port = iaas.create_port(net, pod_owner(t, "a"), "pod-uid-bind-a")
    assert nb_map(ovn_env, port.id, "options") == {}
    bound = iaas.bind_port(port.id, "node-z")
    assert bound.node == "node-z" and bound.ip == port.ip
    assert nb_map(ovn_env, port.id, "options") == {"requested-chassis": ovn_env.chassis}
    assert nb_map(ovn_env, port.id, "external_ids")["netctl:node"] == "node-z"
    with pytest.raises(PortNotFound):
        iaas.bind_port("pod-does-not-exist", "node-z")
    iaas.delete_network(t)


def test_subports_take_the_lowest_free_vlan_per_parent(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    """Nested-vlan: children of a VM's port, chosen in the transaction (also under concurrency)."""
    t = tenant_name(ovn_env, "sub")
    net = iaas.ensure_network(NetworkSpec(t, "10.62.0.0/24", "10.62.0.1"))
    vm1, vm2 = (iaas.create_port(net, PortOwner("node", n, None, None, t), f"node-{t}-{n}") for n in ("a", "b"))
    pods = iaas.create_ports(net, [PortRequest(f"pod-uid-sub-{i}", pod_owner(t, f"s{i}")) for i in range(12)])
    first = iaas.attach_subport(pods[0].id, vm1.id)
    assert (first.parent, first.vlan) == (vm1.id, 1)
    assert iaas.attach_subport(pods[0].id, vm1.id) == first  # idempotent: keeps its VLAN
    assert nb_get(ovn_env, first.id, "parent_name") == vm1.id and nb_get(ovn_env, first.id, "tag_request") == "1"
    with ThreadPoolExecutor(6) as pool:  # one client, several workers: one VLAN each, no duplicates
        got = list(pool.map(lambda p: iaas.attach_subport(p.id, vm1.id).vlan, pods[1:9]))
    assert sorted(got) == list(range(2, 10))
    assert iaas.attach_subport(pods[9].id, vm2.id).vlan == 1  # per parent
    iaas.detach_subport(pods[3].id)
    assert nb_get(ovn_env, pods[3].id, "parent_name") == "[]" and iaas.get_port(pods[3].id).vlan is None
    gap = {p.vlan for p in (iaas.get_port(q.id) for q in pods[:9]) if p is not None and p.vlan} ^ set(range(1, 10))
    assert iaas.attach_subport(pods[10].id, vm1.id).vlan == min(gap)  # the freed VLAN comes back first
    # a released (pooled) port is no subport any more
    (pooled,) = iaas.release_ports([pods[0].id])
    assert pooled.parent is None and pooled.vlan is None
    other = iaas.ensure_network(NetworkSpec(tenant_name(ovn_env, "sub2"), "10.63.0.0/24", "10.63.0.1"))
    stranger = iaas.create_port(other, pod_owner(other.tenant, "x"), "pod-uid-sub-x")
    with pytest.raises(IaaSConflict):
        iaas.attach_subport(stranger.id, vm1.id)
    with pytest.raises(PortNotFound):
        iaas.attach_subport(pods[11].id, "node-nobody")
    with pytest.raises(NestingUnsupported):  # this client has no hypervisor
        iaas.hotplug_port(pods[11].id, vm1.id)
    iaas.delete_ports([p.id for p in iaas.list_ports(t)] + [stranger.id])
    iaas.delete_network(t)
    iaas.delete_network(other.tenant)


def test_batch_of_200_is_distinct_and_one_transaction(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    t = tenant_name(ovn_env, "batch")
    net = iaas.ensure_network(NetworkSpec(t, "10.62.0.0/22", "10.62.0.1"))
    reqs = [PortRequest(f"pod-{t}-{i}", pod_owner(t, f"p{i}")) for i in range(200)]
    t0 = time.monotonic()
    ports = iaas.create_ports(net, reqs)
    elapsed = time.monotonic() - t0
    print(f"200 ports in one transaction: {elapsed * 1000:.0f} ms")
    assert [p.id for p in ports] == [r.port_id for r in reqs]
    ips = [p.ip for p in ports]
    assert len(set(ips)) == 200 and len({p.mac for p in ports}) == 200
    subnet = ipaddress.IPv4Network(net.cidr)
    assert all(ipaddress.IPv4Address(ip) in subnet for ip in ips)
    assert "10.62.0.1" not in ips and "10.62.0.0" not in ips and "10.62.3.255" not in ips
    # independently: what the NB DB holds
    rows = json.loads(ovn_env.nbctl("--format=json", "--columns=name,addresses", "find",
                                    "Logical_Switch_Port", f'external_ids:"netctl:tenant"="{t}"'))["data"]
    nb_ips = [r[1].split()[1] for r in rows]
    assert len(rows) == 200 and sorted(nb_ips) == sorted(ips)
    # exactly one record of the NB database log inserted these ports: one transaction
    db = ovn_env.ovn.run_dir / "ovsdb-nb.db"
    records = [line for line in db.read_text().splitlines() if f"pod-{t}-" in line]
    assert len(records) == 1, f"{len(records)} NB transactions wrote the batch"
    iaas.delete_ports([p.id for p in ports])
    assert iaas.list_ports(t) == []
    iaas.delete_network(t)


def test_restart_never_reuses_an_address(ovn_env: OvnEnv) -> None:
    t = tenant_name(ovn_env, "restart")
    conn = ovn_env.ovn.nb_connection
    with OvnIaaS(conn, timeout=30) as first:
        net = first.ensure_network(NetworkSpec(t, "10.63.0.0/26", "10.63.0.1"))
        held = first.create_ports(net, [PortRequest(f"pod-r1-{i}", pod_owner(t, f"a{i}")) for i in range(30)])
        freed = held[10:20]
        first.delete_ports([p.id for p in freed])
    held_ips = {p.ip for p in held} - {p.ip for p in freed}
    with OvnIaaS(conn, timeout=30) as second:  # a "restarted controller": nothing in memory
        again = second.get_network(t)
        assert again is not None
        new = second.create_ports(again, [PortRequest(f"pod-r2-{i}", pod_owner(t, f"b{i}")) for i in range(20)])
        new_ips = [p.ip for p in new]
        assert not held_ips & set(new_ips)
        assert len(set(new_ips)) == 20
        # rotation survives the restart: the just-freed addresses are not the first handed out
        assert not set(new_ips[:10]) & {p.ip for p in freed}
        second.delete_network(t)


def test_concurrent_clients_never_collide(ovn_env: OvnEnv) -> None:
    """Two clients (as two controller processes would be during a failover) allocating on the same
    switch at once: the switch's ports column is verified, so one of them re-runs, never collides."""
    t = tenant_name(ovn_env, "race")
    conn = ovn_env.ovn.nb_connection
    clients = [OvnIaaS(conn, timeout=60) for _ in range(2)]
    try:
        net = clients[0].ensure_network(NetworkSpec(t, "10.64.0.0/23", "10.64.0.1"))
        results: list[list[Port]] = [[], []]
        errors: list[BaseException] = []

        def work(k: int) -> None:
            try:
                for b in range(10):
                    reqs = [PortRequest(f"pod-c{k}-{b}-{i}", pod_owner(t, f"c{k}-{b}-{i}")) for i in range(10)]
                    results[k].extend(clients[k].create_ports(net, reqs))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors
        ips = [p.ip for r in results for p in r]
        assert len(ips) == 200 and len(set(ips)) == 200
        nb = ovn_env.nbctl("--bare", "--columns=addresses", "find", "Logical_Switch_Port",
                           f'external_ids:"netctl:tenant"="{t}"').split()
        nb_ips = [tok for tok in nb if "." in tok]
        assert len(nb_ips) == 200 and len(set(nb_ips)) == 200
        clients[0].delete_network(t)
    finally:
        for c in clients:
            c.close()


def _index_matches_replica(iaas: OvnIaaS, switch: str) -> None:
    """The incrementally kept address index of `switch` equals one derived from scratch."""
    idl: Any = iaas._api.idl
    with iaas._api.ovsdb_connection.lock:
        assert not idl.index_stale
        ls = iaas._api.lookup("Logical_Switch", switch)
        state = idl.switches[ls.uuid]
        members = {p.uuid for p in ls.ports}
        expected: dict[int, int] = {}
        for p in ls.ports:
            for ip in ovn_backend._row_ips(p):
                expected[ip] = expected.get(ip, 0) + 1
        assert state.members == members
        assert state.held == expected


def _wait_replica(iaas: OvnIaaS, pred: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.02)


def test_allocation_does_not_walk_the_switch(ovn_env: OvnEnv, iaas: OvnIaaS,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Allocating costs O(ports in the transaction): the switch's ports are not re-read, only
    the new ports' addresses are parsed (once per notification), and the index stays exact."""
    t = tenant_name(ovn_env, "o1")
    net = iaas.ensure_network(NetworkSpec(t, "10.67.0.0/20", "10.67.0.1"))
    iaas.create_ports(net, [PortRequest(f"pod-o1-{i}", pod_owner(t, f"o{i}")) for i in range(300)])
    walked: list[int] = []
    parsed: list[int] = []
    real_uuids, real_ips = ovn_backend._port_uuids, ovn_backend._row_ips

    def count_uuids(ls: Any) -> Any:
        walked.append(1)
        return real_uuids(ls)

    def count_ips(lsp: Any) -> Any:
        parsed.append(1)
        return real_ips(lsp)

    monkeypatch.setattr(ovn_backend, "_port_uuids", count_uuids)
    monkeypatch.setattr(ovn_backend, "_row_ips", count_ips)
    iaas.create_port(net, pod_owner(t, "one"), "pod-o1-one")
    iaas.create_ports(net, [PortRequest(f"pod-o1-x{i}", pod_owner(t, f"x{i}")) for i in range(10)])
    assert walked == [] and len(parsed) <= 2 * 11
    monkeypatch.undo()
    _index_matches_replica(iaas, net.id)
    iaas.delete_ports([f"pod-o1-{i}" for i in range(0, 300, 3)])
    _index_matches_replica(iaas, net.id)
    with iaas._api.ovsdb_connection.lock:
        ls_uuid = iaas._api.lookup("Logical_Switch", net.id).uuid
    iaas.delete_network(t)
    assert ls_uuid not in iaas._api.idl.switches


def test_foreign_ports_on_the_switch_are_respected(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    """An address held by a port someone else put on the switch (ovn-nbctl here) is never handed
    out; once that port is gone or readdressed, the index follows."""
    t = tenant_name(ovn_env, "fgn")
    net = iaas.ensure_network(NetworkSpec(t, "10.68.0.0/29", "10.68.0.1"))  # .2-.6 usable
    foreign = f"{ovn_env.prefix}-foreign"
    ovn_env.nbctl("lsp-add", net.id, foreign, "--", "lsp-set-addresses", foreign, "0a:00:00:00:00:04 10.68.0.4")
    lookup = iaas._api.lookup
    _wait_replica(iaas, lambda: lookup("Logical_Switch_Port", foreign, default=None) is not None)
    ports = iaas.create_ports(net, [PortRequest(f"pod-fg-{i}", pod_owner(t, f"g{i}")) for i in range(4)])
    assert sorted(p.ip for p in ports) == ["10.68.0.2", "10.68.0.3", "10.68.0.5", "10.68.0.6"]
    with pytest.raises(SubnetExhausted):
        iaas.create_port(net, pod_owner(t, "g4"), "pod-fg-4")
    _index_matches_replica(iaas, net.id)
    # readdressed by its owner: .4 is free, .3 (freed by us below) is the foreign port's now
    iaas.delete_port("pod-fg-1")
    ovn_env.nbctl("lsp-set-addresses", foreign, "0a:00:00:00:00:03 10.68.0.3")
    _wait_replica(iaas, lambda: "10.68.0.3" in " ".join(lookup("Logical_Switch_Port", foreign).addresses))
    _index_matches_replica(iaas, net.id)
    assert iaas.create_port(net, pod_owner(t, "g5"), "pod-fg-5").ip == "10.68.0.4"
    ovn_env.nbctl("lsp-del", foreign)
    _wait_replica(iaas, lambda: lookup("Logical_Switch_Port", foreign, default=None) is None)
    assert iaas.create_port(net, pod_owner(t, "g6"), "pod-fg-6").ip == "10.68.0.3"
    _index_matches_replica(iaas, net.id)
    iaas.delete_network(t)


def test_failed_batch_leaks_no_address(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    """A batch that fails after allocating part of it gives those addresses back."""
    t, other = tenant_name(ovn_env, "leak"), tenant_name(ovn_env, "leak2")
    net = iaas.ensure_network(NetworkSpec(t, "10.69.0.0/29", "10.69.0.1"))  # 5 usable
    net2 = iaas.ensure_network(NetworkSpec(other, "10.69.8.0/29", "10.69.8.1"))
    iaas.create_port(net2, pod_owner(other, "z"), "pod-leak-elsewhere")
    for _ in range(3):
        with pytest.raises(IaaSConflict):  # 4 addresses allocated, then a port of another network
            iaas.create_ports(net, [*(PortRequest(f"pod-leak-{i}", pod_owner(t, f"l{i}")) for i in range(4)),
                                    PortRequest("pod-leak-elsewhere", None)])
    assert iaas.list_ports(t) == []
    ports = iaas.create_ports(net, [PortRequest(f"pod-leak-{i}", pod_owner(t, f"l{i}")) for i in range(5)])
    assert len({p.ip for p in ports}) == 5
    _index_matches_replica(iaas, net.id)
    iaas.delete_network(t)
    iaas.delete_network(other)


_ALLOCATOR_PROCESS = """
import json, sys
from netctl.iaas.base import PortOwner, PortRequest
from netctl.iaas import ovn as ovn_backend
from netctl.iaas.ovn import OvnIaaS
conn, tenant, tag = sys.argv[1:4]
with OvnIaaS(conn, timeout=60) as iaas:
    net = iaas.get_network(tenant)
    ips = []
    for b in range(12):
        if b % 3 == 0:
            ips.append(iaas.create_port(net, PortOwner("pod", f"{tag}-{b}", "default", f"u-{tag}-{b}", tenant),
                                        f"pod-{tag}-{b}").ip)
        else:
            reqs = [PortRequest(f"pod-{tag}-{b}-{i}", PortOwner("pod", f"{tag}-{b}-{i}", "default",
                                                               f"u-{tag}-{b}-{i}", tenant)) for i in range(8)]
            ips.extend(p.ip for p in iaas.create_ports(net, reqs))
    print(json.dumps(ips))
"""


def test_processes_allocating_at_once_never_collide(ovn_env: OvnEnv) -> None:
    """Three controller processes allocating into one switch at once (single ports and batches):
    the generation verify makes OVSDB re-run the losers against their refreshed index."""
    t = tenant_name(ovn_env, "procs")
    conn = ovn_env.ovn.nb_connection
    iaas = OvnIaaS(conn, timeout=60)
    try:
        net = iaas.ensure_network(NetworkSpec(t, "10.70.0.0/23", "10.70.0.1"))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        procs = [subprocess.Popen([sys.executable, "-c", _ALLOCATOR_PROCESS, conn, t, f"w{k}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for k in range(3)]
        results = [p.communicate(timeout=180) for p in procs]
        for p, (_, err) in zip(procs, results, strict=True):
            assert p.returncode == 0, err
        ips = [ip for out, _ in results for ip in json.loads(out)]
        assert len(ips) == 3 * (4 + 8 * 8) and len(set(ips)) == len(ips)
        nb = ovn_env.nbctl("--bare", "--columns=addresses", "find", "Logical_Switch_Port",
                           f'external_ids:"netctl:tenant"="{t}"').split()
        nb_ips = [tok for tok in nb if "." in tok]
        assert sorted(nb_ips) == sorted(ips)
        # this client saw all of it through notifications alone
        _wait_replica(iaas, lambda: len(iaas.list_ports(t)) == len(ips))
        _index_matches_replica(iaas, net.id)
        more = iaas.create_ports(net, [PortRequest(f"pod-procs-m{i}", pod_owner(t, f"m{i}")) for i in range(10)])
        assert not {p.ip for p in more} & set(ips)
        iaas.delete_network(t)
    finally:
        iaas.close()


def test_subnet_exhausted(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    t = tenant_name(ovn_env, "full")
    net = iaas.ensure_network(NetworkSpec(t, "10.65.0.0/29", "10.65.0.1"))  # 6 hosts - gateway = 5
    ports = iaas.create_ports(net, [PortRequest(f"pod-f-{i}", pod_owner(t, f"f{i}")) for i in range(5)])
    assert sorted(p.ip for p in ports) == [f"10.65.0.{i}" for i in range(2, 7)]
    with pytest.raises(SubnetExhausted) as exc:
        iaas.create_port(net, pod_owner(t, "f5"), "pod-f-5")
    assert isinstance(exc.value, IaaSError) and isinstance(exc.value, ipam.SubnetExhausted)
    # the failed batch left nothing behind
    assert len(iaas.list_ports(t)) == 5
    with pytest.raises(SubnetExhausted):
        iaas.create_ports(net, [PortRequest("pod-f-x", None), PortRequest("pod-f-y", None)])
    assert iaas.get_port("pod-f-x") is None
    iaas.delete_network(t)


def test_delete_is_idempotent(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    t = tenant_name(ovn_env, "del")
    net = iaas.ensure_network(NetworkSpec(t, "10.66.0.0/24", "10.66.0.1"))
    a, b, c = iaas.create_ports(net, [PortRequest(f"pod-d-{i}", pod_owner(t, f"d{i}")) for i in range(3)])
    iaas.delete_port(a.id)
    iaas.delete_port(a.id)
    assert iaas.get_port(a.id) is None and nb_get(ovn_env, a.id, "name") == ""
    iaas.delete_ports([a.id, b.id, "pod-never-existed"])
    assert [p.id for p in iaas.list_ports(t)] == [c.id]
    assert ovn_env.nbctl("lsp-list", net.id).count("pod-d-") == 1
    iaas.delete_network(t)
    iaas.delete_port(c.id)  # its switch is gone: still no error


def test_unreachable_nb_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(IaaSUnavailable):
        OvnIaaS(f"unix:{tmp_path}/nothing-here.sock", timeout=2)


def test_nb_going_away_is_unavailable(ovn_env: OvnEnv, tmp_path: Path) -> None:
    """A client whose NB server dies: operations fail with IaaSUnavailable within the timeout."""
    db, sock, pidfile = tmp_path / "nb.db", ovn_env.base / "lone-nb.sock", tmp_path / "nb.pid"
    subprocess.run(["ovsdb-tool", "create", str(db), "/usr/share/ovn/ovn-nb.ovsschema"],
                   check=True, capture_output=True)
    subprocess.run(["ovsdb-server", str(db), f"--remote=punix:{sock}", f"--pidfile={pidfile}",
                    f"--log-file={tmp_path}/nb.log", f"--unixctl={tmp_path}/nb.ctl", "--detach", "--no-chdir"],
                   check=True, timeout=30, capture_output=True)
    pid = int(pidfile.read_text())
    try:
        client = OvnIaaS(f"unix:{sock}", timeout=3)
        try:
            t = tenant_name(ovn_env, "gone")
            net = client.ensure_network(NetworkSpec(t, "10.67.0.0/24", "10.67.0.1"))
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(IaaSUnavailable):
                client.create_port(net, pod_owner(t, "x"), "pod-gone-x")
            assert time.monotonic() - t0 < 30
        finally:
            client.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_up(env: OvnEnv, port_id: str, since: float, timeout: float = 30.0) -> float:
    """Seconds from `since` until northd reports the port up (ovn-controller bound it)."""
    while time.monotonic() - since < timeout:
        if env.nbctl("lsp-get-up", port_id) == "up":
            return time.monotonic() - since
        time.sleep(0.02)
    raise AssertionError(f"{port_id} not up after {timeout}s; ovn-controller log {env.ovn.controller.log}")


def test_data_path_tcp_within_tenant_and_isolation_across(
    ovn_env: OvnEnv, iaas: OvnIaaS, pods: Pods
) -> None:
    env = ovn_env
    ta, tb = tenant_name(env, "dpa"), tenant_name(env, "dpb")
    # both tenants use the SAME CIDR: only separate switches keep them apart, not routing
    net_a = iaas.ensure_network(NetworkSpec(ta, "10.77.0.0/24", "10.77.0.1"))
    net_b = iaas.ensure_network(NetworkSpec(tb, "10.77.0.0/24", "10.77.0.1"))
    a1, a2 = iaas.create_ports(net_a, [PortRequest("pod-dp-a1", pod_owner(ta, "a1")),
                                       PortRequest("pod-dp-a2", pod_owner(ta, "a2"))])
    iaas.create_port(net_b, pod_owner(tb, "b0"), "pod-dp-b0")  # so b1's address differs from a1's
    b1 = iaas.create_port(net_b, pod_owner(tb, "b1"), "pod-dp-b1")
    assert b1.ip != a1.ip
    try:
        for p in (a1, a2, b1):
            iaas.bind_port(p.id, "node-1")
        latencies = []
        for i, p in enumerate((a1, a2, b1), start=1):
            assert env.nbctl("lsp-get-up", p.id) == "down"
            pod = pods.plug(p, i)
            latencies.append(_wait_up(env, p.id, pod.plugged_at))
        pa1, pa2, pb1 = pods.pods
        print(f"bind latency (veth on bridge -> LSP up): {', '.join(f'{x:.2f}s' for x in latencies)}")
        for p in (a1, a2, b1):
            assert env.sbctl("--bare", "--columns=chassis", "find", "Port_Binding", f"logical_port={p.id}")
            iface_id = env.vsctl("get", "Interface", pods.pods[[a1, a2, b1].index(p)].host_if,
                                 "external_ids:iface-id")
            assert iface_id.strip('"') == p.id
        server = tcp_server(pa1, 5001, lifetime=40)
        try:
            t0 = time.monotonic()
            ok, err = tcp_exchange(pa2, a1.ip, 5001, 1_000_000, timeout=20)
            assert ok, f"TCP a2 -> a1 failed: {err}"
            print(f"1 MB echo a2 -> a1 in {time.monotonic() - t0:.2f}s")
            ok, err = tcp_exchange(pb1, a1.ip, 5001, 1000, timeout=4)
            assert not ok, "a pod of another tenant reached tenant A's pod"
            assert "refused" not in err, f"tenant B got an answer from somewhere: {err}"
            print(f"tenant B -> tenant A: {err}")
            # the isolated attempt failed for lack of L2 reachability, not because the server died
            ok, err = tcp_exchange(pa2, a1.ip, 5001, 1000, timeout=20)
            assert ok, f"TCP a2 -> a1 failed after the isolation check: {err}"
        finally:
            server.kill()
            server.wait()
        # spoofing: a pod that changes its address is dropped by port security
        pa2.exec("ip", "addr", "flush", "dev", "eth0")
        pa2.exec("ip", "addr", "add", "10.77.0.200/24", "dev", "eth0")
        server = tcp_server(pa1, 5002, lifetime=20)
        try:
            ok, err = tcp_exchange(pa2, a1.ip, 5002, 1000, timeout=4)
            assert not ok, "port security let a spoofed source address through"
            assert "refused" not in err, err
        finally:
            server.kill()
            server.wait()
    finally:
        pods.cleanup()
        iaas.delete_network(ta)
        iaas.delete_network(tb)


# ---- pools and intent (issue 4, items 1 and 2) ------------------------------------------------------


def _lsp_ids(env: OvnEnv, port: str) -> dict[str, str]:
    return dict(_nb_column(env, port, "external_ids")[1])


def test_pool_claim_release_trim_write_the_intent_on_the_port(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    t = tenant_name(ovn_env, "pool")
    net = iaas.ensure_network(NetworkSpec(t, "10.69.0.0/24", "10.69.0.1"))
    pool = iaas.create_ports(net, [PortRequest(f"pool-{ovn_env.prefix}-{i}", None) for i in range(3)])
    assert all(p.pooled for p in pool)
    assert _lsp_ids(ovn_env, pool[0].id) == {"netctl:tenant": t, "netctl:state": "pooled"}
    assert [p.id for p in iaas.pooled_ports(t)] == sorted(p.id for p in pool)

    # A claim takes a pooled port (the lowest name) and writes the pod's identity on it.
    owner = pod_owner(t, "claimer")
    claim = iaas.claim_port(net, owner, "pod-uid-claimer", node="node-a")
    assert claim.hit and not claim.existing and claim.port.id == min(p.id for p in pool)
    ids = _lsp_ids(ovn_env, claim.port.id)
    assert ids == {"netctl:tenant": t, "netctl:state": "bound", "netctl:owner": "pod", "netctl:pod": "claimer",
                   "netctl:namespace": "default", "netctl:pod-uid": "uid-claimer", "netctl:node": "node-a"}
    assert nb_get(ovn_env, claim.port.id, "options:requested-chassis").strip('"') == ovn_env.chassis
    assert iaas.ports_of_pod("uid-claimer") == [iaas.get_port(claim.port.id)]
    assert iaas.get_port(claim.port.id).ip == claim.port.ip  # type: ignore[union-attr]
    # Claiming again returns the pod's port (after a crash before the annotation, say).
    again = iaas.claim_port(net, owner, "pod-uid-claimer")
    assert again.existing and again.port.id == claim.port.id and len(iaas.pooled_ports(t)) == 2

    # Release: fresh name, fresh address, no identity, no binding; the old name is gone.
    (back,) = iaas.release_ports([claim.port.id, "pool-no-such-port"])
    assert back.pooled and back.id.startswith("pool-") and back.id != claim.port.id
    assert back.ip != claim.port.ip and back.mac != claim.port.mac
    assert nb_get(ovn_env, claim.port.id, "name") == ""
    assert _lsp_ids(ovn_env, back.id) == {"netctl:tenant": t, "netctl:state": "pooled"}
    assert nb_get(ovn_env, back.id, "options") == "{}"
    assert ovn_env.nbctl("lsp-get-addresses", back.id) == f"{back.mac} {back.ip}"
    assert iaas.ports_of_pod("uid-claimer") == [] and len(iaas.pooled_ports(t)) == 3

    # An empty pool: the claim creates the pod's own port.
    assert iaas.trim_pool(t, 1) == 2 and len(iaas.pooled_ports(t)) == 1
    iaas.claim_port(net, pod_owner(t, "first"), "pod-uid-first")
    miss = iaas.claim_port(net, pod_owner(t, "second"), "pod-uid-second")
    assert not miss.hit and miss.port.id == "pod-uid-second" and miss.port.state == "bound"
    assert _lsp_ids(ovn_env, "pod-uid-second")["netctl:state"] == "bound"

    ports = iaas.list_ports(tenant=t)
    ips = [p.ip for p in ports]
    assert len(ips) == len(set(ips))
    listed = ovn_env.nbctl("--bare", "--columns=name", "find", "Logical_Switch_Port",
                           f"external_ids:netctl\\:tenant={t}")
    assert sorted(listed.split()) == sorted(p.id for p in ports)
    iaas.delete_network(t)


def test_two_clients_never_claim_the_same_pooled_port(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    """Two processes' claims race for a small pool: OVSDB's verify makes the loser re-run against
    the refreshed replica, so every pooled port is taken at most once."""
    t = tenant_name(ovn_env, "race")
    net = iaas.ensure_network(NetworkSpec(t, "10.70.0.0/24", "10.70.0.1"))
    iaas.create_ports(net, [PortRequest(f"pool-{ovn_env.prefix}-r{i}", None) for i in range(10)])
    clients = [OvnIaaS(ovn_env.ovn.nb_connection, timeout=30) for _ in range(2)]
    results: list[list[Any]] = [[], []]

    def work(k: int) -> None:
        for i in range(10):
            results[k].append(clients[k].claim_port(net, pod_owner(t, f"c{k}-{i}"), f"pod-uid-c{k}-{i}"))

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    finally:
        for c in clients:
            c.close()
    claims = results[0] + results[1]
    assert len(claims) == 20
    assert sum(c.hit for c in claims) == 10  # the whole pool, each port once
    ids = [c.port.id for c in claims]
    assert len(ids) == len(set(ids))
    for c in claims:
        assert _lsp_ids(ovn_env, c.port.id)["netctl:pod-uid"] == c.port.owner.uid
    iaas.delete_network(t)

"""CNI ADD does not wait for ovs-vswitchd to attach the port (DESIGN §5): what ADD still promises,
and how CHECK and the agent's log report an attachment, against a real OVS (netdev datapath).

State is checked independently with `ovs-vsctl`; names carry the session's per-run prefix and
everything created here is removed, also after a failure.
"""

from __future__ import annotations

import contextlib
import logging
import time

import pytest

from cni import ovs_binding as ob

pytest.register_assert_rewrite("netns_tests.ovn_fixtures")
from netns_tests.ovn_fixtures import OvnEnv, run  # noqa: E402

pytestmark = pytest.mark.netns
pytest_plugins = ("netns_tests.ovn_fixtures",)


def _ofport(env: OvnEnv, name: str) -> str:
    return env.vsctl("--bare", "--columns=ofport", "find", "Interface", f"name={name}")


def test_plug_without_waiting_commits_the_port_and_check_verifies_the_attachment(ovn_env: OvnEnv) -> None:
    env = ovn_env
    ns, host = f"{env.prefix}-att1", f"{env.prefix[:8]}xat1"
    run("ip", "netns", "add", ns)
    hv = f"/run/netns/{env.hv_netns}"
    ids = {ob.EXT_CONTAINER_ID: f"{env.prefix}-c1", ob.EXT_IFNAME: "eth0"}
    try:
        res = ob.plug_port(ovsdb=env.ovs.db_connection, bridge=env.bridge, ovs_netns=hv,
                           target_netns=f"/run/netns/{ns}", ifname="eth0", host_ifname=host,
                           port_id=f"{env.prefix}-port-att1", mac="0a:58:0a:4e:00:05", cidr="10.78.0.5/24",
                           gateway="10.78.0.1", mtu=1400, external_ids=ids, wait_attached=False)
        assert res.ofport is None
        # what ADD promises when it returns: the port is in the database with its external_ids
        ext = env.vsctl("--bare", "--columns=external_ids", "find", "Interface", f"name={host}")
        assert f"iface-id={env.prefix}-port-att1" in ext and f"{ob.EXT_CONTAINER_ID}={env.prefix}-c1" in ext
        assert env.vsctl("iface-to-br", host) == env.bridge
        # CHECK verifies the attachment, waiting for it if vswitchd has not got there yet
        assert ob.check_port(ovsdb=env.ovs.db_connection, bridge=env.bridge, ovs_netns=hv,
                             target_netns=f"/run/netns/{ns}", ifname="eth0", host_ifname=host,
                             mac="0a:58:0a:4e:00:05", cidrs=["10.78.0.5/24"], external_ids=ids) == []
        assert int(_ofport(env, host)) > 0
    finally:
        with contextlib.suppress(Exception):
            ob.unplug_port(ovsdb=env.ovs.db_connection, ovs_netns=hv, host_ifname=host)
        run("ip", "netns", "del", ns, check=False)


def test_check_and_the_log_report_a_port_vswitchd_cannot_attach(ovn_env: OvnEnv,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A port committed for a device that does not exist (a pod veth deleted behind our back)."""
    env = ovn_env
    ghost = f"{env.prefix[:8]}xgho"
    hv = f"/run/netns/{env.hv_netns}"
    caplog.set_level(logging.WARNING, logger="netctl.cni.ovs")
    db = ob.OvsDb.connect(env.ovs.db_connection)
    try:
        db.add_port(env.bridge, ghost, {ob.EXT_CONTAINER_ID: f"{env.prefix}-c2", ob.EXT_POD: "ns/ghost",
                                        "attached-mac": "0a:58:0a:4e:00:06", "iface-id": "p-ghost"},
                    wait_vswitchd=False)
        problems = ob.check_port(ovsdb=env.ovs.db_connection, bridge=env.bridge, ovs_netns=hv,
                                 target_netns=hv, ifname="lo", host_ifname=ghost, mac="0a:58:0a:4e:00:06",
                                 cidrs=[], ovs=db)
        # reported whether vswitchd had already failed when CHECK read the row or CHECK waited for it
        assert any(ghost in p and f"could not open network device {ghost}" in p for p in problems), problems
        assert _ofport(env, ghost) == "-1"
        deadline = time.monotonic() + 10
        while not any(ghost in r.getMessage() for r in caplog.records if r.name == "netctl.cni.ovs"):
            assert time.monotonic() < deadline, "the attach failure was not logged"
            time.sleep(0.05)
        [line] = [r.getMessage() for r in caplog.records if ghost in r.getMessage()]
        assert "pod ns/ghost" in line and f"container {env.prefix}-c2" in line
    finally:
        with contextlib.suppress(Exception):
            db.del_port(ghost)
        db.close()

"""Nested mode's pure parts: the config keys, aliases and names, and the errors a runtime sees.

No netns of their own: configs that reach the netlink layer point at netns paths that do not exist
(or at this process's own, read only); the executable is exec'd as a runtime does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cni import nested
from cni.netconf import OWN_NETNS, NetConf
from cni.plugin import nested_vlan_id
from cni.spec import CniError, Code
from netctl.annotations import PortAnnotation

BINARY = Path(sys.executable).parent / "netctl-cni"


def parse(**conf: Any) -> NetConf:
    return NetConf.from_dict({"name": "n", "type": "netctl-cni", **conf}, "1.1.0", {"NODE_NAME": "n1"})


def test_mode_defaults_to_ovs() -> None:
    nc = parse()
    assert (nc.mode, nc.trunk_interface, nc.node_netns, nc.vlan_backend) == ("ovs", None, OWN_NETNS, "kernel")
    assert not nc.netlink_only


@pytest.mark.parametrize(("conf", "expect"), [
    ({"mode": "nested-nic"}, ("nested-nic", None, "kernel", True)),
    ({"mode": "nested-vlan", "trunkInterface": "eth0"}, ("nested-vlan", "eth0", "kernel", True)),
    ({"mode": "nested-vlan", "trunkInterface": "ens3", "vlanBackend": "ovs"}, ("nested-vlan", "ens3", "ovs", False)),
])
def test_nested_modes_parse(conf: dict[str, Any], expect: tuple[Any, ...]) -> None:
    nc = parse(**conf, nodeNetns="/run/netns/vm1")
    assert (nc.mode, nc.trunk_interface, nc.vlan_backend, nc.netlink_only) == expect
    assert nc.node_netns == "/run/netns/vm1"


@pytest.mark.parametrize(("conf", "needle"), [
    ({"mode": "nested"}, "mode 'nested' must be one of ovs, nested-nic, nested-vlan"),
    ({"mode": 3}, "mode must be a string"),
    ({"mode": "nested-vlan"}, "trunkInterface is required with mode nested-vlan"),
    ({"mode": "nested-vlan", "trunkInterface": "eth0:1"}, "trunkInterface 'eth0:1' must not contain"),
    ({"mode": "nested-vlan", "trunkInterface": "a" * 16}, "must be shorter than 16 bytes"),
    ({"mode": "nested-nic", "trunkInterface": "eth0"}, "trunkInterface is only used with mode nested-vlan"),
    ({"trunkInterface": "eth0"}, "trunkInterface is only used with mode nested-vlan, not ovs"),
    ({"mode": "nested-nic", "nodeNetns": "vm1"}, "nodeNetns 'vm1' must be an absolute path"),
    ({"mode": "nested-vlan", "trunkInterface": "eth0", "vlanBackend": "macvlan"}, "vlanBackend 'macvlan' must be"),
    ({"mode": "nested-nic", "vlanBackend": "ovs"}, "vlanBackend is only used with mode nested-vlan"),
])
def test_bad_nested_config_is_code_7_naming_the_key(conf: dict[str, Any], needle: str) -> None:
    with pytest.raises(CniError) as err:
        parse(**conf)
    assert err.value.code == Code.INVALID_NETCONF and needle in err.value.msg


def test_alias_round_trip_and_foreign_aliases() -> None:
    mark = nested.alias("net", "cid-1", "eth0")
    assert nested.parse_alias(mark) == ("net", "cid-1", "eth0")
    for foreign in (None, "", "netctl-cni net cid eth0", "netctl-nested net cid", "netctl-nested  cid eth0",
                    "netctl-nested a b c d"):
        assert nested.parse_alias(foreign) is None


def test_returned_name_is_recognisable_and_fits_ifnamsiz() -> None:
    name = nested.returned_name("0A:58:0a:56:00:04")
    assert name == "nic0a580a560004" and len(name) == 15


def port(vlan: int | None) -> PortAnnotation:
    return PortAnnotation("pod-x", "0a:58:0a:01:00:05", "10.1.0.5/24", "10.1.0.1", 1400, "alpha", "netctl-alpha", vlan)


def test_nested_vlan_needs_the_annotations_vlan() -> None:
    vlan_conf = parse(mode="nested-vlan", trunkInterface="eth0", vlanBackend="ovs")
    assert nested_vlan_id(vlan_conf, port(42)) == 42
    assert nested_vlan_id(parse(), port(42)) is None  # ovs mode never tags
    with pytest.raises(CniError) as err:
        nested_vlan_id(vlan_conf, port(None))
    assert err.value.code == Code.ANNOTATION_INVALID and "port pod-x has none" in err.value.msg


def run_plugin(command: str, conf: dict[str, Any], **env: str) -> tuple[int, Any, str]:
    proc = subprocess.run([str(BINARY)], input=json.dumps(conf).encode(), capture_output=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "CNI_COMMAND": command, **env})
    out = proc.stdout.decode()
    return proc.returncode, json.loads(out) if out.strip() else None, proc.stderr.decode()


@pytest.mark.parametrize("mode", ["nested-nic", "nested-vlan"])
def test_del_with_nothing_there_is_idempotent(tmp_path: Path, mode: str) -> None:
    """DEL of an ADD that never happened, with the pod netns gone: success, no output."""
    conf = {"cniVersion": "1.1.0", "name": "n", "type": "netctl-cni", "mode": mode,
            "nodeNetns": "/proc/self/ns/net", "logFile": str(tmp_path / "log")}
    if mode == "nested-vlan":
        conf["trunkInterface"] = "eth0"
    rc, out, err = run_plugin("DEL", conf, CNI_CONTAINERID="c1", CNI_IFNAME="eth0",
                              CNI_NETNS=str(tmp_path / "gone"))
    assert (rc, out) == (0, None), err
    assert "Traceback" not in err


def test_nested_errors_reach_the_runtime_as_error_objects(tmp_path: Path) -> None:
    """The node namespace missing: DEL is a link failure naming it (code 103), never a traceback."""
    conf = {"cniVersion": "1.1.0", "name": "n", "type": "netctl-cni", "mode": "nested-nic",
            "nodeNetns": str(tmp_path / "no-vm"), "logFile": str(tmp_path / "log")}
    rc, out, err = run_plugin("DEL", conf, CNI_CONTAINERID="c1", CNI_IFNAME="eth0")
    assert rc == 1 and out["code"] == Code.LINK_FAILURE, out
    assert f"the node namespace {tmp_path / 'no-vm'} does not exist" in out["details"]
    assert "Traceback" not in err
    # STATUS of nested-vlan says what is missing, as code 50
    conf.update(mode="nested-vlan", trunkInterface="eth0")
    rc, out, _ = run_plugin("STATUS", conf)
    assert rc == 1 and out["code"] == Code.PLUGIN_NOT_AVAILABLE and "does not exist" in out["details"], out


@pytest.mark.parametrize(("example", "mode"), [("10-netctl-nested-nic.conflist.example", "nested-nic"),
                                               ("10-netctl-nested-vlan.conflist.example", "nested-vlan")])
def test_deploy_examples_parse(example: str, mode: str) -> None:
    doc = json.loads((Path(__file__).parents[1] / "deploy" / "cni" / example).read_text())
    for version in doc["cniVersions"]:
        (plugin,) = doc["plugins"]
        nc = NetConf.from_dict({**plugin, "name": doc["name"], "cniVersion": version}, version, {})
        assert nc.mode == mode and nc.netlink_only and nc.agent_socket

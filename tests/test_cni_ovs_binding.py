"""The pieces of the ovs-mode binding that need no root and no OVS: the pod end's batched netlink
requests, the batch's acknowledgement parsing, the IDL's interface copy, the executable's environment.

The batched requests must be the messages pyroute2's own API would send for the same calls (same
type, flags, header fields and attributes; only sequence numbers and the order of attributes may
differ): pyroute2's IPBatch compiles them without sending.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from ovs.db import idl as ovs_idl
from pyroute2 import IPBatch
from pyroute2.netlink import NLMSG_ERROR, nlmsgerr
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from cni import main as cni_main
from cni import ovs_binding as ob
from netctl.lab.ovs import OVS_SCHEMA

_CLASSES = {20: ifaddrmsg, 16: ifinfmsg, 24: rtmsg}  # RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE


def _decoded(data: bytes) -> tuple[Any, ...]:
    """(type, flags, fields, attrs) of one encoded message, sequence number and pid left out."""
    kind = int.from_bytes(data[4:6], "little")
    msg = _CLASSES[kind](data)
    msg.decode()
    fields = tuple((name, msg[name]) for name, _ in msg.fields if not name.startswith("__"))
    return kind, msg["header"]["flags"], fields, sorted((a[0], a[1]) for a in msg["attrs"])


def _ours(idx: int, cidr: str, gateway: str | None, routes: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
    out = []
    for _, (msg, kind, flags) in ob._pod_end_requests(idx, ipaddress.IPv4Interface(cidr), gateway, routes):
        msg["header"]["type"], msg["header"]["flags"] = kind, flags
        msg.encode()
        out.append(_decoded(bytes(msg.data)))
    return out


def _pyroute2s(idx: int, cidr: str, gateway: str | None, routes: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
    iface = ipaddress.IPv4Interface(cidr)
    batch = IPBatch()
    try:
        out = []
        calls: list[Any] = [
            lambda: batch.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen),
            lambda: batch.link("set", index=idx, state="up"),
            lambda: batch.link("set", index=1, state="up"),
        ]
        if gateway:
            calls.append(lambda: batch.route("add", dst="default", gateway=gateway, oif=idx))
        calls += [lambda d=dst, v=via: batch.route("add", dst=d, gateway=v, oif=idx) for dst, via in routes]
        for call in calls:
            batch.reset()
            call()
            out.append(_decoded(bytes(batch.batch)))
        return out
    finally:
        batch.close()


@pytest.mark.parametrize(("cidr", "gateway", "routes"), [
    ("10.85.0.7/16", "10.85.0.1", []),
    ("10.79.3.9/24", "10.79.3.1", [("10.96.0.0/12", "10.79.3.254")]),
    ("192.168.5.2/30", None, []),
])
def test_pod_end_requests_are_what_pyroute2_sends(cidr: str, gateway: str | None,
                                                  routes: list[tuple[str, str]]) -> None:
    assert _ours(7, cidr, gateway, routes) == _pyroute2s(7, cidr, gateway, routes)


def test_alias_request_is_what_pyroute2_sends() -> None:
    msg, kind, flags = ob._alias_request(9, "netctl-cni net1 c0ffee eth0")
    msg["header"]["type"], msg["header"]["flags"] = kind, flags
    msg.encode()
    batch = IPBatch()
    try:
        batch.link("set", index=9, ifalias="netctl-cni net1 c0ffee eth0")
        assert _decoded(bytes(msg.data)) == _decoded(bytes(batch.batch))
    finally:
        batch.close()


def test_pod_end_requests_order_address_up_then_routes() -> None:
    whats = [what for what, _ in ob._pod_end_requests(
        3, ipaddress.IPv4Interface("10.1.0.2/24"), "10.1.0.1", [("10.96.0.0/12", "10.1.0.9")])]
    assert whats == ["adding address 10.1.0.2/24", "setting it up", "setting lo up",
                     "adding route 0.0.0.0/0 via 10.1.0.1", "adding route 10.96.0.0/12 via 10.1.0.9"]


def _ack(seq: int, code: int, echo: bytes = b"") -> bytes:
    msg = nlmsgerr()
    msg["header"]["type"], msg["header"]["sequence_number"], msg["error"] = NLMSG_ERROR, seq, -code
    msg.encode()
    data = bytes(msg.data) + echo  # the kernel appends (part of) the request; the length covers it
    return len(data).to_bytes(4, "little") + data[4:]


@dataclass
class FakeNetlink:
    datagrams: list[bytes]
    sent: list[bytes] = field(default_factory=list)
    timeout: float | None = None

    def settimeout(self, timeout: float) -> None:
        self.timeout = timeout

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.datagrams.pop(0)


def test_rtnl_batch_sends_one_datagram_and_reports_each_code_in_order() -> None:
    iface = ipaddress.IPv4Interface("10.1.0.2/24")
    requests = [r for _, r in ob._pod_end_requests(4, iface, "10.1.0.1", [])]
    # acknowledgements out of order, over two datagrams, one carrying the echoed request header
    sock = FakeNetlink([_ack(2, 0) + _ack(1, 0, b"\0" * 16), _ack(4, errno.ENETUNREACH) + _ack(3, errno.ENODEV)])
    codes = ob._rtnl_batch(sock, requests)  # type: ignore[arg-type]  # the two calls a socket answers
    assert codes == [0, 0, errno.ENODEV, errno.ENETUNREACH]
    assert len(sock.sent) == 1 and sock.timeout == ob._RTNL_TIMEOUT_S
    seqs, data, offset = [], sock.sent[0], 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 4], "little")
        seqs.append(int.from_bytes(data[offset + 8:offset + 12], "little"))
        offset += (length + 3) & ~3
    assert seqs == [1, 2, 3, 4]


@dataclass
class FakeTable:
    name: str


@dataclass
class FakeRow:
    _table: FakeTable
    name: str
    external_ids: dict[str, str]
    uuid: uuid.UUID = field(default_factory=uuid.uuid4)
    ofport: list[int] = field(default_factory=list)  # optional columns: [] or [value]
    error: list[str] = field(default_factory=list)


@pytest.mark.skipif(not OVS_SCHEMA.exists(), reason="the Open_vSwitch schema is not installed")
def test_the_idl_keeps_every_interfaces_external_ids_from_its_notifications() -> None:
    helper = ovs_idl.SchemaHelper(location=str(OVS_SCHEMA))
    helper.register_columns("Interface", ["name", "external_ids"])
    idl = ob._NotifyingIdl("unix:/nonexistent/db.sock", helper)  # never run: no connection is made
    try:
        iface, port = FakeTable("Interface"), FakeTable("Port")
        a = FakeRow(iface, "nca", {ob.EXT_CONTAINER_ID: "c1", ob.EXT_IFNAME: "eth0"})
        b = FakeRow(iface, "ncb", {ob.EXT_CONTAINER_ID: "c1", ob.EXT_IFNAME: "net1"})
        for row in (a, b, FakeRow(port, "nca", {ob.EXT_CONTAINER_ID: "c1"})):
            idl.notify(ovs_idl.ROW_CREATE, row)
        assert idl.changes == 3
        assert sorted(n for n, _ in idl.interfaces_with({ob.EXT_CONTAINER_ID: "c1"})) == ["nca", "ncb"]
        assert [n for n, _ in idl.interfaces_with({ob.EXT_CONTAINER_ID: "c1", ob.EXT_IFNAME: "net1"})] == ["ncb"]
        b.external_ids = {ob.EXT_CONTAINER_ID: "c2", ob.EXT_IFNAME: "net1"}
        idl.notify(ovs_idl.ROW_UPDATE, b)
        assert [n for n, _ in idl.interfaces_with({ob.EXT_CONTAINER_ID: "c1"})] == ["nca"]
        # a row replaced under the same name: the new one is created before the old one is deleted
        a2 = FakeRow(iface, "nca", {ob.EXT_CONTAINER_ID: "c3"})
        idl.notify(ovs_idl.ROW_CREATE, a2)
        idl.notify(ovs_idl.ROW_DELETE, a)
        assert idl.interfaces_with({}) == [("ncb", b.external_ids), ("nca", a2.external_ids)]
    finally:
        idl.close()


@pytest.mark.skipif(not OVS_SCHEMA.exists(), reason="the Open_vSwitch schema is not installed")
def test_the_idl_logs_each_attach_failure_of_our_interfaces_once(caplog: pytest.LogCaptureFixture) -> None:
    helper = ovs_idl.SchemaHelper(location=str(OVS_SCHEMA))
    helper.register_columns("Interface", ["name", "ofport", "error", "external_ids"])
    idl = ob._NotifyingIdl("unix:/nonexistent/db.sock", helper)
    try:
        iface = FakeTable("Interface")
        ours = FakeRow(iface, "ncx", {ob.EXT_CONTAINER_ID: "c9", ob.EXT_POD: "ns/p"})
        node_nic = FakeRow(iface, "eth1", {}, error=["could not open network device eth1"])
        idl.notify(ovs_idl.ROW_CREATE, ours)
        idl.notify(ovs_idl.ROW_UPDATE, node_nic)  # not ours: not reported
        ours.ofport, ours.error = [-1], ["could not open network device ncx (No such device)"]
        for _ in range(2):
            idl.notify(ovs_idl.ROW_UPDATE, ours)
        ours.ofport, ours.error = [7], []
        idl.notify(ovs_idl.ROW_UPDATE, ours)
        ours.ofport = [-1]
        idl.notify(ovs_idl.ROW_UPDATE, ours)
        failures = [r.getMessage() for r in caplog.records if r.name == "netctl.cni.ovs"]
        assert failures == ["ovs-vswitchd could not attach ncx (pod ns/p, container c9): "
                            "could not open network device ncx (No such device)",
                            "ovs-vswitchd could not attach ncx (pod ns/p, container c9): ofport -1"]
    finally:
        idl.close()


def test_the_executables_environment_is_os_environ() -> None:
    assert cni_main.environ() == dict(os.environ)

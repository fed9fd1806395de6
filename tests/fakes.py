"""In-memory fakes of *our own* interfaces (IaaS, informer cache, writer, recorder) for unit tests."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from netctl.iaas.base import (
    Claim,
    IaaS,
    Network,
    NetworkSpec,
    Port,
    PortNotFound,
    PortOwner,
    PortRequest,
    pool_port_id,
)
from netctl.ipam import SubnetAllocator, mac_for_ip

Obj = dict[str, Any]


class FakeIaaS(IaaS):
    """Behaves like a backend: idempotent creates, one allocator per network, thread-safe."""

    def __init__(self) -> None:
        self.networks: dict[str, Network] = {}
        self.ports: dict[str, Port] = {}
        self.alloc: dict[str, SubnetAllocator] = {}
        self.calls: list[str] = []
        self.plugged = {}
        self._lock = threading.Lock()

    def ensure_network(self, spec: NetworkSpec) -> Network:
        with self._lock:
            self.calls.append(f"ensure_network {spec.tenant}")
            net = self.networks.get(spec.tenant)
            if net is None:
                gw = spec.gateway  # like OvnIaaS: no gateway unless asked for
                net = Network(f"netctl-{spec.tenant}", spec.tenant, spec.cidr, gw, spec.mtu)
                self.networks[spec.tenant] = net
                self.alloc[spec.tenant] = SubnetAllocator(spec.cidr, gateway=gw)
            return net

    def get_network(self, tenant: str) -> Network | None:
        return self.networks.get(tenant)

    def delete_network(self, tenant: str) -> None:
        with self._lock:
            self.calls.append(f"delete_network {tenant}")
            self.networks.pop(tenant, None)
            for pid in [p.id for p in self.ports.values() if p.tenant == tenant]:
                del self.ports[pid]

    def list_networks(self) -> list[Network]:
        return list(self.networks.values())

    def create_port(
        self, network: Network, owner: PortOwner | None, port_id: str, node: str | None = None,
        extra_allowed_cidrs: Sequence[str] = (),
    ) -> Port:
        return self.create_ports(network, [PortRequest(port_id, owner, node, tuple(extra_allowed_cidrs))])[0]

    def create_ports(self, network: Network, requests: Iterable[PortRequest]) -> list[Port]:
        out = []
        with self._lock:
            for r in requests:
                self.calls.append(f"create_port {r.port_id}")
                if r.port_id in self.ports:
                    out.append(self.ports[r.port_id])
                    continue
                ip = self.alloc[network.tenant].allocate(r.port_id)
                port = Port(r.port_id, network.id, network.tenant, mac_for_ip(ip), ip,
                            network.prefixlen, r.owner, r.node, r.extra_allowed_cidrs, r.state)
                self.ports[r.port_id] = port
                out.append(port)
        return out

    def claim_port(self, network: Network, owner: PortOwner, fallback_id: str, node: str | None = None) -> Claim:
        with self._lock:
            # as the OVN backend: only this network's ports (the pod may hold a public port elsewhere)
            mine = sorted((p for p in self.ports.values() if p.pod_uid == owner.uid and p.tenant == network.tenant),
                          key=lambda p: p.id)
            if mine:
                return Claim(mine[0], hit=False, existing=True)
            pooled = sorted((p for p in self.ports.values() if p.pooled and p.tenant == network.tenant),
                            key=lambda p: p.id)
            if pooled:
                self.calls.append(f"claim_port {pooled[0].id} {owner.uid}")
                port = dataclasses.replace(pooled[0], owner=owner, node=node, state="bound")
                self.ports[port.id] = port
                return Claim(port, hit=True)
        return Claim(self.create_ports(network, [PortRequest(fallback_id, owner, node)])[0], hit=False)

    def release_ports(self, port_ids: Iterable[str]) -> list[Port]:
        out = []
        with self._lock:
            for pid in port_ids:
                old = self.ports.pop(pid, None)
                if old is None:
                    continue
                new_id = pool_port_id()
                self.calls.append(f"release_port {pid} {new_id}")
                alloc = self.alloc[old.tenant]
                ip = alloc.allocate(new_id)
                alloc.release(old.ip)
                port = Port(new_id, old.network_id, old.tenant, mac_for_ip(ip), ip, old.prefixlen,
                            None, None, (), "pooled")
                self.ports[new_id] = port
                out.append(port)
        return out

    def trim_pool(self, tenant: str, keep: int) -> int:
        doomed = [p.id for p in self.pooled_ports(tenant)][max(0, keep):]
        self.delete_ports(doomed)
        return len(doomed)

    def ports_of_pod(self, uid: str) -> list[Port]:
        with self._lock:
            return sorted((p for p in self.ports.values() if p.pod_uid == uid), key=lambda p: p.id)

    def pooled_ports(self, tenant: str) -> list[Port]:
        with self._lock:
            return sorted((p for p in self.ports.values() if p.pooled and p.tenant == tenant),
                          key=lambda p: p.id)

    def bind_port(self, port_id: str, node: str) -> Port:
        with self._lock:
            self.calls.append(f"bind_port {port_id} {node}")
            port = dataclasses.replace(self.ports[port_id], node=node)
            self.ports[port_id] = port
            return port

    # nested mode: subports (lowest free VLAN per parent) and hot-plugged NICs (port -> VM port)
    plugged: dict[str, str]

    def attach_subport(self, port_id: str, parent_id: str) -> Port:
        with self._lock:
            port, parent = self.ports.get(port_id), self.ports.get(parent_id)
            if port is None or parent is None:
                raise PortNotFound(f"no port {port_id if port is None else parent_id}")
            if port.parent == parent_id and port.vlan is not None:
                return port
            used = {p.vlan for p in self.ports.values() if p.parent == parent_id and p.id != port_id}
            vlan = next(t for t in range(1, 4095) if t not in used)
            self.calls.append(f"attach_subport {port_id} {parent_id} {vlan}")
            port = dataclasses.replace(port, parent=parent_id, vlan=vlan)
            self.ports[port_id] = port
            return port

    def detach_subport(self, port_id: str) -> None:
        with self._lock:
            if port_id in self.ports:
                self.ports[port_id] = dataclasses.replace(self.ports[port_id], parent=None, vlan=None)

    def hotplug_port(self, port_id: str, vm_port_id: str) -> bool:
        with self._lock:
            if port_id not in self.ports or vm_port_id not in self.ports:
                raise PortNotFound(f"no port {port_id if port_id not in self.ports else vm_port_id}")
            if self.plugged.get(port_id) == vm_port_id:
                return False
            self.calls.append(f"hotplug_port {port_id} {vm_port_id}")
            self.plugged[port_id] = vm_port_id
            return True

    def unplug_port(self, port_id: str) -> bool:
        with self._lock:
            if self.plugged.pop(port_id, None) is None:
                return False
            self.calls.append(f"unplug_port {port_id}")
            return True

    def delete_port(self, port_id: str) -> None:
        self.delete_ports([port_id])

    def delete_ports(self, port_ids: Iterable[str]) -> None:
        with self._lock:
            for pid in port_ids:
                self.calls.append(f"delete_port {pid}")
                port = self.ports.pop(pid, None)
                if port is not None:
                    self.alloc[port.tenant].release(port.ip)

    def get_port(self, port_id: str) -> Port | None:
        return self.ports.get(port_id)

    def list_ports(self, tenant: str | None = None) -> list[Port]:
        return [p for p in self.ports.values() if tenant is None or p.tenant == tenant]


class FakeCache:
    def __init__(self, objs: Iterable[dict[str, Any]] = ()) -> None:
        self.objs: dict[str, dict[str, Any]] = {}
        for o in objs:
            self.put(o)

    @staticmethod
    def _key(o: dict[str, Any]) -> str:
        m = o["metadata"]
        return f"{m['namespace']}/{m['name']}" if m.get("namespace") else m["name"]

    def put(self, o: dict[str, Any]) -> None:
        self.objs[self._key(o)] = o

    def remove(self, key: str) -> None:
        self.objs.pop(key, None)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.objs.get(key)

    def list(self) -> list[dict[str, Any]]:
        return list(self.objs.values())

    def by_index(self, index: str, value: str) -> list[dict[str, Any]]:
        return [o for o in self.objs.values() if o["metadata"].get(index) == value]


class FakeWriter:
    def __init__(self, pods: FakeCache | None = None) -> None:
        self.pods = pods
        self.patches: list[tuple[str, str, dict[str, str | None]]] = []
        self.statuses: dict[str, dict[str, Any]] = {}

    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: dict[str, str | None], uid: str | None = None
    ) -> None:
        self.patches.append((namespace, name, annotations))
        if self.pods is not None:  # reflect the write back into the cache, as the watch would
            pod = self.pods.get(f"{namespace}/{name}")
            if pod is not None:
                assert uid is None or pod["metadata"]["uid"] == uid
                anns = pod["metadata"].setdefault("annotations", {})
                for k, v in annotations.items():
                    if v is None:
                        anns.pop(k, None)
                    else:
                        anns[k] = v

    def patch_tenant_status(self, name: str, status: dict[str, Any]) -> None:
        self.statuses[name] = status


class FakeRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, str]] = []

    def record(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        m = obj.get("metadata", {})
        self.events.append((f"{m.get('namespace')}/{m.get('name')}", type_, reason, message))


def pod(name: str, ns: str = "tenant-a", uid: str | None = None, node: str | None = None,
        **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}", "annotations": {}},
        "spec": {"nodeName": node} if node else {},
        "status": {"phase": "Pending"},
    }
    obj.update(extra)
    return obj


def namespace(name: str, tenant: str | None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"netctl.io/tenant": tenant} if tenant else {}}}


def node(name: str, tenant: str | None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"netctl.io/tenant": tenant} if tenant else {}}}


def tenant(name: str, cidr: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "generation": 1}, "spec": {"cidr": cidr}}


class MemListWatch:
    """`ListWatch` over an in-memory object set; every change is also sent down the watch."""

    _rv = itertools.count(100)

    def __init__(self, objs: Iterable[Obj] = ()) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, Obj] = {}
        self.events: queue.Queue[Obj] = queue.Queue()
        self.stopped = threading.Event()
        for o in objs:
            self._store(o)

    @staticmethod
    def key(o: Obj) -> str:
        m = o["metadata"]
        return f"{m['namespace']}/{m['name']}" if m.get("namespace") else str(m["name"])

    def _store(self, o: Obj) -> Obj:
        o = copy.deepcopy(o)
        o["metadata"]["resourceVersion"] = str(next(self._rv))
        self.objects[self.key(o)] = o
        return copy.deepcopy(o)

    def seed(self, o: Obj) -> None:
        """An object that already exists when the informer first lists (no watch event)."""
        with self.lock:
            self._store(o)

    def put(self, o: Obj) -> None:
        with self.lock:
            kind = "MODIFIED" if self.key(o) in self.objects else "ADDED"
            self.events.put({"type": kind, "object": self._store(o)})

    def delete(self, key: str) -> None:
        with self.lock:
            o = self.objects.pop(key)
            o["metadata"]["resourceVersion"] = str(next(self._rv))
            self.events.put({"type": "DELETED", "object": o})

    def list(self, resource_version: str | None = None) -> tuple[list[Obj], str]:
        with self.lock:
            return [copy.deepcopy(o) for o in self.objects.values()], str(next(self._rv))

    def watch(self, resource_version: str, timeout_seconds: float) -> Iterator[Obj]:
        deadline = time.monotonic() + timeout_seconds
        while not self.stopped.is_set() and time.monotonic() < deadline:
            try:
                yield self.events.get(timeout=0.02)
            except queue.Empty:
                continue

    def interrupt(self) -> None:
        self.stopped.set()

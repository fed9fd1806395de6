"""The local lab: everything the slice needs on one machine, described by a `Topology`.

Pieces, in start order (each one is a real program, started by hand, no systemd):
  hypervisor netns  `<prefix>hv` — ovsdb-server + ovs-vswitchd (netdev datapath) with br-int,
                    and ovn-controller: the one chassis every lab node's VM NICs and pods plug into
  OVN central       NB + SB ovsdb-servers and ovn-northd (unix sockets under the run dir)
  mgmt network      a root-namespace bridge; the API server listens on it, node VMs reach it
  control plane     etcd, kube-apiserver, kube-controller-manager, kube-scheduler
  controller        `netctl controller` (a separate process, so tests can kill and restart it)
  nodes             per node a netns "VM" with a mgmt NIC, a NIC on its tenant network (an OVN port
                    the lab creates as the IaaS would) and its own containerd + kubelet, which run
                    `netctl-cni` from the node's CNI config dir for every pod; the thin executable
                    hands each verb to the node's CNI agent (`python -m cni.agent`, started in the
                    node netns before the runtime, pid/log/socket under `nodes/<node>/`)

A lab records itself in `<run_dir>/lab.json`, so `netctl lab down` in another process removes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from netctl.annotations import (
    PORT_ANNOTATION,
    PUBLIC_IP_ANNOTATION,
    TENANT_LABEL,
    AnnotationError,
    PortAnnotation,
)
from netctl.lab.topology import NodeSpec, PodSpec, Topology, demo

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path(os.environ.get("NETCTL_LAB_DIR", "/var/lib/netctl/lab"))
BRIDGE = "br-int"
VM_NIC = "eth1"  # a node VM's NIC on its tenant network (eth0 is unused; mgmt0 reaches the API)
VM_TRUNK_BRIDGE = "br-trunk"  # nested-vlan VMs: the guest's OVS bridge holding the trunk NIC
POD_PORT = 8080
LAB_IMAGE = "netctl.io/lab/busybox:1"
REPO = Path(__file__).resolve().parents[2]

Progress = Callable[[str], None]
_STATE_LOCK = threading.Lock()


def _venv_bin(name: str) -> str:
    """The console script next to the running interpreter (the project's venv)."""
    cand = Path(sys.executable).parent / name
    found = shutil.which(name)
    return str(cand) if cand.exists() else (found or name)


@dataclasses.dataclass
class LabState:
    prefix: str
    run_dir: str
    mgmt_cidr: str = ""
    netns: list[str] = dataclasses.field(default_factory=list)
    nodes: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    started: float = 0.0
    ready: bool = False

    @classmethod
    def load(cls, run_dir: Path) -> LabState | None:
        try:
            return cls(**json.loads((run_dir / "lab.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self) -> None:
        """Atomic rewrite; nodes start in parallel threads, hence the lock."""
        with _STATE_LOCK:
            path = Path(self.run_dir) / "lab.json"
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
            tmp.replace(path)


class Lab:
    """`with Lab(topology) as lab:` brings the lab up and always tears it down."""

    def __init__(
        self,
        topology: Topology | None = None,
        run_dir: Path | str = DEFAULT_RUN_DIR,
        prefix: str | None = None,
        progress: Progress | None = None,
        controller_args: tuple[str, ...] = (),
        services: bool = True,
        kubelets: bool = True,
    ) -> None:
        self.topology = topology or demo()
        self.run_dir = Path(run_dir).absolute()
        self.prefix = prefix or ("nl" + secrets.token_hex(2))
        self.progress = progress or (lambda msg: log.info("%s", msg))
        self.controller_args = controller_args
        self.services = services  # kproxy per node + the CNI's Service route (the Service data path)
        # False: nodes are Node objects only (labelled, no VM, no kubelet) — for controller tests and
        # benchmarks at thousands of pods, which need pods bound to tenant nodes but no data plane.
        self.kubelets = kubelets
        self.kproxies: dict[str, Any] = {}
        self.hv_netns = f"{self.prefix}hv"
        self.chassis = f"{self.prefix}-chassis"
        self.state = LabState(self.prefix, str(self.run_dir))
        self.ovs: Any = None
        self.ovn: Any = None
        self.mgmt: Any = None
        self.cp: Any = None
        self.iaas: Any = None
        self.controller: Any = None  # replica 0 (the only one unless a test starts more)
        self.controllers: dict[int, Any] = {}
        self._identities: dict[int, str] = {}
        self._metrics_urls: dict[int, str] = {}
        self.runtimes: dict[str, Any] = {}
        self.vm_ovs: dict[str, Any] = {}  # nested-vlan node VMs: the guest's own OVS holding the trunk
        self.cni_agents: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    @staticmethod
    def is_healthy(run_dir: Path) -> bool:
        """Every daemon the lab recorded a pidfile for is still alive."""
        # Our daemons only: containerd keeps per-container pidfiles (k8s.io/<id>/init.pid) that
        # go stale as pods come and go.
        pidfiles = [p for p in Path(run_dir).rglob("*.pid") if "k8s.io" not in p.parts]
        for pidfile in pidfiles:
            try:
                os.kill(int(pidfile.read_text().split()[0]), 0)
            except (OSError, ValueError, IndexError):
                return False
        return bool(pidfiles)

    # -- paths -----------------------------------------------------------------------------------

    def node_netns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    @property
    def internet_netns(self) -> str:
        """The "internet" on the provider network (netctl.lab.internet), when the topology has one."""
        return f"{self.prefix}-internet"

    @property
    def kubeconfig(self) -> Path:
        return Path(self.cp.kubeconfig("admin"))

    # -- bring-up --------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if os.environ.get("NETCTL_KEEP_LAB"):
            self.progress(f"NETCTL_KEEP_LAB set: leaving the lab in {self.run_dir}")
            return
        self.down()

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[None]:
        self.progress(f"… {what}")
        t0 = time.monotonic()
        yield
        self.timings[what] = time.monotonic() - t0
        self.progress(f"✓ {what} ({self.timings[what]:.1f} s)")

    def up(self) -> Lab:
        from netctl.iaas.ovn import OvnIaaS
        from netctl.lab.hosts import MgmtNetwork, pick_free_cidr
        from netctl.lab.k8s import ControlPlane
        from netctl.lab.ovs import OvnStack, OvsStack

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state.started = time.time()
        self.state.netns.append(self.hv_netns)
        self.state.save()
        with self._step("OVS (netdev datapath) and OVN in the hypervisor netns"):
            self.ovs = OvsStack(self.run_dir / "ovs", netns=self.hv_netns).start()
            self.ovs.add_bridge(BRIDGE)
            self.ovn = OvnStack(self.run_dir / "ovn", self.ovs, bridge=BRIDGE, system_id=self.chassis).start()
            self.iaas = OvnIaaS(self.ovn.nb_connection, chassis_of=lambda node: self.chassis)
        with self._step("Kubernetes control plane (etcd, apiserver, controller-manager, scheduler)"):
            self.state.mgmt_cidr = pick_free_cidr()
            self.state.save()
            self.mgmt = MgmtNetwork(self.prefix, self.state.mgmt_cidr).create()
            self.cp = ControlPlane(
                self.run_dir / "k8s", self.mgmt.address, self.prefix, self.topology.service_cidr,
                nodes=[n.name for n in self.topology.nodes],
            ).start()
            self.cp.apply(REPO / "deploy" / "crds" / "tenant.yaml")
            self._wait_crd()
        with self._step("tenants and their namespaces"):
            self._apply_tenants()
        with self._step("netctl controller"):
            self.start_controller()
            for t in self.topology.tenants:
                self.wait_network(t.name)
        if self.topology.public_cidr:
            with self._step("provider network and the internet netns"):
                self.attach_internet()
        if self.kubelets:
            with self._step(f"{len(self.topology.nodes)} tenant nodes (netns VM, kubelet, containerd)"):
                self._start_nodes()
        else:
            with self._step(f"{len(self.topology.nodes)} tenant nodes (Node objects only)"):
                self._register_api_only_nodes()
        self.state.ready = True
        self.state.save()
        return self

    def _apply(self, path: Path, attempts: int = 10) -> None:
        """Server-side apply, retried: right after a CRD is added the API server may drop connections."""
        for attempt in range(attempts):
            try:
                self.cp.apply(path)
                return
            except Exception as exc:  # connection resets, discovery not yet showing the new kind
                if attempt == attempts - 1:
                    raise
                log.info("apply %s: %s; retrying", path.name, exc)
                time.sleep(0.5 * (attempt + 1))

    def _wait_crd(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.cp.kubectl("get", "crd", "tenants.netctl.io", "-o",
                                  "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False)
            if out.strip() == "True":
                return
            time.sleep(0.2)
        raise TimeoutError("the Tenant CRD was not established in time")

    def _apply_tenants(self) -> None:
        docs = []
        for t in self.topology.tenants:
            spec: dict[str, Any] = {"cidr": t.cidr, "mode": t.mode}
            if t.gateway:
                spec["gateway"] = t.gateway
            docs.append({"apiVersion": "netctl.io/v1alpha1", "kind": "Tenant", "metadata": {"name": t.name},
                         "spec": spec})
            docs.append({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": t.namespace, "labels": {TENANT_LABEL: t.name}}})
        path = self.run_dir / "tenants.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        self._apply(path)
        for t in self.topology.tenants:
            self.cp.wait_service_account(t.namespace)

    # -- the controller --------------------------------------------------------------------------

    def controller_files(self, replica: int = 0) -> tuple[Path, Path]:
        """(log, pidfile) of one controller replica; replica 0 keeps the single-replica names."""
        stem = "controller" if replica == 0 else f"controller-{replica}"
        return self.run_dir / f"{stem}.log", self.run_dir / f"{stem}.pid"

    def controller_identity(self, replica: int = 0) -> str | None:
        """The leader-election identity the replica runs with (None: never started)."""
        return self._identities.get(replica)

    def controller_url(self, replica: int = 0) -> str | None:
        """Base URL of the replica's /metrics and /healthz (None: never started)."""
        return self._metrics_urls.get(replica)

    def replica_of(self, identity: str | None) -> int | None:
        """Which replica holds ``identity`` (e.g. a Lease's holderIdentity), None if none of ours."""
        return next((r for r, ident in self._identities.items() if ident == identity), None)

    def start_controller(self, replica: int = 0, extra_args: tuple[str, ...] = ()) -> None:
        """Start one `netctl controller` process; several replicas campaign for the same Lease.

        Each start gets a fresh identity (``<prefix>-c<replica>-<random>``), so a restarted replica
        is a new candidate that waits for its predecessor's lease to expire, as a new pod would.
        """
        from netctl.lab.procs import Daemon, free_port

        identity = f"{self.prefix}-c{replica}-{secrets.token_hex(3)}"
        metrics_port = free_port()
        argv = [
            _venv_bin("netctl"), "controller",
            f"--kubeconfig={self.cp.kubeconfig('netctl-controller')}",
            f"--ovn-nb={self.ovn.nb_connection}",
            f"--chassis={self.chassis}",
            # the lab's one hypervisor: hot-plugs pod ports into node VMs of nested-nic tenants
            f"--hypervisor-ovsdb={self.ovs.db_connection}",
            f"--hypervisor-netns=/run/netns/{self.hv_netns}",
            f"--hypervisor-bridge={BRIDGE}",
            f"--metrics-port={metrics_port}",
            "--lease-namespace=kube-system",
            f"--identity={identity}",
            *([f"--public-cidr={self.topology.public_cidr}"] if self.topology.public_cidr else []),
            *self.controller_args,
            *extra_args,
        ]
        log_path, pid_path = self.controller_files(replica)
        daemon = Daemon(f"netctl-controller-{replica}" if replica else "netctl-controller", argv, log_path, pid_path)
        daemon.start()
        self.controllers[replica] = daemon
        self._identities[replica] = identity
        self._metrics_urls[replica] = f"http://127.0.0.1:{metrics_port}"
        if replica == 0:
            self.controller = daemon

    def stop_controller(self, kill: bool = False, replica: int = 0) -> None:
        """Stop one replica: SIGTERM (it releases its lease) or, with ``kill``, SIGKILL (it does not)."""
        daemon = self.controllers.get(replica)
        if daemon is None:
            return
        pid = daemon.pid
        if kill and pid:
            os.kill(pid, 9)
            deadline = time.monotonic() + 10
            while daemon.pid and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            daemon.stop()

    def stop_controllers(self, kill: bool = False) -> None:
        for replica in sorted(self.controllers):
            self.stop_controller(kill=kill, replica=replica)

    def _controllers_dead(self) -> bool:
        return bool(self.controllers) and all(d.pid is None for d in self.controllers.values())

    def wait_network(self, tenant: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            net = self.iaas.get_network(tenant)
            if net is not None:
                return net
            if self._controllers_dead():
                raise RuntimeError(f"the controller exited; see {self.run_dir / 'controller.log'}")
            time.sleep(0.1)
        raise TimeoutError(
            f"the controller did not create tenant {tenant}'s network; see {self.run_dir}/controller.log"
        )

    # -- nodes -----------------------------------------------------------------------------------

    def _cni_bin_dir(self) -> Path:
        d = self.run_dir / "cni-bin"
        d.mkdir(parents=True, exist_ok=True)
        for plugin in Path("/usr/lib/cni").glob("*"):
            link = d / plugin.name
            if not link.exists():
                link.symlink_to(plugin)
        # What a node's install step does: the fast `-IS` launcher, not the console script.
        from cni.install import install

        install(d)
        return d

    def cni_agent_socket(self, node: str) -> Path:
        return self.run_dir / "nodes" / node / "cni-agent.sock"

    def start_cni_agent(self, node: NodeSpec) -> Any:
        """The node's CNI agent (cni/agent.py), in the node netns; returns once it accepts connections."""
        import socket as _socket

        from netctl.lab.procs import Daemon

        node_dir = self.run_dir / "nodes" / node.name
        node_dir.mkdir(parents=True, exist_ok=True)
        config = node_dir / "cni-agent.json"
        ovsdb, ovs_netns = self._node_ovs(node)
        config.write_text(json.dumps({
            "socket": str(self.cni_agent_socket(node.name)), "nodeName": node.name,
            "kubeconfig": str(self.cp.kubeconfig("netctl-cni")), "ovsdb": ovsdb, "ovsNetns": ovs_netns}, indent=2))
        daemon = Daemon(f"netctl-cni-agent[{node.name}]", [sys.executable, "-m", "cni.agent", "--config", str(config)],
                        node_dir / "cni-agent.log", node_dir / "cni-agent.pid", netns=self.node_netns(node.name))
        daemon.start()
        self.cni_agents[node.name] = daemon

        def accepts() -> bool:
            with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as s:
                s.connect(str(self.cni_agent_socket(node.name)))
            return True

        daemon.wait_ready(accepts, 30, "accepting connections")
        return daemon

    def _mode(self, node: NodeSpec) -> str:
        return self.topology.tenant(node.tenant).mode

    def _node_ovs(self, node: NodeSpec) -> tuple[str, str]:
        """(OVSDB, its netns) the node's CNI plugs into: the hypervisor's in mode ovs (the lab's
        shortcut), the VM's own (holding the trunk) in nested-vlan; nested-nic needs none."""
        if self._mode(node) == "nested-vlan":
            return self.vm_ovs[node.name].db_connection, f"/run/netns/{self.node_netns(node.name)}"
        if self._mode(node) == "nested-nic":
            return "", ""
        return self.ovs.db_connection, f"/run/netns/{self.hv_netns}"

    def cni_conflist(self, node: NodeSpec, node_address: str | None = None) -> dict[str, Any]:
        """The node's conflist; with ``node_address`` pods route the Service CIDR via their node."""
        mode = self._mode(node)
        plugin: dict[str, Any] = {
            "type": "netctl-cni",
            "kubeconfig": str(self.cp.kubeconfig("netctl-cni")),
            "nodeName": node.name,
            "logFile": str(self.run_dir / "nodes" / node.name / "cni.log"),
            "agentSocket": str(self.cni_agent_socket(node.name)),
        }
        ovsdb, ovs_netns = self._node_ovs(node)
        if mode == "ovs":
            plugin.update(ovsdb=ovsdb, bridge=BRIDGE, ovsNetns=ovs_netns)
        elif mode == "nested-vlan":  # no 802.1Q in this kernel: the VM's OVS tags (DESIGN §5)
            plugin.update(mode=mode, trunkInterface=VM_NIC, vlanBackend="ovs", bridge=VM_TRUNK_BRIDGE,
                          ovsdb=ovsdb, ovsNetns=ovs_netns)
        else:
            plugin.update(mode=mode)
        conf: dict[str, Any] = {
            "cniVersion": "1.0.0",
            "name": "netctl",
            "plugins": [plugin, {
                # hostPort: kubelet -> containerd pass `portMappings` to plugins declaring it; the
                # reference portmap DNATs node address:hostPort to the pod address from our result.
                "type": "portmap", "capabilities": {"portMappings": True}, "snat": True,
            }],
        }
        if node_address:
            conf["plugins"][0].update(serviceCidr=self.topology.service_cidr, nodeAddress=node_address)
        return conf

    def _register_api_only_nodes(self) -> None:
        """Node objects with the tenant label and nothing behind them (see ``kubelets``).

        Nothing keeps them Ready, so the node lifecycle controller taints them after its grace
        period; pods put on them should tolerate that (e.g. `tolerations: [{operator: Exists}]`).
        """
        from netctl.kube.client import api_path, request_json

        api = self.cp.api_client()
        for node in self.topology.nodes:
            body = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": node.name, "labels": {TENANT_LABEL: node.tenant}}}
            request_json(api, "POST", api_path("", "v1", "nodes"), body=body)

    def _start_nodes(self) -> None:
        bin_dir = self._cni_bin_dir()
        with ThreadPoolExecutor(max(1, len(self.topology.nodes))) as pool:
            list(pool.map(lambda n: self._start_node(n, bin_dir), self.topology.nodes))

    def _start_node(self, node: NodeSpec, bin_dir: Path) -> None:
        from netctl.lab.runtime import NodeRuntime

        netns = self.node_netns(node.name)
        self.state.netns.append(netns)
        self.state.save()
        mgmt_ip = self.mgmt.add_host(netns)
        nic = self.attach_node_nic(node, netns)
        # A Kubernetes node routes: Service traffic (kproxy) and hostPorts (portmap) are forwarded.
        from netctl.lab.service_path import node_sysctls

        node_sysctls(netns)
        node_dir = self.run_dir / "nodes" / node.name
        conf_dir = node_dir / "cni-conf"
        conf_dir.mkdir(parents=True, exist_ok=True)
        conflist = self.cni_conflist(node, nic.ip if self.services else None)
        (conf_dir / "10-netctl.conflist").write_text(json.dumps(conflist, indent=2))
        rt = NodeRuntime(
            node.name, netns, mgmt_ip, node_dir / "runtime", self.cp, bin_dir, conf_dir,
            labels={TENANT_LABEL: node.tenant}, prefix=self.prefix,
        )
        self.runtimes[node.name] = rt
        self.state.nodes[node.name] = {"netns": netns, "mgmt_ip": mgmt_ip, "tenant_ip": nic.ip,
                                       "tenant": node.tenant}
        self.state.save()
        self.start_cni_agent(node)
        rt.start()
        if self.services:
            self.start_kproxy(node)

    def start_kproxy(self, node: NodeSpec) -> None:
        """kproxy in the node VM, with the tenant-scoped credentials the controller maintains."""
        from netctl.lab.service_path import kproxy_daemon, kproxy_kubeconfig

        netns = self.node_netns(node.name)
        node_dir = self.run_dir / "nodes" / node.name
        kubeconfig = kproxy_kubeconfig(self.cp, node.tenant, node_dir / "kproxy.kubeconfig")
        daemon = kproxy_daemon(_venv_bin("kproxy"), node.name, netns, node_dir, kubeconfig,
                               self.topology.service_cidr)
        daemon.start()
        self.kproxies[node.name] = daemon

    def attach_node_nic(self, node: NodeSpec, netns: str) -> Any:
        """What the IaaS does for a VM: a port on the tenant network, plugged as the VM's `eth1`."""
        from cni.ovs_binding import plug_port
        from netctl.iaas.base import PortOwner

        net = self.wait_network(node.tenant)
        owner = PortOwner(kind="node", name=node.name, namespace=None, uid=None, tenant=node.tenant)
        port = self.iaas.create_port(net, owner, f"node-{node.name}", node=node.name,
                                     extra_allowed_cidrs=(self.topology.service_cidr,))
        if self._mode(node) != "ovs":
            self._plug_vm_nic(node, netns, port, net.mtu)
            return port
        plug_port(
            ovsdb=self.ovs.db_connection, bridge=BRIDGE, ovs_netns=f"/run/netns/{self.hv_netns}",
            target_netns=f"/run/netns/{netns}", ifname="eth1",
            host_ifname=f"{self.prefix}n{self.topology.nodes.index(node)}",
            port_id=port.id, mac=port.mac, cidr=f"{port.ip}/{port.prefixlen}", gateway=None, mtu=net.mtu,
            owner_tag=f"node:{node.name}",
        )
        return port

    def _plug_vm_nic(self, node: NodeSpec, netns: str, port: Any, mtu: int) -> None:
        """Nested tenants: the VM's NIC plugged by the hypervisor (as pods' NICs will be), which also
        records the VM it went into; in nested-vlan it is a trunk on the guest's own OVS bridge and
        the node's address sits on that bridge's internal port."""
        from pyroute2 import NetNS

        from netctl.iaas.ovn_nested import Hypervisor
        from netctl.lab.ovs import OvsStack

        Hypervisor(self.ovs.api, BRIDGE, f"/run/netns/{self.hv_netns}").attach(
            port.id, port.mac, f"/run/netns/{netns}", mtu=mtu, vm_ifname=VM_NIC)
        addr_on = VM_NIC
        if self._mode(node) == "nested-vlan":
            ovs = OvsStack(self.run_dir / "nodes" / node.name / "ovs", netns=netns, timeout=60)
            self.vm_ovs[node.name] = ovs
            ovs.start()
            ovs.add_bridge(VM_TRUNK_BRIDGE, fail_mode="standalone")
            ovs.add_port(VM_TRUNK_BRIDGE, VM_NIC)
            # the bridge's own port speaks for the VM: it must carry the NIC's MAC (port security)
            ovs.api.db_set("Bridge", VM_TRUNK_BRIDGE, ("other_config", {"hwaddr": port.mac})).execute(
                check_error=True)
            addr_on = VM_TRUNK_BRIDGE
        with NetNS(netns) as ns:
            for name in dict.fromkeys((VM_NIC, addr_on)):
                (idx,) = ns.link_lookup(ifname=name)
                ns.link("set", index=idx, state="up", mtu=mtu)
            (idx,) = ns.link_lookup(ifname=addr_on)
            ns.addr("add", index=idx, address=port.ip, prefixlen=port.prefixlen)

    def attach_internet(self) -> str:
        """The provider network's upstream router + a host beyond it, as netns `internet_netns`."""
        from netctl.annotations import PUBLIC_NETWORK
        from netctl.lab.internet import attach_internet

        net = self.wait_network(PUBLIC_NETWORK)
        self.state.netns.append(self.internet_netns)
        self.state.save()
        return attach_internet(self.iaas, net, self.internet_netns, ovsdb=self.ovs.db_connection, bridge=BRIDGE,
                               ovs_netns=f"/run/netns/{self.hv_netns}", host_ifname=f"{self.prefix}inet")

    # -- pods ------------------------------------------------------------------------------------

    def pod_manifest(self, pod: PodSpec) -> dict[str, Any]:
        t = self.topology.tenant(pod.tenant)
        selector = {TENANT_LABEL: pod.tenant}
        if pod.node:
            selector["kubernetes.io/hostname"] = pod.node
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": t.namespace,
                         "labels": {"app": "netctl-demo", "netctl.io/lab-pod": pod.name},
                         **({"annotations": {PUBLIC_IP_ANNOTATION: "true"}} if pod.public else {})},
            "spec": {
                "nodeSelector": selector,
                "terminationGracePeriodSeconds": 1,
                "automountServiceAccountToken": False,
                "containers": [{
                    "name": "web", "image": LAB_IMAGE, "imagePullPolicy": "Never",
                    "command": ["/bin/busybox", "httpd", "-f", "-p", str(POD_PORT), "-h", "/"],
                }],
            },
        }

    def create_pods(self, pods: tuple[PodSpec, ...] | None = None) -> None:
        pods = self.topology.pods if pods is None else pods
        path = self.run_dir / "pods.yaml"
        path.write_text(yaml.safe_dump_all([self.pod_manifest(p) for p in pods]))
        self.cp.kubectl("apply", "-f", str(path))

    def pods(self) -> list[dict[str, Any]]:
        out = self.cp.kubectl("get", "pods", "-A", "-l", "app=netctl-demo", "-o", "json")
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return items

    def wait_pods_running(self, names: set[str] | None = None, timeout: float = 120.0) -> list[dict[str, Any]]:
        want = names if names is not None else {p.name for p in self.topology.pods}
        deadline = time.monotonic() + timeout
        while True:
            pods = [p for p in self.pods() if p["metadata"]["name"] in want]
            running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
            if len(running) == len(want):
                return running
            if time.monotonic() > deadline:
                states = {p["metadata"]["name"]: (p.get("status") or {}).get("phase") for p in pods}
                raise TimeoutError(f"pods not Running after {timeout:.0f} s: {states}")
            time.sleep(0.3)

    def pod_netns(self, namespace: str, name: str, node: str) -> str:
        path: str = self.runtimes[node].pod_netns(namespace, name)
        return path

    def pod_table(self, probe: bool = True) -> list[dict[str, Any]]:
        """Pod, tenant, node, IP, and which other pods it reaches over TCP."""
        from netctl.lab.probe import probe_matrix

        rows = []
        for p in self.pods():
            ann = (p["metadata"].get("annotations") or {}).get(PORT_ANNOTATION)
            try:
                port = PortAnnotation.from_json(ann) if ann else None
            except AnnotationError:
                port = None
            rows.append({
                "pod": p["metadata"]["name"], "namespace": p["metadata"]["namespace"],
                "tenant": port.tenant if port else "?", "node": p["spec"].get("nodeName") or "-",
                "ip": (p.get("status") or {}).get("podIP") or "-", "phase": (p.get("status") or {}).get("phase"),
            })
        rows.sort(key=lambda r: (r["tenant"], r["pod"]))
        if probe:
            running = [r for r in rows if r["phase"] == "Running" and r["ip"] != "-"]
            sources = {r["pod"]: self.pod_netns(r["namespace"], r["pod"], r["node"]) for r in running}
            targets = {r["pod"]: r["ip"] for r in running}
            matrix = probe_matrix(sources, targets, POD_PORT)
            for r in rows:
                r["reaches"] = sorted(d for (s, d), ok in matrix.items() if s == r["pod"] and ok)
        return rows

    # -- teardown --------------------------------------------------------------------------------

    def down(self) -> None:
        """Remove everything this lab created; safe to call twice or on a half-built lab."""
        from netctl.lab import teardown

        # Extra replicas first (teardown knows replica 0 as `self.controller`; pidfiles catch the rest).
        for replica in sorted(r for r in self.controllers if r != 0):
            with contextlib.suppress(Exception):
                self.controllers[replica].stop()
        # What is on disk is at least as complete as our own record (we save as we go), and it is
        # all there is when another process brought the lab up.
        teardown.remove_lab(self.run_dir, LabState.load(self.run_dir) or self.state, live=self)

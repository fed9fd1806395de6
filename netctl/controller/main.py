"""`netctl controller`: process set-up around `Controller` (config, logging, metrics, leader election)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
from collections.abc import Sequence

from netctl import config
from netctl.controller.app import Controller, ControllerOptions
from netctl.controller.pools import PoolConfig
from netctl.controller.public import PublicConfig
from netctl.kube.client import new_api_client
from netctl.kube.events import ApiEventSink, EventRecorder
from netctl.kube.leader import ApiLeaseStore, LeaderElector
from netctl.kube.resources import KubeWriter
from netctl.serving import Serving

log = logging.getLogger("netctl.controller")


@dataclasses.dataclass
class ControllerConfig(config.CommonConfig):
    """netctl controller: gives every pod in a tenant namespace an IaaS port on its tenant's network
    and writes it to the pod annotation netctl.io/port for the CNI; frees ports of deleted pods;
    keeps each tenant's kproxy credentials in step with its namespaces; a periodic resync removes
    orphans and repairs what is missing."""

    backend: str = dataclasses.field(default="ovn", metadata={"help": "IaaS backend: ovn (openstack later)"})
    ovn_nb: str = dataclasses.field(
        default="unix:/var/run/ovn/ovnnb_db.sock",
        metadata={"help": "OVN Northbound DB connection (unix:PATH, tcp:HOST:PORT or ssl:HOST:PORT)"},
    )
    chassis: str | None = dataclasses.field(
        default=None,
        metadata={"help": "bind every port to this OVN chassis instead of the pod's node name "
                  "(a lab or a deployment where nodes share one hypervisor chassis)"},
    )
    hypervisor_ovsdb: str = dataclasses.field(
        default="",
        metadata={"help": "Open_vSwitch DB of the hypervisor that hot-plugs ports into tenant VMs for Tenants with "
                  "mode nested-nic (the lab's one chassis: unix:<lab>/ovs/db.sock); empty = nested-nic "
                  "unsupported (PortFailed Events). Subports (nested-vlan) need only the OVN NB"},
    )
    hypervisor_netns: str = dataclasses.field(
        default="/proc/1/ns/net", metadata={"help": "network namespace (path) in which that OVS runs"}
    )
    hypervisor_bridge: str = dataclasses.field(
        default="br-int", metadata={"help": "the hypervisor's integration bridge the NICs' host ends join"}
    )
    default_mtu: int = dataclasses.field(default=1400, metadata={"help": "pod MTU when the Tenant sets none"})
    resync_period_s: float = dataclasses.field(
        default=60.0, metadata={"help": "seconds between full pods/ports/annotations resyncs"}
    )
    manage_kproxy_rbac: bool = dataclasses.field(
        default=True,
        metadata={"help": "keep each Tenant's kproxy credentials in step: ServiceAccount "
                  "kube-system/netctl-kproxy-<tenant>, its ClusterRoleBinding, and a RoleBinding in every "
                  "namespace labelled with the tenant (needs the RBAC in deploy/rbac/controller.yaml)"},
    )
    # Off by default on the embedded OVN backend: there a pool claim and an on-demand create are
    # each one NB transaction of about the same cost, while a pool holds addresses of the subnet.
    # Pools pay where creating a port is slow (Neutron, a NIC hot-plug): turn them on there.
    pool_min: int = dataclasses.field(
        default=0,
        metadata={"help": "warm ports kept per tenant, refilled in batches (0 = pools off: ports are created "
                  "on demand and freed ports deleted)"},
    )
    pool_max: int = dataclasses.field(
        default=0,
        metadata={"help": "most pooled ports per tenant; a freed port returns to the pool below it and is "
                  "deleted above it (0 = twice pool_min)"},
    )
    pool_batch: int = dataclasses.field(
        default=10, metadata={"help": "ports created per IaaS transaction when refilling a pool"}
    )
    pool_refill_interval_s: float = dataclasses.field(
        default=1.0, metadata={"help": "seconds between pool checks (refill below min, trim above max)"}
    )
    public_cidr: str = dataclasses.field(
        default="",
        metadata={"help": "CIDR of the shared provider network (OVN switch netctl-public) from which pods annotated "
                  'netctl.io/public-ip: "true" get a second NIC with a public address for their life '
                  "(empty = the public NIC is off)"},
    )
    public_gateway: str = dataclasses.field(
        default="", metadata={"help": "the provider network's gateway (empty = the first host of public_cidr)"}
    )
    identity: str = dataclasses.field(
        default="", metadata={"help": "leader-election identity (default: hostname_pid)"}
    )
    # 10/7/2 rather than client-go's 15/10/2: a standby takes over 8-13 s after the leader dies,
    # inside the 15 s failover target (DESIGN §2); 15/10/2 gives 13-20 s.
    lease_duration_s: float = dataclasses.field(
        default=10.0,
        metadata={"help": "seconds a standby waits after the leader's last renewal before taking over"},
    )
    renew_deadline_s: float = dataclasses.field(
        default=7.0,
        metadata={"help": "seconds the leader keeps trying to renew before it gives up leading "
                  "(must be below lease_duration_s)"},
    )
    retry_period_s: float = dataclasses.field(
        default=2.0, metadata={"help": "seconds between leader-election attempts (renewals and campaigns)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.pool = PoolConfig(self.pool_min, self.pool_max, self.pool_batch, self.pool_refill_interval_s)
        except ValueError as exc:
            raise config.ConfigError(str(exc)) from None
        self.public = PublicConfig(self.public_cidr, self.public_gateway or None)
        if self.public_gateway and not self.public_cidr:
            raise config.ConfigError("public_gateway needs public_cidr")
        if self.public_cidr:
            from netctl.annotations import PUBLIC_NETWORK
            from netctl.controller.ports import default_gateway
            from netctl.iaas.base import NetworkSpec

            try:
                NetworkSpec(PUBLIC_NETWORK, self.public_cidr, self.public_gateway or default_gateway(self.public_cidr))
            except ValueError as exc:
                raise config.ConfigError(f"public_cidr/public_gateway: {exc}") from None
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise config.ConfigError(
                "leader election: need 0 < retry_period_s < renew_deadline_s < lease_duration_s, got "
                f"{self.retry_period_s} / {self.renew_deadline_s} / {self.lease_duration_s}"
            )


def _iaas(cfg: ControllerConfig):  # type: ignore[no-untyped-def]
    if cfg.backend != "ovn":
        raise config.ConfigError(f"backend: {cfg.backend!r} is not available (only 'ovn' in this release)")
    from netctl.iaas.ovn import OvnIaaS

    chassis = cfg.chassis
    hypervisor = None
    if cfg.hypervisor_ovsdb:
        from netctl.iaas.ovn_nested import Hypervisor

        hypervisor = Hypervisor.connect(cfg.hypervisor_ovsdb, cfg.hypervisor_bridge, cfg.hypervisor_netns)
    # The NB replica fills while the informers list (both wait mostly on their servers); the
    # leader's first reconcile is the first call that needs it.
    return OvnIaaS(cfg.ovn_nb, chassis_of=(lambda node: chassis) if chassis else None, hypervisor=hypervisor,
                   sync_in_background=True)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config.load(ControllerConfig, argv, prog="netctl controller")
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api = new_api_client(cfg.kubeconfig, pool_maxsize=cfg.workers + 8)
    iaas = _iaas(cfg)
    recorder = EventRecorder(ApiEventSink(api), component="netctl-controller")
    writer = KubeWriter(api)
    ctl = Controller(api, iaas, writer, recorder,
                     ControllerOptions(cfg.workers, cfg.resync_period_s, cfg.default_mtu, cfg.pool, cfg.public),
                     rbac_writer=writer if cfg.manage_kproxy_rbac else None)
    log.info("port pools: %s", f"min {cfg.pool.min}, max {cfg.pool.ceiling}, batch {cfg.pool.batch}"
             if cfg.pool.enabled else "off (--pool-min 0)")
    log.info("public NIC: %s", f"provider network {cfg.public_cidr}" if cfg.public.enabled
             else "off (no --public-cidr)")
    log.info("kproxy credentials: %s", "managed" if cfg.manage_kproxy_rbac else "not managed (--no-manage-kproxy-rbac)")
    serving = Serving(cfg.metrics_address, cfg.metrics_port)
    serving.add_health_check("informers", ctl.healthy)
    serving.start()
    log.info("metrics and health on %s", serving.url)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    ctl.start_informers()
    identity = cfg.identity or f"{socket.gethostname()}_{os.getpid()}"

    def lead() -> None:
        log.info("%s is the leader; serving", identity)
        ctl.run()

    def lost() -> None:
        # Never keep writing after losing the lease: another replica is already in charge.
        log.error("%s lost leadership; exiting", identity)
        done.set()

    elector = None
    if cfg.leader_elect:
        elector = LeaderElector(
            ApiLeaseStore(api), namespace=cfg.lease_namespace, name=cfg.lease_name, identity=identity,
            lease_duration_s=cfg.lease_duration_s, renew_deadline_s=cfg.renew_deadline_s,
            retry_period_s=cfg.retry_period_s,
            on_started_leading=lead, on_stopped_leading=lost,
        )
        elector.start()
    else:
        lead()
    done.wait()
    log.info("shutting down")
    if elector is not None:
        elector.stop(release=True)
    ctl.stop()
    recorder.stop()
    serving.stop()
    return 0

"""kproxy's settings (``netctl.config``: defaults < file < ``NETCTL_*`` environment < flags)."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os

from netctl.config import CommonConfig, ConfigError

TENANT_LABEL = "netctl.io/tenant"
NETNS_DIR = "/run/netns"


@dataclasses.dataclass
class KproxyConfig(CommonConfig):
    """Per-tenant kube-proxy on nftables.

    Reads its Node's netctl.io/tenant label, watches only the Namespaces labelled with that tenant
    (server-side label selector) and, in each of them, only Services and EndpointSlices
    (namespace-scoped watches, started and stopped as namespaces join and leave the tenant); it
    never lists cluster-wide. Rules go into one nftables table (family ip) that kproxy alone owns,
    are written only after every watch has listed once, are updated incrementally (one transaction
    per sync, at most one sync per min-sync-period) and restored when verification finds the table
    changed by someone else.
    """

    node_name: str = dataclasses.field(
        default="", metadata={"help": "this node's Node object name (required; in a DaemonSet: spec.nodeName)"}
    )
    tenant: str | None = dataclasses.field(
        default=None,
        metadata={"help": f"the tenant whose Services to proxy (default: the Node's {TENANT_LABEL} label)"},
    )
    table: str = dataclasses.field(default="kproxy", metadata={"help": "the nftables table (family ip) kproxy owns"})
    buckets: int = dataclasses.field(
        default=256, metadata={"help": "endpoint slots of a frontend with more than 32 endpoints (up to 32, each "
                                       "endpoint gets exactly one slot; above this many only the first get traffic)"}
    )
    min_sync_period_s: float = dataclasses.field(
        default=1.0, metadata={"help": "minimum seconds between two syncs; changes inside it are coalesced"}
    )
    sync_period_s: float = dataclasses.field(
        default=30.0, metadata={"help": "a sync runs at least this often even without changes (0 = never)"}
    )
    verify_period_s: float = dataclasses.field(
        default=10.0,
        metadata={"help": "seconds between checks that our table is intact; a flushed/edited table is rebuilt"},
    )
    verify_elements_period_s: float = dataclasses.field(
        default=60.0,
        metadata={
            "help": "seconds between the element-level checks (every map element as we wrote it; O(elements), "
            "done within a verification) — a deleted or edited element is restored (0 = never)"
        },
    )
    healthz_bind_address: str = dataclasses.field(
        default="127.0.0.1", metadata={"help": "address of the kube-proxy style /healthz endpoint"}
    )
    healthz_port: int = dataclasses.field(default=10256, metadata={"help": "port of /healthz (0 = pick a free one)"})
    healthz_stale_s: float = dataclasses.field(
        default=60.0,
        metadata={"help": "/healthz fails when changes have waited longer than this for a successful sync"},
    )
    metrics_port: int = dataclasses.field(
        default=10249, metadata={"help": "port for /metrics (and /healthz) on metrics_address (0 = pick a free one)"}
    )
    netns: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": f"program the rules inside this network namespace: a name under {NETNS_DIR} or a path "
            "(default: kproxy's own namespace)"
        },
    )
    service_cidr: str | None = dataclasses.field(
        default=None,
        metadata={"help": "the cluster's Service CIDR; Services with cluster IPs outside it are logged (optional)"},
    )
    proxy_name: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "also proxy Services labelled service.kubernetes.io/service-proxy-name=<this>; Services "
            "labelled with another name are always skipped (default: only unlabelled Services)"
        },
    )
    node_check_period_s: float = dataclasses.field(
        default=10.0,
        metadata={
            "help": f"seconds between reads of the Node's {TENANT_LABEL} label; when it changes kproxy removes "
            "its table and exits (status 3) for the DaemonSet to restart it for the new tenant (0 = never)"
        },
    )
    leader_elect: bool = dataclasses.field(
        default=False, metadata={"help": "not supported: kproxy runs once per node, never elected"}
    )
    resync_period_s: float = dataclasses.field(
        default=0.0, metadata={"help": "seconds between re-deliveries of cached objects to the tracker (0 = never)"}
    )
    workers: int = dataclasses.field(default=1, metadata={"help": "unused by kproxy (one sync loop)"})
    lease_name: str = dataclasses.field(default="netctl", metadata={"help": "unused by kproxy"})
    lease_namespace: str = dataclasses.field(default="kube-system", metadata={"help": "unused by kproxy"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.node_name:
            raise ConfigError("node_name: required (--node-name or NETCTL_NODE_NAME)")
        if self.leader_elect:
            raise ConfigError("leader_elect: kproxy runs once per node and has no leader election")
        if self.tenant is not None and not self.tenant:
            raise ConfigError("tenant: must not be empty (leave it unset to read the Node's label)")
        if not self.table.replace("_", "").replace("-", "").isalnum() or len(self.table) > 64:
            raise ConfigError(f"table: {self.table!r} must be alphanumeric (plus _ and -), at most 64 characters")
        if not 1 <= self.buckets <= 4096:
            raise ConfigError(f"buckets: must be within 1..4096, got {self.buckets}")
        if not 0 < self.min_sync_period_s < math.inf:
            raise ConfigError(f"min_sync_period_s: must be positive, got {self.min_sync_period_s}")
        if self.proxy_name is not None and not self.proxy_name:
            raise ConfigError("proxy_name: must not be empty (leave it unset for unlabelled Services only)")
        for name in ("sync_period_s", "verify_period_s", "node_check_period_s", "verify_elements_period_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        if self.healthz_stale_s <= 0:
            raise ConfigError(f"healthz_stale_s: must be positive, got {self.healthz_stale_s}")
        if not 0 <= self.healthz_port <= 65535:
            raise ConfigError(f"healthz_port: {self.healthz_port} is not a TCP port")
        if self.service_cidr is not None:
            try:
                net = ipaddress.ip_network(self.service_cidr)
            except ValueError as e:
                raise ConfigError(f"service_cidr: {e}") from None
            if net.version != 4:
                raise ConfigError(f"service_cidr: only IPv4 is proxied, got {self.service_cidr}")

    @property
    def netns_name(self) -> str | None:
        """``netns`` as ``kproxy.netns`` wants it: a name relative to /run/netns (paths are made relative)."""
        if self.netns is None:
            return None
        if "/" not in self.netns:
            return self.netns
        return os.path.relpath(os.path.abspath(self.netns), NETNS_DIR)

    @property
    def sync_max_period(self) -> float:
        return self.sync_period_s or math.inf

    @property
    def verify_period(self) -> float:
        return self.verify_period_s or math.inf

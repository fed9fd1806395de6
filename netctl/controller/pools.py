"""Warm port pools per tenant: sizing decisions, hit/miss accounting and Tenant conditions (pure).

The pool itself lives in the IaaS (ports whose `netctl:state` is `pooled`), never in this
process: a restarted or newly elected controller sees the same pool the last one left, and a
crash can at worst leave one batch too many, which the next reconcile trims to `max`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PoolConfig:
    """`min` 0 = pools off: every pod port is created on demand and freed ports are deleted."""

    min: int = 0
    max: int = 0  # 0 = twice `min`
    batch: int = 10
    refill_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.min < 0 or self.max < 0:
            raise ValueError(f"pool min/max must not be negative, got {self.min}/{self.max}")
        if self.max and self.max < self.min:
            raise ValueError(f"pool max ({self.max}) must be at least pool min ({self.min})")
        if self.batch < 1:
            raise ValueError(f"pool batch must be at least 1, got {self.batch}")
        if self.refill_interval_s <= 0:
            raise ValueError(f"pool refill interval must be positive, got {self.refill_interval_s}")

    @property
    def enabled(self) -> bool:
        return self.min > 0

    @property
    def ceiling(self) -> int:
        """The most pooled ports a tenant may hold (0 when pools are off: all are trimmed)."""
        if not self.enabled:
            return 0
        return self.max or 2 * self.min


def refill_batches(size: int, cfg: PoolConfig) -> list[int]:
    """Batch sizes (one IaaS transaction each) that bring a pool of `size` up to `min`."""
    deficit = cfg.min - size if cfg.enabled else 0
    out = []
    while deficit > 0:
        n = min(cfg.batch, deficit)
        out.append(n)
        deficit -= n
    return out


def split_freed(pool_size: int, freed: Sequence[str], cfg: PoolConfig) -> tuple[list[str], list[str]]:
    """Ports freed by gone pods: (returned to the pool while it is below max, deleted)."""
    room = max(0, cfg.ceiling - pool_size)
    return list(freed[:room]), list(freed[room:])


class PoolStats:
    """Claims served from the pool (hits) or by creating a port (misses), per tenant, since this
    process started (the IaaS holds the pool; these counts are only this leader's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: dict[str, int] = {}
        self._misses: dict[str, int] = {}

    def count(self, tenant: str, hit: bool) -> None:
        with self._lock:
            d = self._hits if hit else self._misses
            d[tenant] = d.get(tenant, 0) + 1

    def of(self, tenant: str) -> tuple[int, int]:
        with self._lock:
            return self._hits.get(tenant, 0), self._misses.get(tenant, 0)


# Degraded reasons, most severe first: one condition carries one reason.
IAAS_UNAVAILABLE = "IaaSUnavailable"
SUBNET_EXHAUSTED = "SubnetExhausted"
NETWORK_FAILED = "NetworkFailed"
POOL_BELOW_MIN = "PoolBelowMin"


def tenant_conditions(
    network_ready: bool, problems: dict[str, str], pool_size: int, cfg: PoolConfig,
    pool_problems: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Ready (the network exists and ports can be handed out) and Degraded (something needs an
    operator's eye). `problems` maps a reason above to its message (the latest failure seen
    giving a pod its port or making the network); `pool_problems` likewise for refills, which
    degrade the tenant but leave it Ready (a pool miss still creates the pod's port)."""
    found = {**(pool_problems or {}), **problems}
    if cfg.enabled and pool_size < cfg.min and POOL_BELOW_MIN not in found:
        found[POOL_BELOW_MIN] = f"pool holds {pool_size} ports, below min {cfg.min}"
    order = (IAAS_UNAVAILABLE, SUBNET_EXHAUSTED, NETWORK_FAILED, POOL_BELOW_MIN)
    reasons = [r for r in order if r in found] + sorted(r for r in found if r not in order)
    if network_ready and not problems:
        ready = {"type": "Ready", "status": "True", "reason": "NetworkReady", "message": "network is ready"}
    else:
        why = next((r for r in reasons if r in problems), NETWORK_FAILED)
        ready = {"type": "Ready", "status": "False", "reason": why,
                 "message": problems.get(why, "network is not ready")}
    if reasons:
        degraded = {"type": "Degraded", "status": "True", "reason": reasons[0],
                    "message": "; ".join(f"{r}: {found[r]}" for r in reasons)}
    else:
        degraded = {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "no problem seen"}
    return [ready, degraded]

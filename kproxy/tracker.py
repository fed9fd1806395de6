"""Change tracking for Services and EndpointSlices, knowing nothing about nftables.

Event handlers only call ``update_service``/``update_slice`` (cheap); the sync loop calls
``apply()`` once per sync and gets back the set of service ports whose rendered state may
differ from what was last applied. Per Service the tracker keeps ``{previous, current}``:
``previous`` is what the last ``apply()`` handed out, ``current`` what the objects say now. When
a burst of events brings a Service back to where it was (add+delete, a no-op resync, an
endpoint flapping twice) the entry is dropped, so the sync has nothing to do for it.

Pure: no I/O, no clock, no locks (the proxier serialises access).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kproxy.model import (
    ServiceKey,
    ServicePort,
    ServicePortName,
    ServicePortState,
    Slice,
    build_states,
    object_key,
    parse_service,
    parse_slice,
)

ServiceView = Mapping[ServicePortName, ServicePortState]


@dataclass
class _Change:
    previous: ServiceView
    current: ServiceView


class ChangeTracker:
    def __init__(self, proxy_name: str | None = None) -> None:
        self._proxy_name = proxy_name
        self._ports: dict[ServiceKey, tuple[ServicePort, ...]] = {}
        self._slices: dict[ServiceKey, dict[str, Slice]] = {}  # by service, then slice name
        self._slice_owner: dict[ServiceKey, ServiceKey] = {}  # slice namespace/name -> its service
        self._applied: dict[ServiceKey, ServiceView] = {}
        self._pending: dict[ServiceKey, _Change] = {}

    # -- event side -------------------------------------------------------------------------
    def update_service(self, obj: Mapping[str, Any], *, deleted: bool = False) -> bool:
        """Record a Service add/update/delete; True when this leaves a pending change."""
        key = object_key(obj)
        ports = () if deleted else parse_service(obj, self._proxy_name)
        if ports:
            self._ports[key] = ports
        else:
            self._ports.pop(key, None)
        return self._recompute(key)

    def update_slice(self, obj: Mapping[str, Any], *, deleted: bool = False) -> bool:
        """Record an EndpointSlice add/update/delete; True when this leaves a pending change."""
        key = object_key(obj)  # slice namespace/name
        parsed = parse_slice(obj)
        # A slice could (in theory) be relabelled to another Service: drop it from its old one first
        # (found through the owner index: a scan of every Service per event is quadratic at scale).
        touched: set[ServiceKey] = set()
        old_owner = self._slice_owner.pop(key, None)
        if old_owner is not None:
            touched.add(old_owner)
            by_name = self._slices[old_owner]
            del by_name[key.name]
            if not by_name:
                del self._slices[old_owner]
        if parsed is not None and not deleted:
            self._slices.setdefault(parsed.service_key, {})[key.name] = parsed
            self._slice_owner[key] = parsed.service_key
            touched.add(parsed.service_key)
        changed = False
        for svc in touched:
            changed = self._recompute(svc) or changed
        return changed

    def _recompute(self, key: ServiceKey) -> bool:
        ports = self._ports.get(key, ())
        current: ServiceView = build_states(ports, self._slices.get(key, {}).values()) if ports else {}
        change = self._pending.get(key)
        previous = change.previous if change else self._applied.get(key, {})
        if previous == current:
            self._pending.pop(key, None)
            return False
        self._pending[key] = _Change(previous, current)
        return True

    # -- sync side --------------------------------------------------------------------------
    def pending(self) -> int:
        return len(self._pending)

    def apply(self) -> frozenset[ServicePortName]:
        """Make the pending changes the applied state; returns the service ports that changed."""
        changed: set[ServicePortName] = set()
        for key, ch in self._pending.items():
            previous, current = ch.previous, ch.current
            if not previous or not current:  # a Service added or removed (all of them, at start-up)
                changed.update(previous or current)
            else:
                for name in previous.keys() | current.keys():
                    old, new = previous.get(name), current.get(name)
                    if old is not new and old != new:
                        changed.add(name)
            if ch.current:
                self._applied[key] = ch.current
            else:
                self._applied.pop(key, None)
        self._pending.clear()
        return frozenset(changed)

    def state(self, name: ServicePortName) -> ServicePortState | None:
        """The applied state of one service port (None: it does not exist / is not proxied)."""
        return self._applied.get(name.service, {}).get(name)

    def all_states(self) -> dict[ServicePortName, ServicePortState]:
        return {n: s for view in self._applied.values() for n, s in view.items()}

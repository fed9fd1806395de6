"""The CNI protocol itself: environment, stdin, versions, the error object and the ADD result.

Pure and stdlib-only (json, os, re): every invocation, even VERSION, imports this module, and the
runtime waits for us on each pod start (DESIGN §5). Nothing here touches the system.

Spec points this module pins down (CNI 0.4.0 / 1.0.0 / 1.1.0):
- which environment variables each verb requires, and their syntax (container id, ifname);
- `CNI_ARGS` as `K=V;K=V` where unknown keys are an error unless `IgnoreUnknown` is true;
- the error object `{"cniVersion", "code", "msg", "details"}` on stdout with a non-zero exit;
- the ADD result per version: 0.4.0 has `ips[].version`, 1.x does not, 1.1.0 adds `interfaces[].mtu`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")


class Code:
    """Error codes: 1-99 are the spec's well-known ones, 100+ are ours."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_NETCONF = 7
    TRY_AGAIN_LATER = 11
    PLUGIN_NOT_AVAILABLE = 50  # STATUS: cannot service ADD now
    # ours
    TENANCY = 100  # pod/namespace/node tenants differ, or the pod is not bound to this node
    ANNOTATION_INVALID = 101  # the netctl.io/port annotation does not parse
    OVS_FAILURE = 102  # OVSDB refused the port, or vswitchd could not open it
    LINK_FAILURE = 103  # netlink: veth, address, route or offload setting failed
    POD_IDENTITY = 104  # pod not found, or its uid differs from K8S_POD_UID
    API_REFUSED = 105  # the API server refused us (401/403) or answered nonsense
    CHECK_FAILED = 106  # CHECK: the attachment is not as ADD left it
    INTERNAL = 999  # a bug: the traceback is in the log, never on stdout


class CniError(Exception):
    """Any failure that ends an invocation; rendered as the spec's error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return f"[{self.code}] {self.msg}" + (f": {self.details}" if self.details else "")


# ---- environment --------------------------------------------------------------------------------

# Required variables per verb (spec 1.1 §2); CNI_PATH is only required by GC.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "VERSION": (),
    "STATUS": (),
    "GC": ("CNI_PATH",),
}

_CONTAINER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_IFNAME_BAD = re.compile(r"[/:\s]")
IFNAMSIZ = 16


def validate_ifname(name: str) -> str | None:
    """Why `name` is not a valid Linux interface name (spec wording), or None if it is."""
    if not name:
        return "must not be empty"
    if name in (".", ".."):
        return "must not be '.' or '..'"
    if len(name.encode()) >= IFNAMSIZ:
        return f"must be shorter than {IFNAMSIZ} bytes"
    if _IFNAME_BAD.search(name):
        return "must not contain '/', ':' or whitespace"
    return None


@dataclass(frozen=True)
class CniArgs:
    """The parsed `CNI_ARGS` (kubelet/containerd pass the K8S_* keys)."""

    pod_namespace: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    infra_container_id: str | None = None
    ignore_unknown: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)


_KNOWN_ARGS = {
    "K8S_POD_NAMESPACE": "pod_namespace",
    "K8S_POD_NAME": "pod_name",
    "K8S_POD_UID": "pod_uid",
    "K8S_POD_INFRA_CONTAINER_ID": "infra_container_id",
}


def _parse_bool(key: str, value: str) -> bool:
    low = value.lower()
    if low in ("1", "true"):
        return True
    if low in ("0", "false"):
        return False
    raise CniError(Code.INVALID_ENV, f"CNI_ARGS: {key}={value!r} is not a boolean (1, true, 0 or false)")


def parse_cni_args(text: str) -> CniArgs:
    """Parse `K=V;K=V`; unknown keys fail unless IgnoreUnknown is true (as libcni does)."""
    values: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue  # tolerate "A=1;" and ";;": nothing ambiguous about an empty segment
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise CniError(Code.INVALID_ENV, f"CNI_ARGS: {item!r} is not a KEY=VALUE pair", f"CNI_ARGS={text!r}")
        if key in values:
            raise CniError(Code.INVALID_ENV, f"CNI_ARGS: {key} given twice", f"CNI_ARGS={text!r}")
        values[key] = value
    ignore = _parse_bool("IgnoreUnknown", values.pop("IgnoreUnknown")) if "IgnoreUnknown" in values else False
    known = {attr: values.pop(key) or None for key, attr in _KNOWN_ARGS.items() if key in values}
    if values and not ignore:
        raise CniError(
            Code.INVALID_ENV,
            f"CNI_ARGS: unknown key(s) {', '.join(sorted(values))} (set IgnoreUnknown=1 to allow them)",
        )
    return CniArgs(ignore_unknown=ignore, extra=values, **known)


@dataclass(frozen=True)
class Invocation:
    """What the runtime told us through the environment."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: CniArgs = field(default_factory=CniArgs)
    path: tuple[str, ...] = ()


def parse_env(env: Mapping[str, str]) -> Invocation:
    """Validate the CNI_* variables for the verb; any problem is code 4 (invalid environment)."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(Code.INVALID_ENV, "CNI_COMMAND is not set", f"expected one of {', '.join(COMMANDS)}")
    if command not in _REQUIRED:
        raise CniError(Code.INVALID_ENV, f"unknown CNI_COMMAND {command!r}", f"expected one of {', '.join(COMMANDS)}")
    missing = [v for v in _REQUIRED[command] if not env.get(v)]
    if missing:
        raise CniError(Code.INVALID_ENV, f"{command} needs {', '.join(missing)} in the environment")
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and not _CONTAINER_ID_RE.fullmatch(container_id):
        raise CniError(
            Code.INVALID_ENV,
            f"CNI_CONTAINERID {container_id!r} is invalid",
            "it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        )
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (why := validate_ifname(ifname)):
        raise CniError(Code.INVALID_ENV, f"CNI_IFNAME {ifname!r} {why}")
    netns = env.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise CniError(Code.INVALID_ENV, f"CNI_NETNS {netns!r} is not an absolute path")
    path = tuple(p for p in env.get("CNI_PATH", "").split(":") if p)
    return Invocation(command, container_id, netns, ifname, parse_cni_args(env.get("CNI_ARGS", "")), path)


# ---- stdin and versions -------------------------------------------------------------------------


def parse_stdin(data: bytes) -> dict[str, Any]:
    """The network configuration must be one JSON object (code 6 otherwise)."""
    try:
        conf = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CniError(Code.DECODE_FAILURE, "network configuration on stdin is not UTF-8", str(e)) from None
    except (ValueError, RecursionError) as e:
        raise CniError(Code.DECODE_FAILURE, "network configuration on stdin is not valid JSON", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(
            Code.DECODE_FAILURE, f"network configuration must be a JSON object, got {type(conf).__name__}"
        )
    return conf


def _version_key(v: str) -> tuple[int, ...] | None:
    parts = v.split(".")
    if len(parts) != 3 or not all(p.isdigit() and p.isascii() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def version_at_least(version: str, minimum: str) -> bool:
    a, b = _version_key(version), _version_key(minimum)
    return a is not None and b is not None and a >= b


def negotiate_version(conf: Mapping[str, Any]) -> str:
    """The config's cniVersion if we speak it, else code 1 (a missing one means 0.1.0, as in libcni)."""
    version = conf.get("cniVersion", "0.1.0")
    if not isinstance(version, str):
        raise CniError(Code.DECODE_FAILURE, f"cniVersion must be a string, got {type(version).__name__}")
    if version not in SUPPORTED_VERSIONS:
        shown = "missing (means 0.1.0)" if "cniVersion" not in conf else repr(version)
        raise CniError(
            Code.INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config cniVersion is {shown}; netctl-cni supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def version_result(requested: str | None) -> dict[str, Any]:
    """The VERSION answer, in the version asked for when we speak it."""
    version = requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


# ---- the ADD result -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""  # netns path for container interfaces, empty for host ones
    mtu: int | None = None  # reported from 1.1.0 on


@dataclass(frozen=True)
class IPConfig:
    address: str  # "a.b.c.d/len"
    interface: int | None = None  # index into Result.interfaces
    gateway: str | None = None


@dataclass(frozen=True)
class Route:
    dst: str
    gw: str | None = None


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.nameservers:
            out["nameservers"] = list(self.nameservers)
        if self.domain:
            out["domain"] = self.domain
        if self.search:
            out["search"] = list(self.search)
        if self.options:
            out["options"] = list(self.options)
        return out


@dataclass(frozen=True)
class Result:
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = field(default_factory=DNS)

    def to_dict(self, version: str) -> dict[str, Any]:
        """Render for `version` (one of SUPPORTED_VERSIONS)."""
        ifaces = []
        for i in self.interfaces:
            d: dict[str, Any] = {"name": i.name}
            if i.mac:
                d["mac"] = i.mac
            if i.mtu is not None and version_at_least(version, "1.1.0"):
                d["mtu"] = i.mtu
            if i.sandbox:
                d["sandbox"] = i.sandbox
            ifaces.append(d)
        ips = []
        for ip in self.ips:
            d = {"address": ip.address}
            if not version_at_least(version, "1.0.0"):
                d = {"version": "6" if ":" in ip.address else "4", **d}
            if ip.gateway:
                d["gateway"] = ip.gateway
            if ip.interface is not None:
                d["interface"] = ip.interface
            ips.append(d)
        routes = [{"dst": r.dst, **({"gw": r.gw} if r.gw else {})} for r in self.routes]
        return {"cniVersion": version, "interfaces": ifaces, "ips": ips, "routes": routes, "dns": self.dns.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> Result:
        """Parse a prevResult (any supported version); malformed is code 7 (it is part of the config)."""

        def bad(what: str) -> CniError:
            return CniError(Code.INVALID_NETCONF, f"prevResult: {what}")

        if not isinstance(data, dict):
            raise bad("must be a JSON object")
        interfaces = []
        for i in _list(data.get("interfaces"), bad, "interfaces"):
            if not isinstance(i, dict) or not isinstance(i.get("name"), str):
                raise bad("every interface needs a string name")
            mtu = i.get("mtu")
            interfaces.append(Interface(
                i["name"], _str(i.get("mac"), bad, "interface mac"), _str(i.get("sandbox"), bad, "sandbox"),
                mtu if isinstance(mtu, int) and not isinstance(mtu, bool) else None,
            ))
        ips = []
        for ip in _list(data.get("ips"), bad, "ips"):
            if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
                raise bad("every ips entry needs a string address")
            idx = ip.get("interface")
            if idx is not None and (not isinstance(idx, int) or isinstance(idx, bool)
                                    or not 0 <= idx < len(interfaces)):
                raise bad(f"ips interface index {idx!r} does not name an interface")
            ips.append(IPConfig(ip["address"], idx, _str(ip.get("gateway"), bad, "gateway") or None))
        routes = []
        for r in _list(data.get("routes"), bad, "routes"):
            if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
                raise bad("every route needs a string dst")
            routes.append(Route(r["dst"], _str(r.get("gw"), bad, "route gw") or None))
        return cls(tuple(interfaces), tuple(ips), tuple(routes), parse_dns(data.get("dns"), bad))


def _list(value: Any, bad: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad(f"{what} must be a list")
    return value


def _str(value: Any, bad: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad(f"{what} must be a string")
    return value


def _strings(value: Any, bad: Any, what: str) -> tuple[str, ...]:
    items = _list(value, bad, what)
    if not all(isinstance(s, str) for s in items):
        raise bad(f"{what} must be a list of strings")
    return tuple(items)


def parse_dns(value: Any, bad: Any) -> DNS:
    """The well-known DNS structure (nameservers, domain, search, options); all optional."""
    if value is None:
        return DNS()
    if not isinstance(value, dict):
        raise bad("dns must be an object")
    return DNS(
        _strings(value.get("nameservers"), bad, "dns.nameservers"),
        _str(value.get("domain"), bad, "dns.domain"),
        _strings(value.get("search"), bad, "dns.search"),
        _strings(value.get("options"), bad, "dns.options"),
    )


def dumps(obj: Mapping[str, Any] | Sequence[Any]) -> str:
    """Compact, deterministic JSON for stdout."""
    return json.dumps(obj, separators=(",", ":"))

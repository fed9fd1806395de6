"""The CNI plugin's verbs, run in the executable's own process or in the node agent.

The ovs mode is here; the netlink-only nested modes (conflist `mode`) hand over to cni/nested_verbs.py.

`cni.main` (the executable's entry point) calls `run()` here when the config has no
`agentSocket`; the node agent (`cni.agent`) calls it for every request it receives, with
`Resources` of its own (warm OVSDB/netlink handles, the pod watch) instead of the per-call
connections of the default `Resources`.

The runtime execs us once per verb with CNI_* in the environment and the network configuration
on stdin. stdout carries exactly one JSON document (the ADD result, the VERSION answer or the
spec's error object) and nothing else: library chatter is redirected to the log, and any
unexpected exception becomes error 999 with the traceback in the log, never on stdout.

Only VERSION and STATUS stay on the stdlib (STATUS probes OVSDB with one raw JSON-RPC call);
ADD/DEL/CHECK/GC import the Kubernetes client (ADD only), pyroute2 and ovsdbapp when they run
(DESIGN §5: start-up time is pod start time).
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any, TypeVar

from cni.netconf import NetConf
from cni.spec import (
    LATEST_VERSION,
    CniError,
    Code,
    Interface,
    Invocation,
    IPConfig,
    Result,
    Route,
    dumps,
    negotiate_version,
    parse_env,
    parse_stdin,
    version_at_least,
    version_result,
)

if TYPE_CHECKING:
    from cni.kubeapi import KubeClient
    from cni.ovs_binding import Netns, OvsDb
    from netctl.annotations import PortAnnotation

POLL_INTERVAL_S = 0.1
T = TypeVar("T")


class Log:
    """Our log lines go to the configured logFile (append), else stderr; never to stdout."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.context = ""

    def use_file(self, path: str | None) -> None:
        if not path:
            return
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            self.write("WARN", f"cannot write logFile {path} ({e.strerror}); logging to stderr")
            return
        self.path = path

    def write(self, level: str, msg: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        line = f"{stamp}Z {level} pid={os.getpid()} {self.context}{msg}\n"
        try:
            if self.path:
                with open(self.path, "a") as f:
                    f.write(line)
            else:
                sys.stderr.write(line)
        except OSError:
            pass  # logging must never turn a result into a failure

    def info(self, msg: str) -> None:
        self.write("INFO", msg)

    def error(self, msg: str) -> None:
        self.write("ERROR", msg)

    def route_library_logs(self) -> None:
        """Send warnings of ovsdbapp/ovs/pyroute2 (stdlib logging) to the same place.

        Only those libraries' loggers are touched (not the root logger), so calling run()
        in-process (tests) leaves the host program's logging alone.
        """
        import logging

        for name in _LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            for old in [h for h in logger.handlers if getattr(h, "_netctl_cni", False)]:
                logger.removeHandler(old)
                old.close()
            handler: logging.Handler = (logging.FileHandler(self.path) if self.path
                                        else logging.StreamHandler(sys.stderr))
            handler._netctl_cni = True  # type: ignore[attr-defined]
            handler.setFormatter(logging.Formatter(
                f"%(asctime)s %(levelname)s pid=%(process)d {self.context}%(name)s: %(message)s"))
            handler.setLevel(logging.WARNING)
            logger.addHandler(handler)
            logger.propagate = False


_LIBRARY_LOGGERS = ("ovsdbapp", "ovs", "pyroute2")


class Resources:
    """Where the verbs get their OVSDB/netlink handles and the pod's port from.

    This default is the executable's: it reads the API with the config's kubeconfig and lets
    the binding connect to OVSDB and open the OVS netns per call. The node agent subclasses it.
    """

    in_agent = False

    def adopt(self, conf: NetConf) -> NetConf:
        """The config the verbs run with (the agent imposes its own node name and credentials)."""
        return conf

    def plumb(self, conf: NetConf, fn: Callable[[OvsDb | None, Netns | None], T]) -> T:
        """Run one binding call with (OVSDB connection, OVS-netns handle); None, None: it connects itself."""
        return fn(None, None)

    def resolve(self, conf: NetConf, ns: str, name: str, uid: str | None, deadline: float,
                log: Log) -> tuple[PortAnnotation, str, PortAnnotation | None]:
        """Check the pod against the API and return its port, uid and public port if any (ADD)."""
        kubeconfig = conf.require_kubeconfig()
        from cni import kubeapi

        try:
            client = kubeapi.KubeClient.from_kubeconfig(kubeconfig)
        except kubeapi.KubeconfigError as e:
            raise CniError(Code.INVALID_NETCONF, f"invalid network config: kubeconfig: {e}") from None
        with client:
            return resolve_pod(client, conf, ns, name, uid, deadline, log)

    def not_ready(self, conf: NetConf) -> str | None:
        """STATUS: why pods cannot be plugged now, beyond OVS (None: nothing)."""
        return None

    def netlink(self, fn: Callable[[], T]) -> T:
        """Run netlink-only plumbing (the nested modes); the node agent runs it on its plumbing thread."""
        return fn()


def main() -> None:
    """Run one invocation in this process (`cni.main.main` is the executable's entry point)."""
    sys.exit(run(os.environ, sys.stdin.buffer, sys.stdout))


def run(env: Mapping[str, str], stdin: IO[bytes] | bytes, out: IO[str], resources: Resources | None = None) -> int:
    """One invocation: returns the exit code, writes exactly one JSON document to `out`.

    `resources` is the node agent's (warm handles, pod watch); it is thread-safe, so with it
    nothing process-wide (sys.stdout, library loggers) is touched.
    """
    log = Log()
    version = LATEST_VERSION
    res = resources or Resources()
    real_stdout = sys.stdout
    if not res.in_agent:
        sys.stdout = sys.stderr  # nothing but our JSON may reach stdout
    try:
        inv = parse_env(env)
        log.context = f"{inv.command} " + (f"cid={inv.container_id[:12]} " if inv.container_id else "")
        data = stdin if isinstance(stdin, bytes) else _read(stdin)
        if inv.command == "VERSION":
            out.write(dumps(version_result(_requested_version(data))))
            return 0
        conf_dict = parse_stdin(data)
        version = negotiate_version(conf_dict)
        if inv.command in ("STATUS", "GC"):
            _needs_1_1(inv.command, version)
        conf = res.adopt(NetConf.from_dict(conf_dict, version, env))
        log.use_file(conf.log_file)
        if res.in_agent:
            log.context += "agent "
        if inv.args.pod_namespace and inv.args.pod_name:
            log.context += f"pod={inv.args.pod_namespace}/{inv.args.pod_name} "
        if not res.in_agent:
            log.route_library_logs()
        started = time.monotonic()
        result = VERBS[inv.command](inv, conf, log, res)
        log.info(f"ok in {time.monotonic() - started:.3f}s")
        if result is not None:
            out.write(dumps(result.to_dict(version)))
        return 0
    except CniError as e:
        log.error(str(e))
        out.write(dumps(e.to_dict(version)))
        return 1
    except Exception as e:
        import traceback

        log.error("internal error:\n" + traceback.format_exc())
        err = CniError(Code.INTERNAL, "internal error in netctl-cni", f"{type(e).__name__}: {e} (traceback in the log)")
        out.write(dumps(err.to_dict(version)))
        return 1
    finally:
        if not res.in_agent:
            sys.stdout = real_stdout
        out.flush()


def _read(stdin: IO[bytes]) -> bytes:
    try:
        return stdin.read()
    except OSError as e:
        raise CniError(Code.IO_FAILURE, "cannot read the network configuration from stdin", str(e)) from None


def _requested_version(data: bytes) -> str | None:
    """VERSION is a probe: answer it whatever stdin holds, in the asked version if we speak it."""
    try:
        conf = parse_stdin(data)
    except CniError:
        return None
    v = conf.get("cniVersion")
    return v if isinstance(v, str) else None


def _needs_1_1(command: str, version: str) -> None:
    if not version_at_least(version, "1.1.0"):
        raise CniError(Code.INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0 or later",
                       f"config cniVersion is {version}")


# ---- ADD ---------------------------------------------------------------------------------------------


def cmd_add(inv: Invocation, conf: NetConf, log: Log, res: Resources) -> Result:
    if not res.in_agent:
        conf.require_kubeconfig()  # the agent reads the API with its own credentials
    ns, name = inv.args.pod_namespace, inv.args.pod_name
    if not ns or not name:
        raise CniError(Code.INVALID_ENV, "ADD needs K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS",
                       "netctl-cni networks Kubernetes pods only")
    if not os.path.exists(inv.netns):
        raise CniError(Code.INVALID_ENV, f"CNI_NETNS {inv.netns} does not exist")
    prev = Result.from_dict(conf.prev_result) if conf.prev_result is not None else None
    deadline = time.monotonic() + conf.annotation_timeout_s
    port, uid, public = res.resolve(conf, ns, name, inv.args.pod_uid, deadline, log)
    ours = plug(inv, conf, port, ns, name, uid, log, res)
    if public is not None:
        ours = _with_public(inv, conf, ours, public, ns, name, uid, log, res)
    return ours if prev is None else chain_after(prev, ours)


def _with_public(inv: Invocation, conf: NetConf, ours: Result, public: PortAnnotation, ns: str, name: str,
                 uid: str, log: Log, res: Resources) -> Result:
    """Plug the public NIC after eth0; if it fails, eth0 goes too (ADD leaves nothing behind)."""
    from cni import ovs_binding as ob
    from cni import public_nic

    try:
        if conf.netlink_only:
            from cni import nested_verbs

            return public_nic.combined(ours, nested_verbs.plug_public(inv, conf, public, log, res))
        return public_nic.combined(ours, public_nic.plug(inv, conf, public, ns, name, uid, log, res))
    except BaseException as exc:
        try:
            cmd_del(inv, conf, log, res)
        except Exception as undo:  # report the ADD failure; the runtime's DEL retries the cleanup
            log.error(f"removing eth0 after the public NIC failed: {undo}")
        if isinstance(exc, ob.BindingError):
            raise _binding_error(exc, "plugging the public NIC") from None
        raise


def chain_after(prev: Result, ours: Result) -> Result:
    """Not first in a chain: pass prevResult through with our interface, addresses and routes added.

    Our `ips[].interface` indices are shifted past the interfaces already listed; the DNS of
    prevResult is kept unless we configure one.
    """
    shift = len(prev.interfaces)
    ips = tuple(IPConfig(ip.address, None if ip.interface is None else ip.interface + shift, ip.gateway)
                for ip in ours.ips)
    dns = ours.dns if ours.dns.to_dict() else prev.dns
    return Result(prev.interfaces + ours.interfaces, prev.ips + ips, prev.routes + ours.routes, dns)


def _api_call(fn: Callable[[float], dict[str, Any]], what: str, deadline: float) -> dict[str, Any]:
    """One GET, retried while the API server is unreachable until `deadline` (then code 11)."""
    from cni import kubeapi

    while True:
        remaining = deadline - time.monotonic()
        try:
            return fn(min(kubeapi.DEFAULT_TIMEOUT_S, max(remaining, 0.5)))
        except kubeapi.ApiUnreachable as e:
            if time.monotonic() + POLL_INTERVAL_S >= deadline:
                raise CniError(Code.TRY_AGAIN_LATER, f"cannot read {what} from the API server", str(e)) from None
        except kubeapi.ApiError as e:
            raise CniError(Code.API_REFUSED, f"the API server refused to return {what}: {e}",
                           "check the CNI's kubeconfig and RBAC (deploy/rbac/cni.yaml)") from None
        time.sleep(POLL_INTERVAL_S)


def resolve_port(client: KubeClient, conf: NetConf, ns: str, name: str, uid: str | None,
                 deadline: float, log: Log) -> tuple[PortAnnotation, str]:
    """`resolve_pod` without the public port."""
    port, uid_, _ = resolve_pod(client, conf, ns, name, uid, deadline, log)
    return port, uid_


def resolve_pod(client: KubeClient, conf: NetConf, ns: str, name: str, uid: str | None,
                deadline: float, log: Log) -> tuple[PortAnnotation, str, PortAnnotation | None]:
    """Check the pod against the API (identity, node, tenancy), wait for and parse its port (and its
    public port, waited for only if the pod asks for one: cni.public_nic).

    The executable polls the pod; the node agent (cni.agent) runs the same checks and waits on
    its watch instead.
    """
    from cni import public_nic
    from netctl.annotations import PORT_ANNOTATION

    pod_ref = f"pod {ns}/{name}"
    pod, tenant = checked_pod(client, conf, ns, name, uid, deadline)
    waited = time.monotonic()
    while (missing := public_nic.awaited(pod, pod_ref)) is not None:
        if time.monotonic() + POLL_INTERVAL_S >= deadline:
            raise no_annotation(pod_ref, conf, tenant, missing)
        time.sleep(POLL_INTERVAL_S)
        pod = _api_call(lambda t: get_pod(client, ns, name, t), pod_ref, deadline)
        check_pod(pod, ns, name, uid, conf.node_name)
    if time.monotonic() - waited > POLL_INTERVAL_S:
        log.info(f"waited {time.monotonic() - waited:.2f}s for the {PORT_ANNOTATION} annotation")
    pod_uid = str(meta_of(pod).get("uid") or "")
    return port_of(pod, ns, name, tenant), pod_uid, public_nic.public_port_of(pod, pod_ref, pod_uid)


def get_pod(client: KubeClient, ns: str, name: str, timeout: float) -> dict[str, Any]:
    from cni import kubeapi

    try:
        return client.get_pod(ns, name, timeout)
    except kubeapi.NotFound:
        raise CniError(Code.POD_IDENTITY, f"pod {ns}/{name} does not exist in the API server",
                       "it was probably deleted while its sandbox was being created") from None


def checked_pod(client: KubeClient, conf: NetConf, ns: str, name: str, uid: str | None, deadline: float,
                pod: dict[str, Any] | None = None, node: Mapping[str, Any] | None = None,
                namespace: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(pod, tenant) once the pod is the runtime's (uid), bound to this node, and its namespace and
    this node belong to the same tenant; `pod`, `node`, `namespace` if the caller has them fresh
    (the node agent's watches), else they are read."""
    from cni import kubeapi

    pod_ref = f"pod {ns}/{name}"

    def get_or_refuse(fn: Callable[[float], dict[str, Any]], what: str, hint: str) -> dict[str, Any]:
        def call(timeout: float) -> dict[str, Any]:
            try:
                return fn(timeout)
            except kubeapi.NotFound:
                raise CniError(Code.TENANCY, f"{what} does not exist in the API server; {hint}") from None
        return _api_call(call, what, deadline)

    if pod is None:
        pod = _api_call(lambda t: get_pod(client, ns, name, t), pod_ref, deadline)
    check_pod(pod, ns, name, uid, conf.node_name)
    if node is None:
        node = get_or_refuse(lambda t: client.get_node(conf.node_name, t), f'node "{conf.node_name}"',
                             "nodeName in the CNI config must be this node's Kubernetes name")
    if namespace is None:
        namespace = get_or_refuse(lambda t: client.get_namespace(ns, t), f'namespace "{ns}"', "")
    return pod, check_tenancy(pod_ref, conf.node_name, node, ns, namespace)


def no_annotation(pod_ref: str, conf: NetConf, tenant: str, missing: str | None = None) -> CniError:
    from netctl.annotations import PORT_ANNOTATION

    return CniError(
        Code.TRY_AGAIN_LATER,
        f"{pod_ref} has no {missing or PORT_ANNOTATION} annotation after {conf.annotation_timeout_s:g}s",
        f"is the netctl controller running, and does tenant {tenant!r} have a network?",
    )


def port_of(pod: Mapping[str, Any], ns: str, name: str, tenant: str) -> PortAnnotation:
    """The pod's parsed port annotation, refused unless it is for the pod's tenant."""
    from netctl.annotations import PORT_ANNOTATION, AnnotationError, PortAnnotation

    pod_ref = f"pod {ns}/{name}"
    text = annotations_of(pod).get(PORT_ANNOTATION)
    try:
        port = PortAnnotation.from_json(text if isinstance(text, str) else "")
    except AnnotationError as e:
        raise CniError(Code.ANNOTATION_INVALID, f"{pod_ref} has an invalid {PORT_ANNOTATION} annotation: {e}",
                       "the netctl controller wrote it; check the controller's log") from None
    if port.tenant != tenant:
        raise CniError(
            Code.TENANCY,
            f"{pod_ref}'s {PORT_ANNOTATION} annotation is for tenant {port.tenant!r} but namespace "
            f'"{ns}" belongs to tenant {tenant!r}; refusing to plug another tenant\'s port',
        )
    return port


def meta_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def annotations_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    ann = meta_of(obj).get("annotations")
    return ann if isinstance(ann, dict) else {}


def _tenant(obj: Mapping[str, Any]) -> str | None:
    from netctl.annotations import TENANT_LABEL

    labels = meta_of(obj).get("labels")
    value = labels.get(TENANT_LABEL) if isinstance(labels, dict) else None
    return value if isinstance(value, str) and value else None


def check_pod(pod: Mapping[str, Any], ns: str, name: str, uid: str | None, node_name: str) -> None:
    """The pod is the one the runtime means (same uid) and is bound to this node."""
    pod_uid = meta_of(pod).get("uid")
    if uid and pod_uid != uid:
        raise CniError(
            Code.POD_IDENTITY,
            f"pod {ns}/{name} has uid {pod_uid} but the runtime asked for uid {uid}",
            "the pod was deleted and re-created; the runtime will create a new sandbox for it",
        )
    spec = pod.get("spec")
    bound = spec.get("nodeName") if isinstance(spec, dict) else None
    if bound != node_name:
        raise CniError(
            Code.TENANCY,
            f'pod {ns}/{name} is bound to node "{bound or ""}", not to this node "{node_name}"',
            "nodeName in this node's CNI config (or NODE_NAME / the hostname) must be its Kubernetes name",
        )


def check_tenancy(pod_ref: str, node_name: str, node: Mapping[str, Any], ns: str,
                  namespace: Mapping[str, Any]) -> str:
    """Namespace tenant == node tenant (DESIGN §3), else refuse; returns the tenant."""
    node_tenant, ns_tenant = _tenant(node), _tenant(namespace)
    if ns_tenant is None:
        raise CniError(Code.TENANCY, f'{pod_ref} belongs to no tenant: namespace "{ns}" has no netctl.io/tenant '
                       "label; label the namespace with its tenant")
    if node_tenant is None:
        raise CniError(Code.TENANCY, f'node "{node_name}" has no netctl.io/tenant label, so it runs no tenant\'s '
                       "pods; label the node with its tenant")
    if node_tenant != ns_tenant:
        raise CniError(
            Code.TENANCY,
            f'{pod_ref} belongs to tenant "{ns_tenant}" but node "{node_name}" belongs to tenant '
            f'"{node_tenant}"; tenants never share nodes',
            f"schedule the pod onto a node of its tenant (nodeSelector netctl.io/tenant={ns_tenant})",
        )
    return ns_tenant


def plug(inv: Invocation, conf: NetConf, port: PortAnnotation, ns: str, name: str, uid: str,
         log: Log, res: Resources | None = None) -> Result:
    """Plumb the pod's port and describe it as the CNI result."""
    from cni import ovs_binding as ob

    routes = []
    if conf.service_route:
        import ipaddress

        cidr, via = conf.service_route
        if ipaddress.IPv4Address(via) not in port.interface.network:
            raise CniError(Code.INVALID_NETCONF, f"invalid network config: nodeAddress {via} is outside the "
                           f"pod subnet {port.interface.network}, so it cannot route serviceCidr {cidr}")
        routes.append((cidr, via))
    if conf.netlink_only:
        from cni import nested_verbs

        return nested_verbs.plug(inv, conf, port, routes, log, res or Resources())
    vlan = nested_vlan_id(conf, port)
    host = ob.host_ifname(inv.container_id, inv.ifname)
    ids = {ob.EXT_CONTAINER_ID: inv.container_id, ob.EXT_IFNAME: inv.ifname, ob.EXT_POD: f"{ns}/{name}",
           ob.EXT_NETWORK: conf.name}
    if uid:
        ids[ob.EXT_POD_UID] = uid
    try:
        done = (res or Resources()).plumb(conf, lambda ovs, hns: ob.plug_port(
            ovsdb=conf.ovsdb, bridge=conf.bridge, ovs_netns=conf.ovs_netns, target_netns=inv.netns,
            ifname=inv.ifname, host_ifname=host, port_id=port.port_id, mac=port.mac, cidr=port.ip,
            gateway=port.gateway, mtu=port.mtu, owner_tag=f"{ob.OWNER_POD_PREFIX}{ns}/{name}", external_ids=ids,
            routes=routes, alias=ob.attachment_alias(conf.name, inv.container_id, inv.ifname), vlan=vlan,
            ovs=ovs, host=hns, wait_attached=False,  # DESIGN §5: vswitchd attaches on its own time; CHECK verifies
        ))
    except ob.BindingError as e:
        raise _binding_error(e, "plugging the pod") from None
    log.info(f"plugged {done.ifname} ({port.ip}, {port.mac}) <-> {done.host_ifname} port {port.port_id}")
    return Result(
        interfaces=(Interface(done.host_ifname, done.host_mac),
                    Interface(done.ifname, done.mac, inv.netns, done.mtu)),
        ips=(IPConfig(port.ip, 1, port.gateway),),
        routes=((Route("0.0.0.0/0", port.gateway),) if port.gateway else ()) + tuple(Route(d, v) for d, v in routes),
        dns=conf.dns,
    )


def nested_vlan_id(conf: NetConf, port: PortAnnotation) -> int | None:
    """The pod's VLAN: the port's segmentation id in nested-vlan (code 101 if it has none), else None."""
    if conf.mode != "nested-vlan":
        return None
    if port.vlan is None:
        raise CniError(Code.ANNOTATION_INVALID,
                       f"mode nested-vlan needs a VLAN id, but the netctl.io/port annotation of port "
                       f"{port.port_id} has none (vlan: null)",
                       "the port must be a trunk subport (OVN: parent_name/tag) of this node's NIC")
    return port.vlan


def _binding_error(e: Exception, doing: str) -> CniError:
    from cni import ovs_binding as ob

    if isinstance(e, ob.OvsUnavailable):
        return CniError(Code.TRY_AGAIN_LATER, f"{doing}: Open vSwitch is unavailable", str(e))
    if isinstance(e, ob.OvsError):
        return CniError(Code.OVS_FAILURE, f"{doing}: Open vSwitch failed", str(e))
    return CniError(Code.LINK_FAILURE, f"{doing}: interface setup failed", str(e))


# ---- DEL / CHECK ---------------------------------------------------------------------------------


def cmd_del(inv: Invocation, conf: NetConf, log: Log, res: Resources) -> None:
    """Idempotent; needs neither the API server nor the pod's netns."""
    if conf.netlink_only:
        from cni import nested_verbs

        return nested_verbs.delete(inv, conf, log, res)
    from cni import ovs_binding as ob
    from cni import public_nic

    host = ob.host_ifname(inv.container_id, inv.ifname)
    try:
        removed = res.plumb(conf, lambda ovs, hns: ob.unplug_port(
            ovsdb=conf.ovsdb, ovs_netns=conf.ovs_netns, host_ifname=host,
            match={ob.EXT_CONTAINER_ID: inv.container_id, ob.EXT_IFNAME: inv.ifname}, ovs=ovs, host=hns))
        removed += public_nic.unplug(inv, conf, res)  # the public NIC, if the pod had one
    except ob.BindingError as e:
        raise _binding_error(e, "unplugging the pod") from None
    log.info(f"removed {', '.join(removed)}" if removed else "nothing to remove")


def cmd_check(inv: Invocation, conf: NetConf, log: Log, res: Resources) -> None:
    """Compare the attachment with prevResult (what ADD reported)."""
    from cni import ovs_binding as ob
    from cni import public_nic

    if conf.prev_result is None:
        raise CniError(Code.INVALID_NETCONF, "invalid network config: CHECK needs prevResult")
    prev = Result.from_dict(conf.prev_result)
    index = next((i for i, itf in enumerate(prev.interfaces)
                  if itf.name == inv.ifname and itf.sandbox == inv.netns), None)
    if index is None:
        raise CniError(Code.CHECK_FAILED, f"prevResult lists no interface {inv.ifname} in {inv.netns}")
    if conf.netlink_only:
        from cni import nested_verbs

        return nested_verbs.check(inv, conf, prev, index, res)
    try:
        mac = prev.interfaces[index].mac
        cidrs = [ip.address for ip in prev.ips if ip.interface == index]
        problems = res.plumb(conf, lambda ovs, hns: ob.check_port(
            ovsdb=conf.ovsdb, bridge=conf.bridge, ovs_netns=conf.ovs_netns, target_netns=inv.netns,
            ifname=inv.ifname, host_ifname=ob.host_ifname(inv.container_id, inv.ifname), mac=mac, cidrs=cidrs,
            external_ids={ob.EXT_CONTAINER_ID: inv.container_id, ob.EXT_IFNAME: inv.ifname}, ovs=ovs, host=hns,
            tagged=conf.mode == "nested-vlan", routes=_our_routes(prev, index),
        ))
        problems += public_nic.check_from_prev(inv, conf, prev, res)  # net1, if ADD plugged one
    except ob.BindingError as e:
        raise _binding_error(e, "checking the pod") from None
    if problems:
        raise CniError(Code.CHECK_FAILED, f"{inv.ifname} in {inv.netns} is not as ADD left it", "; ".join(problems))


def _our_routes(prev: Result, index: int) -> list[tuple[str, str | None]]:
    """The routes of the result whose gateway is on our interface's subnets: the ones ADD set
    (default, Service CIDR). Routes of other plugins in the chain are theirs to check."""
    nets = [ipaddress.IPv4Interface(ip.address).network for ip in prev.ips
            if ip.interface == index and "." in ip.address]
    return [(r.dst, r.gw) for r in prev.routes
            if r.gw and "." in r.gw and any(ipaddress.IPv4Address(r.gw) in n for n in nets)]


# ---- STATUS / GC (CNI 1.1) -------------------------------------------------------------------------


def cmd_status(inv: Invocation, conf: NetConf, log: Log, res: Resources) -> None:
    """Ready (exit 0, no output) when OVSDB answers and the bridge exists (and, through the agent, its
    pod watch is synced); else code 50 saying what is missing."""
    from cni import ovsdb_probe

    if why := res.not_ready(conf):
        raise CniError(Code.PLUGIN_NOT_AVAILABLE, "the netctl-cni node agent cannot plug pods yet", why)
    if conf.netlink_only:
        from cni import nested_verbs

        return nested_verbs.status(conf, res)

    try:
        found = ovsdb_probe.bridge_exists(conf.ovsdb, conf.bridge)
    except ovsdb_probe.ProbeError as e:
        raise CniError(Code.PLUGIN_NOT_AVAILABLE, "Open vSwitch is not available: cannot plug pods", str(e)) from None
    if not found:
        raise CniError(Code.PLUGIN_NOT_AVAILABLE, f"OVS bridge {conf.bridge} does not exist: cannot plug pods",
                       f"OVSDB {conf.ovsdb} answers but has no bridge {conf.bridge!r} (is ovn-controller set up?)")


def cmd_gc(inv: Invocation, conf: NetConf, log: Log, res: Resources) -> None:
    """Remove this network's attachments (OVS port + host veth) that the runtime no longer knows."""
    from cni import ovs_binding as ob
    from cni.netconf import valid_attachments

    valid = valid_attachments(conf.raw)
    if conf.netlink_only:
        from cni import nested_verbs

        return nested_verbs.gc(conf, valid, log, res)
    from cni import public_nic
    from netctl.annotations import PUBLIC_IFNAME

    valid = public_nic.valid_with_public(valid, PUBLIC_IFNAME)  # net1 lives as long as its container's eth0
    try:
        removed = res.plumb(conf, lambda ovs, hns: ob.gc_attachments(
            ovsdb=conf.ovsdb, ovs_netns=conf.ovs_netns, network=conf.name, valid=valid, ovs=ovs, host=hns))
    except ob.BindingError as e:
        raise _binding_error(e, "garbage-collecting attachments") from None
    log.info(f"GC kept {len(valid)} valid attachment(s), removed {', '.join(removed) or 'nothing'}")


VERBS: dict[str, Callable[[Invocation, NetConf, Log, Resources], Result | None]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": cmd_status,
    "GC": cmd_gc,
}


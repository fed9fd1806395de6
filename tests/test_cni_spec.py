"""The CNI protocol surface of netctl-cni: env/stdin parsing, versions, errors, results, netconf,
kubeconfig parsing and the pod/tenancy checks of ADD.

Most tests exec the installed `netctl-cni` exactly as a runtime does (environment + stdin, then
stdout and exit code); none needs root, a daemon or an API server. Configs point OVSDB and the
kubeconfig at paths that do not exist, so nothing outside the test is ever touched.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni import kubeapi
from cni import main as cni_main
from cni import plugin as cni_plugin
from cni.netconf import DEFAULT_BRIDGE, DEFAULT_OVSDB, INIT_NETNS, NetConf
from cni.spec import (
    DNS,
    SUPPORTED_VERSIONS,
    CniError,
    Code,
    Interface,
    IPConfig,
    Result,
    Route,
    parse_cni_args,
    parse_env,
    validate_ifname,
)
from netctl.annotations import PORT_ANNOTATION, TENANT_LABEL, PortAnnotation

BINARY = Path(sys.executable).parent / "netctl-cni"
NOWHERE = "/nonexistent-netctl-cni-test"
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}


def conf(**overrides: Any) -> dict[str, Any]:
    """A valid config whose OVSDB and kubeconfig do not exist (any verb stops before side effects)."""
    base: dict[str, Any] = {
        "cniVersion": "1.0.0", "name": "netctl", "type": "netctl-cni",
        "ovsdb": f"unix:{NOWHERE}/db.sock", "kubeconfig": f"{NOWHERE}/kubeconfig",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def env_for(command: str, **extra: str) -> dict[str, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p1"}
    env.update(extra)
    return {k: v for k, v in env.items() if v != "<unset>"}


def invoke(env: dict[str, str], stdin: bytes | dict[str, Any] | str) -> tuple[int, Any, str]:
    """Exec the plugin like a runtime: only PATH and the CNI variables in the environment."""
    data = json.dumps(stdin).encode() if isinstance(stdin, dict) else (
        stdin.encode() if isinstance(stdin, str) else stdin)
    proc = subprocess.run([str(BINARY)], input=data, capture_output=True, timeout=60,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env})
    out = proc.stdout.decode()
    assert "Traceback" not in out
    return proc.returncode, (json.loads(out) if out else None), proc.stderr.decode()


def assert_error(rc: int, out: Any, code: int) -> dict[str, Any]:
    assert rc != 0, out
    assert isinstance(out, dict) and set(out) <= ERROR_KEYS, out
    assert out["code"] == code, out
    assert isinstance(out["msg"], str) and out["msg"]
    assert out["cniVersion"] in SUPPORTED_VERSIONS
    return out


def run_inproc(env: dict[str, str], stdin: bytes) -> tuple[int, str]:
    out = io.StringIO()
    rc = cni_main.run(env, stdin, out)
    return rc, out.getvalue()


def test_binary_is_installed() -> None:
    assert BINARY.exists(), f"{BINARY} missing: the package must be installed (pip install -e .)"


# ---- VERSION -----------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", ["0.4.0", "1.0.0", "1.1.0"])
def test_version_lists_supported_versions_in_requested_version(requested: str) -> None:
    rc, out, _ = invoke({"CNI_COMMAND": "VERSION"}, {"cniVersion": requested})
    assert rc == 0
    assert out == {"cniVersion": requested, "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize("stdin", [b"", b"garbage", b'{"cniVersion": "9.9.9"}', b"[1]"])
def test_version_answers_whatever_stdin_holds(stdin: bytes) -> None:
    rc, out, _ = invoke({"CNI_COMMAND": "VERSION"}, stdin)
    assert rc == 0
    assert out == {"cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED_VERSIONS)}


# ---- environment (code 4) -------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "needle"), [
    ({}, "CNI_COMMAND is not set"),
    ({"CNI_COMMAND": "FROB"}, "unknown CNI_COMMAND"),
    (env_for("ADD", CNI_CONTAINERID="<unset>"), "CNI_CONTAINERID"),
    (env_for("ADD", CNI_NETNS="<unset>"), "CNI_NETNS"),
    (env_for("ADD", CNI_IFNAME="<unset>"), "CNI_IFNAME"),
    (env_for("CHECK", CNI_NETNS=""), "CNI_NETNS"),
    (env_for("DEL", CNI_IFNAME="<unset>"), "CNI_IFNAME"),
    (env_for("GC", CNI_PATH="<unset>"), "CNI_PATH"),
    (env_for("ADD", CNI_CONTAINERID="-starts-with-dash"), "CNI_CONTAINERID"),
    (env_for("ADD", CNI_CONTAINERID="has space"), "CNI_CONTAINERID"),
    (env_for("ADD", CNI_IFNAME="a" * 16), "shorter than 16"),
    (env_for("ADD", CNI_IFNAME="eth/0"), "CNI_IFNAME"),
    (env_for("ADD", CNI_IFNAME=".."), "CNI_IFNAME"),
    (env_for("ADD", CNI_NETNS="relative/path"), "absolute"),
    (env_for("ADD", CNI_ARGS="K8S_POD_NAME"), "KEY=VALUE"),
    (env_for("ADD", CNI_ARGS="FOO=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"), "unknown key(s) FOO"),
    (env_for("ADD", CNI_ARGS="IgnoreUnknown=maybe"), "not a boolean"),
    (env_for("ADD", CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=a"), "K8S_POD_NAME"),
    (env_for("ADD", CNI_NETNS=f"{NOWHERE}/netns"), "does not exist"),
])
def test_invalid_environment_is_code_4(env: dict[str, str], needle: str) -> None:
    rc, out, _ = invoke(env, conf())
    err = assert_error(rc, out, Code.INVALID_ENV)
    assert needle in err["msg"] + err.get("details", "")


def test_env_is_checked_before_stdin() -> None:
    rc, out, _ = invoke({"CNI_COMMAND": "ADD"}, b"not json")
    assert_error(rc, out, Code.INVALID_ENV)


def test_del_does_not_need_netns() -> None:
    """DEL's env is fine without CNI_NETNS (containerd's second DEL): it gets as far as OVSDB."""
    rc, out, _ = invoke(env_for("DEL", CNI_NETNS=""), conf())
    err = assert_error(rc, out, Code.TRY_AGAIN_LATER)
    assert "Open vSwitch is unavailable" in err["msg"]


def test_cni_args_parsing() -> None:
    args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u-1;"
                          "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_NETWORK=x;")
    assert (args.pod_namespace, args.pod_name, args.pod_uid, args.infra_container_id) == ("ns", "p", "u-1", "abc")
    assert args.ignore_unknown and args.extra == {"K8S_POD_NETWORK": "x"}
    assert parse_cni_args("") == parse_cni_args(";")
    assert parse_cni_args("K8S_POD_NAME=p").pod_name == "p"
    for bad in ("A=1=2", "=x", "K8S_POD_NAME=a;K8S_POD_NAME=b", "X=1", "IgnoreUnknown=yes"):
        with pytest.raises(CniError) as e:
            parse_cni_args(bad)
        assert e.value.code == Code.INVALID_ENV


def test_ifname_rules() -> None:
    assert validate_ifname("eth0") is None
    assert validate_ifname("a" * 15) is None
    for bad in ("", ".", "..", "a" * 16, "a b", "a:b", "a/b", "ä" * 8):
        assert validate_ifname(bad) is not None, bad


# ---- stdin decoding (6) and versions (1) -----------------------------------------------------------


@pytest.mark.parametrize("stdin", [b"", b"{", b"not json", b"[]", b'"str"', b"\xff\xfe", b"null",
                                   b'{"cniVersion": 1}'])
def test_undecodable_config_is_code_6(stdin: bytes) -> None:
    rc, out, _ = invoke(env_for("ADD"), stdin)
    assert_error(rc, out, Code.DECODE_FAILURE)


@pytest.mark.parametrize("version", ["0.1.0", "0.3.1", "1.2.0", "2.0.0", "1.0", "", None])
def test_unsupported_version_is_code_1(version: str | None) -> None:
    for command in ("ADD", "DEL", "CHECK"):
        rc, out, _ = invoke(env_for(command), conf(cniVersion=version))
        err = assert_error(rc, out, Code.INCOMPATIBLE_VERSION)
        assert "0.4.0, 1.0.0, 1.1.0" in err["details"]


@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_status_and_gc_need_1_1(command: str) -> None:
    rc, out, _ = invoke(env_for(command), conf(cniVersion="1.0.0"))
    assert "1.1.0" in assert_error(rc, out, Code.INCOMPATIBLE_VERSION)["msg"]


def test_status_without_ovs_is_code_50_saying_what_is_missing() -> None:
    rc, out, _ = invoke({"CNI_COMMAND": "STATUS"}, conf(cniVersion="1.1.0"))
    err = assert_error(rc, out, Code.PLUGIN_NOT_AVAILABLE)
    assert err["code"] == 50 and "Open vSwitch is not available" in err["msg"]
    assert f"{NOWHERE}/db.sock" in err["details"] and err["cniVersion"] == "1.1.0"


@pytest.mark.parametrize(("attachments", "needle"), [
    (None, "is required for GC"),
    ({"containerID": "a", "ifname": "eth0"}, "must be a list"),
    ([{"containerID": "a"}], "entry 0"),
    ([{"containerID": "a", "ifname": "eth0"}, "x"], "entry 1"),
    ([{"containerID": 7, "ifname": "eth0"}], "entry 0"),
])
def test_gc_rejects_malformed_valid_attachments(attachments: Any, needle: str) -> None:
    rc, out, _ = invoke({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"},
                        conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": attachments}))
    err = assert_error(rc, out, Code.INVALID_NETCONF)
    assert "cni.dev/valid-attachments" in err["msg"] and needle in err["msg"], err


def test_gc_without_ovs_is_try_again_later() -> None:
    rc, out, _ = invoke({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}, conf(
        cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}))
    assert "Open vSwitch is unavailable" in assert_error(rc, out, Code.TRY_AGAIN_LATER)["msg"]


def test_gc_needs_cni_path() -> None:
    rc, out, _ = invoke({"CNI_COMMAND": "GC"}, conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": []}))
    assert "CNI_PATH" in assert_error(rc, out, Code.INVALID_ENV)["msg"]


def test_chained_after_another_plugin_passes_prev_result_through() -> None:
    prev = Result((Interface("lo", "00:00:00:00:00:00", "/run/netns/x"),),
                  (IPConfig("127.0.0.1/8", 0),), (Route("10.9.0.0/16", "127.0.0.2"),), DNS(("1.1.1.1",)))
    ours = Result((Interface("nc0", "aa:bb:cc:dd:ee:01"), Interface("eth0", "0a:58:0a:01:00:05", "/run/netns/x")),
                  (IPConfig("10.1.0.5/24", 1, "10.1.0.1"),), (Route("0.0.0.0/0", "10.1.0.1"),))
    merged = cni_plugin.chain_after(prev, ours)
    assert [i.name for i in merged.interfaces] == ["lo", "nc0", "eth0"]
    assert merged.ips == (IPConfig("127.0.0.1/8", 0), IPConfig("10.1.0.5/24", 2, "10.1.0.1"))
    assert merged.routes == (Route("10.9.0.0/16", "127.0.0.2"), Route("0.0.0.0/0", "10.1.0.1"))
    assert merged.dns == DNS(("1.1.1.1",))
    # and it renders as a valid prevResult for the next plugin
    assert Result.from_dict(merged.to_dict("1.0.0")) == merged


def test_add_rejects_a_malformed_prev_result_before_any_lookup() -> None:
    rc, out, _ = invoke(env_for("ADD"), conf(prevResult={"interfaces": "nope"}))
    assert "prevResult" in assert_error(rc, out, Code.INVALID_NETCONF)["msg"]


def test_attachment_alias_round_trips() -> None:
    from cni import ovs_binding as ob

    alias = ob.attachment_alias("netctl", "abc123", "eth0")
    assert ob.parse_alias(alias) == ("netctl", "abc123", "eth0")
    for foreign in (None, "", "uplink to the ToR", "netctl-cni a b", "netctl-cni a  c"):
        assert ob.parse_alias(foreign) is None


# ---- network config (7) ----------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"name": None}, "name"),
    ({"name": "bad name"}, "name"),
    ({"type": None}, "type"),
    ({"type": 7}, "type"),
    ({"ovsdb": "ssl:1.2.3.4:6640"}, "ovsdb"),
    ({"ovsdb": "unix:relative.sock"}, "ovsdb"),
    ({"ovsNetns": "hv"}, "ovsNetns"),
    ({"bridge": "b" * 16}, "bridge"),
    ({"annotationTimeoutSeconds": 0}, "annotationTimeoutSeconds"),
    ({"annotationTimeoutSeconds": "20"}, "annotationTimeoutSeconds"),
    ({"annotationTimeoutSeconds": True}, "annotationTimeoutSeconds"),
    ({"serviceCidr": "10.96.0.1/16"}, "serviceCidr"),
    ({"serviceCidr": "nope"}, "serviceCidr"),
    ({"nodeAddress": "10.0.0.300"}, "nodeAddress"),
    ({"nodeName": ["n1"]}, "nodeName"),
    ({"dns": {"nameservers": "1.1.1.1"}}, "dns"),
    ({"kubeconfig": None}, "kubeconfig is required"),
    ({}, "kubeconfig"),  # the file does not exist
])
def test_invalid_config_is_code_7(overrides: dict[str, Any], needle: str) -> None:
    rc, out, _ = invoke(env_for("ADD"), conf(**overrides))
    err = assert_error(rc, out, Code.INVALID_NETCONF)
    assert needle in err["msg"], err
    assert err["cniVersion"] == "1.0.0"


def test_check_needs_prev_result() -> None:
    rc, out, _ = invoke(env_for("CHECK"), conf())
    assert "prevResult" in assert_error(rc, out, Code.INVALID_NETCONF)["msg"]
    rc, out, _ = invoke(env_for("CHECK"), conf(prevResult={"ips": "nope"}))
    assert_error(rc, out, Code.INVALID_NETCONF)


def test_netconf_defaults_and_fallbacks() -> None:
    nc = NetConf.from_dict({"name": "n", "type": "t"}, "1.0.0", {"NODE_NAME": "node-7"})
    assert (nc.ovsdb, nc.bridge, nc.ovs_netns, nc.annotation_timeout_s) == (DEFAULT_OVSDB, DEFAULT_BRIDGE,
                                                                           INIT_NETNS, 20.0)
    assert nc.node_name == "node-7" and nc.kubeconfig is None and nc.service_route is None
    assert NetConf.from_dict({"name": "n", "type": "t"}, "1.0.0", {}).node_name == os.uname().nodename.lower()
    full = NetConf.from_dict({
        "name": "n", "type": "t", "nodeName": "n1", "ovsNetns": "/run/netns/hv", "bridge": "br0",
        "ovsdb": "tcp:127.0.0.1:6640", "annotationTimeoutSeconds": 2.5, "serviceCidr": "10.96.0.0/16",
        "nodeAddress": "10.1.0.2", "logFile": "/tmp/x.log", "dns": {"nameservers": ["10.96.0.10"]},
        "unknownKey": {"ignored": True},
    }, "1.1.0", {"NODE_NAME": "other"})
    assert full.node_name == "n1" and full.service_route == ("10.96.0.0/16", "10.1.0.2")
    assert full.dns == DNS(nameservers=("10.96.0.10",))
    only_cidr = NetConf.from_dict({"name": "n", "type": "t", "serviceCidr": "10.96.0.0/16"}, "1.0.0", {})
    assert only_cidr.service_route is None


# ---- results ---------------------------------------------------------------------------------------

RESULT = Result(
    interfaces=(Interface("nc0123456789ab", "02:00:00:00:00:01"),
                Interface("eth0", "0a:58:0a:01:00:05", "/var/run/netns/x", 1400)),
    ips=(IPConfig("10.1.0.5/24", 1, "10.1.0.1"),),
    routes=(Route("0.0.0.0/0", "10.1.0.1"), Route("10.96.0.0/16", "10.1.0.2")),
    dns=DNS(nameservers=("10.96.0.10",), search=("svc.cluster.local",)),
)


def test_result_format_per_version() -> None:
    v04, v10, v11 = (RESULT.to_dict(v) for v in SUPPORTED_VERSIONS)
    assert v04["ips"] == [{"version": "4", "address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1}]
    assert v10["ips"] == [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1}]
    assert "mtu" not in v10["interfaces"][1] and v11["interfaces"][1]["mtu"] == 1400
    assert v11["interfaces"][0] == {"name": "nc0123456789ab", "mac": "02:00:00:00:00:01"}
    assert v11["interfaces"][1]["sandbox"] == "/var/run/netns/x"
    assert v11["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "10.96.0.0/16", "gw": "10.1.0.2"}]
    assert v11["dns"] == {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
    assert [d["cniVersion"] for d in (v04, v10, v11)] == list(SUPPORTED_VERSIONS)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_result_round_trips_through_prev_result(version: str) -> None:
    back = Result.from_dict(json.loads(json.dumps(RESULT.to_dict(version))))
    assert back.ips == RESULT.ips and back.routes == RESULT.routes and back.dns == RESULT.dns
    assert [(i.name, i.mac, i.sandbox) for i in back.interfaces] == [
        (i.name, i.mac, i.sandbox) for i in RESULT.interfaces]


def test_prev_result_interface_index_must_exist() -> None:
    with pytest.raises(CniError) as e:
        Result.from_dict({"interfaces": [], "ips": [{"address": "10.0.0.1/24", "interface": 0}]})
    assert e.value.code == Code.INVALID_NETCONF


# ---- kubeconfig ------------------------------------------------------------------------------------


def write_kubeconfig(tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None,
                     current: str | None = "ctx") -> Path:
    doc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://10.0.0.1:6443",
                                                         "certificate-authority": "ca.crt"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}},
                     {"name": "other", "context": {"cluster": "c", "user": "u"}}],
    }
    if current:
        doc["current-context"] = current
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_kubeconfig_token_file_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    access = kubeapi.load_kubeconfig(str(write_kubeconfig(tmp_path, {"tokenFile": "token"})))
    assert access.server == "https://10.0.0.1:6443"
    assert access.token == "s3cret"
    assert access.ca_file == str(tmp_path.resolve() / "ca.crt")
    assert "s3cret" not in repr(access)


def test_kubeconfig_inline_data(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    b64 = base64.b64encode(pem).decode()
    path = write_kubeconfig(tmp_path, {"client-certificate-data": b64, "client-key-data": b64},
                            {"server": "https://h:1/prefix/", "certificate-authority-data": b64,
                             "tls-server-name": "kubernetes"})
    access = kubeapi.load_kubeconfig(str(path))
    assert access.client_cert_data == pem and access.client_key_data == pem
    assert access.ca_data == pem.decode() and access.tls_server_name == "kubernetes"
    assert access.server == "https://h:1/prefix"


@pytest.mark.parametrize(("user", "cluster", "current", "needle"), [
    ({"exec": {"command": "x"}}, None, "ctx", "not supported"),
    ({"token": "t"}, None, None, "current-context"),
    ({"token": "t"}, None, "missing", "no context named"),
    ({"client-certificate": "c.crt"}, None, "ctx", "needs its key"),
    ({"token": "t"}, {"server": "10.0.0.1:6443"}, "ctx", "http(s) URL"),
    ({"client-key-data": "!!notbase64"}, None, "ctx", "base64"),
    ({"tokenFile": "missing-token"}, None, "ctx", "tokenFile"),
])
def test_kubeconfig_errors(tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any] | None,
                           current: str | None, needle: str) -> None:
    path = write_kubeconfig(tmp_path, user, cluster, current)
    with pytest.raises(kubeapi.KubeconfigError, match=None) as e:
        kubeapi.load_kubeconfig(str(path))
    assert needle in str(e.value)


def test_kubeconfig_unreadable_is_code_7(tmp_path: Path) -> None:
    (tmp_path / "kc").write_text(":\n  - [unbalanced")
    rc, out, _ = invoke(env_for("ADD"), conf(kubeconfig=str(tmp_path / "kc")))
    assert "kubeconfig" in assert_error(rc, out, Code.INVALID_NETCONF)["msg"]


def test_unreachable_api_is_try_again_later(tmp_path: Path) -> None:
    """A closed local port: ADD retries until annotationTimeoutSeconds, then code 11."""
    path = write_kubeconfig(tmp_path, {"token": "t"}, {"server": "http://127.0.0.1:9"})
    t0 = time.monotonic()
    rc, out, _ = invoke(env_for("ADD"), conf(kubeconfig=str(path), annotationTimeoutSeconds=1))
    assert "API server" in assert_error(rc, out, Code.TRY_AGAIN_LATER)["msg"]
    assert time.monotonic() - t0 < 10


# ---- ADD's pod checks, against a fake of our own KubeClient interface ----------------------------------

ANNOTATION = PortAnnotation("pod-u1", "0a:58:0a:01:00:05", "10.1.0.5/24", "10.1.0.1", 1400, "alpha", "netctl-alpha")


def k8s_obj(name: str, *, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
            uid: str = "u1", node: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": name, "uid": uid, "labels": labels or {},
                                        "annotations": annotations or {}}}
    if node is not None:
        obj["spec"] = {"nodeName": node}
    return obj


class FakeKube:
    """Stands in for cni.kubeapi.KubeClient; `pods` is a list of successive answers for the pod."""

    def __init__(self, pods: list[Any], node: Any, namespace: Any) -> None:
        self.pods, self.node, self.namespace = pods, node, namespace
        self.pod_gets = 0

    @staticmethod
    def _answer(value: Any) -> dict[str, Any]:
        if isinstance(value, Exception):
            raise value
        assert isinstance(value, dict)
        return value

    def get_pod(self, ns: str, name: str, timeout: float | None = None) -> dict[str, Any]:
        self.pod_gets += 1
        return self._answer(self.pods[min(self.pod_gets, len(self.pods)) - 1])

    def get_node(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return self._answer(self.node)

    def get_namespace(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return self._answer(self.namespace)


def pod(annotation: str | None = ANNOTATION.to_json(), **kw: Any) -> dict[str, Any]:
    return k8s_obj("p1", annotations={PORT_ANNOTATION: annotation} if annotation is not None else {},
                   node=kw.pop("node", "n1"), **kw)


def resolve(fake: FakeKube, *, uid: str | None = "u1", timeout: float = 2.0) -> PortAnnotation:
    nc = NetConf.from_dict({"name": "n", "type": "t", "nodeName": "n1", "annotationTimeoutSeconds": timeout},
                           "1.0.0", {})
    port, _ = cni_plugin.resolve_port(fake, nc, "ns1", "p1", uid, time.monotonic() + timeout,  # type: ignore[arg-type]
                                    cni_plugin.Log())
    return port


NODE = k8s_obj("n1", labels={TENANT_LABEL: "alpha"})
NAMESPACE = k8s_obj("ns1", labels={TENANT_LABEL: "alpha"})


def test_resolve_port_happy_path_waits_for_annotation() -> None:
    fake = FakeKube([pod(None), pod(None), pod()], NODE, NAMESPACE)
    assert resolve(fake) == ANNOTATION
    assert fake.pod_gets == 3


def expect_code(code: int, fake: FakeKube, **kw: Any) -> str:
    with pytest.raises(CniError) as e:
        resolve(fake, **kw)
    assert e.value.code == code, e.value
    return str(e.value)


def test_tenant_mismatch_is_refused_with_actionable_message() -> None:
    msg = expect_code(Code.TENANCY, FakeKube([pod()], k8s_obj("n1", labels={TENANT_LABEL: "alpha"}),
                                             k8s_obj("ns1", labels={TENANT_LABEL: "beta"})))
    assert 'pod ns1/p1 belongs to tenant "beta" but node "n1" belongs to tenant "alpha"; tenants never share nodes' \
        in msg
    assert "nodeSelector netctl.io/tenant=beta" in msg


@pytest.mark.parametrize(("node", "namespace", "needle"), [
    (k8s_obj("n1"), NAMESPACE, 'node "n1" has no netctl.io/tenant label'),
    (NODE, k8s_obj("ns1"), 'namespace "ns1" has no netctl.io/tenant label'),
    (kubeapi.NotFound("404"), NAMESPACE, 'node "n1" does not exist'),
])
def test_unlabelled_or_missing_objects_are_refused(node: Any, namespace: Any, needle: str) -> None:
    assert needle in expect_code(Code.TENANCY, FakeKube([pod()], node, namespace))


def test_pod_on_another_node_is_refused() -> None:
    assert 'bound to node "n2", not to this node "n1"' in expect_code(
        Code.TENANCY, FakeKube([pod(node="n2")], NODE, NAMESPACE))


def test_annotation_for_another_tenant_is_refused() -> None:
    other = PortAnnotation("pod-u1", "0a:58:0a:01:00:05", "10.1.0.5/24", "10.1.0.1", 1400, "beta", "netctl-beta")
    assert "for tenant 'beta'" in expect_code(Code.TENANCY, FakeKube([pod(other.to_json())], NODE, NAMESPACE))


def test_malformed_annotation_is_code_101_naming_the_pod() -> None:
    msg = expect_code(Code.ANNOTATION_INVALID, FakeKube([pod('{"portId": "x"}')], NODE, NAMESPACE))
    assert "pod ns1/p1" in msg and PORT_ANNOTATION in msg


def test_uid_mismatch_and_missing_pod_are_code_104() -> None:
    assert "uid" in expect_code(Code.POD_IDENTITY, FakeKube([pod()], NODE, NAMESPACE), uid="other")
    assert "does not exist" in expect_code(Code.POD_IDENTITY, FakeKube([kubeapi.NotFound("404")], NODE, NAMESPACE))


def test_missing_annotation_times_out_with_try_again_later() -> None:
    t0 = time.monotonic()
    fake = FakeKube([pod(None)], NODE, NAMESPACE)
    msg = expect_code(Code.TRY_AGAIN_LATER, fake, timeout=0.6)
    assert "has no netctl.io/port annotation after 0.6s" in msg
    assert 0.4 < time.monotonic() - t0 < 2 and fake.pod_gets >= 3  # polled about every 100 ms


def test_api_blip_is_retried_and_refusal_is_105() -> None:
    fake = FakeKube([kubeapi.ApiUnreachable("down"), pod()], NODE, NAMESPACE)
    assert resolve(fake) == ANNOTATION
    expect_code(Code.API_REFUSED, FakeKube([kubeapi.ApiError(403, "forbidden")], NODE, NAMESPACE))


# ---- nothing ever produces a traceback ------------------------------------------------------------

COMMANDS = st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC", "", "add", "FOO"])
TEXT = st.text(max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12)
CONF_KEYS = ["cniVersion", "name", "type", "kubeconfig", "nodeName", "ovsdb", "bridge", "ovsNetns",
             "annotationTimeoutSeconds", "serviceCidr", "nodeAddress", "dns", "prevResult", "logFile"]


@st.composite
def semi_valid_conf(draw: st.DrawFn) -> bytes:
    """A valid config with some keys replaced by arbitrary JSON; never a reachable OVSDB/API/log."""
    c = conf(cniVersion=draw(st.sampled_from([*SUPPORTED_VERSIONS, "0.3.1"])))
    for key in draw(st.lists(st.sampled_from(CONF_KEYS), max_size=4)):
        c[key] = draw(JSON_VALUES)
    c["ovsdb"] = f"unix:{NOWHERE}/db.sock"
    c["kubeconfig"] = f"{NOWHERE}/kubeconfig"
    c.pop("logFile", None)
    return json.dumps(c).encode()


STDIN = st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode()) | semi_valid_conf()


@st.composite
def cni_env(draw: st.DrawFn) -> dict[str, str]:
    env = {"CNI_COMMAND": draw(COMMANDS)}
    for var, good in (("CNI_CONTAINERID", "abc"), ("CNI_NETNS", f"{NOWHERE}/ns"), ("CNI_IFNAME", "eth0"),
                      ("CNI_PATH", "/opt/cni/bin"), ("CNI_ARGS", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b")):
        choice = draw(st.sampled_from(["good", "absent", "garbage"]))
        if choice == "good":
            env[var] = good
        elif choice == "garbage":
            env[var] = draw(st.text(alphabet=st.characters(blacklist_categories=["Cs"],
                                                           blacklist_characters="\x00"), max_size=30))
    return env


def check_output(rc: int, text: str) -> None:
    assert "Traceback" not in text
    doc = json.loads(text)  # exactly one JSON document
    if rc == 0:
        assert set(doc) == {"cniVersion", "supportedVersions"}, doc  # only VERSION can succeed here
    else:
        assert isinstance(doc, dict) and set(doc) <= ERROR_KEYS and {"cniVersion", "code", "msg"} <= set(doc)
        assert isinstance(doc["code"], int) and doc["code"] != Code.INTERNAL, doc
        assert isinstance(doc["msg"], str) and doc["msg"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env=cni_env(), stdin=STDIN)
def test_garbage_never_raises_and_always_answers_a_valid_error(env: dict[str, str], stdin: bytes) -> None:
    rc, text = run_inproc(env, stdin)
    check_output(rc, text)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env=cni_env(), stdin=STDIN)
def test_garbage_through_the_binary(env: dict[str, str], stdin: bytes) -> None:
    proc = subprocess.run([str(BINARY)], input=stdin, capture_output=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **{k: v for k, v in env.items() if "\x00" not in v}})
    check_output(proc.returncode, proc.stdout.decode())
    assert "Traceback" not in proc.stderr.decode()


def test_internal_errors_become_code_999(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any) -> None:
        raise KeyError("bug")

    monkeypatch.setitem(cni_plugin.VERBS, "DEL", boom)
    rc, text = run_inproc(env_for("DEL"), json.dumps(conf()).encode())
    doc = json.loads(text)
    assert rc == 1 and doc["code"] == Code.INTERNAL and "KeyError" in doc["details"]


def test_parse_env_result() -> None:
    inv = parse_env(env_for("ADD", CNI_PATH="/a:/b"))
    assert (inv.command, inv.container_id, inv.ifname, inv.path) == ("ADD", "abc123", "eth0", ("/a", "/b"))
    assert inv.args.pod_name == "p1"


def test_example_conflist_is_valid() -> None:
    """deploy/cni's example parses as the runtime hands it to us (name and cniVersion injected)."""
    doc = json.loads((Path(__file__).parents[1] / "deploy" / "cni" / "10-netctl.conflist.example").read_text())
    # cniVersion stays 1.0.0 for runtimes whose libcni predates 1.1 (containerd 1.6); newer ones pick
    # the highest of cniVersions they support, which is 1.1.0 (STATUS, GC).
    assert doc["cniVersion"] == "1.0.0" and doc["cniVersions"] == ["1.0.0", "1.1.0"]
    assert set(doc["cniVersions"]) <= set(SUPPORTED_VERSIONS)
    plugin, portmap = doc["plugins"]
    # hostPort support: the reference portmap after us, declaring the capability kubelet fills in
    assert portmap["type"] == "portmap" and portmap["capabilities"] == {"portMappings": True}
    for version in doc["cniVersions"]:
        nc = NetConf.from_dict({**plugin, "name": doc["name"], "cniVersion": version}, version, {})
        assert nc.type == "netctl-cni" and nc.kubeconfig and nc.ovs_netns == INIT_NETNS

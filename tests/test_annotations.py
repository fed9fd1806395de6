"""The `netctl.io/port` annotation: round trips, and every malformed input is an AnnotationError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netctl.annotations import PORT_ANNOTATION, TENANT_LABEL, AnnotationError, PortAnnotation

VALID = {
    "portId": "pod-7d0c1a2b",
    "mac": "0a:58:0a:01:00:05",
    "ip": "10.1.0.5/24",
    "gateway": "10.1.0.1",
    "mtu": 1400,
    "tenant": "alpha",
    "networkId": "netctl-alpha",
    "vlan": None,
}


def with_(**changes: Any) -> str:
    d = dict(VALID)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return json.dumps(d)


_DROP = object()


def test_constants() -> None:
    assert PORT_ANNOTATION == "netctl.io/port"
    assert TENANT_LABEL == "netctl.io/tenant"


def test_conventions_example_parses() -> None:
    a = PortAnnotation.from_json(json.dumps(VALID))
    assert a == PortAnnotation("pod-7d0c1a2b", "0a:58:0a:01:00:05", "10.1.0.5/24", "10.1.0.1", 1400,
                               "alpha", "netctl-alpha", None)
    assert str(a.interface.network) == "10.1.0.0/24"


def test_round_trip_and_camel_case_keys() -> None:
    a = PortAnnotation("pod-1", "0a:58:0a:01:00:07", "10.1.0.7/16", None, 9000, "beta", "net-b", vlan=42)
    text = a.to_json()
    assert json.loads(text) == {"portId": "pod-1", "mac": "0a:58:0a:01:00:07", "ip": "10.1.0.7/16",
                                "gateway": None, "mtu": 9000, "tenant": "beta", "networkId": "net-b",
                                "vlan": 42}
    assert PortAnnotation.from_json(text) == a
    assert PortAnnotation.from_json(text.encode()) == a


def test_vlan_may_be_absent_and_unknown_keys_are_ignored() -> None:
    assert PortAnnotation.from_json(with_(vlan=_DROP)).vlan is None
    assert PortAnnotation.from_json(with_(futureField={"x": 1})) == PortAnnotation.from_json(json.dumps(VALID))


def test_frozen() -> None:
    a = PortAnnotation.from_json(json.dumps(VALID))
    with pytest.raises(AttributeError):
        a.mtu = 1500  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"a string"', "must be a JSON object"),
        ("null", "must be a JSON object"),
        (with_(portId=_DROP), "portId"),
        (with_(mac=_DROP, ip=_DROP), "mac, ip"),
        (with_(portId=""), "portId"),
        (with_(portId=7), "portId"),
        (with_(tenant=None), "tenant"),
        (with_(networkId=[]), "networkId"),
        (with_(mac="0A:58:0A:01:00:05"), "mac"),
        (with_(mac="0a:58:0a:01:00"), "mac"),
        (with_(mac="0a-58-0a-01-00-05"), "mac"),
        (with_(mac="01:00:5e:00:00:01"), "unicast"),
        (with_(mac="00:00:00:00:00:00"), "zeros"),
        (with_(mac=5), "mac"),
        (with_(ip="10.1.0.5"), "ip"),
        (with_(ip="10.1.0.256/24"), "ip"),
        (with_(ip="10.1.0.5/33"), "ip"),
        (with_(ip="10.1.0.5/0"), "prefix"),
        (with_(ip="10.1.0.0/24"), "network or broadcast"),
        (with_(ip="10.1.0.255/24"), "network or broadcast"),
        (with_(ip="010.1.0.5/24"), "ip"),
        (with_(ip="fd00::5/64"), "ip"),
        (with_(ip=["10.1.0.5/24"]), "ip"),
        (with_(gateway="10.2.0.1"), "outside"),
        (with_(gateway="10.1.0.5"), "equals"),
        (with_(gateway="10.1.0"), "gateway"),
        (with_(gateway=1), "gateway"),
        (with_(mtu=575), "mtu"),
        (with_(mtu=9217), "mtu"),
        (with_(mtu="1400"), "mtu"),
        (with_(mtu=1400.0), "mtu"),
        (with_(mtu=True), "mtu"),
        (with_(mtu=_DROP), "mtu"),
        (with_(vlan=0), "vlan"),
        (with_(vlan=4095), "vlan"),
        (with_(vlan="7"), "vlan"),
        (with_(vlan=False), "vlan"),
    ],
)
def test_malformed_is_annotation_error_naming_the_problem(text: str, needle: str) -> None:
    with pytest.raises(AnnotationError) as exc:
        PortAnnotation.from_json(text)
    assert needle in str(exc.value)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("value", [None, 5, {"portId": "x"}, ["x"]])
def test_non_text_input(value: Any) -> None:
    with pytest.raises(AnnotationError):
        PortAnnotation.from_json(value)


def test_constructor_validates_too() -> None:
    with pytest.raises(AnnotationError):
        PortAnnotation("p", "0a:58:0a:01:00:05", "10.1.0.5/24", "10.9.0.1", 1400, "t", "n")


def test_deep_nesting_is_an_annotation_error() -> None:
    with pytest.raises(AnnotationError):
        PortAnnotation.from_json("[" * 100_000 + "]" * 100_000)


# -- generated -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def valid_annotations(draw: st.DrawFn) -> PortAnnotation:
    prefix = draw(st.integers(1, 30))
    host_bits = 32 - prefix
    net = draw(st.integers(0, 2**prefix - 1)) << host_bits
    ip_off = draw(st.integers(1, 2**host_bits - 2))
    ip = net + ip_off
    gw = None
    if draw(st.booleans()):
        gw_off = draw(st.integers(1, 2**host_bits - 2).filter(lambda o: o != ip_off))
        gw = net + gw_off
    dotted = ".".join(str((ip >> s) & 255) for s in (24, 16, 8, 0))
    mac = "0a:58:" + ":".join(f"{(ip >> s) & 255:02x}" for s in (24, 16, 8, 0))
    name = st.text(st.characters(codec="utf-8", exclude_categories=("Zs", "Cc")), min_size=1, max_size=20)
    return PortAnnotation(
        port_id=draw(name),
        mac=mac,
        ip=f"{dotted}/{prefix}",
        gateway=None if gw is None else ".".join(str((gw >> s) & 255) for s in (24, 16, 8, 0)),
        mtu=draw(st.integers(576, 9216)),
        tenant=draw(name),
        network_id=draw(name),
        vlan=draw(st.none() | st.integers(1, 4094)),
    )


@settings(max_examples=300)
@given(valid_annotations())
def test_generated_valid_annotations_round_trip(a: PortAnnotation) -> None:
    assert PortAnnotation.from_json(a.to_json()) == a


@settings(max_examples=500)
@given(st.text() | st.binary())
def test_garbage_text_is_always_annotation_error(text: str) -> None:
    with pytest.raises(AnnotationError):
        PortAnnotation.from_json(text)


@settings(max_examples=500)
@given(json_values)
def test_garbage_json_is_always_annotation_error(value: Any) -> None:
    with pytest.raises(AnnotationError):
        PortAnnotation.from_json(json.dumps(value))


@settings(max_examples=1000)
@given(st.sampled_from(sorted(VALID)), json_values)
def test_any_field_replaced_by_anything_never_raises_anything_else(key: str, value: Any) -> None:
    """One field of a valid annotation replaced by an arbitrary JSON value: either an
    AnnotationError, or (when the value happens to be valid) an annotation that round-trips."""
    data = dict(VALID, **{key: value})
    try:
        a = PortAnnotation.from_json(json.dumps(data))
    except AnnotationError:
        return
    assert PortAnnotation.from_json(a.to_json()) == a
